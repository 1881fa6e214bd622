"""Pretraining a RetNet from text with transformers' Trainer: `PretrainSettings` and the `pretrain` recipe.

`pretrain(settings)` runs four phases: the training arguments, the tokenizer and the token blocks (on the main
process first), the model (a preset or a folder to continue), then training and what the run leaves in its
folder (model, tokenizer, generation config, `loss.png`, `training_summary.json`, the model card).
"""

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from .data import SPECIAL_TOKENS, load_texts, save_tokenizer, token_blocks, train_tokenizer
from .errors import UsageError
from .loading import load_causal_lm
from .model import RetNetForCausalLM
from .model_folder import is_local, is_model_folder, resolve_source
from .options import float_in, int_at_least, non_negative_int, positive_float, positive_int
from .presets import PRESETS, preset_config
from .runs import (
    RunSettings,
    base_training_arguments,
    check_run_inputs,
    claimed_output,
    disk_full_explained,
    divergence_guard,
    last_checkpoint,
    logged_losses,
    plot_loss_curve,
    record_finished,
    source_fingerprint,
    write_training_summary,
)


def time_budget(seconds: float):
    """A Trainer callback that stops training once `seconds` have passed (the demo's budget). Under torchrun all
    ranks stop at the same step: rank 0's clock decides. (Made here, not at import: transformers' callback module
    imports peft and bitsandbytes, which `retnet-hf --help` does not need.)"""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        stopped = False  # whether the budget ended the run (it is then unfinished: a rerun goes on)

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            stop = time.monotonic() - self.start > seconds
            if args.world_size > 1:
                flag = torch.tensor([float(stop)], device=args.device)
                torch.distributed.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop:
                control.should_training_stop = self.stopped = True

    return TimeBudget()


@dataclass
class PretrainSettings(RunSettings):
    """One pretraining run; `retnet-hf train`'s options are made from these fields."""

    texts: Tuple[str, ...] = field(
        default=(),
        metadata=dict(positional=True, help="local .txt/.md/.jsonl/.json/.parquet/.csv files or a Hub data set id"),
    )
    output_dir: str = field(
        default="", metadata=dict(flag="--output", required=True, help="folder for checkpoints and the final model")
    )
    preset: str = field(default="tiny", metadata=dict(choices=PRESETS, help="model size (default tiny)"))
    model: Optional[str] = field(default=None, metadata=dict(help="a model folder to continue instead of a new model"))
    tokenizer: Optional[str] = field(
        default=None, metadata=dict(help="a tokenizer folder; by default a byte-level BPE is trained on the text")
    )
    vocab_size: int = field(
        default=4096,
        metadata=dict(
            parse=int_at_least(
                256 + len(SPECIAL_TOKENS), " (a byte-level BPE holds the 256 bytes and 3 special tokens)"
            ),
            help="size of a trained tokenizer",
        ),
    )
    text_column: str = field(default="text", metadata=dict(help="column of jsonl/parquet/csv/Hub data (default text)"))
    block_size: int = field(
        default=256,
        metadata=dict(parse=int_at_least(2, " (a token predicts the next one)"), help="tokens per training sequence"),
    )
    batch_size: int = field(default=8, metadata=dict(parse=positive_int))
    gradient_accumulation_steps: int = field(default=1, metadata=dict(parse=positive_int))
    learning_rate: float = field(
        default=1e-3, metadata=dict(flag="--lr", parse=positive_float, help="peak learning rate (cosine schedule)")
    )
    max_steps: int = field(default=1000, metadata=dict(parse=positive_int))
    max_seconds: Optional[float] = field(
        default=None, metadata=dict(parse=positive_float, help="stop after this many seconds (default: no limit)")
    )
    warmup_steps: int = field(
        default=50, metadata=dict(parse=non_negative_int, help="warm-up steps (at most a tenth of the steps)")
    )
    eval_fraction: float = field(
        default=0.05, metadata=dict(parse=float_in(0.0, 0.5), help="share of the blocks held out for evaluation")
    )
    eval_steps: int = field(default=100, metadata=dict(parse=positive_int))
    save_steps: int = field(default=200, metadata=dict(parse=positive_int))
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata=dict(
            parse=positive_int,
            help="stop once the evaluation loss has not improved for this many evaluations, and keep the model of "
            "the lowest one (checkpoints every --eval-steps; default: train every step, keep the last)",
        ),
    )
    fsdp: bool = field(
        default=False,
        metadata=dict(
            help="shard weights, gradients and optimizer state across the processes of `torchrun` / "
            "`accelerate launch` (FSDP, a decoder layer per unit); without it they train data-parallel"
        ),
    )


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: Optional[float]
    eval_loss: Optional[float]
    seconds: float
    num_parameters: int
    metrics: dict = field(default_factory=dict)
    kept_step: Optional[int] = None  # the step whose model was saved (the best evaluated one with early stopping)
    trained: bool = True  # False: a rerun of a finished run, which trained nothing

    @property
    def eval_perplexity(self) -> Optional[float]:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 50))


