"""Decode benchmark: RetNet (recurrent state) against a same-size Llama (KV cache, SDPA), in one run.

Tokens/s, % of the memory-bandwidth ceiling and memory at each context and batch size, through generate() and
through a bare step loop. The ceiling: the bytes one step must read (every weight but the input embedding table,
plus RetNet's state read and written, or Llama's KV cache read and one token's written) over the fastest read
bandwidth plain PyTorch kernels reach in the same run (`measure_read_bandwidth`: the best of a matrix-vector
product, a [1, k] x [k, n] product and a sum over a 256 MB float32 matrix); `% sum ceiling` uses the x.sum()
probe of the header instead. This script parses arguments,
prints the machine, the models, a markdown table and the goals' figures, and saves decode.png, decode.md and
decode.json into --out.

Full run (defaults: 125M, contexts 512 2k 8k 16k, batch 1 and 8, 16 new tokens, 1 repeat): estimated 6-12
minutes on an idle 2-core CPU (from FLOP and byte counts and a 1k-token calibration, not a full run): mostly the
prefills at 8k-16k (Llama about 2 minutes at 16k, RetNet about 1) and Llama's batch-8 steps at 8k-16k (about 1 s
each: its KV cache is 4.8-9.7 GB). Llama batch 8 at 16k needs about 12 GB free, or it is skipped and says so.
Add 32k with --contexts 512,2k,8k,16k,32k (Llama's prefill alone then takes about 6 more minutes).
Quick run (tiny model, seconds): python -m benchmarks.decode --quick
"""

import argparse
import copy
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from retnet_hf.model import CACHE_NAME, RetNetCache, RetNetForCausalLM

from .common import (
    GB,
    MB,
    PeakMemory,
    add_common_arguments,
    available_memory_bytes,
    build_models,
    cache_bytes,
    describe_models,
    format_table,
    llama_kv_bytes,
    log_axes,
    measure_read_bandwidth,
    next_token,
    parse_ints,
    prepare_run,
    publish,
    pyplot,
    release_freed_memory,
    retnet_state_bytes,
    save_figure,
    size_config,
    timed,
    weight_bytes_per_token,
)


def _restorable_cache(model, prefilled, context: int, batch: int):
    """The prefilled batch-1 cache expanded to `batch` rows, and a function giving a cache at `context` tokens
    to decode from (RetNet: a copy of the small state; Llama: the same KV cache cropped back to `context`)."""
    cache = copy.deepcopy(prefilled)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    if isinstance(cache, RetNetCache):
        return cache, lambda: copy.deepcopy(cache)

    def cropped():
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)
        return cache

    return cache, cropped


