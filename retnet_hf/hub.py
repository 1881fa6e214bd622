"""Sharing a RetNet model folder on the Hugging Face Hub: choose what to send, check it, then send exactly that.

A push never uploads "the folder". `plan_upload` walks it without following a symlink and keeps only what a model
repository is made of (the allow-list): `config.json`, `generation_config.json`, the weights the model loads
(`model.safetensors`, or `model.safetensors.index.json` and the shards it lists; an adapter's
`adapter_model.safetensors` and `adapter_config.json`), the code `auto_map` needs (and what that code imports), the
tokenizer files, the model card `README.md`, `loss.png` and `training_summary.json`. Everything else is left out
and listed with the reason: checkpoints, stray weights the model does not load, dumps, every symlink (one pointing
out of the folder is flagged; links are never followed), and secret-looking names (`.env`, `token`, keys,
`credentials*`, anything under `.ssh/`, ...), which are flagged loudly. `--include PATTERN` (`include=`) adds files
to the allow-list; a secret-looking file goes only where `--include` names its exact path, and is then announced.

The plan then has `retnet_hf.model_card.check_folder` find the folder complete (every weight read for NaN and
infinity) and becomes huggingface_hub `CommitOperationAdd`s, one per chosen file, with the size and sha256 the Hub
records (`push --dry-run` prints them). `push_plan` creates the repository (`HfApi.create_repo(exist_ok=True)`), the
branch if a revision is given, and commits those very operations with `HfApi.create_commit`, after checking that no
planned file changed since it was checked. `push_folder` is `plan_upload` then `push_plan`.
"""

import os
import stat
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from .errors import UsageError
from .model_card import WEIGHTS_INDEX, check_folder, code_file_names, weight_file_names


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
ALLOWED_PATTERNS = ("additional_chat_templates/*.jinja",)  # transformers' further named chat templates

