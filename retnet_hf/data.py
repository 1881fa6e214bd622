"""Data for training: text files and data sets, the byte-level BPE tokenizer, token blocks, and the chat format.

The chat format is guanaco's, `### Human: q### Assistant: a`, with Llama-2 rows (`<s>[INST] q [/INST] a </s>`)
rewritten to it; `GUANACO_CHAT_TEMPLATE` is the same format as a tokenizer chat template, which `sft` saves with
the tokenizer and `chat` applies.
"""

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

from transformers import PreTrainedTokenizerFast

from .errors import UsageError, require


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def load_texts(sources: Sequence[str], text_column: str = "text"):
    """A `datasets.Dataset` with one `text` column from local .txt/.md/.jsonl/.json/.parquet/.csv files or a Hub id.

    Plain text files give one row per paragraph (blank-line separated).
    """
    datasets = require("datasets")
    concatenate_datasets, load_dataset = datasets.concatenate_datasets, datasets.load_dataset

    builders = {
        ".txt": "text",
        ".md": "text",
        ".py": "text",
        ".jsonl": "json",
        ".json": "json",
        ".parquet": "parquet",
        ".csv": "csv",
    }
    parts = []
    for source in sources:
        path = Path(source)
        if path.exists():
            builder = builders.get(path.suffix.lower())
            if builder is None:
                raise UsageError(f"{source}: unsupported file type {path.suffix!r}; use {', '.join(builders)}")
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            data = load_dataset(builder, data_files=str(path), split="train", **kwargs)
        elif "/" in source and not source.startswith((".", "/")):
            data = load_dataset(source, split="train")
        else:
            raise UsageError(f"{source}: no such file (and not a Hub data set id like 'user/name')")
        if text_column not in data.column_names:
            raise UsageError(f"{source}: no column {text_column!r} (columns: {', '.join(data.column_names)})")
        data = data.select_columns([text_column])
        parts.append(data if text_column == "text" else data.rename_column(text_column, "text"))
    data = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    data = data.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(data) == 0:
        raise UsageError("the training text is empty")
    return data


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained with `tokenizers` on an iterable of strings."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **SPECIAL_TOKENS)
    tokenizer.model_max_length = 1_000_000
    return tokenizer


def save_tokenizer(tokenizer, folder) -> None:
    """`tokenizer.save_pretrained(folder)`, with `tokenizer_class: PreTrainedTokenizerFast` in tokenizer_config.json.

    transformers 5.x writes `TokenizersBackend`, a class transformers 4.x (AutoTrain's 4.48) does not know; both
    load `PreTrainedTokenizerFast` from the same tokenizer.json.
    """
    tokenizer.save_pretrained(str(folder))
    config_path = Path(folder) / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("tokenizer_class") in (None, "TokenizersBackend"):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def token_blocks(data, tokenizer, block_size: int):
    """Tokenise every row, end each with EOS, concatenate and cut into blocks of `block_size` tokens."""

    def tokenize(batch):
        return {"ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        usable = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ids = data.map(tokenize, batched=True, remove_columns=data.column_names)
    blocks = ids.map(group, batched=True, batch_size=10_000, remove_columns=["ids"])
    if len(blocks) < 2:
        raise UsageError(
            f"the text gives {len(blocks)} block(s) of {block_size} tokens; give more text or a smaller --block-size"
        )
    return blocks


DEFAULT_DATASET = "timdettmers/openassistant-guanaco"


HUMAN, ASSISTANT = "### Human:", "### Assistant:"


# messages -> "### Human: q### Assistant: a### Human: ..."; a system message goes first as plain text.
GUANACO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)


_INST_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=<s>|\[INST\]|$)", re.S)


def llama2_to_guanaco(text: str) -> str:
    """`<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] a2 </s>` -> `### Human: q### Assistant: a### Human: q2...`."""
    turns = _INST_TURN.findall(text)
    if not turns:
        raise ValueError(f"not a Llama-2 chat row (no [INST] ... [/INST]): {text[:80]!r}")
    parts = []
    for question, answer in turns:
        answer = answer.strip()
        if answer.endswith("</s>"):
            answer = answer[: -len("</s>")].rstrip()
        parts.append(f"{HUMAN} {question.strip()}{ASSISTANT} {answer}")
    return "".join(parts)


def to_guanaco(text: str) -> str:
    """A row in the guanaco form: guanaco rows unchanged, Llama-2 rows rewritten; anything else is an error."""
    if "[INST]" in text and "[/INST]" in text:
        return llama2_to_guanaco(text)
    if HUMAN in text and ASSISTANT in text:
        return text
    raise ValueError(
        f"row is neither '### Human: ... ### Assistant: ...' nor '<s>[INST] ... [/INST] ...': {text[:80]!r}"
    )


def split_prompt_completion(text: str):
    """(`prompt`, `completion`): everything up to and including the last `### Assistant:`, and the answer after it."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no '{ASSISTANT}' in {text[:80]!r}")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def guanaco_messages(text: str) -> List[dict]:
    """The guanaco form as chat messages (`[{"role": "user", ...}, {"role": "assistant", ...}, ...]`)."""
    messages = []
    for piece in re.split(r"(### Human:|### Assistant:)", to_guanaco(text)):
        if piece == HUMAN:
            messages.append({"role": "user", "content": ""})
        elif piece == ASSISTANT:
            messages.append({"role": "assistant", "content": ""})
        elif messages:
            messages[-1]["content"] = piece.strip()
    return messages


def set_chat_template(tokenizer):
    """Give `tokenizer` the guanaco chat template (and a pad token) and return it."""
    tokenizer.chat_template = GUANACO_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_guanaco(
    source: str = DEFAULT_DATASET, text_column: str = "text", completion_only: bool = False, limit: Optional[int] = None
):
    """A `datasets.Dataset` of guanaco-form chat rows from a Hub id or a local jsonl/json/parquet/csv file.

    Columns: `text`, or `prompt` and `completion` with `completion_only=True` (the last answer is the completion,
    for TRL's completion-only loss).
    """
    path = Path(source)
    if path.exists() and path.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv"):
        raise UsageError(f"{source}: chat data must be .jsonl, .json, .parquet or .csv (a column {text_column!r})")
    try:
        data = load_texts([source], text_column)
    except UsageError:
        raise
    except Exception as error:  # a Hub id that cannot be reached offline, a malformed file, ...
        raise UsageError(f"{source}: cannot load the data set: {error}") from error
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    try:
        data = data.map(lambda row: {"text": to_guanaco(row["text"])})
    except ValueError as error:
        raise UsageError(f"{source}: {error}") from error
    if completion_only:
        data = data.map(
            lambda row: dict(zip(("prompt", "completion"), split_prompt_completion(row["text"]))),
            remove_columns=["text"],
        )
    return data
