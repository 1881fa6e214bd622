"""What a training run needs around the Trainer, shared by `train` (pretraining.py) and `sft` (finetuning.py): the
run's settings (`RunSettings`), the base of their TrainingArguments, the output folder (claimed, locked), the
inputs a resumed run must keep, resuming from the newest complete checkpoint, the logged losses and the stop on
divergence, and what a run leaves beside the model (`loss.png`, `training_summary.json`).

A run writes only into a folder that is empty, new, or its own command's earlier output (a marker file,
`checkpoints/retnet-hf-run.json`, says whose), unless `overwrite` is given; while it runs it holds a lock on that
marker, so a second run into the same folder stops with a message naming the first.

A run records what it was started with (`checkpoints/run.json`: its data files and their SHA-256, tokenizer, base
model, preset or shape, LoRA settings; `run_inputs`): running the same command again resumes it, a rerun with other
inputs stops before any work and names what changed, and a rerun of a finished run trains nothing (it rewrites
only the outputs that are missing).
"""

import errno
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from .errors import UsageError, require
from .options import non_negative_int


RUN_MARKER = "retnet-hf-run.json"  # in OUTPUT/checkpoints: which command's output this folder is, and who holds it
RUN_RECORD = "run.json"  # in OUTPUT/checkpoints: what the run was started with, and how it finished
TRAINING_SUMMARY = "training_summary.json"  # in OUTPUT: what the run trained and measured


@dataclass
class RunSettings:
    """The settings every training command shares (`PretrainSettings` and `SFTSettings` extend it)."""

    seed: int = field(default=0, metadata=dict(parse=non_negative_int))
    resume: bool = field(default=True, metadata=dict(help="continue from the newest checkpoint (--no-resume: afresh)"))
    overwrite: bool = field(
        default=False,
        metadata=dict(
            help="write into a non-empty --output that is not this command's earlier output (replaces files)"
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=dict(help="let a model folder that is not a RetNet run its own Python code")
    )


def base_training_arguments(settings) -> dict:
    """The TrainingArguments (or TRL's SFTConfig) fields every run sets alike, from a run's settings (its
    `output_dir`, `learning_rate`, `batch_size`, `gradient_accumulation_steps`, `max_steps`, `save_steps`,
    `seed`): checkpoints in `output_dir/checkpoints` (the newest two kept), a cosine schedule, bf16 on GPUs that
    have it, the CPU otherwise, no reporting, and non-finite losses logged as they are (Trainer would otherwise log
    the previous average in their place, and a diverged run would look fine)."""
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
        logging_nan_inf_filter=False,
    )


# ------------------------------------------------------------------------------------------- the output folder


@contextmanager
def claimed_output(output_dir, command: str, *, overwrite: bool = False, main_process: bool = True) -> Iterator[Path]:
    """Hold `output_dir` for one run of `command` ("train", "sft"), before anything is written into it.

    Refused (UsageError): a path that is a file; a non-empty folder that is not `command`'s own earlier output,
    unless `overwrite`; a folder another run is writing to (the lock on the marker, released when the process ends,
    however it ends). Under torchrun only the main process takes the lock; the others only check, after it (inside
    `TrainingArguments.main_process_first`), so that they find its marker.
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output_dir} is a file; give a folder (new, empty, or an earlier run's output)")
    marker = output / "checkpoints" / RUN_MARKER
    if not overwrite and output.is_dir() and any(output.iterdir()) and _marker_command(marker) != command:
        shown = ", ".join(sorted(p.name for p in output.iterdir())[:6])
        whose = f"retnet-hf {_marker_command(marker)}'s output" if marker.is_file() else "not a retnet-hf run's output"
        raise UsageError(
            f"--output {output_dir} already holds files ({shown}, ...) and is {whose}; nothing was written. "
            f"Choose a new folder, or pass --overwrite to write into it (files of the same names are replaced)"
        )
    if not main_process:
        yield output
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        handle = open(marker, "a+")
    except OSError as error:
        raise UsageError(
            f"--output {output_dir}: cannot write there ({error.strerror}); choose another folder"
        ) from error
    with handle:
        if not _lock(handle):
            handle.seek(0)
            holder = _read_json(handle.read())
            raise UsageError(
                f"--output {output_dir} is in use by another run (retnet-hf {holder.get('command', '?')}, pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}); "
                "wait for it to finish or choose another --output"
            )
        handle.seek(0)
        handle.truncate()
        record = {
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
        }
        handle.write(json.dumps(record, indent=2) + "\n")
        handle.flush()
        yield output  # the lock goes with the handle


def _lock(handle) -> bool:
    """An exclusive, non-blocking lock on the open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; a concurrent run is not detected there
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _marker_command(marker: Path) -> Optional[str]:
    try:
        return _read_json(marker.read_text()).get("command")
    except OSError:
        return None


