"""The command line end to end on tiny settings: train, resume, generate, chat, demo, and clear errors."""

import argparse
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retnet_hf.cli import COMMANDS, build_parser, main
from retnet_hf.options import settings_from_args
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
        "fla_retention.py",
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
        (["train", "/no/such/file.txt", "--output", "{tmp_path}/run"], "no such file"),
    ],
)
def test_bad_paths_give_a_message_and_nonzero_exit(argv, message, capsys, tmp_path):
    assert main([arg.format(tmp_path=tmp_path) for arg in argv]) != 0
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


# ------------------------------------------------------------------------------------------ the table of commands

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_design_notes_table_of_commands_is_the_command_line_s():
    """docs/design.md's "Commands" table: each command's module, settings class and test file, as `cli.COMMANDS`
    has them; the settings class and run function are the module's own, and the test file runs the command."""
    section = (REPOSITORY / "docs" / "design.md").read_text().split("\n## Commands\n")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()]
    rows = [row for row in rows if len(row) == 4][2:]  # past the header and its rule
    assert [row[:3] for row in rows] == [[c.name, f"retnet_hf/{c.module}.py", c.settings] for c in COMMANDS]
    for (name, _, _, test_file), command in zip(rows, COMMANDS):
        settings, run = command.load(command.settings), command.load(command.run)
        assert dataclasses.is_dataclass(settings) and callable(run)
        assert settings.__module__ == run.__module__ == f"retnet_hf.{command.module}", name
        assert f'"{name}"' in (REPOSITORY / test_file).read_text(), f"{test_file} does not run {name}"


def subcommand(name: str) -> argparse.ArgumentParser:
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices[name]


@pytest.mark.parametrize(
    "name, options",
    [
        ("demo", "--text --output --max-seconds --max-steps --overwrite"),
        (
            "generate",
            "--prompt --max-new-tokens --greedy --temperature --top-p --top-k --seed --quantize --trust-remote-code",
        ),
        ("chat", "--max-new-tokens --greedy --temperature --top-p --top-k --seed --quantize --trust-remote-code"),
        ("convert", "--from --config --max-shard-size"),
        ("push", "--private --revision --commit-message --create-pr --token --dry-run --include"),
        ("export-onnx", "--quantize"),
    ],
)
def test_the_commands_keep_their_options(name, options):
    found = {flag for action in subcommand(name)._actions for flag in action.option_strings} - {"-h", "--help"}
    assert found == set(options.split())


def test_settings_from_the_command_line():
    """Defaults, dests and repeated options as the commands had them before their settings classes."""
    parser = build_parser()

    def settings(*argv):
        command = next(command for command in COMMANDS if command.name == argv[0])
        return settings_from_args(command.load(command.settings), parser.parse_args(argv))

    generate, chat = settings("generate", "folder"), settings("chat", "folder")
    assert (generate.max_new_tokens, chat.max_new_tokens, generate.prompt, chat.greedy) == (200, 128, "", False)
    assert generate.sampling() == {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 50}
    assert settings("chat", "folder", "--greedy").sampling() == {"do_sample": False}
    convert = settings("convert", "--from", "fla", "src", "out")
    assert (convert.source_format, convert.src, convert.out, convert.max_shard_size) == ("fla", "src", "out", "2GB")
    push = settings("push", "folder", "user/name", "--include", "a.md", "--include=notes/*")
    assert push.include == ("a.md", "notes/*") and settings("push", "folder", "user/name").include == ()
    demo = settings("demo")
    assert (demo.text, demo.output_dir, demo.max_seconds, demo.max_steps, demo.overwrite) == (
        None,
        "retnet-demo",
        120.0,
        1500,
        False,
    )


def test_a_settings_class_checks_itself_before_the_command_runs(tmp_path, capsys):
    """push's target is checked as its settings are made, before the folder is read."""
    assert main(["push", str(tmp_path / "missing"), "user/name", "--create-pr", "--revision", "dev"]) == 2
    assert "retnet-hf push: error: give either --revision or --create-pr" in capsys.readouterr().err
