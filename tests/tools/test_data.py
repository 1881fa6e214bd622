"""retnet_hf.data: text files that cannot be read give a UsageError naming them; the Llama-2 chat parser on rows
that fooled the old regex; what sft's --max-length cuts and drops, counted before training as SFTTrainer cuts.

Tiny tokenizers trained here on the guanaco rows of the package's sample data; nothing trains.
"""

import json
import re

import pytest
import torch

from retnet_hf import ACTIVATION_CHECKPOINTING, RetNetForCausalLM
from retnet_hf.cli import main
from retnet_hf.data import (
    guanaco_messages,
    load_guanaco,
    load_texts,
    save_tokenizer,
    set_chat_template,
    split_prompt_completion,
    to_guanaco,
    train_tokenizer,
)
from retnet_hf.errors import UsageError
from retnet_hf.sample_data import GUANACO as PARQUET

from conftest import tiny_config


@pytest.fixture(scope="module")
def llama_rows():
    import pandas as pd

    return list(pd.read_parquet(PARQUET)["text"])


@pytest.fixture(scope="module")
def tokenizer(llama_rows):
    return set_chat_template(train_tokenizer([to_guanaco(t) for t in llama_rows[:200]], 320))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny RetNet folder with its tokenizer, as `retnet-hf train` leaves one."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    RetNetForCausalLM(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


def write_jsonl(path, texts):
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


# ---------------------------------------------------------------- text files that cannot be read (train)


