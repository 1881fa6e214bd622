"""Decode benchmark: RetNet (recurrent state) against a same-size Llama (KV cache, SDPA), in one run.

Tokens/s, % of the memory-bandwidth ceiling and memory at each context and batch size, through generate() and
through a bare step loop. The ceiling: the bytes one step must read (every weight but the input embedding table,
plus RetNet's state read and written, or Llama's KV cache read and one token's written) over the fastest read
bandwidth plain PyTorch kernels reach in the same run (`measure_read_bandwidth`: the best of a matrix-vector
product, a [1, k] x [k, n] product and a sum over a 256 MB float32 matrix); `% sum ceiling` uses the x.sum()
probe of the header instead. This script parses arguments,
prints the machine, the models, a markdown table and the goals' figures, and saves decode.png, decode.md and
decode.json into --out.

At each context and batch size both models' caches are alive at once and the timings are taken in rounds, each
of which runs RetNet's and Llama's generate() and step loop once in turn, so that the RetNet/Llama and generate/step
ratios compare timings taken moments apart (the shared machines these run on drift by 10% over minutes): the
medians over rounds, and the paired ratios (`x Llama tokens/s`, `x step time`: the median of each round's ratio).

Full run (defaults: 125M, contexts 256 512 2k 8k 16k, batch 1 and 8, 16 new tokens, 3 rounds): estimated 25-35
minutes on an idle 2-core CPU (from the per-step times of the 2026-12-01 run in docs/benchmarks.md, not timed as a
whole). Each model runs about 116 forwards per context and batch (3 rounds x 2 paths x 16 steps, the memory pass's
16, a 2-token warm-up per path); most of the time goes to Llama's batch-8 steps at 8k-16k (3-7 s each: its KV
cache is 4.8-9.7 GB; about 20 minutes), then to the prefills at 8k-16k (Llama about 2 minutes at 16k, RetNet
about 1). Llama batch 8 at 16k is timed when about 16 GiB are available (the guard counts 12.8 GiB for it: the KV
cache, the prefill and its copy, one layer's torch.cat; and 0.2 GiB for RetNet's state beside it), or it is skipped
and says so. Add 32k with --contexts 256,512,2k,8k,16k,32k (Llama's prefill alone then takes about 6 more minutes,
its batch-1 steps about 4; its batch 8 is skipped on a 23.5 GiB machine).
Quick run (tiny model, seconds): python -m benchmarks.decode --quick

On a GPU: --device cuda --dtype bfloat16, and --paths generate,step,compiled adds the `compiled` path: generate()
through transformers' compile path (`compile_config`: torch.compile of the forward for the one-token steps, with
CUDA graphs in inductor's "reduce-overhead" mode), RetNet on its own cache (`RetNetCache`, whose recurrent states
keep their addresses), Llama on a `StaticCache` sized for each context. Its rows say whether generate() did compile
(`compiled`); where transformers would not, the figures are eager ones and say so. --retention-backend picks
RetNet's retention (auto, the default: flash-linear-attention's kernels on CUDA where installed; torch; fla).
"""

import argparse
import copy
import functools
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
    error_summary,
    fla_backend_unavailable,
    format_table,
    interleaved_timings,
    llama_kv_bytes,
    log_axes,
    measure_read_bandwidth,
    next_token,
    paired_median_ratio,
    parse_ints,
    prepare_run,
    publish,
    pyplot,
    release_freed_memory,
    retnet_state_bytes,
    save_figure,
    save_partial,
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


WARM_UP_TOKENS = 2  # new tokens of the untimed run of every (model, path) before a point's rounds
# ... of the compiled path: the compile, then CUDA graph trees' warm-up run, recording run and a replay
COMPILED_WARM_UP_TOKENS = 5


def decode_bytes_needed(model: nn.Module, context: int, batch: int, new_tokens: int, compiled: bool = False) -> float:
    """What one model's decode point keeps alive at once, in bytes (the memory guard's estimate): RetNet the
    batch's state, a run's copy of it and the batch-1 prefill's; Llama the batch's KV cache at `context +
    new_tokens` tokens, the batch-1 prefill's and its copy, and one layer's torch.cat per step. With `compiled`
    (the compiled path), one more state or static KV cache of the batch."""
    if isinstance(model, RetNetForCausalLM):
        return retnet_state_bytes(model.config, batch) * (2 + 1 / batch + compiled)
    kv = llama_kv_bytes(model.config, context + new_tokens, batch, next(model.parameters()).element_size())
    return kv * (1 + 2 / batch + 2 / model.config.num_hidden_layers + compiled)


