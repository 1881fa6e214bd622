"""The commands run no code of a model folder's own without --trust-remote-code, load RetNet folders through the
installed package, and refuse a model whose weights do not cover it."""

import json
import shutil

import pytest
import torch

from retnet_hf.cli import main
from retnet_hf.data import save_tokenizer, train_tokenizer
from retnet_hf.sample_data import SHAKESPEARE_TRAIN

from conftest import tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    text = SHAKESPEARE_TRAIN.read_text()[:20_000]
    return train_tokenizer(text.split("\n\n"), 300)


@pytest.fixture(scope="module")
def retnet_folder(tmp_path_factory, tokenizer):
    from retnet_hf import RetNetForCausalLM

    folder = tmp_path_factory.mktemp("retnet")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    RetNetForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


SENTINEL_CODE = """
from pathlib import Path
Path({sentinel!r}).write_text("the folder's own code ran")
raise SystemExit("the folder's own code ran")
"""


@pytest.fixture
def foreign_folder(tmp_path, retnet_folder):
    """A folder of another model type whose config asks to run its own Python (auto_map): the code, if imported,
    leaves a file behind."""
    folder = tmp_path / "foreign"
    shutil.copytree(retnet_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "not_a_retnet"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(SENTINEL_CODE.format(sentinel=str(folder / "code-ran")))
    return folder


def commands_on(folder, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "### Human: hi### Assistant: hello"}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE_TRAIN.read_text()[:5_000])
    return {
        "generate": ["generate", str(folder), "--prompt", "a"],
        "chat": ["chat", str(folder)],
        "sft": ["sft", str(folder), "--output", str(tmp_path / "sft"), "--data", str(data), "--max-steps", "1"],
        "train": ["train", str(text), "--model", str(folder), "--output", str(tmp_path / "train"), "--max-steps", "1"],
    }


@pytest.mark.parametrize("command", ["generate", "chat", "sft", "train"])
def test_a_foreign_folder_code_runs_only_with_the_flag(command, foreign_folder, tmp_path, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    argv = commands_on(foreign_folder, tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "not_a_retnet" in err and "Traceback" not in err
    assert not (foreign_folder / "code-ran").exists()
    with pytest.raises(BaseException):  # with consent the folder's code runs (and here it stops the load)
        main(argv + ["--trust-remote-code"])
    assert (foreign_folder / "code-ran").exists()


def test_a_retnet_folder_loads_through_the_package_not_its_saved_code(retnet_folder, tmp_path, capsys):
    folder = tmp_path / "retnet"
    shutil.copytree(retnet_folder, folder)
    # the copy of the code next to the weights is never imported
    (folder / "modeling_retnet.py").write_text(SENTINEL_CODE.format(sentinel=str(folder / "code-ran")))
    assert main(["generate", str(folder), "--prompt", "a", "--max-new-tokens", "3", "--greedy"]) == 0
    assert not (folder / "code-ran").exists()


def test_missing_weights_are_an_error_for_inference(retnet_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(retnet_folder, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(name for name in weights if ".layers.1." in name)
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors")
    assert main(["generate", str(folder), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert f"lack or mis-shape {len(dropped)} tensor(s)" in err and "random layers" in err


def test_the_generate_default_prompt_starts_from_the_beginning_of_text(retnet_folder, capsys):
    assert main(["generate", str(retnet_folder), "--max-new-tokens", "4", "--greedy"]) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_chat_survives_a_line_that_is_not_utf8(retnet_folder, capsys, monkeypatch):
    import io
    import sys

    stdin = io.TextIOWrapper(io.BytesIO("caf\xe9\n".encode("latin-1") + b"hello\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", str(retnet_folder), "--max-new-tokens", "3", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert "not UTF-8" in err and out.count("assistant>") == 1


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--top-p", "0", "must be a number in (0, 1]"),
        ("--top-p", "2", "must be a number in (0, 1]"),
        ("--top-k", "0", "must be a positive integer"),
        ("--temperature", "0", "must be a number in (0, inf)"),
        ("--seed", "-1", "must be an integer >= 0"),
    ],
)
def test_sampling_options_out_of_range_are_refused(retnet_folder, option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(retnet_folder), option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-seconds", "0"], "must be a number in (0, inf)"),
        (["--vocab-size", "1"], "must be an integer >= 259"),
        (["--seed", "-3"], "must be an integer >= 0"),
        (["--lr", "nan"], "must be a number in (0, inf)"),
    ],
)
def test_train_options_out_of_range_are_refused(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "x.txt", "--output", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--model", "--tokenizer"])
def test_a_missing_local_model_or_tokenizer_is_named_as_a_missing_folder(tmp_path, option, capsys):
    text = tmp_path / "text.txt"
    text.write_text("some text\n\nmore text\n")
    assert main(["train", str(text), "--output", str(tmp_path / "o"), option, "./no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "./no/such/folder: no such" in err and "repo" not in err.lower()
    assert not (tmp_path / "o").exists()  # refused before anything was written
