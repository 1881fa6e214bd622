#!/usr/bin/env python
"""Decode benchmark: RetNet (recurrent state) against a same-size Llama (KV cache, SDPA), in one run.

Tokens/s, % of the memory-bandwidth ceiling and memory at each context and batch size, through generate() and
through a bare step loop. The logic is `retnet_hf.benchmarking.decode_benchmark`; this script parses arguments,
prints the machine, the models, a markdown table and the goals' figures, and saves decode.png, decode.md and
decode.json into --out.

Full run (defaults: 125M, contexts 512 2k 8k 16k, batch 1 and 8, 16 new tokens, 1 repeat): estimated 6-12
minutes on an idle 2-core CPU (from FLOP and byte counts and a 1k-token calibration, not a full run): mostly the
prefills at 8k-16k (Llama about 2 minutes at 16k, RetNet about 1) and Llama's batch-8 steps at 8k-16k (about 1 s
each: its KV cache is 4.8-9.7 GB). Llama batch 8 at 16k needs about 12 GB free, or it is skipped and says so.
Add 32k with --contexts 512,2k,8k,16k,32k (Llama's prefill alone then takes about 6 more minutes).
Quick run (tiny model, seconds): python scripts/bench_decode.py --quick
"""

import argparse
import sys

from retnet_hf import benchmarking as bench


COLUMNS = [
    "model",
    "context",
    "batch",
    "path",
    "ms/step",
    "tokens/s",
    "ideal tokens/s",
    "% ceiling",
    "cache MB",
    "decode MB",
    "prefill s",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_arguments(parser)
    parser.add_argument(
        "--contexts",
        type=bench.parse_ints,
        default=None,
        help="context lengths, e.g. '512,2k,8k,16k' (default; 32k if memory allows is opt-in)",
    )
    parser.add_argument("--batch-sizes", type=bench.parse_ints, default=None, help="default '1,8'")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed per point; default 16")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many timings; default 1")
    parser.add_argument("--paths", default="generate,step", help="'generate,step' (default), or one of them")
    args = parser.parse_args(argv)
    quick = args.quick
    if quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.contexts = args.contexts or ([32, 64] if quick else [512, 2048, 8192, 16384])
    args.batch_sizes = args.batch_sizes or ([1, 2] if quick else [1, 8])
    args.new_tokens = args.new_tokens or (4 if quick else 16)
    args.paths = [path for path in args.paths.replace(",", " ").split()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = bench.prepare_run(args)
    retnet_config = bench.SIZES[args.size]()
    retnet, llama = bench.build_models(retnet_config, dtype=run["dtype"], device=args.device, seed=args.seed)
    settings = (
        f"settings: size {args.size}, {args.dtype}, contexts {args.contexts}, batch sizes {args.batch_sizes}, "
        f"{args.new_tokens} new tokens, {args.repeats} repeat(s), paths {args.paths}"
    )
    print(run["header"], bench.describe_models(retnet, llama), settings, sep="\n", flush=True)
    rows = bench.decode_benchmark(
        retnet,
        llama,
        args.contexts,
        args.batch_sizes,
        args.new_tokens,
        args.repeats,
        run["bandwidth"],
        args.paths,
        seed=args.seed,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = bench.format_table(rows, COLUMNS)
    summary = "\n".join(f"- {line}" for line in bench.decode_summary(rows))
    note = (
        "ms/step: time per decode step (generate: between the first and the last new token, as a streamer "
        "sees them); tokens/s = batch / step time; ideal: batch * bandwidth / (non-embedding weight bytes + "
        "batch * state or KV bytes); decode MB: cache + peak increase during an untimed step loop "
        f"({bench.PeakMemory(args.device).method})."
    )
    preamble = [run["header"], bench.describe_models(retnet, llama), settings]
    png = bench.plot_decode(rows, f"{args.out}/decode.png", f"Decode, RetNet vs Llama ({args.size}, {args.dtype})")
    bench.publish(args.out, "decode", preamble, [table, note, summary], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