def decode_benchmark(
    retnet: RetNetForCausalLM,
    llama: nn.Module,
    contexts: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 16,
    rounds: int = 3,
    bandwidths: Optional[Dict[str, float]] = None,
    paths: Sequence[str] = ("generate", "step"),
    memory_fraction: float = 0.8,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
    compile_config=None,
    progress: Callable[[List[dict]], None] = lambda rows: None,
) -> List[dict]:
    """Decode speed and memory of RetNet (recurrent state) against Llama (DynamicCache KV cache, SDPA), the two
    timed side by side.

    For each context: a random prompt of `context` tokens is prefilled at batch 1 in one forward pass by each model
    (RetNet in its default chunkwise form, Llama with SDPA; `prefill s`, one timing each), and each cache is
    repeated to each batch size (the cost of a decode step does not depend on the tokens). Then, from those caches,
    per (model, path):

    - `generate`: `model.generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)` on the prompt plus its
      next token (N = `new_tokens`), with a streamer recording when each new token arrives; per step
      `(t_last - t_first) / (N - 1)`, which leaves out generate's set-up and the first forward;
    - `step`: a bare loop of N calls `model(token, **{CACHE_NAME: cache}, use_cache=True)`, greedy; per step its
      time over N;
    - `compiled` (opt-in): generate() as above but through transformers' compile path (`compile_config`, by default
      `CompileConfig()`: inductor, CUDA graphs), from an empty cache that keeps its tensors' addresses from call to
      call (reset in place): RetNet's `RetNetCache`, one per batch size, and a `StaticCache` of `context + 1 + N`
      tokens per point for Llama; generate() prefills the prompt itself (eagerly) and compiles the one-token steps.
      `compiled` says whether it did (transformers compiles no cache of growing size, and on a CPU only models
      that ask for it, as RetNet does); its warm-up run (`COMPILED_WARM_UP_TOKENS`) compiles and records the
      graphs. A (model, path) that raises is a row that says so, and the others go on.

    At each (context, batch) both models' caches are alive at once and, after one untimed run of every (model,
    path) with `WARM_UP_TOKENS` new tokens, the timings are taken in `rounds` rounds (`interleaved_timings`): each
    round runs every (model, path) once, in a rotating order, so that the figures of one round were taken moments
    apart on a machine whose speed drifts. `ms/step` is the median over rounds (`ms/step by round`: each round's);
    `x Llama tokens/s` (RetNet's rows) is the median over rounds of Llama's per-step time over RetNet's in the same
    round and path, RetNet's tokens/s as a multiple of Llama's; `x step time` (generate rows) is the median over
    rounds of the model's generate per-step time over its step loop's in the same round (`paired_median_ratio`).

    Each row also gives the ceiling of memory-bound decoding: per step the weights (`weight_bytes_per_token`)
    are read once, and every row's state read and written (RetNet) or its KV cache at that context read and one
    token's keys and values written (Llama), so `ideal tokens/s = batch * bandwidth / (weight bytes + step cache
    bytes)`; `% ceiling` = measured / ideal with `bandwidths["read"]` (`measure_read_bandwidth()["best"]`),
    `% sum ceiling` with `bandwidths["sum"]` (`measure_bandwidth`, x.sum()); `ideal tokens/s` is the former.
    `cache MB` is the state or KV cache at the context (exact); `decode MB` is that plus the peak increase
    (`PeakMemory`) during a separate, untimed step loop of N tokens after the rounds (a growing KV cache,
    activations, copies); the same figure is given for both paths.
    A model is not prefilled at a context where even its smallest batch's `decode_bytes_needed` exceeds
    `memory_fraction` of the available memory, and at each batch the models are admitted in turn (RetNet first)
    while the sum of their `decode_bytes_needed` fits in it, since their caches are alive together; a point left
    out is a row with `skipped` set, and a model admitted alone is timed alone (no paired ratio). Returns one row
    per model, context, batch and path, those of one (context, batch) together; `progress` gets the rows so far
    after each context.
    """
    device = next(retnet.parameters()).device
    models = {"RetNet": retnet, "Llama": llama}
    compiled = "compiled" in paths
    if compiled and compile_config is None:
        from transformers import CompileConfig

        compile_config = CompileConfig()
    compiled_caches = {}  # RetNet's, by batch size: the same tensors for every context
    weight_bytes = {name: weight_bytes_per_token(model) for name, model in models.items()}
    element_size = next(llama.parameters()).element_size()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for context in contexts:
        prompt = torch.randint(0, retnet.config.vocab_size, (1, context), generator=generator).to(device)
        needed = {
            name: {batch: decode_bytes_needed(model, context, batch, new_tokens, compiled) for batch in batch_sizes}
            for name, model in models.items()
        }
        prefilled = {}  # name -> (batch-1 cache, its next token, prefill seconds)
        for name, model in models.items():
            if min(needed[name].values()) > memory_fraction * available_memory_bytes(device):
                continue
            log(f"decode: {name} prefill of {context} tokens")
            result = {}
            with torch.no_grad():
                prefill_seconds = timed(
                    lambda: result.update(out=model(prompt, use_cache=True, logits_to_keep=1)), device
                )
            out = result.pop("out")
            prefilled[name] = (getattr(out, CACHE_NAME), next_token(out.logits), prefill_seconds)
            del out
        for batch in batch_sizes:
            limit, admitted, points, skipped = memory_fraction * available_memory_bytes(device), 0.0, {}, {}
            for name, model in models.items():
                if name not in prefilled:  # too large at this context for any batch size
                    skipped[name] = [_skipped_row(name, context, batch, path, needed[name][batch]) for path in paths]
                    continue
                alive = admitted + needed[name][batch]
                if alive > limit:
                    note = f" with {', '.join(points)}'s cache" if points else ""
                    skipped[name] = [_skipped_row(name, context, batch, path, alive, note) for path in paths]
                    continue
                admitted = alive
                points[name] = _decode_point(model, prefilled[name][0], prefilled[name][1], prompt, batch)
                if compiled:
                    points[name]["compiled"] = _compiled_cache(model, compiled_caches, context, batch, new_tokens)
            if points:
                log(f"decode: {' and '.join(points)} context {context} batch {batch}, {rounds} rounds")
                seconds, peaks, notes = _time_side_by_side(
                    models, points, paths, new_tokens, rounds, device, compile_config
                )
            for name, model in models.items():
                if name in skipped:
                    rows += skipped[name]
                    continue
                held = points[name]["held"]
                cache_at_context = retnet_state_bytes(model.config, batch) if name == "RetNet" else held
                step_bytes = weight_bytes[name] + (
                    2 * cache_at_context
                    if name == "RetNet"
                    else cache_at_context + llama_kv_bytes(model.config, 1, batch, element_size)
                )
                ideal = {probe: batch * gbs * 1e9 / step_bytes for probe, gbs in (bandwidths or {}).items() if gbs}
                for path in paths:
                    if (name, path) not in seconds:  # it raised
                        rows.append({**_skipped_row(name, context, batch, path, 0), "skipped": notes[(name, path)]})
                        continue
                    per_round = seconds[(name, path)]
                    per_token = statistics.median(per_round)
                    tokens_per_second = batch / per_token if per_token > 0 else float("nan")
                    versus_llama = versus_step = None
                    if name == "RetNet" and ("Llama", path) in seconds:
                        versus_llama = paired_median_ratio(seconds[("Llama", path)], per_round)
                    if path == "generate" and (name, "step") in seconds:
                        versus_step = paired_median_ratio(per_round, seconds[(name, "step")])
                    rows.append(
                        {
                            "model": name,
                            "context": context,
                            "batch": batch,
                            "path": path,
                            "compiled": notes.get((name, path)),
                            "ms/step": per_token * 1e3,
                            "tokens/s": tokens_per_second,
                            "x Llama tokens/s": versus_llama,
                            "x step time": versus_step,
                            "ideal tokens/s": ideal.get("read"),
                            "% ceiling": 100 * tokens_per_second / ideal["read"] if "read" in ideal else None,
                            "% sum ceiling": 100 * tokens_per_second / ideal["sum"] if "sum" in ideal else None,
                            "cache MB": cache_at_context / MB,
                            "decode MB": (held + peaks[name].peak_bytes) / MB,
                            "prefill s": prefilled[name][2],
                            "ms/step by round": [value * 1e3 for value in per_round],
                            "skipped": None,
                        }
                    )
            del points
            release_freed_memory()
        del prefilled
        release_freed_memory()
        progress(rows)
    return rows


