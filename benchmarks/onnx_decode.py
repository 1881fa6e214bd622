"""Decode benchmark: the ONNX Runtime runner of `retnet-hf export-onnx` against PyTorch eager and a torch.compile'd
one-token step, at batch 1 on the CPU, float32.

Per path: a prefill of --context random tokens (PyTorch: one call in the model's chunkwise form; ONNX Runtime: the
runner's chunk loop over prefill.onnx), then --new-tokens greedy one-token steps, timed after two warm-up steps
(median over --repeats loops); `same tokens` says whether the path chose the eager path's tokens. `setup s` is the
export (ONNX Runtime: export, check and session start) or the compilation (the compiled step's first calls).

- `PyTorch eager`: `model(token, cache=cache, use_cache=True)`, the recurrent form;
- `PyTorch compiled`: `torch.compile` (inductor, default options) of a function doing the same step on plain
  tensors (states and count in, logits and states out); the count is a Python int, which dynamo makes dynamic
  after its first change (one recompilation, then none);
- `ONNX Runtime`: `OnnxRetNet.step` on step.onnx (numpy in and out), with as many intra-op threads as torch.

The script prints the machine (its load average too: timings on a shared machine are upper bounds), the model, a
markdown table, and saves onnx_decode.png, .md and .json into --out. A default run (retnet_base, 51.8M
parameters, context 512, 64 new tokens, 3 repeats) took 5 minutes on a shared 2-core machine (load average 5),
most of it the export (75 s) and the compilation (81 s). Quick run (tiny model): python -m benchmarks.onnx_decode --quick --paths eager,onnx
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from retnet_hf.model import CACHE_NAME, RetNetCache, RetNetForCausalLM

from .common import (
    add_common_arguments,
    describe_models,
    format_table,
    load_average,
    prepare_run,
    publish,
    pyplot,
    save_figure,
    size_config,
    timed,
)


PATHS = {"eager": "PyTorch eager", "compiled": "PyTorch compiled", "onnx": "ONNX Runtime"}
COLUMNS = ["path", "batch", "context", "ms/step", "tokens/s", "vs eager", "prefill s", "setup s", "same tokens"]


class EagerStepper:
    """PyTorch's decode step through the model's own cache."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        self.cache = getattr(out, CACHE_NAME)
        return int(out.logits[0, -1].argmax())

    def step(self, token: int) -> int:
        ids = torch.tensor([[token]])
        return int(self.model(ids, **{CACHE_NAME: self.cache}, use_cache=True).logits[0, -1].argmax())


class CompiledStepper(EagerStepper):
    """`torch.compile` of the step on plain tensors: the states and the count in, the logits and states out."""

    def __init__(self, model):
        super().__init__(model)
        layers = model.config.decoder_layers

        def step(ids, states, num_tokens):
            cache = RetNetCache.from_states([(states[2 * i], states[2 * i + 1]) for i in range(layers)], num_tokens)
            logits = model(ids, cache=cache, use_cache=True, retention_form="recurrent").logits[:, -1]
            return logits, [tensor for state in cache.states for tensor in state]

        self.compiled = torch.compile(step)

    def prefill(self, ids):
        token = super().prefill(ids)
        self.states = [tensor for state in self.cache.states for tensor in state]
        self.count = self.cache.num_tokens
        return token

    def step(self, token: int) -> int:
        logits, self.states = self.compiled(torch.tensor([[token]]), self.states, self.count)
        self.count += 1
        return int(logits[0].argmax())


class OnnxStepper:
    """The ONNX Runtime runner's prefill (chunk loop) and step."""

    def __init__(self, runner):
        self.runner = runner

    def prefill(self, ids: torch.Tensor) -> int:
        logits, self.states, self.count = self.runner.prefill(ids.numpy())
        return int(logits[0].argmax())

    def step(self, token: int) -> int:
        logits, self.states = self.runner.step(np.array([token]), self.states, self.count)
        self.count += 1
        return int(logits[0].argmax())


def decode_tokens(stepper, prompt: torch.Tensor, new_tokens: int, repeats: int) -> Dict[str, object]:
    """Prefill (timed), two warm-up steps, then `repeats` timed loops of `new_tokens` steps, each from the same
    prefilled state; the median seconds per step and the tokens the first loop chose."""
    seconds, tokens = [], None
    prefill_seconds = []
    for _ in range(repeats):
        result = {}
        prefill_seconds.append(timed(lambda: result.update(token=stepper.prefill(prompt))))
        token = result["token"]
        for _ in range(2):  # warm-up; the compiled step compiles (and recompiles once) here
            token = stepper.step(token)
        chosen = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = stepper.step(token)
            chosen.append(token)
        seconds.append((time.perf_counter() - start) / new_tokens)
        tokens = tokens or chosen
    return {"per_step": statistics.median(seconds), "prefill": statistics.median(prefill_seconds), "tokens": tokens}


