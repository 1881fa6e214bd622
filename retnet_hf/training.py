"""What pretraining and fine-tuning share: the base of their TrainingArguments, resuming, the logged losses."""

from pathlib import Path
from typing import List, Optional

import torch


def base_training_arguments(settings) -> dict:
    """The TrainingArguments (or TRL's SFTConfig) fields every run sets alike, from a run's settings (its
    `output_dir`, `learning_rate`, `batch_size`, `gradient_accumulation_steps`, `max_steps`, `save_steps`,
    `seed`): checkpoints in `output_dir/checkpoints` (the newest two kept), a cosine schedule, bf16 on GPUs that
    have it, the CPU otherwise, no reporting."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(Path(settings.output_dir) / "checkpoints"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to=[],
        seed=settings.seed,
        dataloader_num_workers=0,
    )


def last_checkpoint(checkpoints: Path, resume: bool) -> Optional[str]:
    """The newest checkpoint under `checkpoints` to resume from, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None


def logged_losses(log_history: List[dict]) -> List[float]:
    """The training losses Trainer logged, in order."""
    return [entry["loss"] for entry in log_history if "loss" in entry]
