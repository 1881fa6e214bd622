"""Sharing a RetNet model folder on the Hugging Face Hub: choose what to send, check it, then send exactly that.

A push never uploads "the folder". `plan_upload` walks it without following a symlink and keeps only what a model
repository is made of (the allow-list): `config.json`, `generation_config.json`, the weights the model loads
(`model.safetensors`, or `model.safetensors.index.json` and the shards it lists; an adapter's
`adapter_model.safetensors` and `adapter_config.json`), the code `auto_map` needs (and what that code imports), the
tokenizer files (further chat templates only directly in `additional_chat_templates/`), the model card `README.md`,
`loss.png` and `training_summary.json`. Everything else is left out and listed with the reason: checkpoints, stray
weights the model does not load, dumps, every symlink (one pointing out of the folder is flagged; links are never
followed), every hard link (a file with other names, which may lie outside the folder: flagged like a link out of
it), and secret-looking names (`.env`, `token`, API keys, `credentials*`, cookies, anything under `.ssh/`, ...;
matched after normalising the name: case, Unicode look-alikes, invisible characters, separators), which are flagged
loudly. `--include PATTERN` (`include=`) adds files to the allow-list; a secret-looking file or a hard link goes only
where `--include` names its exact path, and is then announced.

The plan then has `retnet_hf.model_folder.check_folder` find the folder complete (every weight read for NaN and
infinity), reads every file it sends for what its name promises (a `.safetensors` file parses as safetensors, a
`.json` file as JSON, `tokenizer.json` loads as a tokenizer, a `.jinja` template is UTF-8 text), and sends an index
only with every shard it names; then it becomes huggingface_hub `CommitOperationAdd`s, one per chosen file, with the
size and sha256 the Hub records (`push --dry-run` prints them). Every name in the report and the errors is escaped
(`shown`), so that no file name can hide itself or forge a line of them. `push_plan` creates the repository
(`HfApi.create_repo(exist_ok=True)`), the branch if a revision is given, and commits those very operations with
`HfApi.create_commit`, after checking that no planned file changed since it was checked. `push_folder` is
`plan_upload` then `push_plan`.
"""

import json
import os
import re
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from .errors import UsageError
from .model_folder import (
    SINGLE_WEIGHTS,
    WEIGHTS_INDEX,
    WeightIndexError,
    absence,
    check_folder,
    code_file_names,
    index_shards,
    is_shareable,
    weight_files,
)