def pretrain(settings: PretrainSettings, callbacks: Sequence = ()) -> TrainResult:
    """Train a RetNet from scratch (`settings.preset`) or continue one (`settings.model`, a folder) on text.

    `output_dir` must be new, empty or an earlier `train` run's folder (or `overwrite`), and no other run may be
    writing to it (`runs.claimed_output`). Checkpoints go to `output_dir/checkpoints` and a run resumes from
    the newest complete one. A non-finite loss stops the run with a UsageError before anything is saved as the
    model. Under `torchrun` /
    `accelerate launch` every process runs this function and Trainer trains data-parallel (DDP), or with `fsdp`
    fully sharded (one `RetNetDecoderLayer` per wrap unit); only the main process writes.
    """
    s = settings
    for source, what in ((s.model, "model"), (s.tokenizer, "tokenizer")):
        if source is not None:
            resolve_source(source, what)  # a local path that does not exist: said now, not as a bad Hub id later
    args = _training_arguments(s)
    with ExitStack() as held:
        # the main process claims the folder first; the others then see its marker and only check
        with args.main_process_first(local=False, desc="claiming the output folder"):
            held.enter_context(
                claimed_output(s.output_dir, "train", overwrite=s.overwrite, main_process=args.process_index == 0)
            )
            finished = check_run_inputs(
                s.output_dir, "train", run_inputs(s), s.resume, main_process=args.process_index == 0
            )
        with disk_full_explained(s.output_dir):
            if finished and finished["max_steps"] >= s.max_steps:
                return _finished_earlier(s, finished, main_process=args.process_index == 0)
            return _pretrain(s, args, callbacks)


def train_command(settings: PretrainSettings) -> None:
    """`retnet-hf train`: `pretrain`, and a line on what it trained (from the main process only)."""
    result = pretrain(settings)
    if not _is_main_process() or not result.trained:
        return  # under torchrun / accelerate launch the main process reports; a finished run said so
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s: eval loss {result.eval_loss:.3f}, "
        f"perplexity {result.eval_perplexity:.1f}; model saved to {result.output_dir} (loss curve: loss.png)"
    )


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_inputs(s: PretrainSettings) -> dict:
    """What a train run is started with, which a resumed run must share: the texts (files by SHA-256), the
    tokenizer (given, or trained to a size), the model (a folder to continue, or a preset) and the token blocks
    (their length, the evaluation share and the seed that splits them)."""
    return {
        "texts": [source_fingerprint(text) for text in s.texts],
        "text_column": s.text_column,
        "tokenizer": source_fingerprint(s.tokenizer) if s.tokenizer else {"trained, vocab_size": s.vocab_size},
        "model": source_fingerprint(s.model) if s.model else {"preset": s.preset},
        "blocks": {"block_size": s.block_size, "eval_fraction": s.eval_fraction, "seed": s.seed},
    }


def _pretrain(s: PretrainSettings, args, callbacks: Sequence) -> TrainResult:
    from transformers import Trainer, default_data_collator

    tokenizer, train_set, eval_set = _tokenizer_and_blocks(s, args)
    torch.manual_seed(s.seed)
    model = _model(s, tokenizer)
    num_parameters = model.num_parameters()  # before FSDP shards the weights
    guard = divergence_guard()
    budget = time_budget(s.max_seconds) if s.max_seconds is not None else None
    callbacks = [guard, *callbacks] + ([budget] if budget is not None else [])
    if s.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=s.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    start = time.monotonic()
    resume = last_checkpoint(Path(args.output_dir), s.resume, set_aside=args.process_index == 0)
    train_output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - start
    metrics = trainer.evaluate() if guard.diverged is None else {}
    guard.raise_if_diverged(s, metrics.get("eval_loss"))
    losses = logged_losses(trainer.state.log_history)
    result = TrainResult(
        output_dir=Path(s.output_dir),
        steps=trainer.state.global_step,
        train_loss=losses[-1] if losses else train_output.training_loss,
        eval_loss=metrics.get("eval_loss"),
        seconds=seconds,
        num_parameters=num_parameters,
        metrics=metrics,
        kept_step=_kept_step(trainer),
    )
    _save(s, trainer, tokenizer, result, len(eval_set), finished=budget is None or not budget.stopped)
    return result


