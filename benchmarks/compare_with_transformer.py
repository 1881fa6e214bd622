"""RetNet against a same-size Transformer (transformers' LlamaForCausalLM) at small scale, on the CPU.

Both models get the same byte-level BPE tokenizer (`train_tokenizer`), the same token blocks (`load_texts`,
`token_blocks`, one shuffled split into training and validation blocks), the same Trainer settings (AdamW, cosine
schedule with warm-up, batch, steps, seed, so the same batches in the same order) and the same learning-rate
sweep. The Llama's MLP width is chosen so that its parameter count matches the RetNet's (embeddings and output
layer included, neither tied; `benchmarks.common.same_size_llama`). Prints the validation losses side by side (a
markdown table) and saves curves.png, table.md and results.json into --output. `compare(settings)` is the same in Python.

  python -m benchmarks.compare_with_transformer                  # the package's Tiny Shakespeare sample, defaults
  python -m benchmarks.compare_with_transformer --text my.txt --steps 600 --lrs 1e-3,3e-3
  python -m benchmarks.compare_with_transformer --quick          # tiny models and text, seconds (for the tests)
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from retnet_hf.data import load_texts, save_tokenizer, token_blocks, train_tokenizer
from retnet_hf.errors import UsageError
from retnet_hf.options import add_settings_options, settings_from_args
from retnet_hf.sample_data import SHAKESPEARE_TRAIN

from .common import same_size_llama


@dataclass
class ComparisonSettings:
    """One comparison's settings; the command line's options are made from these fields."""

    text: str = field(
        default=str(SHAKESPEARE_TRAIN),
        metadata=dict(help="any text file (default: the package's 400,000 characters of Tiny Shakespeare)"),
    )
    output_dir: str = field(
        default="comparison", metadata=dict(flag="--output", help="folder for curves.png, table.md, results.json")
    )
    max_chars: Optional[int] = field(default=None, metadata=dict(help="use only the text's first characters"))
    vocab_size: int = 2048
    d_model: int = field(default=128, metadata=dict(help="width of both models"))
    layers: int = field(default=4, metadata=dict(help="layers of both models"))
    retnet_heads: int = field(default=2, metadata=dict(help="key head dim d_model / heads, as the paper's presets"))
    llama_heads: int = 4
    block_size: int = field(default=128, metadata=dict(help="tokens per sequence"))
    batch_size: int = 16
    steps: int = 200
    eval_every: int = 25
    eval_blocks: int = field(default=64, metadata=dict(help="validation blocks, held out from training"))
    warmup_fraction: float = 0.1
    learning_rates: Tuple[float, ...] = field(
        default=(1e-3, 3e-3, 1e-2),
        metadata=dict(flag="--lrs", parse=lambda text: tuple(map(float, text.split(","))), help="e.g. 1e-3,3e-3,1e-2"),
    )
    seed: int = 0
    save_models: bool = field(
        default=False,
        metadata=dict(
            help="keep each trained model with the tokenizer in OUTPUT/models/<model>-lr<lr> (for retnet-hf eval)"
        ),
    )


# --quick: tiny models and text, seconds (for the tests)
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


@dataclass
class Run:
    model: str
    parameters: int
    learning_rate: float
    eval_steps: List[int]
    eval_losses: List[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.eval_losses[-1]


@dataclass
class Comparison:
    settings: ComparisonSettings
    vocab_size: int
    train_blocks: int
    runs: List[Run] = field(default_factory=list)

    def best(self, model: str) -> Run:
        return min((r for r in self.runs if r.model == model), key=lambda r: r.final_loss)

    def table(self) -> str:
        """A markdown table: model, parameters, learning rate, final and lowest validation loss, best lr marked."""
        lines = [
            "| model | params | lr | final val loss | lowest val loss | best lr |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for run in self.runs:
            mark = "*" if run is self.best(run.model) else ""
            lines.append(
                f"| {run.model} | {run.parameters:,} | {run.learning_rate:g} | {run.final_loss:.4f} | "
                f"{min(run.eval_losses):.4f} | {mark} |"
            )
        return "\n".join(lines)


def retnet_model(s: ComparisonSettings, vocab: int, tokenizer):
    from retnet_hf.model import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig(
        vocab_size=vocab,
        decoder_embed_dim=s.d_model,
        decoder_value_embed_dim=2 * s.d_model,
        decoder_ffn_embed_dim=2 * s.d_model,
        decoder_layers=s.layers,
        decoder_retention_heads=s.retnet_heads,
        activation_fn="swish",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return RetNetForCausalLM(config)


def llama_model(s: ComparisonSettings, retnet_config):
    """The same-size Llama: `s.llama_heads` heads, the MLP width that matches the RetNet's parameter count."""
    from transformers import LlamaForCausalLM

    config = same_size_llama(
        retnet_config, head_dim=s.d_model // s.llama_heads, multiple_of=1, max_position_embeddings=s.block_size
    )
    return LlamaForCausalLM(config)