def _skipped_row(name, context, batch, path, needed_bytes, note="") -> dict:
    return {
        "model": name,
        "context": context,
        "batch": batch,
        "path": path,
        "skipped": f"needs ~{needed_bytes / GB:.1f} GiB{note}",
    }


def _decode_point(model, prefilled, first, prompt, batch: int) -> dict:
    """What one model decodes from at a batch size: `fresh` (a function giving a cache at the context, see
    `_restorable_cache`), `held` (bytes of that cache), `first` (the prompt's next token per row) and `ids` (the
    prompt and that token per row, for generate())."""
    context = prompt.shape[1]
    cache, fresh = _restorable_cache(model, prefilled, context, batch)
    return dict(
        fresh=fresh,
        held=cache_bytes(cache),
        first=first.expand(batch, -1),
        ids=torch.cat([prompt, first], dim=1).expand(batch, -1).contiguous(),
    )


def _compiled_cache(model, compiled_caches: dict, context: int, batch: int, new_tokens: int) -> Callable:
    """For the compiled path: a function giving the model's empty cache of static addresses, reset in place (RetNet:
    a `RetNetCache` per batch size, kept in `compiled_caches`; Llama: a `StaticCache` of this context's size)."""
    if isinstance(model, RetNetForCausalLM):
        cache = compiled_caches.setdefault(batch, RetNetCache(model.config.decoder_layers))
    else:
        from transformers import StaticCache

        steps = max(new_tokens, COMPILED_WARM_UP_TOKENS)
        cache = StaticCache(config=model.config, max_cache_len=context + 1 + steps)

    def reset():
        cache.reset()
        return cache

    return reset