def _read_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def disk_full_explained(output_dir) -> Iterator[None]:
    """A full disk under `output_dir` while the run writes, as a UsageError that says so and what to do (torch's
    writer reports it as a RuntimeError about stream positions, the others as OSError ENOSPC)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and isinstance(error, RuntimeError):
            try:
                full = shutil.disk_usage(output_dir).free < 16 << 20
            except OSError:
                full = False
        if not full:
            raise
        raise UsageError(
            f"No space left on device under {output_dir} ({error}); free space, then run the same command again: "
            "it resumes from the newest complete checkpoint"
        ) from error


# ------------------------------------------------------------------------------------- what a run resumes


def source_fingerprint(source: Optional[str]) -> Optional[dict]:
    """A run's input as it is now, to tell whether a rerun has the same: a local file by its path and SHA-256; a
    local folder (a model, a tokenizer) by its path, the SHA-256 of its JSON files and its weight files' sizes; a
    Hub id by its name."""
    from .data import file_sha256

    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return {"file": str(path.resolve()), "sha256": file_sha256(path)}
    if path.is_dir():
        files = {p.name: file_sha256(p) for p in sorted(path.glob("*.json")) if p.name != RUN_MARKER}
        files.update({p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))})
        return {"folder": str(path.resolve()), "files": files}
    return {"hub": str(source)}


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def check_run_inputs(output_dir, command: str, inputs: dict, resume: bool, main_process: bool = True) -> dict:
    """Before any work: stop (UsageError) when `resume` would continue a run in `output_dir` that was started with
    other `inputs`, naming what changed; else record `inputs` as the run's. Returns how the recorded run finished
    (`record_finished`'s entry) when it had these inputs and finished, else an empty dict."""
    path = Path(output_dir) / "checkpoints" / RUN_RECORD
    inputs = json.loads(json.dumps(inputs))  # as read back: tuples become lists
    try:
        earlier = _read_json(path.read_text()) if path.is_file() else {}
    except OSError:
        earlier = {}
    before = earlier.get("inputs")
    if resume and before is not None and before != inputs:
        changed = [key for key in sorted(set(before) | set(inputs)) if before.get(key) != inputs.get(key)]
        details = "; ".join(f"{key}: {_shown(before.get(key))} then, {_shown(inputs.get(key))} now" for key in changed)
        raise UsageError(
            f"--output {output_dir} holds a retnet-hf {command} run started with another {', '.join(changed)} "
            f"({details}); resuming it would mix the two. Nothing was done: run with --no-resume to start afresh in "
            "that folder, or choose another --output"
        )
    if resume and before == inputs:
        return earlier.get("finished") or {}
    if main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, "inputs": inputs}, indent=2) + "\n")
    return {}


