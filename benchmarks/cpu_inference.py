"""CPU inference as users run it: RetNet through the package (PyTorch eager, and `export-onnx` folders, float32 and
quantized, on ONNX Runtime through the package's runner) against the same-size Llama in llama.cpp (GGUF, through
llama-cpp-python), in one run.

The models: RetNet 125m (`benchmarks.common.size_config`, random weights) and the Llama of the same parameter count
(`same_size_llama`), saved with one SentencePiece tokenizer trained here on the package's sample text; the Llama is
converted with llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama-cpp-python sdist) to GGUF f32 and
quantized by llama.cpp (`llama_model_quantize`) to q8_0 and q4_0; RetNet is exported with `export_onnx` (float32,
`--quantize int8`, `--quantize int4`). Everything is made once in `--work` and reused.

Measured per variant and context, each in a process of its own (the load, the prefill and the decode; `--threads`
threads): decode tokens/s after a prompt of the context's length (the median over `--new-tokens` steps after two
untimed ones), and prefill tokens/s of a 512-token prompt. llama.cpp runs with flash attention on and off. The
variants are run in `--rounds` interleaved rounds (`common.interleaved_timings`), and each RetNet path's speed is
given as a multiple of llama.cpp's fastest variant at the same context (the median of the per-round ratios), with
the goal (at least as fast at every context, 20x at 32k) met or not. The load average is printed before and after.

`--variants` may also name transformers' own quantization configs on the eager model (`TRANSFORMERS_CONFIGS`:
torchao int8 weight-only and dynamic-activation, quanto int8/int4, bitsandbytes 8-bit/4-bit), given as multiples
of eager float32; a config that does not load or run here is a row saying why.

Needs `pip install -e ".[bench]"` (llama-cpp-python compiles llama.cpp: about 15 minutes on 2 cores; on these
machines build it with AMX off, see the README) and the `onnx` extra. Never part of CI. Full run: about an hour on 2
cores; `--quick` (tiny models, short contexts): a few minutes, most of it the exports.

    python -m benchmarks.cpu_inference                      # 125m, contexts 256,2k,8k,32k, 3 rounds, 2 threads
    python -m benchmarks.cpu_inference --threads 1 --contexts 256,2k
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from .common import (
    format_table,
    interleaved_timings,
    load_average,
    machine_description,
    measure_bandwidth,
    measure_read_bandwidth,
    paired_median_ratio,
    parse_ints,
    publish,
    pyplot,
    same_size_llama,
    save_figure,
    size_config,
    weight_bytes_per_token,
)


REPOSITORY = Path(__file__).resolve().parents[1]
RETNET_VARIANTS = ("retnet-eager-fp32", "retnet-onnx-fp32", "retnet-onnx-int8", "retnet-onnx-int4")
# transformers' own quantization configs that run on a CPU, on the eager model (`from_pretrained(...,
# quantization_config=...)`): not among the defaults (the commands' --quantize runs ONNX Runtime, which beat them
# all here); `--variants` names them for the comparison
TRANSFORMERS_CONFIGS = (
    "retnet-eager-torchao-int8-weight-only",
    "retnet-eager-torchao-int8-dynamic",
    "retnet-eager-quanto-int8",
    "retnet-eager-quanto-int4",
    "retnet-eager-bnb-8bit",
    "retnet-eager-bnb-4bit",
)
LLAMA_QUANTS = ("q8_0", "q4_0")
LLAMA_VARIANTS = tuple(f"llama.cpp-{q}-fa-{fa}" for q in LLAMA_QUANTS for fa in ("on", "off"))
PREFILL_TOKENS = 512


# --------------------------------------------------------------------------------------------- the models


def prepare(work: Path, size: str, variants=RETNET_VARIANTS + LLAMA_VARIANTS) -> dict:
    """Make (once) in `work` what `variants` need: the RetNet folder and its ONNX exports, the Llama folder and its
    GGUF files; returns the paths by name."""
    import torch

    from retnet_hf import RetNetForCausalLM
    from retnet_hf.onnx_runtime import export_onnx

    work.mkdir(parents=True, exist_ok=True)
    config = size_config(size)
    paths = {"retnet": work / "retnet", "llama": work / "llama"}
    if not (paths["retnet"] / "config.json").is_file():
        torch.manual_seed(0)
        RetNetForCausalLM(config).save_pretrained(paths["retnet"])
    for scheme in ("fp32", "int8", "int4"):
        out = work / f"retnet-onnx-{scheme}"
        if f"retnet-onnx-{scheme}" not in variants:
            continue
        if not (out / "retnet_onnx.json").is_file():
            print(f"exporting RetNet to ONNX ({scheme}) ...", flush=True)
            export_onnx(paths["retnet"], out, quantize=None if scheme == "fp32" else scheme)
        paths[f"retnet-onnx-{scheme}"] = out
    if not any(v.startswith("llama.cpp") for v in variants):
        return paths
    tokenizer_model = _sentencepiece(work, config.vocab_size)
    if not (paths["llama"] / "config.json").is_file():
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        llama = LlamaForCausalLM(same_size_llama(config)).eval()
        llama.save_pretrained(paths["llama"])
        (paths["llama"] / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    gguf = work / "llama-f32.gguf"
    if not gguf.is_file():
        print("converting the Llama to GGUF with llama.cpp's converter ...", flush=True)
        converter = _llama_cpp_converter(work)
        subprocess.run(
            [sys.executable, str(converter), str(paths["llama"]), "--outtype", "f32", "--outfile", str(gguf)],
            check=True,
            capture_output=True,
        )
    paths["llama-f32"] = gguf
    for quant in LLAMA_QUANTS:
        target = work / f"llama-{quant}.gguf"
        if not target.is_file():
            _llama_quantize(gguf, target, quant)
        paths[f"llama-{quant}"] = target
    return paths


def _sentencepiece(work: Path, vocab_size: int) -> Path:
    """A SentencePiece model of up to `vocab_size` pieces trained on the package's sample text (llama.cpp's
    converter takes a Llama's tokenizer.model as it is; the Llama's embedding rows beyond it are padding)."""
    import sentencepiece

    from retnet_hf.sample_data import SHAKESPEARE_TRAIN

    prefix = work / "spm"
    if not prefix.with_suffix(".model").is_file():
        sentencepiece.SentencePieceTrainer.train(
            input=str(SHAKESPEARE_TRAIN),
            model_prefix=str(prefix),
            vocab_size=min(vocab_size, 8000),
            model_type="bpe",
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return prefix.with_suffix(".model")


def _llama_cpp_converter(work: Path) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` from the llama-cpp-python sdist of the installed version (downloaded from
    the package index once, unpacked into `work`)."""
    import importlib.metadata
    import tarfile

    version = importlib.metadata.version("llama_cpp_python")
    unpacked = work / f"llama_cpp_python-{version}"
    converter = unpacked / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not converter.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={version}", "-d", str(work)],
            check=True,
        )
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    return converter


