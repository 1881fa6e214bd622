#!/usr/bin/env python
"""Prefill and training benchmark: time and peak memory of forward (no_grad) and forward+backward against the
sequence length, for RetNet's parallel and chunkwise forms and a same-size Llama with SDPA, in one run.

The logic is `retnet_hf.benchmarking.prefill_benchmark`; this script prints the machine, the models, a markdown
table and where chunkwise overtakes parallel, and saves prefill.png, prefill.md and prefill.json into --out.
Points that would not fit in memory (the parallel form's [T, T] matrices) are skipped and say so.

Full run (defaults: 125M, lengths 512 to 16k doubling, batch 1, both modes, 1 repeat): about 10 minutes on an
idle 2-core CPU with 23.5 GB, most of it the parallel form's forward at 8k (about 2 minutes). There the memory
guard skips the parallel form's longest points and forward+backward at 16k (measured: 14.6 GB of tensors for
RetNet, 17.0 GB for Llama, in float32) and says so. To measure 16k training on such a machine (about 6 minutes):
MALLOC_MMAP_THRESHOLD_=131072 python scripts/bench_prefill.py --modes forward+backward \
    --variants "RetNet chunkwise,Llama SDPA" --lengths 8k,16k --memory-fraction 1.3
(the fixed malloc threshold keeps the RSS at the tensor peak). --gradient-checkpointing makes 16k training take
about 7 GB for either model (then the logits dominate).
Quick run (tiny model, seconds): python scripts/bench_prefill.py --quick
"""

import argparse
import os
import sys

from retnet_hf import benchmarking as bench


COLUMNS = ["variant", "length", "batch", "mode", "seconds", "tokens/s", "peak MB", "RSS MB"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_arguments(parser)
    parser.add_argument(
        "--lengths", type=bench.parse_ints, default=None, help="sequence lengths, default '512,1k,2k,4k,8k,16k'"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--modes", default="forward,forward+backward", help="default 'forward,forward+backward'")
    parser.add_argument(
        "--variants", default=",".join(bench.PREFILL_VARIANTS), help=f"default '{','.join(bench.PREFILL_VARIANTS)}'"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="RetNet chunk size (default: the config's, 512)")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many timings; default 1")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer in the backward pass (both models); it lets 16k training at "
        "125M float32 fit in about 7 GB, where without it each needs 15 GB or more",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="skip a point when its predicted peak (the peak at the previous length, scaled, times "
        "1.3) exceeds this fraction of the available memory; default 0.7",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.lengths = args.lengths or ([32, 128] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    args.modes = args.modes.replace(" ", "").split(",")
    args.variants = [variant.strip() for variant in args.variants.split(",")]
    unknown = [variant for variant in args.variants if variant not in bench.PREFILL_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(bench.PREFILL_VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = bench.prepare_run(args)
    overrides = {} if args.chunk_size is None else {"recurrent_chunk_size": args.chunk_size}
    retnet_config = bench.SIZES[args.size](**overrides)
    retnet, llama = bench.build_models(retnet_config, dtype=run["dtype"], device=args.device, seed=args.seed)
    settings = (
        f"settings: size {args.size}, {args.dtype}, lengths {args.lengths}, batch {args.batch_size}, "
        f"modes {args.modes}, {args.repeats} repeat(s), gradient checkpointing {args.gradient_checkpointing}, "
        f"memory fraction {args.memory_fraction}"
    )
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # glibc: fixed threshold, large blocks go back to the system
        settings += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    print(run["header"], bench.describe_models(retnet, llama), settings, sep="\n", flush=True)
    rows = bench.prefill_benchmark(
        retnet,
        llama,
        args.lengths,
        args.batch_size,
        args.modes,
        args.variants,
        args.repeats,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        memory_fraction=args.memory_fraction,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = bench.format_table(rows, COLUMNS)
    chunk = retnet_config.recurrent_chunk_size
    summary = "\n".join(f"- {line}" for line in bench.prefill_summary(rows, chunk))
    note = (
        "forward: no_grad, use_cache=True, last-token logits (a prefill); forward+backward: labels = inputs, "
        f"full logits, loss.backward(). peak MB: {bench.PeakMemory(args.device).method} (increase over the start); "
        "RSS MB (CPU): sampled resident-set increase, which also counts memory malloc keeps after a free."
    )
    preamble = [run["header"], bench.describe_models(retnet, llama), settings]
    png = bench.plot_prefill(rows, f"{args.out}/prefill.png", f"Prefill and training ({args.size}, {args.dtype})")
    bench.publish(args.out, "prefill", preamble, [table, note, summary], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