def _kept_step(trainer) -> int:
    """The step of the model the run keeps: the best evaluated checkpoint's when Trainer loaded it at the end, else
    the last step."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return int(Path(best).name.rsplit("-", 1)[-1])
    return trainer.state.global_step


def _training_arguments(s: PretrainSettings):
    from transformers import TrainingArguments

    keep_best = {}
    if s.early_stopping_patience is not None:  # Trainer's own: checkpoints at every evaluation, the best reloaded
        keep_best = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    args = TrainingArguments(
        **{**base_training_arguments(s), **({"save_steps": s.eval_steps} if keep_best else {})},
        **keep_best,
        per_device_eval_batch_size=s.batch_size,
        warmup_steps=min(s.warmup_steps, s.max_steps // 10),
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=s.eval_steps,
        logging_steps=max(1, min(10, s.eval_steps)),
        disable_tqdm=False,
        ddp_find_unused_parameters=False,  # every weight takes part in each step
        # FSDP through Trainer's own integration (FSDP2 in transformers 5.x): one RetNetDecoderLayer per wrap unit
        fsdp=s.fsdp,
        fsdp_config={"transformer_layer_cls_to_wrap": ["RetNetDecoderLayer"], "reshard_after_forward": True}
        if s.fsdp
        else None,
    )
    if s.fsdp and args.use_cpu:
        # accelerate (1.15) turns FSDP on only for multi-GPU/accelerator runs; on CPU processes it would drop the
        # plugin without a word and train data-parallel, so say so instead
        raise UsageError(
            "--fsdp needs GPUs (or other accelerators): accelerate applies FSDP only to multi-device "
            "runs, not to CPU processes; without --fsdp the processes train data-parallel (DDP)"
        )
    return args


def _tokenizer_and_blocks(s: PretrainSettings, args):
    """The tokenizer (given, the continued model's, a resumed run's, or trained on the text) and the training and
    evaluation blocks; the main process goes first, the others wait and reuse what it saved."""
    from transformers import PreTrainedTokenizerFast

    checkpoints = Path(args.output_dir)
    with args.main_process_first(local=False, desc="tokenizer and data"):
        data = load_texts(s.texts, s.text_column)
        source = None if s.tokenizer is None else resolve_source(s.tokenizer, "tokenizer")
        if source is None and s.model is not None and (Path(s.model) / "tokenizer.json").exists():
            source = s.model
        trained = checkpoints / "tokenizer"  # kept so that a resumed run uses the same one
        if source is None and (s.resume or args.process_index > 0) and (trained / "tokenizer.json").exists():
            source = str(trained)
        if source is not None:
            try:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
            except Exception as error:  # not a tokenizer folder, an unreachable Hub id, a broken tokenizer.json
                raise UsageError(f"{source}: cannot load a tokenizer from it: {error}") from error
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = train_tokenizer((row["text"] for row in data), s.vocab_size)
            save_tokenizer(tokenizer, trained)
        blocks = token_blocks(data, tokenizer, s.block_size).shuffle(seed=s.seed)
    n_eval = max(1, int(len(blocks) * s.eval_fraction))
    return tokenizer, blocks.select(range(n_eval, len(blocks))), blocks.select(range(n_eval))


def _model(s: PretrainSettings, tokenizer):
    if s.model is None:
        return RetNetForCausalLM(preset_config(s.preset, len(tokenizer), tokenizer))
    model = load_causal_lm(s.model, trust_remote_code=s.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def _save(s: PretrainSettings, trainer, tokenizer, result: TrainResult, n_eval: int, finished: bool) -> None:
    """The model (every rank takes part: FSDP gathers the weights), then on the main process the tokenizer, the
    loss curve, the run summary and the model card; a `finished` run (not stopped by its time budget) is recorded
    as such, for a rerun to find."""
    output = Path(s.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(output))
    if not trainer.is_world_process_zero():
        return
    save_tokenizer(tokenizer, output)
    plot_loss_curve(trainer.state.log_history, output / "loss.png", kept_step=result.kept_step)
    texts = [os.fspath(t) for t in s.texts]
    summary = {
        "preset": s.preset if s.model is None else None,
        "base_model": s.model,
        "texts": [source_fingerprint(text) for text in s.texts],  # local files with the SHA-256 trained on
        "steps": result.steps,
        "kept_step": result.kept_step,
        **{key: asdict(s)[key] for key in ("block_size", "batch_size", "gradient_accumulation_steps", "learning_rate")},
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "eval_perplexity": result.eval_perplexity,
        "num_parameters": result.num_parameters,
        "seconds": round(result.seconds, 1),
    }
    write_training_summary(output, summary)
    from .model_card import write_model_card  # the card (README.md): this run's settings and measured figures

    args = trainer.args
    local_base = s.model is not None and is_local(s.model)
    card = dict(
        base_model=None if s.model is None or local_base else s.model,
        datasets=[t for t in texts if not Path(t).exists()],
        local_data=[Path(t).name for t in texts if Path(t).exists()],
        source=f"Continued from the local model folder `{Path(s.model).name}`." if local_base else None,
        training={
            "model size preset": s.preset if s.model is None else None,
            "parameters": result.num_parameters,
            "tokenizer vocabulary": len(tokenizer),
            "training steps": result.steps,
            "kept model": None
            if result.kept_step == result.steps
            else f"step {result.kept_step}, the lowest evaluation loss (early stopping)",
            "sequence length (tokens)": s.block_size,
            "batch size per device": s.batch_size,
            "processes": args.world_size,
            "gradient accumulation steps": s.gradient_accumulation_steps,
            "peak learning rate": s.learning_rate,
            "schedule": f"cosine, {args.warmup_steps} warm-up steps, weight decay {args.weight_decay}",
            "precision": "bf16 mixed" if args.bf16 else "float32",
            "seed": s.seed,
            "training time (s)": round(result.seconds, 1),
        },
        evaluation={
            "eval loss (nats/token)": result.eval_loss,
            "eval perplexity": result.eval_perplexity,
            "last logged training loss": result.train_loss,
        },
        evaluation_note=f"{n_eval} held-out blocks of {s.block_size} tokens, {n_eval * s.block_size:,} tokens",
    )
    write_model_card(output, **card)
    if finished:
        fields = {name: value for name, value in asdict(result).items() if name not in ("output_dir", "trained")}
        record_finished(s.output_dir, {"max_steps": s.max_steps, "result": fields, "summary": summary, "card": card})


def _finished_earlier(s: PretrainSettings, finished: dict, main_process: bool) -> TrainResult:
    """A rerun of a finished run: no training; the outputs that are missing are written again (the model from the
    checkpoint of its kept step, the tokenizer, the loss curve, the summary, the card), and it says so."""
    output = Path(s.output_dir)
    result = TrainResult(output_dir=output, **{**finished["result"], "trained": False})
    checkpoints = output / "checkpoints"
    rewritten = []
    if main_process and not (is_model_folder(output) and any(output.glob("model*.safetensors"))):
        source = checkpoints / f"checkpoint-{result.kept_step}"
        if not is_model_folder(source):
            raise UsageError(
                f"--output {s.output_dir}: the run finished, but its model files are gone and so is {source.name}; "
                "run with --no-resume to train it again"
            )
        RetNetForCausalLM.from_pretrained(source).save_pretrained(output)
        rewritten.append("the model")
    if main_process and not (output / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        places = (checkpoints / "tokenizer", checkpoints / f"checkpoint-{result.kept_step}", s.tokenizer, s.model)
        source = next((str(p) for p in places if p is not None and (Path(p) / "tokenizer.json").is_file()), None)
        if source is None:
            raise UsageError(
                f"--output {s.output_dir}: the run finished, but its tokenizer is gone from it and from its "
                "checkpoints; run with --no-resume to train it again"
            )
        save_tokenizer(PreTrainedTokenizerFast.from_pretrained(source), output)
        rewritten.append("the tokenizer")
    states = sorted(checkpoints.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    if main_process and not (output / "loss.png").is_file() and states:
        log_history = json.loads(states[-1].read_text())["log_history"]
        plot_loss_curve(log_history, output / "loss.png", kept_step=result.kept_step)
        rewritten.append("loss.png")
    if main_process and not (output / "training_summary.json").is_file():
        write_training_summary(output, finished["summary"])
        rewritten.append("training_summary.json")
    if main_process and not (output / "README.md").is_file():
        from .model_card import write_model_card

        write_model_card(output, **finished["card"])
        rewritten.append("the model card")
    if main_process:
        print(
            f"{s.output_dir}: this run finished earlier ({result.steps} of --max-steps {finished['max_steps']}); "
            f"nothing to train{'; wrote again what was missing: ' + ', '.join(rewritten) if rewritten else ''} "
            "(--no-resume trains afresh; a higher --max-steps goes on)"
        )
    return result