def _llama_quantize(source: Path, target: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant}")


# ------------------------------------------------------------------------- one variant, in a process of its own


def measure(variant: str, paths: Dict[str, str], context: int, new_tokens: int, threads: int) -> dict:
    """In this process: load `variant`, prefill `context` random tokens and time the decode steps after them;
    time a 512-token prefill. Returns `{"decode tok/s", "prefill tok/s"}`."""
    import numpy as np

    rng = np.random.default_rng(0)
    if variant.startswith("llama.cpp"):
        import llama_cpp

        quant, flash = variant.split("-")[1], variant.endswith("fa-on")
        llm = llama_cpp.Llama(
            paths[f"llama-{quant}"],
            n_ctx=max(context, PREFILL_TOKENS) + new_tokens + 8,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            flash_attn=flash,
            verbose=False,
        )
        vocab = llm.n_vocab()
        prompt = rng.integers(3, vocab, PREFILL_TOKENS).tolist()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = PREFILL_TOKENS / (time.perf_counter() - start)
        llm.reset()
        llm.eval(rng.integers(3, vocab, context).tolist())
        token, times = int(rng.integers(3, vocab)), []
        for _ in range(new_tokens + 2):
            start = time.perf_counter()
            llm.eval([token])
            times.append(time.perf_counter() - start)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))  # the last token's (greedy)
            token = int(np.argmax(logits))
        return {"decode tok/s": 1 / statistics.median(times[2:]), "prefill tok/s": prefill}
    if variant.startswith("retnet-onnx"):
        from retnet_hf.onnx_runtime import OnnxRetNet

        runner = OnnxRetNet(paths[variant], threads=threads)
        vocab = runner.vocab_size
        start = time.perf_counter()
        runner.prefill(rng.integers(3, vocab, (1, PREFILL_TOKENS)))
        prefill = PREFILL_TOKENS / (time.perf_counter() - start)
        logits, states, count = runner.prefill(rng.integers(3, vocab, (1, context)))
        token, times = logits.argmax(-1), []
        for _ in range(new_tokens + 2):
            start = time.perf_counter()
            logits, states = runner.step(token, states, count)
            times.append(time.perf_counter() - start)
            count, token = count + 1, logits.argmax(-1)
        return {"decode tok/s": 1 / statistics.median(times[2:]), "prefill tok/s": prefill}
    import torch

    from retnet_hf import CACHE_NAME, RetNetForCausalLM

    torch.set_num_threads(threads)
    scheme = variant.removeprefix("retnet-eager-")
    quantization = {} if scheme == "fp32" else {"quantization_config": transformers_config(scheme)}
    model = RetNetForCausalLM.from_pretrained(paths["retnet"], **quantization).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        start = time.perf_counter()
        model(torch.from_numpy(rng.integers(3, vocab, (1, PREFILL_TOKENS))), use_cache=True, logits_to_keep=1)
        prefill = PREFILL_TOKENS / (time.perf_counter() - start)
        out = model(torch.from_numpy(rng.integers(3, vocab, (1, context))), use_cache=True, logits_to_keep=1)
        cache, token, times = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1), []
        for _ in range(new_tokens + 2):
            start = time.perf_counter()
            out = model(token, cache=cache)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    return {"decode tok/s": 1 / statistics.median(times[2:]), "prefill tok/s": prefill}


