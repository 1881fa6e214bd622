"""The command line end to end on tiny settings: train, resume, generate, chat, demo, and clear errors."""

import io
import json
import re
import subprocess
import sys

import pytest
import torch

from retnet_hf.cli import main
from retnet_hf.sample_data import SHAKESPEARE_TRAIN

from conftest import TINY_TRAIN


SHAKESPEARE = SHAKESPEARE_TRAIN


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("run") / "model"
    code = main(
        [
            "train",
            str(text_file),
            "--output",
            str(out),
            *TINY_TRAIN,
            "--max-steps",
            "12",
            "--eval-steps",
            "6",
            "--save-steps",
            "6",
            "--lr",
            "3e-3",
        ]
    )
    assert code == 0
    return out


def test_train_writes_a_complete_folder_that_loads(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "loss.png",
        "modeling_retnet.py",
        "configuration_retnet.py",
        "retention.py",
    ):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(trained, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_training_lowers_the_loss(trained):
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["eval_loss"] < torch.log(torch.tensor(300.0)).item()  # better than uniform over the vocabulary


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, text_file):
    common = [
        "train",
        str(text_file),
        "--output",
        str(tmp_path),
        "--vocab-size",
        "300",
        "--block-size",
        "64",
        "--batch-size",
        "4",
        "--eval-steps",
        "5",
        "--save-steps",
        "5",
    ]
    assert main(common + ["--max-steps", "10", "--max-seconds", "0.001"]) == 0  # stops after the first step
    first = json.loads((tmp_path / "training_summary.json").read_text())["steps"]
    assert first < 10
    assert main(common + ["--max-steps", "10", "--save-steps", "1"]) == 0
    # the second run picked up the first run's tokenizer and went on to the last step
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 10
    assert (tmp_path / "checkpoints" / "checkpoint-10").is_dir()


def test_generate_streams_and_reports_speed(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "KING", "--max-new-tokens", "8", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("KING") and len(out) > len("KING")
    assert "tokens/s" in err


def test_chat_keeps_the_state_between_turns(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n"))
    assert main(["chat", str(trained), "--max-new-tokens", "5", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant>") == 2
    contexts = [int(n) for n in re.findall(r"(\d+) tokens of context", err)]
    assert len(contexts) == 2 and contexts[1] > contexts[0]


def test_demo_runs_on_a_small_budget(tmp_path, text_file, capsys):
    assert (
        main(
            [
                "demo",
                "--text",
                str(text_file),
                "--output",
                str(tmp_path / "demo"),
                "--max-seconds",
                "3",
                "--max-steps",
                "20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in ("chunkwise vs parallel", "recurrent vs parallel", "decode at 128 tokens", "decode at 4096 tokens"):
        assert row in out
    for form in ("chunkwise", "recurrent"):
        assert float(out.split(f"{form} vs parallel")[1].split("=")[1].split()[0]) < 1e-4
    # the chunkwise row spans several chunks: a probe inside one chunk is the parallel computation itself
    tokens, chunks, chunk = map(int, re.search(r"\((\d+) tokens, (\d+) chunks of (\d+)\)", out).groups())
    assert chunks >= 3 and tokens > 3 * chunk
    assert chunk == json.loads((tmp_path / "demo" / "config.json").read_text())["recurrent_chunk_size"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "/no/such/folder"], "not a model folder"),
        (["train", "/no/such/file.txt", "--output", "/tmp/x"], "no such file"),
    ],
)
def test_bad_paths_give_a_message_and_nonzero_exit(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_checkpoint_gives_a_message(tmp_path, trained, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in trained.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["generate", str(broken), "--prompt", "x"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_wrong_option_and_help_in_a_fresh_process():
    help_text = subprocess.run([sys.executable, "-m", "retnet_hf", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0
    for command in ("demo", "train", "generate", "chat"):
        assert command in help_text.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "retnet_hf", "train", "x.txt", "--output", "o", "--max-steps", "-3"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "must be a positive integer" in wrong.stderr
    assert "Traceback" not in wrong.stderr
