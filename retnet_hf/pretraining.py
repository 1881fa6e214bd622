"""Pretraining a RetNet from text with transformers' Trainer: presets, tokenizer training, data, the run itself."""

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, default_data_collator
from transformers.trainer_callback import TrainerCallback

from .data import load_texts, save_tokenizer, token_blocks, train_tokenizer
from .errors import UsageError
from .model import RetNetForCausalLM
from .presets import preset_config
from .reports import plot_loss_curve


class TimeBudget(TrainerCallback):
    """Stops training once `seconds` have passed (the demo's budget)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        stop = time.monotonic() - self.start > self.seconds
        if args.world_size > 1:  # under torchrun all ranks must stop at the same step: rank 0's clock decides
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            control.should_training_stop = True


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: Optional[float]
    eval_loss: Optional[float]
    seconds: float
    num_parameters: int
    metrics: dict = field(default_factory=dict)

    @property
    def eval_perplexity(self) -> Optional[float]:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 50))


def pretrain(
    texts: Sequence[str],
    output_dir: str,
    preset: str = "tiny",
    model: Optional[str] = None,
    tokenizer: Optional[str] = None,
    vocab_size: int = 4096,
    block_size: int = 256,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-3,
    max_steps: int = 1000,
    max_seconds: Optional[float] = None,
    warmup_steps: int = 50,
    eval_fraction: float = 0.05,
    eval_steps: int = 100,
    save_steps: int = 200,
    seed: int = 0,
    resume: bool = True,
    text_column: str = "text",
    fsdp: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train a RetNet from scratch (`preset`) or continue one (`model`, a folder) on `texts`.

    Checkpoints go to `output_dir/checkpoints` and a run resumes from the newest one; the final model, tokenizer,
    generation config, model card and `loss.png` go to `output_dir`.

    Under `torchrun` / `accelerate launch` every process runs this function and Trainer trains data-parallel (DDP),
    or with `fsdp=True` fully sharded (FSDP, one `RetNetDecoderLayer` per wrap unit): the main process reads the
    text and trains the tokenizer while the others wait, then load what it saved; only the main process writes.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    output = Path(output_dir)
    checkpoints = output / "checkpoints"
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(warmup_steps, max_steps // 10),
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(10, eval_steps)),
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,  # every weight takes part in each step
        # FSDP through Trainer's own integration (FSDP2 in transformers 5.x; `fsdp="full_shard auto_wrap"` is its
        # deprecated spelling): full sharding, one RetNetDecoderLayer per wrap unit
        fsdp=fsdp,
        fsdp_config={"transformer_layer_cls_to_wrap": ["RetNetDecoderLayer"], "reshard_after_forward": True}
        if fsdp
        else None,
    )
    if fsdp and args.use_cpu:
        # accelerate (1.15) turns FSDP on only for multi-GPU/accelerator runs; on CPU processes it would drop the
        # plugin without a word and train data-parallel, so say so instead
        raise UsageError(
            "--fsdp needs GPUs (or other accelerators): accelerate applies FSDP only to multi-device "
            "runs, not to CPU processes; without --fsdp the processes train data-parallel (DDP)"
        )
    with args.main_process_first(local=False, desc="tokenizer and data"):  # the others wait, then reuse its work
        data = load_texts(texts, text_column)
        if tokenizer is None and model is not None and (Path(model) / "tokenizer.json").exists():
            tokenizer = model
        trained_tokenizer = checkpoints / "tokenizer"  # kept so that a resumed run uses the same one
        if tokenizer is None and (resume or args.process_index > 0) and (trained_tokenizer / "tokenizer.json").exists():
            tokenizer = str(trained_tokenizer)
        if tokenizer is not None:
            tok = PreTrainedTokenizerFast.from_pretrained(tokenizer)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        else:
            tok = train_tokenizer((row["text"] for row in data), vocab_size)
            save_tokenizer(tok, trained_tokenizer)

        blocks = token_blocks(data, tok, block_size).shuffle(seed=seed)
    n_eval = max(1, int(len(blocks) * eval_fraction))
    eval_set, train_set = blocks.select(range(n_eval)), blocks.select(range(n_eval, len(blocks)))

    torch.manual_seed(seed)
    if model is not None:
        net = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True)
        if net.get_input_embeddings().num_embeddings < len(tok):
            net.resize_token_embeddings(len(tok))
    else:
        net = RetNetForCausalLM(preset_config(preset, len(tok), tok))
    num_parameters = net.num_parameters()  # before FSDP shards the weights

    callbacks = list(callbacks) + ([TimeBudget(max_seconds)] if max_seconds else [])
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    start = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - start
    metrics = trainer.evaluate()

    output.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(output))  # every rank takes part (FSDP gathers the full weights); the main one writes
    if trainer.is_world_process_zero():
        save_tokenizer(tok, output)
        plot_loss_curve(trainer.state.log_history, output / "loss.png")
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = TrainResult(
        output_dir=output,
        steps=trainer.state.global_step,
        train_loss=train_losses[-1] if train_losses else train_output.training_loss,
        eval_loss=metrics.get("eval_loss"),
        seconds=seconds,
        num_parameters=num_parameters,
        metrics=metrics,
    )
    if not trainer.is_world_process_zero():
        return result
    (output / "training_summary.json").write_text(
        json.dumps(
            {
                "preset": preset if model is None else None,
                "base_model": model,
                "texts": [os.fspath(t) for t in texts],
                "steps": result.steps,
                "block_size": block_size,
                "batch_size": batch_size,
                "gradient_accumulation_steps": gradient_accumulation_steps,
                "learning_rate": learning_rate,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "eval_perplexity": result.eval_perplexity,
                "num_parameters": result.num_parameters,
                "seconds": round(seconds, 1),
            },
            indent=2,
        )
    )
    from .model_card import write_model_card  # the card (README.md): this run's settings and measured figures

    local_base = model is not None and Path(model).exists()
    write_model_card(
        output,
        base_model=None if model is None or local_base else model,
        datasets=[os.fspath(t) for t in texts if not Path(t).exists()],
        local_data=[Path(t).name for t in texts if Path(t).exists()],
        source=f"Continued from the local model folder `{Path(model).name}`." if local_base else None,
        training={
            "model size preset": preset if model is None else None,
            "parameters": result.num_parameters,
            "tokenizer vocabulary": len(tok),
            "training steps": result.steps,
            "sequence length (tokens)": block_size,
            "batch size per device": batch_size,
            "processes": args.world_size,
            "gradient accumulation steps": gradient_accumulation_steps,
            "peak learning rate": learning_rate,
            "schedule": f"cosine, {args.warmup_steps} warm-up steps, weight decay {args.weight_decay}",
            "precision": "bf16 mixed" if args.bf16 else "float32",
            "seed": seed,
            "training time (s)": round(seconds, 1),
        },
        evaluation={
            "eval loss (nats/token)": result.eval_loss,
            "eval perplexity": result.eval_perplexity,
            "last logged training loss": result.train_loss,
        },
        evaluation_note=f"{n_eval} held-out blocks of {block_size} tokens, {n_eval * block_size:,} tokens",
    )
    return result
