"""Step time and peak memory of LoRA and QLoRA fine-tuning steps: RetNet vs a LlamaForCausalLM of the same size.

    python -m benchmarks.finetune [--lengths 512 2048 8192] [--steps 3] [--preset small]

Each (model, method, length) runs in its own process (so the peak memory is its own): LoRA on every projection
(r 16), batch 1, AdamW, `--steps` timed steps after one warm-up step. On a GPU the memory is
`torch.cuda.max_memory_allocated`; on a CPU it is the process's peak resident set. The Llama has the RetNet's
width, depth and head count, and an MLP width chosen so the parameter counts match. One run prints one table.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from .common import same_size_llama


def build(kind: str, preset: str, vocab: int, method: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    from retnet_hf import RetNetForCausalLM
    from retnet_hf.presets import preset_config

    config = preset_config(preset, vocab)
    torch.manual_seed(0)
    if kind == "retnet":
        model = RetNetForCausalLM(config)
    else:  # the RetNet's width, depth and head count, the MLP width that matches its parameter count
        head_dim = config.decoder_embed_dim // config.decoder_retention_heads
        model = LlamaForCausalLM(
            same_size_llama(config, head_dim=head_dim, multiple_of=1, max_position_embeddings=16384)
        )
    params = sum(p.numel() for p in model.parameters())
    if method == "qlora":  # round trip through a folder: from_pretrained does the quantization
        import tempfile

        from transformers import AutoModelForCausalLM

        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            ),
        )
    return model, params


def one(kind: str, method: str, length: int, steps: int, preset: str, vocab: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from retnet_hf.finetuning import prepare_for_kbit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, params = build(kind, preset, vocab, method)
    if method == "qlora":
        model = prepare_for_kbit(model, gradient_checkpointing=False)
    elif device == "cuda":
        model = model.to(device)
    targets = "all-linear"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, vocab, (1, length), device=model.device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": kind,
        "method": method,
        "length": length,
        "params": params,
        "step_s": sum(times) / len(times),
        "peak_mib": memory,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, method, length = args.one
        print(json.dumps(one(kind, method, int(length), args.steps, args.preset, args.vocab)))
        return

    rows = []
    for length in args.lengths:
        for method in args.methods:
            for kind in ("retnet", "llama"):
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.finetune",
                    "--one",
                    kind,
                    method,
                    str(length),
                    "--steps",
                    str(args.steps),
                    "--preset",
                    args.preset,
                    "--vocab",
                    str(args.vocab),
                ]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                    line = [text for text in done.stdout.splitlines() if text.startswith("{")]
                    row = json.loads(line[-1]) if line else {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
                except subprocess.TimeoutExpired:
                    row = {"error": f"over {args.timeout:.0f} s"}
                row.update(model=kind, method=method, length=length)
                rows.append(row)
                print(
                    f"  {kind:6s} {method:5s} {length:5d}: "
                    + (
                        f"{row['step_s']:.3f} s/step, peak {row['peak_mib']:.0f} MiB"
                        if "step_s" in row
                        else row["error"]
                    ),
                    file=sys.stderr,
                    flush=True,
                )

    device = next((r["device"] for r in rows if "device" in r), "?")
    params = {r["model"]: r["params"] for r in rows if "params" in r}
    print(
        f"\nLoRA r=16 on all projections, batch 1, mean of {args.steps} steps, on {device}; parameters: "
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items())
    )
    memory = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    print(f"| method | length | RetNet s/step | Llama s/step | RetNet {memory} | Llama {memory} |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        for method in args.methods:
            pair = {r["model"]: r for r in rows if r["length"] == length and r["method"] == method}

            def cell(kind, key, fmt):
                row = pair.get(kind, {})
                return fmt.format(row[key]) if key in row else row.get("error", "-")

            print(
                f"| {method} | {length} | {cell('retnet', 'step_s', '{:.3f}')} | {cell('llama', 'step_s', '{:.3f}')} "
                f"| {cell('retnet', 'peak_mib', '{:.0f}')} | {cell('llama', 'peak_mib', '{:.0f}')} |"
            )


if __name__ == "__main__":
    main()
