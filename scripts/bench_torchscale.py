#!/usr/bin/env python
"""retnet_hf against Microsoft's torchscale 0.3.0 on the same weights: the prompt (ours in one chunkwise pass,
torchscale token by token, the only way its incremental decoding takes one) and the decode step after it.

Needs `pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`. The logic is
`retnet_hf.benchmarking.torchscale_benchmark`; this script prints the machine, the model, a markdown table and
saves torchscale.png, torchscale.md and torchscale.json into --out. `max rel diff` checks that both computed the
same logits.

Full run (defaults: 125M, prompts 512 1k 2k 4k, batch 1, 16 decode steps): estimated 3-6 minutes on an idle
2-core CPU (almost all of it torchscale's 7,680 token-by-token calls, about 20-40 ms each).
Quick run (tiny model, seconds): python scripts/bench_torchscale.py --quick
"""

import argparse
import sys

from retnet_hf import benchmarking as bench


COLUMNS = [
    "prompt",
    "batch",
    "ours prefill s",
    "torchscale prompt s",
    "prefill speed-up",
    "ours ms/step",
    "torchscale ms/step",
    "max rel diff",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_arguments(parser)
    parser.add_argument("--prompts", type=bench.parse_ints, default=None, help="prompt lengths, default '512,1k,2k,4k'")
    parser.add_argument("--batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps after the prompt; default 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.prompts = args.prompts or ([16, 64] if args.quick else [512, 1024, 2048, 4096])
    args.decode_steps = args.decode_steps or (4 if args.quick else 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        bench.import_torchscale()
    except ImportError as error:
        print(
            f"torchscale is not importable ({error}); pip install --no-deps torchscale==0.3.0 fairscale==0.4.0",
            file=sys.stderr,
        )
        return 2
    run = bench.prepare_run(args)
    retnet, _ = bench.build_models(bench.SIZES[args.size](), dtype=run["dtype"], device=args.device, seed=args.seed)
    settings = (
        f"settings: size {args.size}, {args.dtype}, prompts {args.prompts}, batch {args.batch_size}, "
        f"{args.decode_steps} decode steps"
    )
    print(run["header"], bench.describe_models(retnet), settings, sep="\n", flush=True)
    rows = bench.torchscale_benchmark(
        retnet,
        args.prompts,
        args.decode_steps,
        args.batch_size,
        seed=args.seed,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = bench.format_table(rows, COLUMNS)
    note = (
        "ours prefill: one forward pass (chunkwise) returning the state; torchscale prompt: its incremental "
        "decoding, one call per token; ms/step: median decode step after the prompt; max rel diff: logits of "
        "both, relative to their largest magnitude."
    )
    preamble = [run["header"], bench.describe_models(retnet), settings]
    png = bench.plot_torchscale(
        rows, f"{args.out}/torchscale.png", f"retnet_hf vs torchscale 0.3.0, same weights ({args.size}, {args.dtype})"
    )
    bench.publish(args.out, "torchscale", preamble, [table, note], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