# Secret-looking names (matched, lower-cased, against each file's own name) and folders (any part of its path).
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
    "service-account*.json",
    "service_account*.json",
)
SECRET_FOLDER_NAMES = (".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".password-store", "gcloud")

# Folders the Hub refuses to hold files in (huggingface_hub's FORBIDDEN_FOLDERS): never uploaded, even with --include
HUB_FORBIDDEN_FOLDERS = (".git", ".cache")


class IncompleteFolderError(UsageError):
    """The folder lacks something a shared RetNet model needs; `problems` lists each item."""

    def __init__(self, folder, problems: List[str]):
        self.folder = Path(folder)
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{folder} is not ready to share; missing or wrong:\n{lines}")


@dataclass(frozen=True)
class LeftOut:
    """Something in the folder that push does not upload, and why: a file, a symlink, or a folder (its path ends
    in "/") none of whose files is part of a model repository. `size` is in bytes (None for a link); `secret`: the
    name looks like a secret; `outside`: a symlink pointing out of the folder."""

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
    and sha256 the Hub records. `left_out`: everything else, with the reason. `included_secrets`: secret-looking
    files sent only because `--include` named them exactly. `stamps`: each chosen file's (size, mtime_ns) when it
    was chosen, for `push_plan` to check that nothing changed since.
    """

    folder: Path
    root: Path
    operations: List[Any]
    left_out: List[LeftOut]
    included_secrets: List[str] = field(default_factory=list)
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
    "unreadable" folder. `detail` is a link's target as written, or why a folder could not be listed."""

    path: str
    kind: str
    size: int = 0
    mtime_ns: int = 0
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
                entries.append(_Entry(path, "file", status.st_size, status.st_mtime_ns))
            else:
                entries.append(_Entry(path, "other"))

    visit(root, "")
    return entries


def looks_secret(path: str) -> bool:
    """Whether a relative path looks like it holds a secret: its name matches SECRET_NAME_PATTERNS, or a folder on
    its way is one of SECRET_FOLDER_NAMES."""
    parts = [part.lower() for part in PurePosixPath(path).parts]
    if not parts:
        return False
    if any(part in SECRET_FOLDER_NAMES for part in parts[:-1]):
        return True
    return any(fnmatchcase(parts[-1], pattern) for pattern in SECRET_NAME_PATTERNS)


def model_repository_files(folder: Union[str, Path]) -> Set[str]:
    """The allow-list's exact paths for `folder`: the fixed names, the weights it loads and the code auto_map needs
    (`ALLOWED_PATTERNS` adds further chat templates)."""
    names = set(MODEL_FILES) | set(TOKENIZER_FILES) | set(ADAPTER_FILES)
    return names | set(weight_file_names(folder)) | set(code_file_names(folder))


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


def _symlink_reason(root: Path, entry: _Entry) -> Tuple[str, bool]:
    """Why a symlink is left out, and whether it points out of the folder."""
    try:
        target = (root / entry.path).resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"a symlink to {entry.detail} that resolves to nothing (a loop): never followed", False
    if target != root and root not in target.parents:
        return f"a symlink to {entry.detail}, outside the folder: never followed", True
    return (
        f"a symlink to {target.relative_to(root).as_posix()}: push never follows links "
        "(put a copy of the file in place of the link to upload it)",
        False,
    )


def _not_a_file(root: Path, entry: _Entry) -> LeftOut:
    """The left-out line for a symlink, a pipe, socket or device, or a folder that cannot be listed."""
    if entry.kind == "symlink":
        reason, outside = _symlink_reason(root, entry)
        return LeftOut(entry.path, reason, secret=looks_secret(entry.path), outside=outside)
    if entry.kind == "unreadable":
        return LeftOut(entry.path, f"a folder push cannot list ({entry.detail})")
    return LeftOut(entry.path, "not a regular file (a pipe, socket or device)")


def _file_reason(path: str, weights: List[str]) -> Tuple[str, bool]:
    """Why a regular file the allow-list does not name is left out, and whether it may go into a folder's line."""
    parts = PurePosixPath(path).parts
    forbidden = next((part for part in parts[:-1] if part in HUB_FORBIDDEN_FOLDERS), None)
    if forbidden:
        return f"under {forbidden}/, where the Hub holds no files", True
    if path == WEIGHTS_INDEX:
        return "an index the model does not use: model.safetensors is there, and transformers loads it first", False
    if path.endswith(".safetensors"):
        loaded = "model.safetensors" if weights == ["model.safetensors"] else f"a shard {WEIGHTS_INDEX} lists"
        return f"weights the model does not load (not {loaded}); --include it to upload it anyway", True
    return "not part of a model repository (--include it to upload it anyway)", True


def _secret_reason(path: str, patterns: List[str]) -> str:
    matching = [pattern for pattern in patterns if _matches(path, pattern)]
    if matching:
        return (
            f"secret-looking name: not uploaded although --include {matching[0]!r} matches it (a pattern never adds "
            f"a secret-looking file; name it exactly, --include {path}, only if it is meant to be public)"
        )
    return "secret-looking name: not uploaded (keep secrets out of model folders)"


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
    uploaded: List[_Entry] = field(default_factory=list)
    left_out: List[Tuple[LeftOut, bool]] = field(default_factory=list)
    included_secrets: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


def _select(root: Path, entries: List[_Entry], include: Sequence[str]) -> _Selection:
    """Sort the folder's entries into uploaded and left out (with reasons), by the allow-list and --include."""
    allowed = model_repository_files(root)
    weights = weight_file_names(root)
    patterns = [_normalise_pattern(pattern) for pattern in include]
    _require_matches(root, entries, patterns)
    selection = _Selection()
    for entry in entries:
        secret = looks_secret(entry.path)
        listed = entry.path in allowed or any(fnmatchcase(entry.path, pattern) for pattern in ALLOWED_PATTERNS)
        included = any(_matches(entry.path, pattern) for pattern in patterns)
        forbidden = any(part in HUB_FORBIDDEN_FOLDERS for part in PurePosixPath(entry.path).parts[:-1])
        if entry.kind != "file":
            selection.left_out.append((_not_a_file(root, entry), False))
        elif secret and entry.path in patterns and not forbidden:  # named exactly: the one way a secret goes
            selection.uploaded.append(entry)
            selection.included_secrets.append(entry.path)
        elif secret:
            reason = _secret_reason(entry.path, patterns)
            selection.left_out.append((LeftOut(entry.path, reason, entry.size, secret=True), False))
            if listed:  # the model's own files name it (auto_map, the index): the folder cannot go as it is
                selection.problems.append(
                    f"{entry.path}: the model needs it but its name looks like a secret; rename it, or pass "
                    f"--include {entry.path} if it is meant to be public"
                )
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


def upload_files(folder: Union[str, Path], include: Sequence[str] = ()) -> List[str]:
    """The paths (relative, POSIX) of the files a push of `folder` uploads, in upload order (no completeness check)."""
    root = Path(folder).expanduser().resolve()
    return [entry.path for entry in _select(root, _scan(root), include).uploaded]


def plan_upload(folder: Union[str, Path], include: Sequence[str] = ()) -> UploadPlan:
    """Choose what a push of `folder` sends, check it, and return the `UploadPlan` (no network).

    `include`: further paths or patterns (fnmatch, `*` also matching "/"; a folder stands for what it holds) to
    upload besides the allow-list; a secret-looking file only where a pattern is its exact path. Raises
    `IncompleteFolderError` for a folder `check_folder` finds incomplete or whose own files name a secret-looking
    one, and `UsageError` for an --include that matches nothing.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    root = folder.expanduser().resolve()
    if not root.is_dir():
        raise IncompleteFolderError(folder, [f"{folder}: no such folder"])
    selection = _select(root, _scan(root), include)
    problems = check_folder(root) + selection.problems
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
    out of the folder (none uploaded) and the secret-looking files --include names exactly (uploaded)."""
    lines = []
    if plan.left_out:
        lines.append(f"left out of the upload ({len(plan.left_out)}):")
        width = min(40, max(len(item.path) for item in plan.left_out))
        for item in plan.left_out:
            flag = "SECRET? " if item.secret else "OUTSIDE " if item.outside else ""
            lines.append(f"  {item.path:<{width}}  {_describe_size(item)}{flag}{item.reason}")
    secrets = [item.path for item in plan.left_out if item.secret]
    if secrets:
        lines.append(f"warning: {plan.folder} holds secret-looking files, none uploaded: {', '.join(secrets)}")
    links = [item.path for item in plan.left_out if item.outside]
    if links:
        lines.append(f"warning: {plan.folder} holds links out of it, never followed: {', '.join(links)}")
    for path in plan.included_secrets:
        lines.append(f"warning: uploading the secret-looking {path}, because --include names it exactly")
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
            changed.append(path)
            continue
        if not stat.S_ISREG(status.st_mode) or (status.st_size, status.st_mtime_ns) != stamp:
            changed.append(path)
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


__all__ = [
    "IncompleteFolderError",
    "LeftOut",
    "UploadPlan",
    "check_target",
    "left_out_report",
    "looks_secret",
    "model_repository_files",
    "plan_upload",
    "push_folder",
    "push_plan",
    "upload_files",
]