def _time_side_by_side(models, points, paths, new_tokens, rounds, device, compile_config=None):
    """Times every (model, path) of one context and batch side by side: one untimed run of each with
    `WARM_UP_TOKENS` new tokens (`COMPILED_WARM_UP_TOKENS` for the compiled path), then `rounds` rounds of
    `interleaved_timings` (each runs every (model, path) once: in the order of `paths`, RetNet before Llama,
    rotated by one each round), then per model an untimed step loop inside `PeakMemory`. Returns each (model,
    path)'s seconds per step, one per round, each model's `PeakMemory`, and notes by (model, path): for the
    compiled path whether generate() compiled, and for a (model, path) whose warm-up raised (left out of the
    rounds) what it raised."""
    runs, notes = {}, {}
    for path in paths:
        for name, point in points.items():
            if path == "generate":
                runs[(name, path)] = functools.partial(
                    _generate_seconds_per_token, models[name], point["ids"], point["fresh"]
                )
            elif path == "compiled":
                runs[(name, path)] = functools.partial(
                    _generate_seconds_per_token,
                    models[name],
                    point["ids"],
                    point["compiled"],
                    compile_config=compile_config,
                )
            else:
                runs[(name, path)] = functools.partial(
                    _step_seconds_per_token, models[name], point["first"], point["fresh"], device=device
                )
    with torch.no_grad():
        for key, run in list(runs.items()):
            try:
                run(COMPILED_WARM_UP_TOKENS if key[1] == "compiled" else WARM_UP_TOKENS)
            except Exception as error:  # e.g. a compile that fails: the other (model, path)s go on
                notes[key] = f"failed: {error_summary(error)}"
                del runs[key]
                continue
            if key[1] == "compiled":
                notes[key] = "yes" if hasattr(models[key[0]], "_compiled_call") else "no: generate() ran eager"
        seconds = interleaved_timings({key: functools.partial(run, new_tokens) for key, run in runs.items()}, rounds)
        peaks = {}
        for name, point in points.items():
            # memory in a pass of its own, so that the sampling thread cannot disturb the timings
            with PeakMemory(device) as peaks[name]:
                _step_seconds_per_token(models[name], point["first"], point["fresh"], new_tokens, device)
    return seconds, peaks, notes


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