def transformers_config(scheme: str):
    """transformers' quantization config for an eager variant (`TRANSFORMERS_CONFIGS`)."""
    import transformers

    if scheme.startswith("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        kind = Int8WeightOnlyConfig() if scheme.endswith("weight-only") else Int8DynamicActivationInt8WeightConfig()
        return transformers.TorchAoConfig(kind)
    if scheme.startswith("quanto"):
        return transformers.QuantoConfig(weights=scheme.split("-")[1])
    if scheme == "bnb-8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def run_child(variant: str, paths: dict, context: int, args) -> dict:
    """`measure` in a new process (its own memory, nothing warm from another variant)."""
    command = [sys.executable, "-m", "benchmarks.cpu_inference", "--child", variant, "--paths", json.dumps(paths)]
    command += ["--context", str(context), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, timeout=3600)
    if done.returncode != 0:
        if variant in TRANSFORMERS_CONFIGS:  # a config that does not run here is a finding, not the run's end
            return {"failed": done.stderr.strip().splitlines()[-1][:200]}
        raise RuntimeError(f"{variant} at {context}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the run


def benchmark(paths: dict, args) -> List[dict]:
    variants = [v for v in RETNET_VARIANTS + TRANSFORMERS_CONFIGS + LLAMA_VARIANTS if v in args.variants]
    rows = []
    for context in args.contexts:
        results: Dict[str, List[dict]] = {v: [] for v in variants}

        def measure_in_child(variant, context=context):
            figures = run_child(variant, {k: str(p) for k, p in paths.items()}, context, args)
            results[variant].append(figures)
            return 1 / figures["decode tok/s"] if "failed" not in figures else float("nan")  # seconds per token

        print(f"context {context}: {len(variants)} variants x {args.rounds} rounds ...", flush=True)
        seconds = interleaved_timings({v: (lambda v=v: measure_in_child(v)) for v in variants}, args.rounds)
        llama = [v for v in variants if v.startswith("llama.cpp")]
        fastest = min(llama, key=lambda v: statistics.median(seconds[v])) if llama else None
        reference = "retnet-eager-fp32" if "retnet-eager-fp32" in variants else None
        for variant in variants:
            failed = [r["failed"] for r in results[variant] if "failed" in r]
            if failed:
                rows.append({"variant": variant, "context": context, "failed": failed[0]})
                continue
            decode = [r["decode tok/s"] for r in results[variant]]
            prefill = [r["prefill tok/s"] for r in results[variant]]
            row = {
                "variant": variant,
                "context": context,
                "decode tok/s": statistics.median(decode),
                "prefill 512 tok/s": statistics.median(prefill),
                "decode by round": [round(x, 2) for x in decode],
            }
            if fastest and variant.startswith("retnet"):
                row["x fastest llama.cpp"] = paired_median_ratio(seconds[fastest], seconds[variant])
                row["fastest llama.cpp"] = fastest
            if reference and variant.startswith("retnet"):
                row["x eager fp32"] = paired_median_ratio(seconds[reference], seconds[variant])
            rows.append(row)
    return rows


def retnet_step_bytes(folder: Path) -> int:
    """The bytes a float32 RetNet decode step at batch 1 must move at least: every weight but the input embedding
    table read once (`weight_bytes_per_token`), and the state read and written."""
    from retnet_hf import RetNetForCausalLM

    model = RetNetForCausalLM.from_pretrained(folder)
    config = model.config
    state = config.decoder_layers * config.decoder_embed_dim * config.decoder_value_embed_dim
    state //= config.decoder_retention_heads  # per layer H x Dk x Dv = d x dv / H
    return weight_bytes_per_token(model) + 2 * 4 * state


def bandwidth_probes(threads: int) -> Dict[str, float]:
    """GB/s of the read probes (`measure_read_bandwidth`: mv, [1, k] x [k, n], sum of 256 MiB; and `x.sum()` of 512
    MiB) with `threads` threads, and `best`: the ceiling's bandwidth."""
    import torch

    torch.set_num_threads(threads)
    probes = measure_read_bandwidth()
    probes.pop("best")
    probes["sum 512"] = measure_bandwidth(512)
    probes["best"] = max(probes.values())
    return probes


def add_ceiling(rows: List[dict], step_bytes: int, bandwidth: float) -> None:
    """Each float32 RetNet row's decode as a share of the memory-bound ceiling `bandwidth` / `step_bytes`."""
    ideal = bandwidth * 1e9 / step_bytes
    for row in rows:
        if row["variant"].endswith("fp32") and row["variant"].startswith("retnet") and "decode tok/s" in row:
            row["% ceiling"] = round(100 * row["decode tok/s"] / ideal, 1)


def goals(rows: List[dict]) -> List[str]:
    """The issue's goal for RetNet's best quantized path: at least llama.cpp's fastest at every context, 20x at 32k."""
    lines = []
    for context in sorted({r["context"] for r in rows}):
        ours = [
            r for r in rows if r["context"] == context and r.get("x fastest llama.cpp") and "onnx-int" in r["variant"]
        ]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["x fastest llama.cpp"])
        target = 20.0 if context >= 32768 else 1.0
        met = "met" if best["x fastest llama.cpp"] >= target else "not met"
        lines.append(
            f"context {context}: best quantized RetNet path {best['variant']} at {best['x fastest llama.cpp']:.2f}x "
            f"{best['fastest llama.cpp']} (goal {target:g}x): {met}"
        )
    shares = [r for r in rows if r.get("% ceiling") is not None]
    if shares:
        best = max(shares, key=lambda r: r["% ceiling"])
        met = "met" if best["% ceiling"] >= 95 else "not met"
        lines.append(
            f"float32 decode at batch 1: best {best['variant']} at {best['% ceiling']}% of the bandwidth ceiling "
            f"(context {best['context']}; goal 95%): {met}"
        )
    return lines


def plot(rows: List[dict], path: Path) -> str:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant in sorted({r["variant"] for r in rows if "failed" not in r}):
        points = sorted((r["context"], r["decode tok/s"]) for r in rows if r["variant"] == variant)
        axis.plot(*zip(*points), marker="o", label=variant, linestyle="-" if variant.startswith("retnet") else "--")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("decode tokens/s (batch 1)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    return save_figure(plt, figure, "CPU decode: RetNet (package) vs same-size Llama (llama.cpp)", str(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="125m", help="model size (benchmarks.common.SIZES; default 125m)")
    parser.add_argument("--contexts", type=parse_ints, default=parse_ints("256,2k,8k,32k"))
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per run (default 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(RETNET_VARIANTS + LLAMA_VARIANTS))
    parser.add_argument("--work", default="bench-results/cpu-inference-models", help="where the models are made")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true", help="tiny models, contexts 64 and 256, 1 round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(measure(args.child, json.loads(args.paths), args.context, args.new_tokens, args.threads)))
        return 0
    args.variants = args.variants.split(",")
    if args.quick:
        args.size, args.contexts, args.rounds, args.new_tokens = "tiny", [64, 256], 1, 4
        args.work = str(Path(args.work).with_name(Path(args.work).name + "-quick"))
    preamble = [
        "# CPU inference: RetNet through the package vs the same-size Llama in llama.cpp",
        machine_description(),
        f"size {args.size}, random weights, batch 1, {args.threads} threads in every runtime, {args.new_tokens} "
        f"decode steps timed per run, {args.rounds} interleaved rounds, each variant in its own process; load "
        f"average before: {load_average()}",
    ]
    print("\n".join(preamble), flush=True)
    paths = prepare(Path(args.work), args.size, args.variants)
    step_bytes = retnet_step_bytes(paths["retnet"])
    probes = bandwidth_probes(args.threads)
    rows = benchmark(paths, args)
    add_ceiling(rows, step_bytes, probes["best"])
    preamble.append(
        f"read bandwidth ({args.threads} threads, GB/s): "
        + ", ".join(f"{name} {value:.1f}" for name, value in probes.items())
        + f"; a float32 RetNet step moves {step_bytes / 1e6:.0f} MB (weights but the input embedding, the state "
        "read and written): the ceiling is best / that"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    columns = ["variant", "context", "decode tok/s", "x fastest llama.cpp", "fastest llama.cpp", "x eager fp32"]
    columns += ["% ceiling"]
    columns += ["prefill 512 tok/s", "failed"]
    png = plot(rows, Path(args.out) / "cpu_inference.png")
    body = [format_table(rows, columns + ["decode by round"]), *goals(rows), f"load average after: {load_average()}"]
    publish(args.out, "cpu_inference", preamble, body, rows, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