def decode_benchmark(
    retnet: RetNetForCausalLM,
    llama: nn.Module,
    contexts: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 16,
    repeats: int = 1,
    bandwidths: Optional[Dict[str, float]] = None,
    paths: Sequence[str] = ("generate", "step"),
    memory_fraction: float = 0.8,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Decode speed and memory of RetNet (recurrent state) against Llama (DynamicCache KV cache, SDPA).

    For each context: a random prompt of `context` tokens is prefilled at batch 1 in one forward pass (RetNet in
    its default chunkwise form, Llama with SDPA; `prefill s`), and the cache is repeated to each batch size (the
    cost of a decode step does not depend on the tokens). Then, from that cache:

    - `generate`: `model.generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)` on the prompt plus its
      next token (N = `new_tokens`), with a streamer recording when each new token arrives; per step
      `(t_last - t_first) / (N - 1)`, which leaves out generate's set-up and the first forward;
    - `step`: a bare loop of N calls `model(token, **{CACHE_NAME: cache}, use_cache=True)`, greedy.

    Each row also gives the ceiling of memory-bound decoding: per step the weights (`weight_bytes_per_token`)
    are read once, and every row's state read and written (RetNet) or its KV cache at that context read and one
    token's keys and values written (Llama), so `ideal tokens/s = batch * bandwidth / (weight bytes + step cache
    bytes)`; `% ceiling` = measured / ideal with `bandwidths["read"]` (`measure_read_bandwidth()["best"]`),
    `% sum ceiling` with `bandwidths["sum"]` (`measure_bandwidth`, x.sum()); `ideal tokens/s` is the former. `cache MB` is the state or KV cache at the context (exact); `decode MB` is that plus the peak
    increase (`PeakMemory`) during a separate, untimed step loop of N tokens (a growing KV cache, activations,
    copies); the same figure is given for both paths.
    A (model, context, batch) point whose cache would not fit in `memory_fraction` of the available memory is
    skipped (a row with `skipped` set). Returns one row per model, context, batch and path.
    """
    device = next(retnet.parameters()).device
    models = (("RetNet", retnet), ("Llama", llama))
    weight_bytes = {name: weight_bytes_per_token(model) for name, model in models}
    element_size = next(llama.parameters()).element_size()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for context in contexts:
        prompt = torch.randint(0, retnet.config.vocab_size, (1, context), generator=generator).to(device)
        for name, model in models:
            needed = {
                batch: (
                    retnet_state_bytes(model.config, batch)
                    if name == "RetNet"
                    # the batch's cache, the batch-1 prefill and its copy, one layer's torch.cat per step
                    else llama_kv_bytes(model.config, context + new_tokens, batch, element_size)
                    * (1 + 2 / batch + 2 / model.config.num_hidden_layers)
                )
                for batch in batch_sizes
            }
            limit = memory_fraction * available_memory_bytes(device)
            if min(needed.values()) > limit:
                for batch in batch_sizes:
                    rows += [_skipped_row(name, context, batch, path, needed[batch]) for path in paths]
                continue
            log(f"decode: {name} prefill of {context} tokens")
            result = {}
            with torch.no_grad():
                prefill_seconds = timed(
                    lambda: result.update(out=model(prompt, use_cache=True, logits_to_keep=1)), device
                )
            out = result.pop("out")
            prefilled, first = getattr(out, CACHE_NAME), next_token(out.logits)
            del out
            for batch in batch_sizes:
                if needed[batch] > memory_fraction * available_memory_bytes(device):
                    rows += [_skipped_row(name, context, batch, path, needed[batch]) for path in paths]
                    continue
                log(f"decode: {name} context {context} batch {batch}")
                cache, fresh = _restorable_cache(model, prefilled, context, batch)
                held = cache_bytes(cache)
                ids = torch.cat([prompt, first], dim=1).expand(batch, -1).contiguous()
                seconds = {}
                with torch.no_grad():
                    if "generate" in paths:
                        seconds["generate"] = _generate_seconds_per_token(
                            model, ids, fresh, new_tokens, repeats, device
                        )
                    if "step" in paths:
                        seconds["step"] = _step_seconds_per_token(
                            model, first.expand(batch, -1), fresh, new_tokens, repeats, device
                        )
                    # memory in a pass of its own, so that the sampling thread cannot disturb the timings
                    with PeakMemory(device) as peak:
                        _step_seconds_per_token(model, first.expand(batch, -1), fresh, new_tokens, 1, device)
                cache_at_context = retnet_state_bytes(model.config, batch) if name == "RetNet" else held
                step_bytes = weight_bytes[name] + (
                    2 * cache_at_context
                    if name == "RetNet"
                    else cache_at_context + llama_kv_bytes(model.config, 1, batch, element_size)
                )
                ideal = {probe: batch * gbs * 1e9 / step_bytes for probe, gbs in (bandwidths or {}).items() if gbs}
                for path, per_token in seconds.items():
                    tokens_per_second = batch / per_token if per_token > 0 else float("nan")
                    rows.append(
                        {
                            "model": name,
                            "context": context,
                            "batch": batch,
                            "path": path,
                            "ms/step": per_token * 1e3,
                            "tokens/s": tokens_per_second,
                            "ideal tokens/s": ideal.get("read"),
                            "% ceiling": 100 * tokens_per_second / ideal["read"] if "read" in ideal else None,
                            "% sum ceiling": 100 * tokens_per_second / ideal["sum"] if "sum" in ideal else None,
                            "cache MB": cache_at_context / MB,
                            "decode MB": (held + peak.peak_bytes) / MB,
                            "prefill s": prefill_seconds,
                            "skipped": None,
                        }
                    )
                del cache, fresh
            del prefilled
            release_freed_memory()
    return rows


def _skipped_row(name, context, batch, path, needed_bytes) -> dict:
    return {
        "model": name,
        "context": context,
        "batch": batch,
        "path": path,
        "skipped": f"needs ~{needed_bytes / GB:.1f} GiB",
    }


class TimingStreamer:
    """A generate() streamer that only records when each new token arrives (`put` is called with the prompt
    first, then once per step with the new tokens)."""

    def __init__(self):
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _generate_seconds_per_token(model, ids, fresh_cache, new_tokens, repeats, device) -> float:
    """Per decode step inside `generate()`: the time between the first and the last new token (as a streamer
    receives them) over the steps between them, so generate's set-up, the first forward (the prompt's last token)
    and its wrap-up are left out; the median over `repeats` calls after a warm-up call."""
    mask = torch.ones_like(ids)
    steps = max(new_tokens, 2)

    def run():
        streamer = TimingStreamer()
        model.generate(
            ids,
            attention_mask=mask,
            **{CACHE_NAME: fresh_cache()},
            do_sample=False,
            min_new_tokens=steps,
            max_new_tokens=steps,
            pad_token_id=0,
            streamer=streamer,
        )
        assert len(streamer.times) == steps, len(streamer.times)
        return (streamer.times[-1] - streamer.times[0]) / (steps - 1)

    run()  # warm-up
    return statistics.median(run() for _ in range(repeats))


def _step_seconds_per_token(model, first, fresh_cache, new_tokens, repeats, device) -> float:
    def run():
        cache, token = fresh_cache(), first

        def loop():
            nonlocal token
            for _ in range(new_tokens):
                token = next_token(model(token, **{CACHE_NAME: cache}, use_cache=True).logits)

        return timed(loop, device) / new_tokens

    return statistics.median(run() for _ in range(repeats))


# The decode goals, as `decode_summary` checks them.
GOALS = {
    "% ceiling": {1: 95, 8: 60},  # RetNet's step loop, by batch size
    "flat from": 512,  # per-token time at the longest context within this of that at this context
    "flat within %": 2,
    "RetNet/Llama": {8192: 1.8, None: 1.0},  # tokens/s, by context (None: any other)
    "generate within %": 5,  # generate()'s per-token time vs the bare step loop
}


def decode_summary(rows: List[dict]) -> List[str]:
    """The issue's decode goals, read off the rows where they were measured."""

    def value(model, context, batch, path, key="ms/step"):
        for row in rows:
            if (row["model"], row["context"], row["batch"], row["path"]) == (
                model,
                context,
                batch,
                path,
            ) and not row.get("skipped"):
                return row[key]
        return None

    lines = []
    contexts = sorted({row["context"] for row in rows})
    batches = sorted({row["batch"] for row in rows})
    paths = [p for p in ("step", "generate") if any(row["path"] == p for row in rows)]
    for batch in batches:
        goal = GOALS["% ceiling"].get(batch)
        for context in contexts:
            shares = [value("RetNet", context, batch, "step", key) for key in ("% ceiling", "% sum ceiling")]
            if shares[0] is not None:
                lines.append(
                    f"RetNet step batch {batch} context {context}: {shares[0]:.0f}% of the ceiling "
                    f"({shares[1]:.0f}% with the x.sum() probe)" + (f" (goal: >= {goal}%)" if goal else "")
                )
    base = GOALS["flat from"] if GOALS["flat from"] in contexts else contexts[0]
    if contexts[-1] > base:
        for batch in batches:
            for path in paths:
                first, last = value("RetNet", base, batch, path), value("RetNet", contexts[-1], batch, path)
                if first and last:
                    lines.append(
                        f"RetNet {path} batch {batch}: per-token time at {contexts[-1]} is "
                        f"{last / first:.3f}x that at {base} (goal: within {GOALS['flat within %']}%)"
                    )
    for context in contexts:
        for batch in batches:
            for path in paths:
                ours, theirs = (
                    value("RetNet", context, batch, path, "tokens/s"),
                    value("Llama", context, batch, path, "tokens/s"),
                )
                if ours and theirs:
                    goal = GOALS["RetNet/Llama"].get(context, GOALS["RetNet/Llama"][None])
                    lines.append(
                        f"context {context} batch {batch} {path}: RetNet/Llama tokens/s = "
                        f"{ours / theirs:.2f}x (goal: >= {goal}x)"
                    )
    for model in ("RetNet", "Llama"):
        for context in contexts:
            for batch in batches:
                step, generate = value(model, context, batch, "step"), value(model, context, batch, "generate")
                if step and generate:
                    lines.append(
                        f"{model} context {context} batch {batch}: generate() per token is "
                        f"{100 * (generate / step - 1):+.1f}% vs the step loop "
                        f"(goal: within {GOALS['generate within %']}%)"
                    )
    return lines


def plot_decode(rows: List[dict], path: str, title: str = "") -> str:
    """Tokens/s and decode memory against the context, one line per model, path and batch; saved as PNG."""
    plt = pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    rows = [row for row in rows if not row.get("skipped")]
    for model, colour in (("RetNet", "tab:blue"), ("Llama", "tab:red")):
        for batch, marker in zip(sorted({row["batch"] for row in rows}), "os^v"):
            for kind, style in (("step", "-"), ("generate", "--")):
                points = sorted(
                    (row["context"], row["tokens/s"], row["decode MB"])
                    for row in rows
                    if (row["model"], row["batch"], row["path"]) == (model, batch, kind)
                )
                if points:
                    x, y, m = zip(*points)
                    label = f"{model} b{batch} {kind}"
                    speed.plot(x, y, style, color=colour, marker=marker, label=label)
                    if kind == "step":
                        memory.plot(x, m, style, color=colour, marker=marker, label=f"{model} b{batch}")
            ideal = sorted(
                (row["context"], row["ideal tokens/s"])
                for row in rows
                if row["ideal tokens/s"] and (row["model"], row["batch"], row["path"]) == (model, batch, "step")
            )
            if ideal:
                x, y = zip(*ideal)
                speed.plot(x, y, ":", color=colour, alpha=0.5, label=f"{model} b{batch} ceiling")
    for axis, label in ((speed, "tokens/s"), (memory, "decode memory (MB)")):
        log_axes(axis, "context (tokens)", label)
    return save_figure(plt, figure, title or "Decode: RetNet vs Llama (KV cache)", path)


COLUMNS = [
    "model",
    "context",
    "batch",
    "path",
    "ms/step",
    "tokens/s",
    "ideal tokens/s",
    "% ceiling",
    "% sum ceiling",
    "cache MB",
    "decode MB",
    "prefill s",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--contexts",
        type=parse_ints,
        default=None,
        help="context lengths, e.g. '512,2k,8k,16k' (default; 32k if memory allows is opt-in)",
    )
    parser.add_argument("--batch-sizes", type=parse_ints, default=None, help="default '1,8'")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed per point; default 16")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many timings; default 1")
    parser.add_argument("--paths", default="generate,step", help="'generate,step' (default), or one of them")
    args = parser.parse_args(argv)
    quick = args.quick
    if quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.contexts = args.contexts or ([32, 64] if quick else [256, 512, 2048, 8192, 16384])
    args.batch_sizes = args.batch_sizes or ([1, 2] if quick else [1, 8])
    args.new_tokens = args.new_tokens or (4 if quick else 16)
    args.paths = [path for path in args.paths.replace(",", " ").split()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = prepare_run(args)
    # the probe on a 256 MB matrix (smaller when --bandwidth-mb, the x.sum() tensor, is)
    read_bandwidth = measure_read_bandwidth(min(256, args.bandwidth_mb), device=args.device)
    run["header"] += "\nfastest read of plain PyTorch kernels: " + ", ".join(
        f"{name} {gbs:.1f} GB/s" for name, gbs in read_bandwidth.items()
    )
    retnet_config = size_config(args.size)
    retnet, llama = build_models(retnet_config, dtype=run["dtype"], device=args.device, seed=args.seed)
    settings = (
        f"settings: size {args.size}, {args.dtype}, contexts {args.contexts}, batch sizes {args.batch_sizes}, "
        f"{args.new_tokens} new tokens, {args.repeats} repeat(s), paths {args.paths}"
    )
    print(run["header"], describe_models(retnet, llama), settings, sep="\n", flush=True)
    rows = decode_benchmark(
        retnet,
        llama,
        args.contexts,
        args.batch_sizes,
        args.new_tokens,
        args.repeats,
        {"read": read_bandwidth["best"], "sum": run["bandwidth"]},
        args.paths,
        seed=args.seed,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = format_table(rows, COLUMNS)
    summary = "\n".join(f"- {line}" for line in decode_summary(rows))
    note = (
        "ms/step: time per decode step (generate: between the first and the last new token, as a streamer "
        "sees them); tokens/s = batch / step time; ideal: batch * read bandwidth / (non-embedding weight bytes + "
        "RetNet's state read and written or Llama's KV cache read and one token's written), read bandwidth the "
        "best of mv, [1,k]x[k,n] and sum; % sum ceiling: the same with the x.sum() bandwidth; decode MB: cache + "
        f"peak increase during an untimed step loop ({PeakMemory(args.device).method})."
    )
    preamble = [run["header"], describe_models(retnet, llama), settings]
    png = plot_decode(rows, f"{args.out}/decode.png", f"Decode, RetNet vs Llama ({args.size}, {args.dtype})")
    publish(args.out, "decode", preamble, [table, note, summary], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
