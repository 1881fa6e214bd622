"""What quantization costs in quality: a trained RetNet exported float32, `--quantize int8` and `--quantize int4`
(`retnet_hf.onnx_runtime.export_onnx`), each run on ONNX Runtime through the package's runner:

- perplexity on held-out text: the text's tokens in windows of `--window` tokens (the training block size) through
  the prompt graph (chunk by chunk, every token's logits), the mean negative log-likelihood of each next token, as
  `exp`; and its change against float32;
- top-1 agreement over a long decode: float32's greedy continuation of a held-out prompt, then each scheme fed the
  same tokens one at a time (the decode graph, teacher-forced): the share of steps where its most likely next token is float32's, and how many tokens of free-running
  greedy decoding it shares with float32 before the first difference.

    python -m benchmarks.quantized_quality --model FOLDER --text HELD_OUT.txt     # e.g. a `retnet-hf train` folder
    python -m benchmarks.quantized_quality --quick                                # a tiny random model, seconds
"""

import argparse
import sys
from pathlib import Path
from typing import List

import numpy as np

from .common import format_table, load_average, machine_description, publish


SCHEMES = ("fp32", "int8", "int4")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def teacher_forced(runner, tokens: List[int]) -> np.ndarray:
    """The logits `[T - 1, V]` the decode graph gives for each next token of `tokens`, fed one at a time."""
    states, logits = runner.empty_states(1), []
    for position, token in enumerate(tokens[:-1]):
        out, states = runner.step(np.array([token]), states, position)
        logits.append(out[0])
    return np.stack(logits)


def mean_nll(runner, windows: np.ndarray, batch: int = 8) -> float:
    """The mean negative log-likelihood of each next token of each row of `windows` `[n, W]`, from the prompt graph
    (every token's logits, chunk by chunk), `batch` rows at a time."""
    total = []
    for start in range(0, len(windows), batch):
        rows = windows[start : start + batch]
        logits = runner.prefill(rows, all_logits=True)[0][:, :-1]
        picked = np.take_along_axis(log_softmax(logits), rows[:, 1:, None], axis=-1)[..., 0]
        total.append(-picked.reshape(-1))
    return float(np.concatenate(total).mean())


def quality(runners: dict, windows: np.ndarray, prompt: List[int], decode: int) -> List[dict]:
    reference = runners["fp32"]
    never = dict(max_new_tokens=decode, eos_token_id=[])  # a long decode: the end token does not stop it
    greedy = [int(t) for t in reference.generate([prompt], **never)[0]]
    forced_reference = teacher_forced(reference, greedy)[len(prompt) - 1 :]
    rows, base = [], None
    for scheme, runner in runners.items():
        perplexity = float(np.exp(mean_nll(runner, windows)))
        base = perplexity if scheme == "fp32" else base
        forced = teacher_forced(runner, greedy)[len(prompt) - 1 :]
        agreement = float((forced.argmax(-1) == forced_reference.argmax(-1)).mean())
        free = [int(t) for t in runner.generate([prompt], **never)[0][len(prompt) :]]
        shared = next((i for i, (a, b) in enumerate(zip(free, greedy[len(prompt) :])) if a != b), len(free))
        rows.append(
            {
                "scheme": scheme,
                "held-out perplexity": perplexity,
                "vs fp32": f"{100 * (perplexity / base - 1):+.2f}%",
                "top-1 agreement (teacher-forced)": f"{100 * agreement:.1f}%",
                "greedy tokens equal to fp32's before the first difference": f"{shared} of {decode}",
                "max logit difference / scale": float(
                    np.abs(forced - forced_reference).max() / np.abs(forced_reference).max()
                ),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained RetNet folder with its tokenizer")
    parser.add_argument("--text", help="held-out text (default: the package's held-out Tiny Shakespeare)")
    parser.add_argument("--tokens", type=int, default=8000, help="held-out tokens scored (default 8000)")
    parser.add_argument("--decode", type=int, default=512, help="greedy tokens compared (default 512)")
    parser.add_argument("--window", type=int, default=256, help="tokens per scored window (default 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="bench-results/quantized-quality-models")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from retnet_hf.onnx_runtime import OnnxRetNet, export_onnx
    from retnet_hf.sample_data import SHAKESPEARE_HELD_OUT

    work = Path(args.work)
    text = Path(args.text or SHAKESPEARE_HELD_OUT).read_text(encoding="utf-8")
    if args.quick:
        import torch

        from retnet_hf import RetNetConfig, RetNetForCausalLM

        args.model, args.tokens, args.decode, args.window = str(work / "tiny"), 64, 16, 16
        if not (work / "tiny" / "config.json").is_file():
            torch.manual_seed(0)
            RetNetForCausalLM(
                RetNetConfig(
                    vocab_size=64,
                    decoder_embed_dim=32,
                    decoder_value_embed_dim=64,
                    decoder_ffn_embed_dim=64,
                    decoder_layers=2,
                    decoder_retention_heads=2,
                )
            ).save_pretrained(work / "tiny")
    elif not args.model:
        parser.error("give --model (or --quick)")
    runners = {}
    for scheme in SCHEMES:
        out = work / f"{Path(args.model).name}-{scheme}"
        if not (out / "retnet_onnx.json").is_file():
            export_onnx(args.model, out, quantize=None if scheme == "fp32" else scheme)
        runners[scheme] = OnnxRetNet(out, threads=args.threads)
    if args.quick:
        rng = np.random.default_rng(0)
        tokens, prompt = rng.integers(3, 64, args.tokens).tolist(), rng.integers(3, 64, 8).tolist()
    else:
        tokenizer = runners["fp32"].tokenizer
        tokens = tokenizer(text, add_special_tokens=False).input_ids[: args.tokens]
        prompt = tokenizer(text[len(text) // 2 : len(text) // 2 + 300], add_special_tokens=False).input_ids
    count = len(tokens) // args.window
    windows = np.array(tokens[: count * args.window], dtype=np.int64).reshape(count, args.window)
    rows = quality(runners, windows, prompt, args.decode)
    preamble = [
        "# What quantization costs: a trained RetNet on ONNX Runtime, float32 / int8 / int4",
        machine_description(),
        f"model {args.model}; {windows.size} held-out tokens scored in windows of {args.window}, {args.decode} greedy tokens compared after a "
        f"{len(prompt)}-token prompt; load average {load_average()}",
    ]
    print("\n".join(preamble))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    publish(args.out, "quantized_quality", preamble, [format_table(rows, list(rows[0]))], rows, "(no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