def record_finished(output_dir, finished: dict) -> None:
    """Add to the run's record how it finished (what a rerun needs to say so and to rewrite missing outputs)."""
    path = Path(output_dir) / "checkpoints" / RUN_RECORD
    record = _read_json(path.read_text()) if path.is_file() else {}
    record["finished"] = json.loads(json.dumps(finished, default=str))
    path.write_text(json.dumps(record, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------- resuming

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def last_checkpoint(checkpoints: Path, resume: bool, set_aside: bool = True) -> Optional[str]:
    """The newest complete checkpoint under `checkpoints` to resume from, or None.

    A checkpoint whose save was cut short (the process killed, the disk full) is skipped with a warning that names
    it and says why; with `set_aside` (the main process) it is renamed `incomplete-checkpoint-N`, out of Trainer's
    way (Trainer would count it among the checkpoints it keeps, and save into it again).
    """
    if not resume or not checkpoints.is_dir():
        return None
    found = sorted(
        (int(match.group(1)), path)
        for path in checkpoints.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))
    )
    for step, path in reversed(found):
        problem = checkpoint_problem(path, step)
        if problem is None:
            return str(path)
        note = ""
        if set_aside:
            aside = _free_name(checkpoints / f"incomplete-{path.name}")
            path.rename(aside)
            note = f"; moved to {aside.name}"
        warnings.warn(f"{path} is incomplete ({problem}: its save was cut short){note}; resuming from an earlier one")
    return None


def checkpoint_problem(path: Path, step: int) -> Optional[str]:
    """Why the Trainer checkpoint folder `path` (of step `step`) cannot be resumed from, or None when it is whole:
    `trainer_state.json` (written last) parses and names the step, every safetensors file holds the bytes its
    header promises, every torch file (optimizer, scheduler, RNG states) is a readable archive."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except OSError:
        return "no trainer_state.json"
    except ValueError:
        return "trainer_state.json is cut short"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json names step {state.get('global_step') if isinstance(state, dict) else '?'}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no weight file"
    for file in weights:
        if not _safetensors_whole(file):
            return f"{file.name} is cut short"
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.bin")):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile):
            return f"{file.name} is cut short"
    return None


def _safetensors_whole(file: Path) -> bool:
    """Whether the safetensors file is as long as its header says (8-byte length, JSON header, the tensors)."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return file.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


# ---------------------------------------------------------------------------------------------- the losses


def logged_losses(log_history: List[dict]) -> List[float]:
    """The training losses Trainer logged, in order."""
    return [entry["loss"] for entry in log_history if "loss" in entry]


def divergence_guard():
    """A Trainer callback that stops training at the first non-finite logged loss (training or evaluation) and
    saves no checkpoint of that step; `raise_if_diverged(settings)` then turns it into the run's error."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        diverged = None  # (step, name, value) of the first non-finite loss

        def on_log(self, args, state, control, logs=None, **kwargs):
            for name in ("loss", "eval_loss"):
                value = (logs or {}).get(name)
                if self.diverged is None and value is not None and not math.isfinite(value):
                    self.diverged = (state.global_step, name, value)
            if self.diverged is not None:
                control.should_training_stop = True
                control.should_save = False

        def raise_if_diverged(self, settings, eval_loss: Optional[float] = None) -> None:
            if self.diverged is None and eval_loss is not None and not math.isfinite(eval_loss):
                self.diverged = ("the end", "eval_loss", eval_loss)
            if self.diverged is None:
                return
            step, name, value = self.diverged
            raise UsageError(
                f"training diverged: {name} {value} at step {step}; the model was not saved and no card was written "
                f"(checkpoints before that step are kept). Lower --lr (it was {settings.learning_rate:g}) or check "
                "the data"
            )

    return DivergenceGuard()


# ------------------------------------------------------------------------------- what a run leaves beside the model


def write_training_summary(output_dir, summary: dict) -> Path:
    """`training_summary.json` in `output_dir`: the run's summary as indented JSON (both commands write it, and a
    rerun of a finished run writes it again from the recorded summary when it is missing). Returns its path."""
    path = Path(output_dir) / TRAINING_SUMMARY
    path.write_text(json.dumps(summary, indent=2))
    return path


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
