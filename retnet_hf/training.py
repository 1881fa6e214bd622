"""What pretraining and fine-tuning share: the base of their TrainingArguments, resuming, the logged losses."""

from pathlib import Path
from typing import List, Optional

import torch


def base_training_arguments(
    checkpoints: Path,
    *,
    learning_rate: float,
    batch_size: int,
    gradient_accumulation_steps: int,
    max_steps: int,
    save_steps: int,
    seed: int,
) -> dict:
    """The TrainingArguments (or TRL's SFTConfig) fields every run here sets alike: checkpoints in `checkpoints`
    (the newest two kept), a cosine schedule, bf16 on GPUs that have it, the CPU otherwise, no reporting."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(checkpoints),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
    )


def last_checkpoint(checkpoints: Path, resume: bool) -> Optional[str]:
    """The newest checkpoint under `checkpoints` to resume from, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None


def logged_losses(log_history: List[dict]) -> List[float]:
    """The training losses Trainer logged, in order."""
    return [entry["loss"] for entry in log_history if "loss" in entry]
