"""Data for training: text files and data sets, the byte-level BPE tokenizer, token blocks, and the chat format.

`load_texts` refuses, with a UsageError naming the file, what would otherwise end in a parser's traceback: an
empty, binary or non-UTF-8 file (with the `iconv` command that converts it), malformed JSON lines, a text column
that is not strings.

The chat format is guanaco's, `### Human: q### Assistant: a`; Llama-2 rows (`<s>[INST] q [/INST] a </s>`, a
`<<SYS>>` block in the first turn as a system message) are parsed (`llama2_messages`) and rewritten to it;
`GUANACO_CHAT_TEMPLATE` is the same format as a tokenizer chat template, which `sft` saves with the tokenizer and
`chat` applies. `fit_to_max_length` counts what SFTTrainer's `max_length` cuts and drops, before training.
"""

import codecs
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from transformers import PreTrainedTokenizerFast

from .errors import UsageError, require


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


# local files that `load_texts` reads, by suffix, and the `datasets` builder of each
FILE_BUILDERS = {
    ".txt": "text",
    ".md": "text",
    ".py": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def load_texts(sources: Sequence[str], text_column: str = "text"):
    """A `datasets.Dataset` with one `text` column from local .txt/.md/.jsonl/.json/.parquet/.csv files or a Hub id.

    Plain text files give one row per paragraph (blank-line separated). Every problem with a source is a
    `UsageError` naming it: a file that is empty, binary, not UTF-8 (Latin-1, UTF-16: refused, with the `iconv`
    command that converts it), malformed JSON (the first bad line), a text column that holds anything but strings.
    """
    datasets = require("datasets")
    concatenate_datasets = datasets.concatenate_datasets

    parts = []
    for source in sources:
        data = _load_source(source, datasets.load_dataset)
        if text_column not in data.column_names:
            raise UsageError(f"{source}: no column {text_column!r} (columns: {', '.join(data.column_names)})")
        data = _string_column(data.select_columns([text_column]), text_column, source)
        parts.append(data if text_column == "text" else data.rename_column(text_column, "text"))
    data = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    data = data.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(data) == 0:
        raise UsageError(f"{', '.join(sources)}: the training text is empty (every row is blank); give some text")
    return data


def file_sha256(path) -> str:
    """The SHA-256 of a file's content (read in 1 MiB chunks; remembered for the file as it is now)."""
    path = Path(path).resolve()
    status = path.stat()
    return _sha256_of(str(path), status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_source(source: str, load_dataset):
    path = Path(source)
    if path.exists():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None or not path.is_file():
            raise UsageError(f"{source}: unsupported file type {path.suffix!r}; use {', '.join(FILE_BUILDERS)}")
        if builder != "parquet":
            check_utf8_text_file(path)
        # utf-8-sig: a byte-order mark is not text (json and csv drop it themselves)
        kwargs = {"sample_by": "paragraph", "encoding": "utf-8-sig"} if builder == "text" else {}
        # `datasets` knows a local file by its path and modification time: a file rewritten with its time kept
        # (cp -p, rsync -a, a restore) would be read as its old content. A cache of its own per content instead.
        config = require("datasets.config")
        kwargs["cache_dir"] = str(Path(config.HF_DATASETS_CACHE) / "retnet-hf-by-content" / file_sha256(path)[:32])
        try:
            return load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as error:  # pyarrow and pandas parse errors, a damaged parquet, ...
            if builder == "json":
                _raise_json_problem(path)
            raise UsageError(f"{source}: cannot read it as {builder} data: {_last_cause(error)}") from error
    if "/" in source and not source.startswith((".", "/")):
        try:
            return load_dataset(source, split="train")
        except Exception as error:  # offline, no such data set, no train split, ...
            raise UsageError(f"{source}: cannot load the Hub data set: {_last_cause(error)}") from error
    raise UsageError(f"{source}: no such file (and not a Hub data set id like 'user/name')")


def _last_cause(error: BaseException) -> str:
    """The message of the innermost cause (`datasets` wraps the parser's error in "An error occurred ..."), on
    one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_utf8_text_file(path) -> None:
    """A `UsageError` unless `path` is a non-empty UTF-8 text file (a byte-order mark is allowed): one for an
    empty file, a binary one (NUL or control bytes), UTF-16, or bytes that are not UTF-8 (Latin-1, say), with
    the `iconv` command that converts it. The file is read in 1 MiB chunks."""
    path = Path(path)
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: the file is empty; give a file with text in it")
    with path.open("rb") as f:
        head = f.read(1 << 20)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or _looks_utf16(head[:4096]):
            raise UsageError(
                f"{path}: the text is UTF-16, not UTF-8; convert it with: iconv -f UTF-16 -t UTF-8 {path} > {converted}"
            )
        decoder = codecs.getincrementaldecoder("utf-8")()
        chunk, offset, lines = head, 0, 1
        while chunk:
            nul = chunk.find(b"\x00")
            if nul >= 0 or (offset == 0 and _control_fraction(chunk[:4096]) > 0.1):
                where = f" (a NUL byte at offset {offset + nul})" if nul >= 0 else ""
                raise UsageError(f"{path}: a binary file, not text{where}; give a UTF-8 text file")
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=False)
            except UnicodeDecodeError as error:
                data, start = pending + chunk, offset - len(pending)
                line = lines + data.count(b"\n", len(pending), error.start)
                raise UsageError(
                    f"{path}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {start + error.start}, line "
                    f"{line}); if it is Latin-1, convert it with: iconv -f LATIN1 -t UTF-8 {path} > {converted}"
                ) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
            chunk = f.read(1 << 20)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 (it ends inside a character); convert it to UTF-8") from None


def _looks_utf16(head: bytes) -> bool:
    """UTF-16 without a byte-order mark: mostly-ASCII text has a NUL in every other byte."""
    if len(head) < 8:
        return False
    even, odd = head[0::2].count(0) / len(head[0::2]), head[1::2].count(0) / len(head[1::2])
    return max(even, odd) > 0.4 and min(even, odd) < 0.05


def _control_fraction(head: bytes) -> float:
    controls = sum(1 for b in head if b < 32 and b not in b"\t\n\r\f\v\x1b")
    return controls / max(1, len(head))


def _raise_json_problem(path: Path) -> None:
    """A UsageError at the first line of a JSON-lines file that is not a JSON object, or at the parse error of a
    whole-file JSON document; returns when it finds neither."""
    text = path.read_text(encoding="utf-8-sig")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    example = 'one JSON object per line, like {"text": "..."}'
    try:
        json.loads(text)
        return  # one valid document, of a shape that datasets does not take: the caller's message says why
    except json.JSONDecodeError as error:
        document_error = error
    if path.suffix.lower() == ".json" and not _is_json_object(lines[0][1] if lines else ""):
        raise UsageError(
            f"{path}: not valid JSON ({document_error.msg} at line {document_error.lineno}, column "
            f'{document_error.colno}); give a list of objects like [{{"text": "..."}}] or {example}'
        )
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(
                f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno}); the file must hold "
                f"{example}"
            ) from None
        if not isinstance(row, dict):
            raise UsageError(
                f"{path}: line {number} is a JSON {type(row).__name__}, not an object; the file must hold {example}"
            )


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _string_column(data, column: str, source: str):
    """`data` whose `column` is strings (None allowed), or a UsageError naming the first row that is not one."""
    feature = data.features[column]
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return data
    for number, value in enumerate(data[column], 1):
        if value is not None and not isinstance(value, str):
            raise UsageError(
                f"{source}: row {number} of column {column!r} is {_short(value)} ({type(value).__name__}), not a "
                "string; the text must be strings (in JSON, in quotes), or name the text column with --text-column"
            )
    from datasets import Value

    return data.cast_column(column, Value("string"))  # every value None: the empty check says so


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


def render_guanaco(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """`GUANACO_CHAT_TEMPLATE` in Python: what `tokenizer.apply_chat_template(messages, tokenize=False)` renders."""
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(f"{content}\n")
        elif role == "user":
            parts.append(f"{HUMAN} {content}")
        elif role == "assistant":
            parts.append(f"{ASSISTANT} {content}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


# A Llama-2 chat row: `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>`.
# A turn starts with `<s>[INST]` at the start of the row or right after the previous turn's `</s>` (the `<s>` may
# be missing, whitespace may surround the markers); anything else, an HTML `<s>` or a `[INST]` quoted in an
# answer, is text.
_LLAMA2_START = re.compile(r"\s*(?:<s>\s*)?\[INST\]")
_LLAMA2_NEXT_TURN = re.compile(r"</s>\s*(?:<s>\s*)?\[INST\]")
SYS_OPEN, SYS_CLOSE = "<<SYS>>", "<</SYS>>"


def is_llama2(text: str) -> bool:
    """Whether `text` is a Llama-2 chat row: it starts with `<s>[INST]` (or `[INST]`)."""
    return _LLAMA2_START.match(text) is not None


def llama2_messages(text: str) -> List[dict]:
    """A Llama-2 chat row as chat messages: a `<<SYS>> ... <</SYS>>` block at the start of the first `[INST]` is
    a system message, then a user and an assistant message per turn. A ValueError for a row that does not start
    with `<s>[INST]` (text before the first `[INST]` is refused, not guessed at), a turn without `[/INST]`, or an
    unclosed `<<SYS>>`."""
    start = _LLAMA2_START.match(text)
    if start is None:
        where = text.find("[INST]")
        if where < 0:
            raise ValueError(f"not a Llama-2 chat row (no [INST] ... [/INST]): {text[:80]!r}")
        raise ValueError(
            f"text before the first [INST] ({text[:where][:60]!r}); a Llama-2 row starts with <s>[INST] (a system "
            f"prompt goes in {SYS_OPEN} ... {SYS_CLOSE} inside the first [INST])"
        )
    turns = _LLAMA2_NEXT_TURN.split(text[start.end() :])
    messages = []
    for number, turn in enumerate(turns, 1):
        question, found, answer = turn.partition("[/INST]")
        if not found:
            raise ValueError(f"turn {number} has no [/INST]: {('[INST]' + turn)[:80]!r}")
        question, answer = question.strip(), answer.strip()
        if number == len(turns) and answer.endswith("</s>"):  # the other turns' </s> went with the split
            answer = answer[: -len("</s>")].rstrip()
        if number == 1 and question.startswith(SYS_OPEN):
            system, found, question = question[len(SYS_OPEN) :].partition(SYS_CLOSE)
            if not found:
                raise ValueError(f"{SYS_OPEN} without {SYS_CLOSE} in the first [INST]: {text[:80]!r}")
            if system.strip():
                messages.append({"role": "system", "content": system.strip()})
            question = question.strip()
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def llama2_to_guanaco(text: str) -> str:
    """`<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] a2 </s>` -> `### Human: q### Assistant: a### Human: q2...`;
    a system block becomes the first line (as `GUANACO_CHAT_TEMPLATE` renders a system message)."""
    return render_guanaco(llama2_messages(text))


def to_guanaco(text: str) -> str:
    """A row in the guanaco form: Llama-2 rows (starting with `<s>[INST]`) rewritten, guanaco rows unchanged (even
    where their text mentions `[INST] ... [/INST]`); anything else is a ValueError."""
    if is_llama2(text):
        return llama2_to_guanaco(text)
    if HUMAN in text and ASSISTANT in text:
        return text
    if "[INST]" in text:
        llama2_messages(text)  # raises: says what is before the first [INST]
    raise ValueError(
        f"row is neither '### Human: ... ### Assistant: ...' nor '<s>[INST] ... [/INST] ...': {text[:80]!r}"
    )


def split_prompt_completion(text: str):
    """(`prompt`, `completion`) of a chat row in either form, in the guanaco form: everything up to and including
    the last `### Assistant:`, and the answer after it (`prompt + completion == to_guanaco(text)`). A Llama-2 row
    is split at its last turn, so an answer that quotes `### Assistant:` stays whole."""
    if is_llama2(text):
        messages = llama2_messages(text)
        return render_guanaco(messages[:-1], add_generation_prompt=True), " " + messages[-1]["content"]
    text = to_guanaco(text)
    cut = text.rfind(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def guanaco_messages(text: str) -> List[dict]:
    """A chat row in either form as chat messages (`[{"role": "user", ...}, {"role": "assistant", ...}, ...]`);
    text before the first `### Human:` of a guanaco row, or a Llama-2 `<<SYS>>` block, is a system message."""
    if is_llama2(text):
        return llama2_messages(text)
    pieces = re.split(r"(### Human:|### Assistant:)", to_guanaco(text))
    messages = [{"role": "system", "content": pieces[0].strip()}] if pieces[0].strip() else []
    for piece in pieces[1:]:
        if piece == HUMAN:
            messages.append({"role": "user", "content": ""})
        elif piece == ASSISTANT:
            messages.append({"role": "assistant", "content": ""})
        else:
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
    for TRL's completion-only loss). A row that is in neither chat form is a UsageError naming it (`row N`: the
    N-th non-blank row).
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
    rows = []
    for number, text in enumerate(data["text"], 1):
        try:
            rows.append(split_prompt_completion(text) if completion_only else to_guanaco(text))
        except ValueError as error:
            raise UsageError(f"{source}: row {number}: {error}") from None
    Dataset = require("datasets").Dataset
    if completion_only:
        return Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
    return Dataset.from_dict({"text": rows})


@dataclass
class LengthReport:
    """What `max_length` does to a chat data set, counted as TRL's SFTTrainer tokenizes it (each row, or prompt +
    completion, with EOS appended): `tokens` in all; `truncated` rows longer than `max_length`, whose tokens past
    it (`cut_tokens`, which also counts every token of a dropped row) are not trained on; with completion-only
    loss, `dropped` rows whose prompt alone fills `max_length` (no answer token left) and the answer tokens lost."""

    rows: int
    max_length: int
    tokens: int = 0
    truncated: int = 0
    cut_tokens: int = 0
    completion_only: bool = False
    dropped: int = 0
    completion_tokens: int = 0
    completion_cut_tokens: int = 0

    def line(self) -> str:
        longer = self.truncated + self.dropped
        head = f"sft data: {self.rows:,} rows, "
        if not longer:
            return head + f"none longer than --max-length {self.max_length} ({self.tokens:,} tokens)"
        cut = f"{self.cut_tokens:,} of {self.tokens:,} tokens cut"
        if not self.completion_only:
            return head + f"{longer:,} longer than --max-length {self.max_length} (truncated, {cut})"
        dropped = f", {self.dropped:,} dropped: the prompt alone fills it" if self.dropped else ""
        return head + (
            f"{longer:,} longer than --max-length {self.max_length} ({self.truncated:,} truncated{dropped}; {cut}, "
            f"{self.completion_cut_tokens:,} of the {self.completion_tokens:,} answer tokens)"
        )


def fit_to_max_length(data, tokenizer, max_length: int, completion_only: bool = False, batch_size: int = 1000):
    """(`data` without the rows that cannot train, `LengthReport`), before SFTTrainer sees the data.

    What TRL 1.16's SFTTrainer does with `max_length` (sft_trainer.py `_prepare_dataset`): it appends EOS, keeps
    the first `max_length` tokens of each row (with packing too: the "bfd" strategy truncates each row before it
    bins them), and without packing drops the rows left with no label; with packing such rows stay and train on
    nothing. Here, with `completion_only`, those rows (the prompt alone is `max_length` tokens or more) are dropped
    whether packing or not, and a UsageError naming --max-length says when no row is left.
    """
    eos = tokenizer.eos_token

    def with_eos(text: str) -> str:
        return text if not eos or text.endswith(eos) else text + eos

    report = LengthReport(rows=len(data), max_length=max_length, completion_only=completion_only)
    keep, shortest_prompt = [], None
    for begin in range(0, len(data), batch_size):
        batch = data[begin : begin + batch_size]
        if completion_only:
            prompts = tokenizer(batch["prompt"])["input_ids"]
            fulls = tokenizer([p + with_eos(c) for p, c in zip(batch["prompt"], batch["completion"])])["input_ids"]
            prompt_lengths = [_common_prefix(p, f) for p, f in zip(prompts, fulls)]
        else:
            fulls = tokenizer([with_eos(t) for t in batch["text"]])["input_ids"]
            prompt_lengths = [0] * len(fulls)
        for index, (ids, prompt_length) in enumerate(zip(fulls, prompt_lengths), begin):
            length, answer = len(ids), len(ids) - prompt_length
            report.tokens += length
            report.completion_tokens += answer
            if completion_only and prompt_length >= max_length:
                report.dropped += 1
                report.cut_tokens += length
                report.completion_cut_tokens += answer
                shortest_prompt = min(prompt_length, shortest_prompt or prompt_length)
                continue
            keep.append(index)
            if length > max_length:
                report.truncated += 1
                report.cut_tokens += length - max_length
                report.completion_cut_tokens += length - max_length
    if not keep:
        raise UsageError(
            f"--max-length {max_length}: no row is left to train on; every prompt is {shortest_prompt:,} tokens or "
            "longer, so --completion-only keeps no answer token; raise --max-length or drop --completion-only"
        )
    return (data.select(keep) if report.dropped else data), report


def _common_prefix(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens two sequences share (where TRL starts the completion: trl.data_utils)."""
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length
