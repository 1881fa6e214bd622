"""retnet_hf.runs, what a training run needs around the Trainer. The run's output folder: nothing of the user's
overwritten, one run at a time, resuming past a half-written checkpoint (killed, disk full), a diverged run stopped
instead of saved as a success, reruns with the same or other inputs, and the summary a run leaves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retnet_hf.cli import main
from retnet_hf.runs import RUN_MARKER, checkpoint_problem, claimed_output, write_training_summary
from retnet_hf.sample_data import SHAKESPEARE_TRAIN


TINY_RUN = ["--vocab-size", "300", "--block-size", "64", "--batch-size", "4", "--eval-steps", "5", "--save-steps", "5"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(SHAKESPEARE_TRAIN.read_text()[:40_000])
    return path


def train_argv(text_file, output, *extra):
    return ["train", str(text_file), "--output", str(output), *TINY_RUN, *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ the user's files are kept


@pytest.fixture
def users_folder(tmp_path):
    """A folder of someone else's: a model card, a config, a shard, a checkpoint of another tool."""
    folder = tmp_path / "mine"
    (folder / "checkpoints" / "checkpoint-99").mkdir(parents=True)
    (folder / "README.md").write_text("my notes\n")
    (folder / "config.json").write_text('{"model_type": "gpt2"}\n')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    (folder / "checkpoints" / "checkpoint-99" / "optimizer.pt").write_bytes(b"mine")
    return folder


@pytest.mark.parametrize("extra", [(), ("--no-resume",)])
def test_train_refuses_a_folder_that_is_not_its_own(users_folder, text_file, capsys, extra):
    before = snapshot(users_folder)
    assert main(train_argv(text_file, users_folder, "--max-steps", "2", *extra)) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(users_folder) == before  # not a byte written, nothing deleted


def test_an_output_that_is_a_file_is_refused(tmp_path, text_file, capsys):
    target = tmp_path / "model"
    target.write_text("a file of mine")
    assert main(train_argv(text_file, target, "--max-steps", "2")) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "a file of mine"


def test_claimed_output_accepts_new_empty_and_own_folders_and_overwrite(tmp_path, users_folder):
    with claimed_output(tmp_path / "new", "train") as output:
        assert json.loads((output / "checkpoints" / RUN_MARKER).read_text())["pid"] == os.getpid()
    with claimed_output(tmp_path / "new", "train"):  # its own earlier output
        pass
    with pytest.raises(Exception, match="retnet-hf train's output"):  # another command's output
        with claimed_output(tmp_path / "new", "sft"):
            pass
    (tmp_path / "empty").mkdir()
    with claimed_output(tmp_path / "empty", "sft"):
        pass
    with claimed_output(users_folder, "train", overwrite=True):
        assert (users_folder / "README.md").read_text() == "my notes\n"  # overwrite writes, it does not clear


def test_a_second_run_into_the_same_folder_stops_naming_the_first(tmp_path, text_file, capsys):
    output = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "retnet_hf", *train_argv(text_file, output, "--max-steps", "400")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        marker = output / "checkpoints" / RUN_MARKER
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker.is_file() and f'"pid": {first.pid}' in marker.read_text():
                break
            assert first.poll() is None, "the first run ended before the test could start the second"
            time.sleep(0.2)
        else:
            pytest.fail("the first run never claimed its folder")
        assert main(train_argv(text_file, output, "--max-steps", "400")) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {first.pid}" in err
    finally:
        first.kill()
        first.wait()
    with claimed_output(output, "train"):  # a killed run's lock goes with its process
        pass


# ------------------------------------------------------------------------------- half-written checkpoints

KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
from retnet_hf.cli import main

save_rng_state = Trainer._save_rng_state

def killed_at_step_10(self, output_dir):
    if output_dir.endswith("checkpoint-10"):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of writing checkpoint-10
    return save_rng_state(self, output_dir)