def _generate_seconds_per_token(model, ids, fresh_cache, new_tokens, **generate_kwargs) -> float:
    """Seconds per decode step inside one `generate()` call (with `generate_kwargs`) of `max(new_tokens, 2)` new
    tokens from a fresh cache: the time between the first and the last new token (as a streamer receives them) over
    the steps between them, so generate's set-up, the first forward (the prompt's last token, or the whole prompt
    from an empty cache) and its wrap-up are left out."""
    steps = max(new_tokens, 2)
    streamer = TimingStreamer()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **{CACHE_NAME: fresh_cache()},
        do_sample=False,
        min_new_tokens=steps,
        max_new_tokens=steps,
        pad_token_id=0,
        streamer=streamer,
        **generate_kwargs,
    )
    assert len(streamer.times) == steps, len(streamer.times)
    return (streamer.times[-1] - streamer.times[0]) / (steps - 1)


def _step_seconds_per_token(model, first, fresh_cache, new_tokens, device) -> float:
    """Seconds per decode step of one bare greedy loop of `new_tokens` steps from a fresh cache."""
    cache, token = fresh_cache(), first

    def loop():
        nonlocal token
        for _ in range(new_tokens):
            token = next_token(model(token, **{CACHE_NAME: cache}, use_cache=True).logits)

    return timed(loop, device) / new_tokens


# The decode goals, as `decode_summary` checks them.
GOALS = {
    "% ceiling": {1: 95, 8: 60},  # RetNet's step loop, by batch size
    "flat from": 512,  # per-token time at the longest context within this of that at this context
    "flat within %": 2,
    "RetNet/Llama": {8192: 1.8, None: 1.0},  # tokens/s, by context (None: any other)
    "generate within %": 5,  # generate()'s per-token time vs the bare step loop
}


def decode_summary(rows: List[dict]) -> List[str]:
    """The issue's decode goals, read off the rows where they were measured: RetNet's share of the ceiling and
    its per-token time at the longest context over that at 512 (from the medians), RetNet/Llama tokens/s (the
    rows' paired `x Llama tokens/s`) and generate() against the step loop (the paired `x step time`); and where
    the compiled path ran eager."""

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
    paths = [p for p in ("step", "generate", "compiled") if any(row["path"] == p for row in rows)]
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
                ratio = value("RetNet", context, batch, path, "x Llama tokens/s")
                if ratio:
                    goal = GOALS["RetNet/Llama"].get(context, GOALS["RetNet/Llama"][None])
                    lines.append(
                        f"context {context} batch {batch} {path}: RetNet/Llama tokens/s = {ratio:.2f}x, "
                        f"paired per round (goal: >= {goal}x)"
                    )
    for model in ("RetNet", "Llama"):
        for context in contexts:
            for batch in batches:
                ratio = value(model, context, batch, "generate", "x step time")
                if ratio:
                    lines.append(
                        f"{model} context {context} batch {batch}: generate() per token is "
                        f"{100 * (ratio - 1):+.1f}% vs the step loop, paired per round "
                        f"(goal: within {GOALS['generate within %']}%)"
                    )
    for model in ("RetNet", "Llama"):  # the compiled path's figures are eager ones where generate() did not compile
        eager = sorted(
            {
                row["context"]
                for row in rows
                if row["model"] == model
                and row.get("compiled", "") != "yes"
                and row["path"] == "compiled"
                and not row.get("skipped")
            }
        )
        if eager:
            lines.append(f"{model} compiled path: generate() did not compile at contexts {eager}: eager figures")
    return lines


def plot_decode(rows: List[dict], path: str, title: str = "") -> str:
    """Tokens/s and decode memory against the context, one line per model, path and batch; saved as PNG."""
    plt = pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    rows = [row for row in rows if not row.get("skipped")]
    for model, colour in (("RetNet", "tab:blue"), ("Llama", "tab:red")):
        for batch, marker in zip(sorted({row["batch"] for row in rows}), "os^v"):
            for kind, style in (("step", "-"), ("generate", "--"), ("compiled", "-.")):
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