def onnx_decode_benchmark(
    model: RetNetForCausalLM,
    runner,
    paths: List[str],
    context: int,
    new_tokens: int,
    repeats: int,
    setup_seconds: Optional[Dict[str, float]] = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """One row per path of `paths` (keys of PATHS) at batch 1; `runner` is an `OnnxRetNet` (for "onnx")."""
    setup_seconds = dict(setup_seconds or {})
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    rows, reference = [], None
    for path in ["eager"] + [p for p in paths if p != "eager"]:
        log(f"onnx_decode: {PATHS[path]}")
        if path == "eager":
            stepper = EagerStepper(model)
        elif path == "compiled":
            stepper = CompiledStepper(model)
            start = time.perf_counter()
            with torch.no_grad():
                stepper.prefill(prompt[:, :2])
                for token in (1, 2, 3):  # the first call compiles, the second recompiles with a dynamic count
                    stepper.step(token)
            setup_seconds["compiled"] = time.perf_counter() - start
        else:
            stepper = OnnxStepper(runner)
        with torch.no_grad():
            result = decode_tokens(stepper, prompt, new_tokens, repeats)
        reference = reference or result
        if path not in paths:
            continue
        rows.append(
            {
                "path": PATHS[path],
                "batch": 1,
                "context": context,
                "ms/step": result["per_step"] * 1e3,
                "tokens/s": 1 / result["per_step"],
                "vs eager": reference["per_step"] / result["per_step"],
                "prefill s": result["prefill"],
                "setup s": setup_seconds.get(path),
                "same tokens": "yes" if result["tokens"] == reference["tokens"] else "no",
            }
        )
    return rows


def plot_onnx_decode(rows: List[dict], path: str, title: str) -> str:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    names = [row["path"] for row in rows]
    bars = axis.bar(
        names, [row["tokens/s"] for row in rows], color=["tab:blue", "tab:purple", "tab:green"][: len(rows)]
    )
    for bar, row in zip(bars, rows):
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        axis.annotate(f"{row['tokens/s']:.1f}", top, ha="center", va="bottom")
    axis.set_ylabel("decode tokens/s (batch 1)")
    axis.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, figure, title, path)


def parse_paths(text: str) -> List[str]:
    paths = [p for p in text.replace(",", " ").split()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(PATHS)}")
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_size="base")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens before decoding; default 512")
    parser.add_argument("--new-tokens", type=int, default=None, help="timed steps per loop; default 64")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many loops; default 3")
    parser.add_argument("--paths", type=parse_paths, default=list(PATHS), help=f"of {', '.join(PATHS)} (default all)")
    parser.add_argument("--model", help="a saved model folder to measure instead of a random --size model")
    parser.add_argument("--onnx", help="that folder's export (export-onnx); made in a temporary folder if not given")
    args = parser.parse_args(argv)
    if args.dtype != "float32" or args.device != "cpu":
        parser.error("the ONNX graphs are float32 and run here on the CPU: use --dtype float32 --device cpu")
    if args.onnx and not args.model:
        parser.error("--onnx needs --model (the folder it was exported from), for the PyTorch paths")
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.context = args.context or (32 if args.quick else 512)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    if args.quick:
        args.repeats = 1
    return args


def main(argv=None) -> int:
    from retnet_hf.onnx_runtime import OnnxRetNet, export_onnx

    args = parse_args(argv)
    run = prepare_run(args)
    threads = torch.get_num_threads()
    start_load = load_average()
    with tempfile.TemporaryDirectory(prefix="onnx-decode-") as scratch:
        if args.model:
            model = RetNetForCausalLM.from_pretrained(args.model).float().eval()
            folder = Path(args.model)
        else:
            torch.manual_seed(args.seed)
            model = RetNetForCausalLM(size_config(args.size)).eval()
            folder = Path(scratch) / "model"
            model.save_pretrained(folder)
        setup = {}
        onnx_folder = Path(args.onnx) if args.onnx else Path(scratch) / "onnx"
        if "onnx" in args.paths:
            start = time.perf_counter()
            if not args.onnx:
                print("  ... onnx_decode: exporting (export-onnx)", file=sys.stderr, flush=True)
                export_onnx(folder, onnx_folder)
            runner = OnnxRetNet(onnx_folder, threads=threads)
            setup["onnx"] = time.perf_counter() - start
        else:
            runner = None
        rows = onnx_decode_benchmark(
            model,
            runner,
            args.paths,
            args.context,
            args.new_tokens,
            args.repeats,
            setup,
            seed=args.seed,
            log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
        )
    import onnxruntime

    settings = (
        f"settings: {'model ' + args.model if args.model else 'size ' + args.size}, float32, batch 1, context "
        f"{args.context}, {args.new_tokens} new tokens (greedy), {args.repeats} repeat(s), {threads} threads for "
        f"torch and ONNX Runtime {onnxruntime.__version__}; load average (1, 5, 15 min) {start_load} at the start, "
        f"{load_average()} at the end"
    )
    preamble = [run["header"], describe_models(model), settings]
    print(*preamble, sep="\n", flush=True)
    note = (
        "ms/step: median time per greedy one-token step at batch 1 after the prefill; vs eager: PyTorch eager's "
        "ms/step over this path's; setup s: export + check + session start (ONNX Runtime) or compilation (the first "
        "calls of the compiled step); same tokens: the path chose eager's tokens."
    )
    table = format_table(rows, COLUMNS)
    png = plot_onnx_decode(
        rows, os.path.join(args.out, "onnx_decode.png"), f"Decode at batch 1 ({args.model or args.size}, float32)"
    )
    publish(args.out, "onnx_decode", preamble, [table, note], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
