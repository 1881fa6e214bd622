"""LoRA and QLoRA fine-tuning through TRL's SFTTrainer: steps/s, tokens/s and peak memory, RetNet vs a same-size
LlamaForCausalLM, on the guanaco chat rows.

    python -m benchmarks.finetune                  # 125m, max lengths 512 and 2048, LoRA and QLoRA
    python -m benchmarks.finetune --quick          # tiny model, 64 tokens (the tests run this; under a minute idle)

The run is the package's own `retnet-hf sft` (`retnet_hf.finetuning`: its data loading with the Llama-2 chat
parser and `fit_to_max_length`, model loading, PEFT `LoraConfig`, `SFTConfig` and `SFTTrainer`), once per
(model, method, max length) and round, each in its own process so that the peak memory is its own. Both models get
the same tokenizer (a byte-level BPE trained here, with `retnet_hf.data.train_tokenizer`, on the rows themselves;
nothing is downloaded), the same rows (`--data`, default the package's 300 guanaco rows), packing into
padding-free rows of at most `max length` tokens, batch, steps, learning rate and seed. LoRA rank 16 (alpha 32,
dropout 0.05) on RetNet's `LORA_TARGET_MODULES` and on Llama's q, k, v, o, gate, up and down projections; QLoRA
loads the saved folder with bitsandbytes 4-bit nf4 (double quantization, `retnet_hf.finetuning.load_model`). The
Llama is `benchmarks.common.same_size_llama` of the RetNet (125m: exactly 124,373,760 parameters each).

Measured: the wall time between the ends of consecutive optimiser steps (a TrainerCallback), over the steps after
`--warmup`; steps/s, non-padding tokens/s (the trainer's token count), and the process's peak memory (CPU: peak
resident set, `ru_maxrss`, which includes loading the model; `--device cuda`: `max_memory_allocated`). A
configuration that fails (e.g. 4-bit where bitsandbytes has no backend) is a table row saying why. Prints the
machine, the settings and a markdown table, and saves finetune.png, finetune.md and finetune.json into --out.

Full run (defaults: 125m, max lengths 512 and 2048, LoRA and QLoRA, batch 1, 1 warm-up + 5 timed steps, 2 rounds of
8 processes): 35 minutes on 2026-12-01, alone on 2 cores of an AMD EPYC with 23.5 GiB (about 10 s per process to
start, load and prepare the data, then 6 steps of about 4.5 s (LoRA, 512 tokens), 7.5 s (QLoRA, 512), 20-26 s (LoRA,
2048) and 30-33 s (QLoRA, 2048)). The machine's speed drifts by several percent within minutes, so the two models of
a configuration run one after the other in every round (which goes first alternates) and the ratio is taken within
rounds. On a busy machine it takes many times longer (measured with a load of 4-5 on 2 cores: 25-55 s per step at
512 tokens).
"""

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch
from transformers import TrainerCallback

from retnet_hf.sample_data import GUANACO

from .common import (
    add_common_arguments,
    format_table,
    interleaved_timings,
    prepare_run,
    publish,
    pyplot,
    same_size_llama,
    save_figure,
    size_config,
)


REPOSITORY = Path(__file__).resolve().parents[1]

DEFAULT_DATA = str(GUANACO)

MODELS = ("RetNet", "Llama")

METHODS = ("lora", "qlora")

# LoRA targets: every projection of each model (RetNet's eight, retnet_hf.LORA_TARGET_MODULES; Llama's seven)
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

RESULT = "finetune result: "  # the line of a configuration's process that carries its row (JSON)

COLUMNS = [
    "model",
    "method",
    "max length",
    "trainable params",
    "steps/s",
    "tokens/s",
    "peak memory MB",
    "RetNet/Llama steps/s",
    "RetNet/Llama memory",
]


# ------------------------------------------------------------------------------------------ one configuration