# What a model repository is made of, besides the weights and code the folder's own files name
MODEL_FILES = ("README.md", "config.json", "generation_config.json", "loss.png", "training_summary.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# transformers' further named chat templates; matched part by part (`*` never crosses "/")
ALLOWED_PATTERNS = ("additional_chat_templates/*.jinja",)

# Secret-looking names (matched against each file's own name) and folders (any part of its path), both normalised by
# `_normalised_name` first: "-", "_", "." and spaces are one separator, so "*api_key*" also stands for "api-key.txt".
# Nothing in a model repository looks like these; `looks_secret` is tested against every allow-listed name.
SECRET_NAME_PATTERNS = (
    ".env",
    ".env.*",
    "*.env",
    "token",
    "token.*",
    "tokens",
    "stored_tokens",  # huggingface_hub keeps its logins in `token` and `stored_tokens`
    "*_token",
    "*_token.*",
    "*-token",
    "*-token.*",
    "*.token",
    "*api_key*",
    "*apikey*",
    "*access_key*",
    "*private_key*",
    "keys",
    "keys.*",
    "*_keys",
    "*_keys.*",  # aws_keys.txt, ssh-keys.json; not "monkeys" nor "hotkeys"
    "*credential*",
    "*secret*",
    "*password*",
    "*passwd*",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "authorized_keys",
    "known_hosts",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ppk",
    "*.gpg",
    "*.kdbx",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    ".htpasswd",
    ".dockercfg",
    "*_history",
    "*cookie*",
    "service-account*.json",
    "service_account*.json",
)
SECRET_FOLDER_NAMES = (".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".password-store", "gcloud")

# A small table of confusables (after Unicode's confusables.txt): Cyrillic, then Greek lower-case letters that look
# like Latin ones, mapped to the Latin letter they imitate, so that "t\u043eken" (a Cyrillic o) reads "token"
_CONFUSABLES = str.maketrans(
    {
        "\u0430": "a",  # а
        "\u0435": "e",  # е
        "\u043e": "o",  # о
        "\u0440": "p",  # р
        "\u0441": "c",  # с
        "\u0445": "x",  # х
        "\u0443": "y",  # у
        "\u043a": "k",  # к
        "\u0442": "t",  # т
        "\u0456": "i",  # і
        "\u0455": "s",  # ѕ
        "\u0458": "j",  # ј
        "\u03bf": "o",  # ο
        "\u03b1": "a",  # α
        "\u03b5": "e",  # ε
        "\u03ba": "k",  # κ
        "\u03c4": "t",  # τ
        "\u03bd": "v",  # ν
        "\u03b9": "i",  # ι
        "\u03c1": "p",  # ρ
    }
)
_SEPARATORS = re.compile(r"[\s._-]+")


def _normalised_name(name: str) -> str:
    """`name` as the secret-name check reads it: Unicode NFKC (fullwidth letters become ASCII), without format
    characters (zero-width spaces and joiners, direction marks: category Cf), case-folded, look-alike letters made
    Latin (`_CONFUSABLES`), without whitespace at either end, and every run of "-", "_", "." and whitespace one "_"."""
    name = unicodedata.normalize("NFKC", name)
    name = "".join(char for char in name if unicodedata.category(char) != "Cf")
    name = name.casefold().translate(_CONFUSABLES).strip()
    return _SEPARATORS.sub("_", name)


_SECRET_NAMES = tuple(_normalised_name(pattern) for pattern in SECRET_NAME_PATTERNS)
_SECRET_FOLDERS = tuple(_normalised_name(name) for name in SECRET_FOLDER_NAMES)

# Folders the Hub refuses to hold files in (huggingface_hub's FORBIDDEN_FOLDERS): never uploaded, even with --include
HUB_FORBIDDEN_FOLDERS = (".git", ".cache")


def shown(path: str) -> str:
    """`path` as push prints it: as it is where it is printable ASCII with no space at either end, no backslash and
    no leading quote; else as Python's ascii() writes it (quoted, every control, invisible or non-ASCII character
    escaped), so that a name can neither hide itself nor forge a line of what push prints."""
    plain = path.isascii() and path.isprintable() and path == path.strip() and "\\" not in path
    return path if plain and path[:1] not in ("'", '"') else ascii(path)


def _escaped(text: str) -> str:
    """`text` with every character that is not printable (controls, line breaks, invisible format characters)
    written as ascii() writes it: for messages that hold names push did not write itself (check_folder's)."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


class IncompleteFolderError(UsageError):
    """The folder lacks something a shared RetNet model needs; `problems` lists each item (any character that is
    not printable escaped)."""

    def __init__(self, folder, problems: List[str]):
        self.folder = Path(folder)
        self.problems = [_escaped(problem) for problem in problems]
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{folder} is not ready to share; missing or wrong:\n{lines}")


@dataclass(frozen=True)
class LeftOut:
    """Something in the folder that push does not upload, and why: a file, a symlink, or a folder (its path ends
    in "/") none of whose files is part of a model repository. `path` is the name as it is on disk (print it with
    `shown`). `size` is in bytes (None for a symlink); `secret`: the name looks like a secret; `outside`: a link that
    leads, or may lead, out of the folder (a symlink pointing out of it, or a hard link)."""

    path: str
    reason: str
    size: Optional[int] = None
    files: int = 1
    secret: bool = False
    outside: bool = False


@dataclass
class UploadPlan:
    """What a push of `folder` sends, and what it leaves out.

    `operations`: huggingface_hub `CommitOperationAdd`s for exactly the chosen files, in path order, with the size
    and sha256 the Hub records. `left_out`: everything else, with the reason. `included_secrets` and
    `included_links`: secret-looking files and hard links sent only because `--include` named them exactly.
    `stamps`: each chosen file's (size, mtime_ns) when it was chosen, for `push_plan` to check that nothing changed
    since.
    """

    folder: Path
    root: Path
    operations: List[Any]
    left_out: List[LeftOut]
    included_secrets: List[str] = field(default_factory=list)
    included_links: List[str] = field(default_factory=list)
    stamps: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def files(self) -> List[str]:
        """The paths (relative, POSIX) the push uploads, in upload order."""
        return [operation.path_in_repo for operation in self.operations]

    @property
    def size(self) -> int:
        """The bytes the push uploads."""
        return sum(operation.upload_info.size for operation in self.operations)


# ---------------------------------------------------------------------------------------------------------------
# What the folder holds, and what of it is a model repository


@dataclass(frozen=True)
class _Entry:
    """One thing found in the folder: a regular "file", a "symlink", an "other" (pipe, socket, device) or an
    "unreadable" folder. `links`: a file's number of names (more than 1: a hard link); `detail` is a symlink's target
    as written, or why a folder could not be listed."""

    path: str
    kind: str
    size: int = 0
    mtime_ns: int = 0
    links: int = 1
    detail: str = ""


def _scan(root: Path) -> List[_Entry]:
    """Everything under `root`, in path order, without following a symlink: a link is an entry, never entered."""
    entries: List[_Entry] = []

    def visit(directory: Path, prefix: str) -> None:
        try:
            with os.scandir(directory) as listing:
                children = sorted(listing, key=lambda child: child.name)
        except OSError as error:
            if not prefix:
                raise UsageError(f"cannot list {root}: {error}") from error
            entries.append(_Entry(prefix, "unreadable", detail=str(error)))
            return
        for child in children:
            path = prefix + child.name
            if child.is_symlink():
                entries.append(_Entry(path, "symlink", detail=os.readlink(child.path)))
            elif child.is_dir(follow_symlinks=False):
                visit(Path(child.path), path + "/")
            elif child.is_file(follow_symlinks=False):
                status = child.stat(follow_symlinks=False)
                entries.append(_Entry(path, "file", status.st_size, status.st_mtime_ns, status.st_nlink))
            else:
                entries.append(_Entry(path, "other"))

    visit(root, "")
    return entries


def looks_secret(path: str) -> bool:
    """Whether a relative path looks like it holds a secret: its name matches SECRET_NAME_PATTERNS, or a folder on
    its way is one of SECRET_FOLDER_NAMES, each compared normalised (`_normalised_name`: "T\u043eKEN " and
    "api-key.txt" look like secrets as "token" and "api_key" do)."""
    parts = [_normalised_name(part) for part in PurePosixPath(path).parts]
    if not parts:
        return False
    if any(part in _SECRET_FOLDERS for part in parts[:-1]):
        return True
    return any(fnmatchcase(parts[-1], pattern) for pattern in _SECRET_NAMES)


def model_repository_files(folder: Union[str, Path]) -> Set[str]:
    """The allow-list's exact paths for `folder`: the fixed names, the weights it loads and the code auto_map needs
    (`ALLOWED_PATTERNS` adds further chat templates)."""
    names = set(MODEL_FILES) | set(TOKENIZER_FILES) | set(ADAPTER_FILES)
    return names | set(_loaded_weights(folder)) | set(code_file_names(folder))


def _loaded_weights(folder: Union[str, Path]) -> List[str]:
    """The weight files the folder's model loads that push can upload (no link followed); [] for an index that
    does not give its shards (check_folder says so)."""
    try:
        return [name for name in weight_files(folder, links=False) if is_shareable(folder, name)]
    except WeightIndexError:
        return []


def _normalise_pattern(pattern: str) -> str:
    """An --include pattern as it is matched: no leading "./"; a folder ("notes/") stands for what it holds."""
    pattern = pattern.strip()
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return pattern + "*" if pattern.endswith("/") else pattern


def _matches(path: str, pattern: str) -> bool:
    """fnmatch (`*` also matches "/") on the path or on a folder it lies in: "notes" matches "notes/eval.md"."""
    parts = path.split("/")
    return any(fnmatchcase("/".join(parts[:depth]), pattern) for depth in range(1, len(parts) + 1))


def _matches_parts(path: str, pattern: str) -> bool:
    """fnmatch part by part, as ALLOWED_PATTERNS are matched: `*` stays within one folder ("a/*.jinja" matches
    "a/x.jinja", not "a/b/x.jinja")."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatchcase(part, want) for part, want in zip(parts, wanted))


def _symlink_reason(root: Path, entry: _Entry) -> Tuple[str, bool]:
    """Why a symlink is left out, and whether it points out of the folder."""
    try:
        target = (root / entry.path).resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"a symlink to {shown(entry.detail)} that resolves to nothing (a loop): never followed", False
    if target != root and root not in target.parents:
        return f"a symlink to {shown(entry.detail)}, outside the folder: never followed", True
    return (
        f"a symlink to {shown(target.relative_to(root).as_posix())}: push never follows links "
        "(put a copy of the file in place of the link to upload it)",
        False,
    )


def _not_a_file(root: Path, entry: _Entry) -> LeftOut:
    """The left-out line for a symlink, a pipe, socket or device, or a folder that cannot be listed."""
    if entry.kind == "symlink":
        reason, outside = _symlink_reason(root, entry)
        return LeftOut(entry.path, reason, secret=looks_secret(entry.path), outside=outside)
    if entry.kind == "unreadable":
        return LeftOut(entry.path, f"a folder push cannot list ({_escaped(entry.detail)})")
    return LeftOut(entry.path, "not a regular file (a pipe, socket or device)")


def _file_reason(path: str, weights: List[str]) -> Tuple[str, bool]:
    """Why a regular file the allow-list does not name is left out, and whether it may go into a folder's line."""
    parts = PurePosixPath(path).parts
    forbidden = next((part for part in parts[:-1] if part in HUB_FORBIDDEN_FOLDERS), None)
    if forbidden:
        return f"under {forbidden}/, where the Hub holds no files", True
    if path == WEIGHTS_INDEX:
        return f"an index the model does not use: {SINGLE_WEIGHTS} is there, and transformers loads it first", False
    if path.endswith(".safetensors"):
        loaded = SINGLE_WEIGHTS if weights == [SINGLE_WEIGHTS] else f"a shard {WEIGHTS_INDEX} lists"
        return f"weights the model does not load (not {loaded}); --include it to upload it anyway", True
    return "not part of a model repository (--include it to upload it anyway)", True


def _flagged_reason(entry: _Entry, secret: bool, patterns: List[str]) -> str:
    """Why a secret-looking file or a hard link is left out."""
    what = (
        "secret-looking name"
        if secret
        else f"a hard link (one file with {entry.links} names, maybe outside the folder)"
    )
    matching = [pattern for pattern in patterns if _matches(entry.path, pattern)]
    if matching:
        kind = "a secret-looking file" if secret else "a hard link"
        return (
            f"{what}: not uploaded although --include {matching[0]!r} matches it (a pattern never adds {kind}; name "
            f"it exactly, --include {shown(entry.path)}, only if it is meant to be public)"
        )
    if secret:
        return f"{what}: not uploaded (keep secrets out of model folders)"
    return f"{what}: not uploaded (put a copy of the file in its place to upload it)"


def _flagged_problem(entry: _Entry, secret: bool) -> str:
    """The problem a secret-looking file or a hard link is when the model's own files name it."""
    name = shown(entry.path)
    if secret:
        return (
            f"{name}: the model needs it but its name looks like a secret; rename it, or pass --include {name} if it "
            "is meant to be public"
        )
    return (
        f"{name}: a hard link (one file with {entry.links} names, maybe outside the folder), which the model needs; "
        f"put a copy of the file in its place, or pass --include {name} if it is meant to be public"
    )


def _collapse(left_out: List[Tuple[LeftOut, bool]], uploaded: List[str]) -> List[LeftOut]:
    """The left-out list with the quiet entries (those marked True) of each folder that holds nothing uploaded
    merged into one line for the folder (the top-most such folder); secrets, links and the rest stay one a line."""
    busy = {"/".join(path.split("/")[:depth]) for path in uploaded for depth in range(1, path.count("/") + 1)}
    kept: List[LeftOut] = []
    groups: Dict[str, List[LeftOut]] = {}
    for item, quiet in left_out:
        parts = item.path.rstrip("/").split("/")[:-1]
        folders = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
        idle = next((folder for folder in folders if folder not in busy), None)
        if quiet and idle is not None:
            groups.setdefault(idle, []).append(item)
        else:
            kept.append(item)
    for folder, items in groups.items():
        if len(items) == 1:
            kept.append(items[0])
            continue
        size = sum(item.size or 0 for item in items)
        reason = f"a folder of {len(items)} files, none of them part of a model repository"
        kept.append(LeftOut(folder + "/", reason, size=size, files=len(items)))
    return sorted(kept, key=lambda item: item.path)


@dataclass
class _Selection:
    """The folder's entries sorted: `uploaded`; `left_out`, each with whether it may go into a folder's line;
    `included_secrets` and `included_links` (sent because --include names them exactly); `problems` that refuse the
    push, and `refused`, the paths they name."""

    uploaded: List[_Entry] = field(default_factory=list)
    left_out: List[Tuple[LeftOut, bool]] = field(default_factory=list)
    included_secrets: List[str] = field(default_factory=list)
    included_links: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    refused: Set[str] = field(default_factory=set)


def _select(root: Path, entries: List[_Entry], include: Sequence[str]) -> _Selection:
    """Sort the folder's entries into uploaded and left out (with reasons), by the allow-list and --include."""
    allowed = model_repository_files(root)
    weights = _loaded_weights(root)
    patterns = [_normalise_pattern(pattern) for pattern in include]
    _require_matches(root, entries, patterns)
    selection = _Selection()
    for entry in entries:
        secret = looks_secret(entry.path)
        linked = entry.kind == "file" and entry.links > 1  # a hard link: its other names may lie outside the folder
        listed = entry.path in allowed or any(_matches_parts(entry.path, pattern) for pattern in ALLOWED_PATTERNS)
        included = any(_matches(entry.path, pattern) for pattern in patterns)
        forbidden = any(part in HUB_FORBIDDEN_FOLDERS for part in PurePosixPath(entry.path).parts[:-1])
        if entry.kind != "file":
            selection.left_out.append((_not_a_file(root, entry), False))
        elif (secret or linked) and entry.path in patterns and not forbidden:  # named exactly: the one way they go
            selection.uploaded.append(entry)
            if secret:
                selection.included_secrets.append(entry.path)
            if linked:
                selection.included_links.append(entry.path)
        elif secret or linked:
            reason = _flagged_reason(entry, secret, patterns)
            selection.left_out.append((LeftOut(entry.path, reason, entry.size, secret=secret, outside=linked), False))
            if listed:  # the model's own files name it (auto_map, the index): the folder cannot go as it is
                selection.problems.append(_flagged_problem(entry, secret))
                selection.refused.add(entry.path)
        elif (listed or included) and not forbidden:
            selection.uploaded.append(entry)
        else:
            reason, quiet = _file_reason(entry.path, weights)
            selection.left_out.append((LeftOut(entry.path, reason, entry.size), quiet))
    return selection


def _require_matches(root: Path, entries: List[_Entry], patterns: List[str]) -> None:
    """A UsageError for an --include pattern that matches nothing in the folder (a typo would add nothing)."""
    for pattern in patterns:
        if not any(_matches(entry.path, pattern) for entry in entries):
            raise UsageError(
                f"--include {pattern!r} matches nothing in {root}: give a path relative to the folder "
                "(a file, a folder, or a pattern such as 'notes/*.md')"
            )


# ---------------------------------------------------------------------------------------------------------------
# What the chosen files hold


def _read_by_check_folder(root: Path) -> Set[str]:
    """The files `check_folder` reads in full, whose contents need no second look: config.json,
    generation_config.json and the weights the model loads (the index and its shards)."""
    return {"config.json", "generation_config.json"} | set(_loaded_weights(root))


def _content_problem(root: Path, path: str) -> Optional[str]:
    """What is wrong with the contents of the file at `path` for what its name promises, or None: a `.safetensors`
    file must parse as safetensors (its header and tensor names are read), a `.json` file as JSON (UTF-8), a
    `tokenizer.json` must load as a tokenizer, and a `.jinja` template must be UTF-8 text."""
    file, lower = root / path, path.lower()
    name = shown(path)
    try:
        if lower.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as weights:
                    weights.keys()
            except Exception as error:  # safetensors' own error: a bad header, a truncated file, not safetensors
                return f"{name}: not a safetensors file ({_escaped(str(error))})"
        elif lower.endswith(".json"):
            try:
                json.loads(file.read_bytes().decode("utf-8"))
            except ValueError as error:  # not UTF-8, or not JSON
                return f"{name}: not valid JSON ({error})"
            if PurePosixPath(path).name == "tokenizer.json":
                from transformers import PreTrainedTokenizerFast

                try:
                    PreTrainedTokenizerFast(tokenizer_file=str(file))
                except Exception as error:  # the tokenizers library refusing it
                    return f"{name}: does not load as a tokenizer ({_escaped(str(error))})"
        elif lower.endswith(".jinja"):
            try:
                file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as error:
                return f"{name}: not UTF-8 text ({error})"
    except OSError as error:
        return f"{name}: cannot be read ({error.strerror})"
    return None


def _index_problems(root: Path, selection: _Selection, checked: Set[str]) -> List[str]:
    """Where the upload holds model.safetensors.index.json: each shard it names that the upload does not hold (an
    index goes only with every shard it names). Missing shards of the index the model loads are check_folder's."""
    uploaded = {entry.path for entry in selection.uploaded}
    if WEIGHTS_INDEX not in uploaded:
        return []
    try:
        shards = sorted(index_shards(root))
    except WeightIndexError as error:
        if isinstance(error.__cause__, (json.JSONDecodeError, UnicodeDecodeError)):
            return []  # not JSON at all: the contents check says so
        return [f"{WEIGHTS_INDEX}: not a valid index ({error})"]
    reasons = {item.path: item.reason for item, _ in selection.left_out}
    problems = []
    for shard in shards:
        if shard in uploaded or shard in selection.refused:
            continue
        why = absence(root, shard)
        if why and WEIGHTS_INDEX in checked:
            continue
        if why is None and PurePosixPath(shard).as_posix() != shard:  # "./model-1.safetensors": the Hub has no "."
            why = f"written otherwise than the file {shown(PurePosixPath(shard).as_posix())} (write that in the index)"
        elif why is None:
            why = f"left out of the upload ({reasons.get(shard, 'not chosen')})"
        problems.append(
            f"{WEIGHTS_INDEX}: the shard {shown(shard)} it names is {why}; an index goes only with every shard it names"
        )
    return problems


def _upload_problems(root: Path, selection: _Selection) -> List[str]:
    """What refuses the chosen files besides check_folder: files whose contents are not what their names promise
    (those check_folder reads are not read again) and an index without every shard it names."""
    checked = _read_by_check_folder(root)
    problems = [_content_problem(root, entry.path) for entry in selection.uploaded if entry.path not in checked]
    return [problem for problem in problems if problem] + _index_problems(root, selection, checked)


def upload_files(folder: Union[str, Path], include: Sequence[str] = ()) -> List[str]:
    """The paths (relative, POSIX) of the files a push of `folder` uploads, in upload order (no completeness check)."""
    root = Path(folder).expanduser().resolve()
    return [entry.path for entry in _select(root, _scan(root), include).uploaded]


def plan_upload(folder: Union[str, Path], include: Sequence[str] = ()) -> UploadPlan:
    """Choose what a push of `folder` sends, check it, and return the `UploadPlan` (no network).

    `include`: further paths or patterns (fnmatch, `*` also matching "/"; a folder stands for what it holds) to
    upload besides the allow-list; a secret-looking file only where a pattern is its exact path. Raises
    `IncompleteFolderError` for a folder `check_folder` finds incomplete, whose own files name a secret-looking one
    or a hard link, that would send a file whose contents are not what its name promises, or an index without every
    shard it names; and `UsageError` for an --include that matches nothing.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    root = folder.expanduser().resolve()
    if not root.is_dir():
        raise IncompleteFolderError(folder, [f"{folder}: no such folder"])
    selection = _select(root, _scan(root), include)
    problems = check_folder(root) + selection.problems + _upload_problems(root, selection)
    if problems:
        raise IncompleteFolderError(folder, problems)
    operations = [
        CommitOperationAdd(path_in_repo=e.path, path_or_fileobj=str(root / e.path)) for e in selection.uploaded
    ]
    return UploadPlan(
        folder=folder,
        root=root,
        operations=operations,
        left_out=_collapse(selection.left_out, [entry.path for entry in selection.uploaded]),
        included_secrets=selection.included_secrets,
        included_links=selection.included_links,
        stamps={entry.path: (entry.size, entry.mtime_ns) for entry in selection.uploaded},
    )


def _describe_size(item: LeftOut) -> str:
    if item.size is None:
        return ""
    if item.path.endswith("/"):
        return f"({item.files:,} files, {item.size:,} bytes)  "
    return f"({item.size:,} bytes)  "


def left_out_report(plan: UploadPlan) -> List[str]:
    """Lines saying what the push leaves out and why, then warnings naming the secret-looking files and the links
    that lead or may lead out of the folder (none uploaded) and the secret-looking files and hard links --include
    names exactly (uploaded). Every name is `shown` (escaped)."""
    lines = []
    if plan.left_out:
        lines.append(f"left out of the upload ({len(plan.left_out)}):")
        width = min(40, max(len(shown(item.path)) for item in plan.left_out))
        for item in plan.left_out:
            flag = ("SECRET? " if item.secret else "") + ("OUTSIDE " if item.outside else "")
            lines.append(f"  {shown(item.path):<{width}}  {_describe_size(item)}{flag}{item.reason}")
    secrets = [shown(item.path) for item in plan.left_out if item.secret]
    if secrets:
        lines.append(f"warning: {plan.folder} holds secret-looking files, none uploaded: {', '.join(secrets)}")
    links = [shown(item.path) for item in plan.left_out if item.outside]
    if links:
        lines.append(
            f"warning: {plan.folder} holds links that lead or may lead out of it, none uploaded: {', '.join(links)}"
        )
    for path in plan.included_secrets:
        lines.append(f"warning: uploading the secret-looking {shown(path)}, because --include names it exactly")
    for path in plan.included_links:
        lines.append(
            f"warning: uploading the hard link {shown(path)} (its other names may lie outside the folder), because "
            "--include names it exactly"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Sending the plan


def check_target(repo_id: str, revision: Optional[str] = None, create_pr: bool = False) -> None:
    """A UsageError for a repository id the Hub would refuse, or for both a revision and a pull request."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{repo_id!r} is not a valid repository id: {error}") from error
    if "/" not in repo_id:
        raise UsageError(f"{repo_id!r}: give the repository as 'user/name' or 'organisation/name'")
    if create_pr and revision not in (None, "main"):
        raise UsageError("give either --revision or --create-pr: a pull request is opened against main")


def _require_unchanged(plan: UploadPlan) -> None:
    """A UsageError where a planned file is gone, no longer a regular file, or changed since it was checked."""
    changed = []
    for path, stamp in plan.stamps.items():
        try:
            status = os.lstat(plan.root / path)
        except OSError:
            changed.append(shown(path))
            continue
        if not stat.S_ISREG(status.st_mode) or (status.st_size, status.st_mtime_ns) != stamp:
            changed.append(shown(path))
    if changed:
        raise UsageError(f"{', '.join(changed)} changed in {plan.folder} after it was checked: run push again")


def push_plan(
    plan: UploadPlan,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    create_pr: bool = False,
    api=None,
):
    """Commit exactly `plan.operations` to the model repository `repo_id`; returns huggingface_hub's `CommitInfo`.

    Raises a `UsageError` for a bad repository id, a planned file that changed since it was checked, and whatever
    the Hub or the network answers (offline mode, no token, refused), with the original error as its cause.
    `revision` names a branch, created from main if it does not exist; `create_pr` opens a pull request against main
    instead of committing. `private` applies when the repository is created.
    """
    from huggingface_hub import HfApi

    check_target(repo_id, revision, create_pr)
    _require_unchanged(plan)
    api = api if api is not None else HfApi(token=token)  # an HfApi for another endpoint or with its own token
    step = "creating the repository"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = f"committing {len(plan.operations)} files"
        return api.create_commit(
            repo_id=repo_id,
            operations=list(plan.operations),
            commit_message=commit_message or f"Upload {plan.root.name} with retnet-hf",
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as error:  # offline mode, no or bad token, network errors, the Hub refusing the commit
        raise UsageError(
            f"cannot upload {plan.folder} to {repo_id} ({step} on {api.endpoint}): {_describe(error)}"
        ) from error


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    include: Sequence[str] = (),
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    create_pr: bool = False,
    api=None,
):
    """Plan the upload of `folder` (`plan_upload`, with `include`) and commit it to `repo_id` (`push_plan`).

    Raises `IncompleteFolderError` (a `UsageError`) listing everything missing, before any network call, and a
    `UsageError` for a bad target or whatever the Hub answers (see `push_plan`).
    """
    check_target(repo_id, revision, create_pr)
    plan = plan_upload(folder, include=include)
    return push_plan(
        plan,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
        api=api,
    )


def _describe(error: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return f"offline mode is enabled (unset HF_HUB_OFFLINE to upload): {error}"
    if isinstance(error, LocalTokenNotFoundError):
        return f"no Hub token (run `hf auth login`, set HF_TOKEN or pass --token): {error}"
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered: {error}"
    return f"{type(error).__name__}: {error}"


# -------------------------------------------------------------------------------------------- `retnet-hf push`


@dataclass
class PushSettings:
    """One push; `retnet-hf push`'s options are made from these fields. The target is checked when they are made
    (`check_target`), before the folder is read."""

    folder: str = field(
        default="",
        metadata=dict(
            positional=True, help="a model folder (weights, config, code, tokenizer, generation config, card)"
        ),
    )
    repo_id: str = field(
        default="",
        metadata=dict(
            positional=True,
            help="the Hub model repo, e.g. your-name/retnet-tiny (created if it does not exist)",
        ),
    )
    private: bool = field(
        default=False, metadata=dict(negatable=False, help="create the repo private (no effect if it exists)")
    )
    revision: Optional[str] = field(
        default=None, metadata=dict(help="the branch to commit to (created from main if needed; default main)")
    )
    commit_message: Optional[str] = field(default=None, metadata=dict(help="the commit's title"))
    create_pr: bool = field(
        default=False, metadata=dict(negatable=False, help="open a pull request instead of committing to main")
    )
    token: Optional[str] = field(
        default=None,
        repr=False,
        metadata=dict(help="a Hub token with write access (default: HF_TOKEN or the saved login)"),
    )
    dry_run: bool = field(
        default=False,
        metadata=dict(
            negatable=False, help="check the folder and list the files, sizes and sha256 that would be uploaded"
        ),
    )
    include: Tuple[str, ...] = field(
        default=(),
        metadata=dict(
            repeat=True,
            metavar="PATTERN",
            help="also upload these files (a path, a folder or a pattern such as 'notes/*.md'; repeatable); a "
            "secret-looking file goes only when PATTERN is its exact path",
        ),
    )

    def __post_init__(self):
        check_target(self.repo_id, self.revision, self.create_pr)


def push_command(settings: PushSettings) -> None:
    """`retnet-hf push`: check a model folder, then upload its model-repository files to a Hub model repo (or, with
    --dry-run, list them); what is left out, and why, goes to stderr in both cases."""
    s = settings
    plan = plan_upload(s.folder, include=s.include)
    for line in left_out_report(plan):
        print(line, file=sys.stderr)
    left_out = f"; {len(plan.left_out)} left out (listed on stderr)" if plan.left_out else ""
    if s.dry_run:
        for operation in plan.operations:
            print(
                f"{operation.upload_info.size:>14,}  {operation.upload_info.sha256.hex()[:16]}  "
                f"{shown(operation.path_in_repo)}"
            )
        print(
            f"{s.folder} is complete: {len(plan.operations)} files, {plan.size:,} bytes would go to {s.repo_id}"
            f"{left_out} (dry run: nothing was uploaded)"
        )
        return
    info = push_plan(
        plan,
        s.repo_id,
        private=s.private,
        revision=s.revision,
        commit_message=s.commit_message,
        token=s.token,
        create_pr=s.create_pr,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {len(plan.operations)} files of {s.folder} to {s.repo_id}{left_out}: {url}")


__all__ = [
    "IncompleteFolderError",
    "LeftOut",
    "PushSettings",
    "UploadPlan",
    "check_target",
    "left_out_report",
    "looks_secret",
    "model_repository_files",
    "plan_upload",
    "push_command",
    "push_folder",
    "push_plan",
    "shown",
    "upload_files",
]