BAD_FILES = {
    "empty.txt": (b"", "the file is empty"),
    "blank.txt": (b"\n\n   \n\t\n", "the training text is empty"),
    "binary.txt": (bytes(range(256)) * 8, "a binary file, not text"),
    "latin1.txt": ("Un café, crème brûlée.\n\nÀ bientôt.\n".encode("latin-1"), "not UTF-8 (byte 0xe9 at offset 6"),
    "utf16.txt": ("Hello there.\n\nA second paragraph.\n".encode("utf-16"), "UTF-16, not UTF-8"),
    "utf16be.txt": ("Hello there.\n\nA second paragraph.\n".encode("utf-16-be"), "UTF-16, not UTF-8"),
    "broken.jsonl": (b'{"text": "fine"}\n{"text": "no closing quote}\n{"text": "fine"}\n', "line 2 is not valid JSON"),
    "list.jsonl": (b'{"text": "fine"}\n["not", "an", "object"]\n', "line 2 is a JSON list, not an object"),
    "broken.json": (b'[\n  {"text": "a"},\n  {"text": "b"\n]\n', "not valid JSON (Expecting ',' delimiter at line 4"),
    "numbers.jsonl": (b'{"text": 1}\n{"text": 2}\n', "row 1 of column 'text' is 1 (int), not a string"),
    "mixed.jsonl": (b'{"text": "words"}\n{"text": 2.5}\n', "row 2 of column 'text' is 2.5 (float), not a string"),
    "numbers.csv": (b"text\n1\n2\n", "row 1 of column 'text' is 1 (int), not a string"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_unreadable_text_files_give_a_usage_error_naming_the_file(tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UsageError) as caught:
        load_texts([str(path)])
    text = str(caught.value)
    assert str(path) in text and message in text and "\n" not in text
    if "UTF-" in message or "Latin" in text:
        assert f"iconv -f {'LATIN1' if 'latin1' in name else 'UTF-16'} -t UTF-8 {path} > " in text
    assert path.read_bytes() == content  # nothing is changed


def test_utf8_text_with_a_byte_order_mark_and_strings_that_look_like_numbers_load(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffCafé au lait.\n\nDeuxième paragraphe.\n".encode("utf-8"))
    assert list(load_texts([str(bom)])["text"])[0] == "Café au lait."  # no U+FEFF glued to the first word
    quoted = write_jsonl(tmp_path / "quoted.jsonl", ["1", "2", None, "three"])
    assert list(load_texts([str(quoted)])["text"]) == ["1", "2", "three"]


@pytest.mark.parametrize("name", ["latin1.txt", "numbers.jsonl", "empty.txt"])
def test_train_on_an_unreadable_file_exits_2_with_the_message(tmp_path, capsys, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "model"
    argv = ["train", str(path), "--output", str(out), "--preset", "tiny", "--vocab-size", "300", "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("retnet-hf train: error: ")]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0] and "Traceback" not in err
    assert path.read_bytes() == content and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- the Llama-2 chat format


def test_an_html_s_tag_in_an_answer_is_text_not_a_turn():
    text = (
        "<s>[INST] How do I strike text out in HTML? [/INST] Write <s>old price</s> new price; "
        "<s> is the strikethrough tag. </s><s>[INST] And in Markdown? [/INST] ~~old~~ </s>"
    )
    assert guanaco_messages(text) == [
        {"role": "user", "content": "How do I strike text out in HTML?"},
        {"role": "assistant", "content": "Write <s>old price</s> new price; <s> is the strikethrough tag."},
        {"role": "user", "content": "And in Markdown?"},
        {"role": "assistant", "content": "~~old~~"},
    ]
    assert to_guanaco(text) == (
        "### Human: How do I strike text out in HTML?### Assistant: Write <s>old price</s> new price; <s> is the "
        "strikethrough tag.### Human: And in Markdown?### Assistant: ~~old~~"
    )


def test_a_guanaco_row_that_mentions_inst_is_left_alone():
    text = (
        "### Human: What do [INST] and [/INST] mean in a Llama-2 prompt?"
        "### Assistant: <s>[INST] opens a user turn, [/INST] closes it: <s>[INST] hi [/INST] hello </s>"
    )
    assert to_guanaco(text) == text
    assert [m["role"] for m in guanaco_messages(text)] == ["user", "assistant"]
    assert split_prompt_completion(text)[1].startswith(" <s>[INST] opens a user turn")


def test_the_system_block_is_a_system_message(tokenizer):
    text = (
        "<s>[INST] <<SYS>>\nYou answer in one word.\n<</SYS>>\n\nCapital of France? [/INST] Paris. </s>"
        "<s>[INST] And of Italy? [/INST] Rome. </s>"
    )
    messages = guanaco_messages(text)
    assert messages == [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    guanaco = to_guanaco(text)
    assert guanaco == (
        "You answer in one word.\n### Human: Capital of France?### Assistant: Paris.### Human: And of Italy?"
        "### Assistant: Rome."
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == guanaco  # the template sft saves
    assert guanaco_messages(guanaco) == messages  # and back
    prompt, completion = split_prompt_completion(text)
    assert prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert completion == " Rome." and prompt + completion == guanaco


def test_malformed_llama2_rows_are_errors_naming_the_row(tmp_path):
    good = "<s>[INST] Hi [/INST] Hello. </s>"
    for text, message in [
        ("Some preamble. <s>[INST] Hi [/INST] Hello. </s>", "text before the first [INST] ('Some preamble. <s>')"),
        ("<s>[INST] Hi [/INST] Hello. </s><s>[INST] And then? </s>", "turn 2 has no [/INST]"),
        ("<s>[INST] <<SYS>> Be brief. Hi [/INST] Hello. </s>", "<<SYS>> without <</SYS>>"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            to_guanaco(text)
        path = write_jsonl(tmp_path / "chat.jsonl", [good, text, good])
        with pytest.raises(UsageError, match=re.escape(f"{path}: row 2: {message}")):
            load_guanaco(str(path))


def test_completion_only_splits_a_llama2_row_at_its_last_turn(tmp_path):
    text = "<s>[INST] Which marker starts an answer? [/INST] It is ### Assistant: then the answer. </s>"
    path = write_jsonl(tmp_path / "chat.jsonl", [text])
    pairs = load_guanaco(str(path), completion_only=True)
    assert list(pairs["prompt"]) == ["### Human: Which marker starts an answer?### Assistant:"]
    assert list(pairs["completion"]) == [" It is ### Assistant: then the answer."]


def test_every_row_of_the_real_data_round_trips(llama_rows, tokenizer):
    for text in llama_rows:
        messages = guanaco_messages(text)
        turns = text.count("[INST]")
        assert [m["role"] for m in messages] == ["user", "assistant"] * turns
        assert all("[INST]" not in m["content"] and "</s>" not in m["content"] for m in messages)
        guanaco = to_guanaco(text)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == guanaco
        assert to_guanaco(guanaco) == guanaco and guanaco_messages(guanaco) == messages
        prompt, completion = split_prompt_completion(text)
        assert prompt + completion == guanaco and completion.strip() == messages[-1]["content"]


# ---------------------------------------------------------------- what --max-length cuts (sft)


def report_of(output: str) -> dict:
    """The numbers of the one `sft data: ...` line in `output`."""
    lines = [line for line in output.splitlines() if line.startswith("sft data: ")]
    assert len(lines) == 1, output
    line = lines[0]

    def number(pattern, group=1):
        match = re.search(pattern, line)
        return int(match.group(group).replace(",", "")) if match else 0

    report = {
        "rows": number(r"^sft data: ([\d,]+) rows, "),
        "max_length": number(r"longer than --max-length (\d+) \("),
        "longer": number(r"rows, ([\d,]+) longer than"),
        "dropped": number(r", ([\d,]+) dropped: the prompt alone fills it"),
        "cut": number(r"([\d,]+) of [\d,]+ tokens cut"),
        "tokens": number(r"of ([\d,]+) tokens cut") or number(r"\(([\d,]+) tokens\)$"),
        "answer_cut": number(r"([\d,]+) of the [\d,]+ answer tokens\)$"),
        "answers": number(r"of the ([\d,]+) answer tokens\)$"),
    }
    assert report["rows"] and report["max_length"] and report["tokens"], line
    return report


@pytest.fixture(scope="module")
def mixed_jsonl(tmp_path_factory, llama_rows):
    """Rows short and long: at --max-length 64 some fit, some are cut, some have a prompt longer than that."""
    ranked = sorted(llama_rows[:300], key=len)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    return write_jsonl(path, ranked[:4] + ranked[150:154] + ranked[-4:])


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("completion_only", [False, True], ids=["full-text", "completion-only"])
def test_sft_prints_what_max_length_cuts_and_sfttrainer_cuts_that(
    tmp_path, folder, mixed_jsonl, capsys, packing, completion_only
):
    trl = pytest.importorskip("trl", reason="trl is in the train extras: pip install -e '.[train]'")
    from retnet_hf.finetuning import SFTSettings, tokenizer_and_data

    settings = SFTSettings(
        model=str(folder),
        output_dir=str(tmp_path / "out"),
        data=str(mixed_jsonl),
        max_length=64,
        packing=packing,
        completion_only=completion_only,
    )
    tokenizer, dataset = tokenizer_and_data(settings)
    report = report_of(capsys.readouterr().out)
    assert report["rows"] == 12 and report["max_length"] == 64
    assert report["longer"] >= 4 and 0 < report["cut"] < report["tokens"]
    if completion_only:
        assert 0 < report["dropped"] < report["longer"] and 0 < report["answer_cut"] < report["answers"]
    assert len(dataset) == report["rows"] - report["dropped"]

    # what TRL 1.16 makes of the same rows (what sft's _trainer asks of it)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "trainer"),
        max_length=64,
        packing=packing,
        completion_only_loss=completion_only or None,
        dataset_text_field="text",
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        **{ACTIVATION_CHECKPOINTING: False},  # TRL defaults it to on, under the name transformers 5.24 deprecated
    )
    model = RetNetForCausalLM.from_pretrained(folder)
    prepared = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train_dataset
    ids, labels = list(prepared["input_ids"]), list(prepared["labels"])
    assert max(map(len, ids)) <= 64
    assert sum(map(len, ids)) == report["tokens"] - report["cut"]  # the tokens that reach the model
    if completion_only:
        trained = sum(label != -100 for row in labels for label in row)
        assert trained == report["answers"] - report["answer_cut"]  # the tokens with a loss
    if not packing:
        assert len(prepared) == len(dataset)  # TRL drops no further row: the count above is all


def test_a_length_that_fits_is_said_too(tmp_path, folder, llama_rows, capsys):
    from retnet_hf.finetuning import SFTSettings, tokenizer_and_data

    path = write_jsonl(tmp_path / "short.jsonl", sorted(llama_rows[:50], key=len)[:3])
    tokenizer_and_data(SFTSettings(model=str(folder), output_dir=str(tmp_path / "o"), data=str(path), max_length=4096))
    report = report_of(capsys.readouterr().out)
    assert report["rows"] == 3 and report["longer"] == 0 and report["tokens"] > 0


def test_completion_only_with_every_prompt_too_long_is_a_usage_error(tmp_path, folder, mixed_jsonl, capsys):
    argv = ["sft", str(folder), "--output", str(tmp_path / "o"), "--data", str(mixed_jsonl), "--max-steps", "1"]
    assert main([*argv, "--completion-only", "--max-length", "4"]) == 2
    err = capsys.readouterr().err
    assert "--max-length 4: no row is left to train on" in err and "--completion-only" in err
    assert "Traceback" not in err and not (tmp_path / "o" / "adapter_model.safetensors").exists()