class StepTimer(TrainerCallback):
    """Records, at the end of every optimiser step, the wall time and the trainer's count of input tokens seen
    (and the logged losses)."""

    def __init__(self, device: str):
        self.device = device
        self.ends: List[float] = []
        self.tokens: List[int] = []
        self.losses: List[float] = []

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends, self.tokens = [self._now()], [state.num_input_tokens_seen]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())
        self.tokens.append(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def summary(self, warmup: int) -> dict:
        seconds = self.ends[-1] - self.ends[warmup]
        steps = len(self.ends) - 1 - warmup
        tokens = self.tokens[-1] - self.tokens[warmup]
        return {
            "timed steps": steps,
            "steps/s": steps / seconds,
            "tokens/s": tokens / seconds,
            "tokens/step": tokens / steps,
            "step seconds": [round(b - a, 4) for a, b in zip(self.ends[warmup:], self.ends[warmup + 1 :])],
            "loss": self.losses[-1] if self.losses else None,
        }


def measure(settings: dict, warmup: int, threads: int = None) -> dict:
    """Fine-tune as `retnet-hf sft` does (retnet_hf.finetuning) with `settings` (SFTSettings' fields) and return
    the row: trainable parameters, steps/s and tokens/s after `warmup` steps, peak memory."""
    from retnet_hf.finetuning import SFTSettings, linear4bit_modules, sft_trainer, tokenizer_and_data, trainable_model

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = SFTSettings(**{**settings, "target_modules": tuple(settings["target_modules"])})
    tokenizer, data = tokenizer_and_data(s)
    torch.manual_seed(s.seed)
    model = trainable_model(s, tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = len(linear4bit_modules(model))
    timer = StepTimer(device)
    trainer = sft_trainer(s, model, tokenizer, data, callbacks=[timer])
    trainer.args.include_num_input_tokens_seen = "non_padding"  # state.num_input_tokens_seen, for tokens/s
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "trainable params": trainable,
        **timer.summary(warmup),
        "peak memory MB": peak / 2**20,
        "4-bit linears": quantized,
        "device": device,
    }


# ------------------------------------------------------------------------------------------------ the run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--data", default=DEFAULT_DATA, help="chat rows (Llama-2 or guanaco form); default %(default)s")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="max lengths; default 512 2048")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=1, help="rows (packed) per step; default 1")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up; default 5")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first; default 1")
    parser.add_argument(
        "--rounds", type=int, default=None, help="every configuration once per round (medians); default 2, --quick 1"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha 2 x rank); default 16")
    parser.add_argument(
        "--no-packing", dest="packing", action="store_false", help="truncate and pad rows instead of packing them"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per configuration; default 1200")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration's JSON: run it in this process
    args = parser.parse_args(argv)
    if args.dtype != "float32":
        parser.error("--dtype: the fine-tuning runs keep float32 base weights (QLoRA: nf4 with float32 compute)")
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
        args.limit = args.limit or 64
        args.steps = min(args.steps, 2)
    args.lengths = args.lengths or ([64] if args.quick else [512, 2048])
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def build_folders(args, work: Path) -> dict:
    """The tokenizer trained on the rows, and a RetNet and its same-size Llama (random weights, seed `--seed`)
    saved with it: {model name: folder}."""
    from transformers import LlamaForCausalLM

    from retnet_hf import RetNetForCausalLM
    from retnet_hf.data import load_guanaco, save_tokenizer, set_chat_template, train_tokenizer

    texts = load_guanaco(args.data, limit=args.limit)["text"]
    retnet_config = size_config(args.size)
    tokenizer = set_chat_template(train_tokenizer(texts, retnet_config.vocab_size))
    retnet_config = size_config(args.size, tokenizer=tokenizer)
    folders = {}
    for name, make in (
        ("RetNet", lambda: RetNetForCausalLM(retnet_config)),
        ("Llama", lambda: LlamaForCausalLM(same_size_llama(retnet_config))),
    ):
        torch.manual_seed(args.seed)
        model = make()
        folders[name] = work / name
        model.save_pretrained(folders[name])
        save_tokenizer(tokenizer, folders[name])
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    print(f"tokenizer: byte-level BPE, {len(tokenizer):,} tokens, trained on {len(texts):,} rows", flush=True)
    return folders


def configurations(args, folders: dict, work: Path) -> List[dict]:
    """Every (length, method, model) as `measure`'s arguments: SFTSettings' fields, declared here once."""
    from retnet_hf import LORA_TARGET_MODULES
    from retnet_hf.finetuning import SFTSettings

    runs = []
    for length in args.lengths:
        for method in args.methods:
            for name in MODELS:
                settings = SFTSettings(
                    model=str(folders[name]),
                    output_dir=str(work / f"{name}-{method}-{length}"),
                    data=args.data,
                    method=method,
                    rank=args.rank,
                    target_modules=tuple(LORA_TARGET_MODULES if name == "RetNet" else LLAMA_TARGET_MODULES),
                    max_length=length,
                    packing=args.packing,
                    max_steps=args.warmup + args.steps,
                    batch_size=args.batch_size,
                    limit=args.limit,
                    seed=args.seed,
                    save_steps=10**6,
                    disable_tqdm=True,
                    write_card=False,
                )
                runs.append(
                    {
                        "row": {"model": name, "method": method, "max length": length},
                        "settings": dataclasses.asdict(settings),
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "device": args.device,
                    }
                )
    return runs


def run_in_process(run: dict, timeout: float) -> dict:
    """`measure` in a fresh Python process: the row, or the row with `skipped` (why it gave no numbers)."""
    command = [sys.executable, "-m", "benchmarks.finetune", "--one", json.dumps(run)]
    row = dict(run["row"])
    # the Trainer takes a GPU wherever there is one: --device cpu hides them
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if run["device"] == "cpu" else None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "skipped": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        errors = [line for line in done.stderr.strip().splitlines() if line.strip()] or [f"exit {done.returncode}"]
        return {**row, "skipped": errors[-1][-200:]}
    return {**row, **json.loads(lines[-1][len(RESULT) :])}


def merge_rounds(rounds: List[List[dict]]) -> List[dict]:
    """One row per configuration from its row in every round (`rounds[r][i]`: round r's row of configuration i):
    the median steps/s and tokens/s over the rounds that gave numbers, the largest peak memory, every round's
    step times and steps/s (`round steps/s`); and on RetNet's row `RetNet/Llama steps/s`, the median over the
    rounds of the ratio of RetNet's steps/s to Llama's in the same round (the two ran one after the other, so the
    machine's drift between rounds cancels), and `RetNet/Llama memory`. A configuration that gave no numbers in
    any round keeps its first `skipped`."""
    rows = []
    for runs in zip(*rounds):
        done = [run for run in runs if "steps/s" in run]
        if not done:
            rows.append(runs[0])
            continue
        row = dict(done[0])
        for key in ("steps/s", "tokens/s"):
            row[key] = statistics.median(run[key] for run in done)
        row["peak memory MB"] = max(run["peak memory MB"] for run in done)
        row["step seconds"] = [seconds for run in done for seconds in run["step seconds"]]
        row["round steps/s"] = [run["steps/s"] for run in done]
        row["timed steps"] = sum(run["timed steps"] for run in done)
        rows.append(row)
    for index, row in enumerate(rows):
        if row["model"] != "RetNet" or "steps/s" not in row:
            continue
        key = (row["method"], row["max length"])
        other = next(
            (i for i, o in enumerate(rows) if o["model"] == "Llama" and (o["method"], o["max length"]) == key), None
        )
        pairs = [
            (runs[index]["steps/s"], runs[other]["steps/s"])
            for runs in rounds
            if other is not None and "steps/s" in runs[index] and "steps/s" in runs[other]
        ]
        if pairs:
            row["RetNet/Llama steps/s"] = f"{statistics.median(ours / theirs for ours, theirs in pairs):.2f}x"
            row["RetNet/Llama memory"] = f"{row['peak memory MB'] / rows[other]['peak memory MB']:.2f}x"
    return rows


def plot_finetune(rows: List[dict], path: str, title: str) -> str:
    """Steps/s and peak memory of each (method, max length), RetNet's bar next to Llama's; saved as PNG."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    groups = list(dict.fromkeys((row["method"], row["max length"]) for row in rows))
    for offset, model in ((-0.2, "RetNet"), (0.2, "Llama")):
        found = {(row["method"], row["max length"]): row for row in rows if row["model"] == model}
        for axis, key in zip(axes, ("steps/s", "peak memory MB")):
            values = [found.get(group, {}).get(key, 0) for group in groups]
            axis.bar([i + offset for i in range(len(groups))], values, width=0.4, label=model)
    for axis, label in zip(axes, ("steps/s (higher is faster)", "peak memory (MB)")):
        axis.set_xticks(range(len(groups)), [f"{method} {length}" for method, length in groups])
        axis.set_ylabel(label)
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(plt, figure, title, path)


def describe_settings(args, s: dict) -> str:
    """One line: what every configuration shares (`s`: one configuration's SFTSettings fields)."""
    alpha = s["alpha"] if s["alpha"] is not None else 2 * s["rank"]
    return (
        f"settings: size {args.size}, data {s['data']}"
        + (f" (first {s['limit']} rows)" if s["limit"] else "")
        + f", max lengths {args.lengths}, methods {args.methods}, batch {s['batch_size']}, "
        + ("packed padding-free rows" if s["packing"] else "rows truncated and padded")
        + f", LoRA r {s['rank']} alpha {alpha} dropout {s['lora_dropout']}, lr {s['learning_rate']} cosine, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s), seed {s['seed']}, gradient checkpointing "
        f"{s['gradient_checkpointing']}, float32 (QLoRA: nf4, double quantization, float32 compute on the CPU), "
        "TRL SFTTrainer as in retnet-hf sft"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        run = json.loads(args.one)
        print(RESULT + json.dumps(measure(run["settings"], run["warmup"], run["threads"])), flush=True)
        return 0
    machine = prepare_run(args)
    print(machine["header"], flush=True)
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as work:
        folders = build_folders(args, Path(work))
        runs = configurations(args, folders, Path(work))
        settings = describe_settings(args, runs[0]["settings"])
        print(settings, flush=True)

        def run_and_log(index: int) -> dict:
            start = time.perf_counter()
            row = run_in_process(runs[index], args.timeout)
            done = row.get("skipped") or f"{row['steps/s']:.3f} steps/s, {row['peak memory MB']:.0f} MB"
            print(
                f"  ... {row['model']} {row['method']} {row['max length']}: {done} "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            return row

        # each (length, method)'s two models side by side in rounds, the one that goes first alternating
        by_round = {}
        for first in range(0, len(runs), len(MODELS)):
            pair = range(first, first + len(MODELS))
            by_round.update(interleaved_timings({i: functools.partial(run_and_log, i) for i in pair}, args.rounds))
        rounds = [[by_round[i][number] for i in range(len(runs))] for number in range(args.rounds)]
    rows = merge_rounds(rounds)
    device = next((row["device"] for row in rows if "device" in row), "cpu")
    memory = "CUDA max_memory_allocated" if device == "cuda" else "peak resident set of the process (ru_maxrss)"
    note = (
        f"steps/s and tokens/s: over the {args.steps} steps after {args.warmup} warm-up step(s), wall time between "
        f"optimiser step ends, median over {args.rounds} round(s); tokens = non-padding input tokens. peak memory: "
        f"{memory}, loading included, the largest over the rounds. RetNet/Llama steps/s: the median over the rounds "
        "of RetNet's steps/s over Llama's in the same round, the two run one after the other, which goes first "
        "alternating (above 1x: RetNet is faster); memory: RetNet's peak over Llama's."
    )
    table = format_table(rows, COLUMNS)
    png = plot_finetune(rows, f"{args.out}/finetune.png", f"LoRA / QLoRA through TRL's SFTTrainer ({args.size})")
    publish(args.out, "finetune", [machine["header"], settings], [table, note], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