Trainer._save_rng_state = killed_at_step_10
sys.exit(main(sys.argv[1:]))
"""


def test_resume_skips_a_checkpoint_whose_save_was_killed(tmp_path, text_file, capsys):
    output = tmp_path / "run"
    script = tmp_path / "kill_during_save.py"
    script.write_text(textwrap.dedent(KILL_DURING_SAVE))
    killed = subprocess.run(
        [sys.executable, str(script), *train_argv(text_file, output, "--max-steps", "15")], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = output / "checkpoints"
    assert checkpoint_problem(checkpoints / "checkpoint-10", 10) == "no trainer_state.json"
    assert checkpoint_problem(checkpoints / "checkpoint-5", 5) is None

    with pytest.warns(UserWarning, match="checkpoint-10 is incomplete"):
        assert main(train_argv(text_file, output, "--max-steps", "15")) == 0
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == 15
    assert (checkpoints / "incomplete-checkpoint-10").is_dir()  # set aside, not deleted
    assert checkpoint_problem(checkpoints / "checkpoint-15", 15) is None


def _mount_tmpfs(path: Path, size: int) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_resume_after_a_full_disk_cut_a_checkpoint_short(tmp_path, text_file, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 64 << 20):
        pytest.skip("needs a small tmpfs to fill, which only root can mount here")
    try:
        output = disk / "run"
        assert main(train_argv(text_file, output, "--max-steps", "5")) == 0
        used = shutil.disk_usage(disk).used
        checkpoint = sum(p.stat().st_size for p in (output / "checkpoints" / "checkpoint-5").iterdir())
        # room for less than half a checkpoint more: the save of checkpoint-10 runs out of space
        subprocess.run(["mount", "-o", f"remount,size={used + checkpoint // 2}", str(disk)], check=True)
        assert main(train_argv(text_file, output, "--max-steps", "10")) != 0
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        assert checkpoint_problem(output / "checkpoints" / "checkpoint-10", 10) is not None

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        with pytest.warns(UserWarning, match="checkpoint-10 is incomplete"):
            assert main(train_argv(text_file, output, "--max-steps", "10")) == 0
        assert json.loads((output / "training_summary.json").read_text())["steps"] == 10
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_checkpoint_problem_names_a_truncated_file(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100)}, folder / "model.safetensors")
    assert checkpoint_problem(folder, 3) is None
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    assert checkpoint_problem(folder, 3) == "model.safetensors is cut short"
    (folder / "model.safetensors").write_bytes(data)
    (folder / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")
    assert checkpoint_problem(folder, 3) == "optimizer.pt is cut short"
    assert checkpoint_problem(folder, 4) == "trainer_state.json names step 3"


# --------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr", ["1e6"])
def test_a_diverged_run_stops_and_is_not_described_as_a_success(tmp_path, text_file, capsys, lr):
    output = tmp_path / "run"
    assert main(train_argv(text_file, output, "--max-steps", "30", "--lr", lr)) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "Lower --lr" in err
    assert not (output / "model.safetensors").exists()
    assert not (output / "README.md").exists() and not (output / "training_summary.json").exists()


def test_a_block_of_one_token_is_refused(tmp_path, text_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(train_argv(text_file, tmp_path / "run", "--block-size", "1"))
    assert exit_.value.code == 2
    assert "--block-size: must be an integer >= 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- early stopping keeps the best model


def test_early_stopping_keeps_the_model_of_the_lowest_evaluation_loss(tmp_path):
    """On a text small enough to over-fit at once, the run stops once the evaluation loss has not improved for
    `--early-stopping-patience` evaluations; the saved model is the one of the lowest evaluation loss (its own
    evaluation gives that loss), and the summary, the card and the plot say which step that was."""
    import torch
    from transformers import AutoModelForCausalLM

    text = tmp_path / "small.txt"
    text.write_text(SHAKESPEARE_TRAIN.read_text()[:6_000])
    out = tmp_path / "run"
    argv = train_argv(text, out, "--max-steps", "300", "--lr", "1e-2", "--early-stopping-patience", "2")
    assert main(argv + ["--eval-fraction", "0.3", "--warmup-steps", "0"]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    state = json.loads(sorted((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    evals = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    best = min(evals, key=evals.get)
    assert summary["steps"] < 300  # it stopped early: the evaluation loss rose after its lowest point
    assert summary["kept_step"] == best < summary["steps"]
    assert summary["eval_loss"] == pytest.approx(evals[best], rel=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / f"checkpoint-{best}").state_dict()
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    assert f"step {best}, the lowest evaluation loss" in (out / "README.md").read_text()


# ------------------------------------------------------------- a rerun resumes what it started, or stops first


def weights_of(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_a_finished_run_trains_nothing_when_run_again_and_rewrites_only_what_is_missing(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(text_file, out, "--max-steps", "6")
    assert main(argv) == 0
    weights, summary = weights_of(out), (out / "training_summary.json").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "finished earlier (6 of --max-steps 6); nothing to train" in said and "wrote again" not in said
    assert weights_of(out) == weights and (out / "training_summary.json").read_text() == summary
    assert not (out / "checkpoints" / "checkpoint-7").exists()
    for name in ("loss.png", "README.md", "training_summary.json", "tokenizer.json"):
        (out / name).unlink()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "wrote again what was missing: the tokenizer, loss.png, training_summary.json, the model card" in said
    assert weights_of(out) == weights and (out / "training_summary.json").read_text() == summary
    assert (out / "loss.png").stat().st_size > 1000 and "6" in (out / "README.md").read_text()
    # a higher --max-steps goes on from the checkpoint
    assert main(train_argv(text_file, out, "--max-steps", "8")) == 0
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 8


@pytest.mark.parametrize(
    "change, named",
    [
        (("--vocab-size", "310"), "tokenizer"),
        (("--preset", "small"), "model"),
        (("--block-size", "32"), "blocks"),
        ("another text", "texts"),
        ("the same text rewritten", "texts"),
    ],
)
def test_a_rerun_with_other_inputs_stops_before_any_work(text_file, tmp_path, capsys, change, named):
    out = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text(text_file.read_text())
    assert main(train_argv(text, out, "--max-steps", "2")) == 0
    before = snapshot(out)
    extra = []
    if change == "another text":
        other = tmp_path / "other.txt"
        other.write_text(text_file.read_text()[:20_000])
        text = other
    elif change == "the same text rewritten":
        stat = text.stat()
        text.write_text(text_file.read_text()[::-1])  # other content, the same size and modification time
        os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        extra = list(change)
    capsys.readouterr()
    assert main(train_argv(text, out, "--max-steps", "4", *extra)) == 2
    err = capsys.readouterr().err
    assert f"started with another {named}" in err and "--no-resume" in err and "Traceback" not in err
    marker = f"checkpoints/{RUN_MARKER}"  # the lock's record of who holds the folder, rewritten by each run
    assert {k: v for k, v in snapshot(out).items() if k != marker} == {k: v for k, v in before.items() if k != marker}
    assert main(train_argv(text, out, "--max-steps", "2", "--no-resume", *extra)) == 0  # afresh, as it says


def test_a_text_rewritten_with_its_modification_time_kept_is_read_as_it_is_now(tmp_path):
    """`datasets` knows a local file by path and modification time; the text trained on must be the file's content."""
    from retnet_hf.data import load_texts

    path = tmp_path / "text.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n")
    assert list(load_texts([str(path)])["text"]) == ["first paragraph", "second paragraph\n"]
    stat = path.stat()
    path.write_text("other words entirely, and longer than before\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list(load_texts([str(path)])["text"]) == ["other words entirely, and longer than before\n"]


# ------------------------------------------------------------------------------------ what a run leaves beside it


def test_the_training_summary_is_indented_json_in_the_output(tmp_path):
    summary = {"steps": 3, "train_loss": 2.5, "base_model": None, "texts": [{"hub": "x"}]}
    path = write_training_summary(tmp_path, summary)
    assert path == tmp_path / "training_summary.json"
    assert path.read_text() == json.dumps(summary, indent=2) and json.loads(path.read_text()) == summary
