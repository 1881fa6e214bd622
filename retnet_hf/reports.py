"""What a training run leaves beside the model: the loss curve."""

from pathlib import Path
from typing import List, Optional

from .errors import require


def plot_loss_curve(log_history: List[dict], path: Path, kept_step: Optional[int] = None) -> None:
    """Training and evaluation loss against the step, saved as a PNG; `kept_step` (the step of the model saved)
    is marked when given."""
    matplotlib = require("matplotlib")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the curve of training: what was logged before Trainer's closing summary (the evaluation of the saved model
    # after it would stand at the last step, beside the last evaluation during training)
    end = next((i for i, e in enumerate(log_history) if "train_runtime" in e), len(log_history))
    train = [(e["step"], e["loss"]) for e in log_history[:end] if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history[:end] if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval")
    if kept_step is not None:
        ax.axvline(kept_step, color="grey", linestyle="--", label=f"kept model (step {kept_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("RetNet training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