def _eval_history(log_history) -> tuple:
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    steps, losses = [], []
    for step, loss in evals:  # the final evaluation repeats the last step when it falls on eval_every
        if steps and steps[-1] == step:
            losses[-1] = loss
        else:
            steps.append(step)
            losses.append(loss)
    return steps, losses


def train_one(name: str, model, s: ComparisonSettings, lr: float, train_set, eval_set, workdir: Path) -> Run:
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(workdir),
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(s.steps * s.warmup_fraction)),
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=s.eval_every,
        save_strategy="no",
        logging_steps=s.eval_every,
        use_cpu=True,
        report_to=[],
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=default_data_collator
    )
    start = time.monotonic()
    evaluation0 = trainer.evaluate()  # step 0: the untrained model
    trainer.train()
    if trainer.state.global_step % s.eval_every:
        trainer.evaluate()
    seconds = time.monotonic() - start
    steps, losses = _eval_history(trainer.state.log_history)
    return Run(name, model.num_parameters(), lr, [0] + steps, [evaluation0["eval_loss"]] + losses, seconds)


def plot_curves(comparison: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lrs = sorted({r.learning_rate for r in comparison.runs})
    for run in comparison.runs:
        style = "-" if run.model == "RetNet" else "--"
        ax.plot(
            run.eval_steps,
            run.eval_losses,
            style,
            color=colours[lrs.index(run.learning_rate) % len(colours)],
            label=f"{run.model} ({run.parameters / 1e6:.2f}M), lr {run.learning_rate:g}",
        )
    ax.axhline(math.log(comparison.vocab_size), color="grey", lw=0.8, ls=":", label="uniform, ln(vocab)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("RetNet vs a same-size Llama: validation loss")
    finals = [r.final_loss for r in comparison.runs]
    ax.set_ylim(min(finals) - 0.3, max(r.eval_losses[0] for r in comparison.runs) + 0.2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(s: ComparisonSettings, log=print) -> Comparison:
    """Train both models at every learning rate; write results.json, table.md and curves.png to `output_dir`."""
    text = Path(s.text)
    if not text.is_file():
        raise UsageError(f"{s.text}: no such file")
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if s.max_chars:
        part = out / f"text-{s.max_chars}{text.suffix}"
        part.write_text(text.read_text(encoding="utf-8")[: s.max_chars], encoding="utf-8")
        text = part
    data = load_texts([str(text)])
    tokenizer = train_tokenizer((row["text"] for row in data), s.vocab_size)
    vocab = len(tokenizer)
    blocks = token_blocks(data, tokenizer, s.block_size).shuffle(seed=s.seed)
    n_eval = min(s.eval_blocks, max(1, len(blocks) // 10))
    eval_set, train_set = blocks.select(range(n_eval)), blocks.select(range(n_eval, len(blocks)))
    comparison = Comparison(s, vocab, len(train_set))
    log(
        f"data: {text} -> {len(train_set)} training and {n_eval} validation blocks of {s.block_size} tokens; "
        f"byte-level BPE vocabulary {vocab}; {s.steps} steps x batch {s.batch_size} = "
        f"{s.steps * s.batch_size / len(train_set):.2f} epochs"
    )

    torch.manual_seed(s.seed)
    retnet = retnet_model(s, vocab, tokenizer)
    target, llama = retnet.num_parameters(), llama_model(s, retnet.config)
    llama_params = llama.num_parameters()
    log(
        f"parameters: RetNet {target:,}, Llama {llama_params:,} ({100 * (llama_params / target - 1):+.2f}%); "
        f"Llama MLP width {llama.config.intermediate_size}"
    )
    for lr in s.learning_rates:
        for name in ("RetNet", "Llama"):
            torch.manual_seed(s.seed)
            model = retnet_model(s, vocab, tokenizer) if name == "RetNet" else llama_model(s, retnet.config)
            run = train_one(name, model, s, lr, train_set, eval_set, out / "trainer")
            comparison.runs.append(run)
            if s.save_models:
                folder = out / "models" / f"{name.lower()}-lr{lr:g}"
                model.save_pretrained(folder)
                save_tokenizer(tokenizer, folder)
            log(
                f"{name:6s} lr {lr:g}: val loss {run.eval_losses[0]:.3f} -> {run.final_loss:.3f} in {run.seconds:.0f} s"
            )
    comparison.runs.sort(key=lambda r: (r.model != "RetNet", r.learning_rate))
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": {**asdict(s), "learning_rates": list(s.learning_rates)},
                "vocab_size": vocab,
                "train_blocks": comparison.train_blocks,
                "eval_blocks": n_eval,
                "runs": [asdict(r) | {"final_loss": r.final_loss} for r in comparison.runs],
            },
            indent=2,
        )
    )
    (out / "table.md").write_text(comparison.table() + "\n")
    plot_curves(comparison, out / "curves.png")
    return comparison


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_options(parser, ComparisonSettings)
    parser.add_argument("--quick", action="store_true", help="tiny models, 40k characters, 30 steps (tests)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy, shared CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(ComparisonSettings, args, **(QUICK if args.quick else {}))
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
    print(f"curves: {Path(settings.output_dir) / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