PATHS = ("generate", "step", "compiled")

COLUMNS = [
    "model",
    "context",
    "batch",
    "path",
    "compiled",
    "ms/step",
    "tokens/s",
    "x Llama tokens/s",
    "x step time",
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
        help="context lengths; default '256,512,2k,8k,16k' (32k, if memory allows, is opt-in)",
    )
    parser.add_argument("--batch-sizes", type=parse_ints, default=None, help="default '1,8'")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed per point; default 16")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds: each times every (model, path) of a context and batch once, side by side; medians and "
        "paired ratios over them; default 3",
    )
    parser.add_argument(
        "--paths",
        default="generate,step",
        help="'generate,step' (default), or one of them; add 'compiled' for generate() through transformers' "
        "compile path",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled path; default inductor"
    )
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help="inductor's mode for the compiled path ('reduce-overhead': CUDA graphs; 'none' for none); default "
        "reduce-overhead",
    )
    parser.add_argument(
        "--retention-backend",
        choices=("auto", "torch", "fla"),
        default=None,
        help="RetNet's retention_backend (default: the config's, auto: fla's kernels on CUDA where installed)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.contexts = args.contexts or ([32, 64] if quick else [256, 512, 2048, 8192, 16384])
    args.batch_sizes = args.batch_sizes or ([1, 2] if quick else [1, 8])
    args.new_tokens = args.new_tokens or (4 if quick else 16)
    args.paths = [path for path in args.paths.replace(",", " ").split()]
    unknown = [path for path in args.paths if path not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
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
    if args.retention_backend:
        retnet.config.retention_backend = args.retention_backend
    compile_config = None
    if "compiled" in args.paths:
        from transformers import CompileConfig

        mode = None if args.compile_mode == "none" or args.compile_backend != "inductor" else args.compile_mode
        compile_config = CompileConfig(backend=args.compile_backend, mode=mode)
    backend = getattr(retnet.config, "retention_backend", "torch")
    fla_note = fla_backend_unavailable(args.device, run["dtype"]) if backend != "torch" else None
    settings = (
        f"settings: size {args.size}, {args.dtype}, device {args.device}, contexts {args.contexts}, batch sizes "
        f"{args.batch_sizes}, {args.new_tokens} new tokens, {args.repeats} round(s), paths {args.paths}, RetNet "
        f"retention_backend {backend}" + (f" (runs torch: {fla_note})" if fla_note else "")
    )
    if compile_config is not None:
        settings += f", compiled path: backend {compile_config.backend}, mode {compile_config.mode}"
    preamble = [run["header"], describe_models(retnet, llama), settings]
    print(*preamble, sep="\n", flush=True)
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
        compile_config=compile_config,
        progress=lambda rows: save_partial(args.out, "decode", preamble, rows, COLUMNS),
    )
    table = format_table(rows, COLUMNS)
    summary = "\n".join(f"- {line}" for line in decode_summary(rows))
    note = (
        "ms/step: time per decode step (generate: between the first and the last new token, as a streamer "
        f"sees them), the median over {args.repeats} round(s), each of which timed every (model, path) of the "
        "context and batch once, side by side; x Llama tokens/s: RetNet's tokens/s over Llama's, the median over "
        "rounds of the ratio within a round (same path); x step time: generate()'s per-step time over the step "
        "loop's, the same way; compiled: generate() through transformers' compile path (yes: it compiled the "
        "one-token steps; no: it ran them eager); tokens/s = batch / step time; ideal: batch * read bandwidth / (non-embedding "
        "weight bytes + RetNet's state read and written or Llama's KV cache read and one token's written), read "
        "bandwidth the best of mv, [1,k]x[k,n] and sum; % sum ceiling: the same with the x.sum() bandwidth; "
        f"decode MB: cache + peak increase during an untimed step loop ({PeakMemory(args.device).method})."
    )
    png = plot_decode(rows, f"{args.out}/decode.png", f"Decode, RetNet vs Llama ({args.size}, {args.dtype})")
    publish(args.out, "decode", preamble, [table, note, summary], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
