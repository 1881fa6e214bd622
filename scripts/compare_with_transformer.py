#!/usr/bin/env python
"""Quality at small scale: a RetNet and a same-size Transformer (LlamaForCausalLM) on the CPU.

Same parameter count (within 3%), same byte-level BPE tokenizer, same data and batches, same steps, and a small
learning-rate sweep for each; prints the validation losses side by side (a markdown table) and saves
curves.png, table.md and results.json into --output. The logic is `retnet_hf.comparison.compare`.

  python scripts/compare_with_transformer.py                  # ../shared/data/tinyshakespeare.txt, defaults
  python scripts/compare_with_transformer.py --text my.txt --steps 600 --lrs 1e-3,3e-3
  python scripts/compare_with_transformer.py --quick          # tiny models and text, seconds (for the tests)
"""

import argparse
import sys
from pathlib import Path

from retnet_hf.comparison import ComparisonSettings, compare
from retnet_hf.pretraining import UsageError


DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
QUICK = dict(
    max_chars=40_000,
    vocab_size=300,
    d_model=48,
    layers=2,
    retnet_heads=2,
    llama_heads=2,
    block_size=32,
    batch_size=8,
    steps=30,
    eval_every=10,
    eval_blocks=16,
    learning_rates=(2e-3, 5e-3, 1e-2),
)


def _floats(text):
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def parse_args(argv=None):
    d = ComparisonSettings(text="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="any text file (default tinyshakespeare.txt)")
    parser.add_argument("--output", default="comparison", help="folder for curves.png, table.md, results.json")
    parser.add_argument("--quick", action="store_true", help="tiny models, 40k characters, 30 steps (tests)")
    parser.add_argument("--max-chars", type=int, default=d.max_chars, help="use only the text's first characters")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size)
    parser.add_argument("--d-model", type=int, default=d.d_model, help="width of both models")
    parser.add_argument("--layers", type=int, default=d.layers, help="layers of both models")
    parser.add_argument("--retnet-heads", type=int, default=d.retnet_heads)
    parser.add_argument("--llama-heads", type=int, default=d.llama_heads)
    parser.add_argument("--block-size", type=int, default=d.block_size, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--eval-blocks", type=int, default=d.eval_blocks, help="held-out validation blocks")
    parser.add_argument("--lrs", type=_floats, default=d.learning_rates, help="learning rates, e.g. 1e-3,3e-3,1e-2")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy, shared CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fields = dict(
        max_chars=args.max_chars,
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        layers=args.layers,
        retnet_heads=args.retnet_heads,
        llama_heads=args.llama_heads,
        block_size=args.block_size,
        batch_size=args.batch_size,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_blocks=args.eval_blocks,
        learning_rates=args.lrs,
    )
    if args.quick:
        fields.update(QUICK)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ComparisonSettings(text=args.text, output_dir=args.output, seed=args.seed, **fields)
    try:
        comparison = compare(settings, log=lambda line: print(line, flush=True))
    except UsageError as error:
        print(f"compare_with_transformer: error: {error}", file=sys.stderr)
        return 2
    print()
    print(comparison.table())
    for model in ("RetNet", "Llama"):
        best = comparison.best(model)
        print(f"best {model}: lr {best.learning_rate:g}, final val loss {best.final_loss:.4f}")
    print(f"curves: {Path(args.output) / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
