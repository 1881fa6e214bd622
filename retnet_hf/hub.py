"""Sharing a RetNet model folder on the Hugging Face Hub: check it is complete, then upload it.

`push_folder` refuses a folder that `retnet_hf.model_card.check_folder` finds incomplete (with the whole list of
what is missing) before any network access, then creates the repository (`HfApi.create_repo(exist_ok=True)`), the
branch if a revision is given, and uploads with `HfApi.upload_folder`. `plan_upload` lists what an upload would
send, as huggingface_hub `CommitOperationAdd` operations, without touching the network (`push --dry-run`).
"""

from pathlib import Path
from typing import List, Optional, Union

from .errors import UsageError
from .model_card import check_folder


# Never uploaded: a training run's checkpoints (optimizer states, often several times the model) and Python caches.
# Patterns are huggingface_hub's (fnmatch on the path relative to the folder; `*` also matches `/`).
UPLOAD_IGNORE_PATTERNS = [
    "checkpoints",
    "checkpoints/*",
    "__pycache__",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
    ".ipynb_checkpoints/*",
]


class IncompleteFolderError(UsageError):
    """The folder lacks something a shared RetNet model needs; `problems` lists each item."""

    def __init__(self, folder, problems: List[str]):
        self.folder = Path(folder)
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{folder} is not ready to share; missing or wrong:\n{lines}")


def _require_complete(folder: Union[str, Path]) -> None:
    problems = check_folder(folder)
    if problems:
        raise IncompleteFolderError(folder, problems)


def _ignore_patterns() -> List[str]:
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # .git and huggingface_hub's local cache

    return list(UPLOAD_IGNORE_PATTERNS) + list(DEFAULT_IGNORE_PATTERNS)


def upload_files(folder: Union[str, Path]) -> List[str]:
    """The paths (relative, POSIX) of the files `push_folder` uploads from `folder`, in upload order."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(folder).expanduser().resolve()
    names = [path.relative_to(root).as_posix() for path in sorted(root.glob("**/*")) if path.is_file()]
    return list(filter_repo_objects(names, ignore_patterns=_ignore_patterns()))


def plan_upload(folder: Union[str, Path]):
    """Check `folder`, then return the `CommitOperationAdd` list an upload of it consists of (no network).

    Raises `IncompleteFolderError` for an incomplete folder. Each operation is huggingface_hub's own, built from the
    file on disk, with the size and sha256 the Hub records for it.
    """
    from huggingface_hub import CommitOperationAdd

    _require_complete(folder)
    root = Path(folder).expanduser().resolve()
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in upload_files(root)]


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    create_pr: bool = False,
    api=None,
):
    """Check `folder` and upload it to the model repository `repo_id`; returns huggingface_hub's `CommitInfo`.

    Raises `IncompleteFolderError` (a `UsageError`) listing everything missing, before any network call, and a
    `UsageError` for whatever the Hub or the network answers otherwise (offline mode, no token, refused), with the
    original error as its cause. `revision` names a branch, created from main if it does not exist; `create_pr`
    opens a pull request against main instead of committing. `private` applies when the repository is created.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    _require_complete(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{repo_id!r} is not a valid repository id: {error}") from error
    if "/" not in repo_id:
        raise UsageError(f"{repo_id!r}: give the repository as 'user/name' or 'organisation/name'")
    if create_pr and revision not in (None, "main"):
        raise UsageError("give either --revision or --create-pr: a pull request is opened against main")

    api = api if api is not None else HfApi(token=token)  # an HfApi for another endpoint or with its own token
    step = "creating the repository"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = "uploading the folder"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.resolve().name} with retnet-hf",
            create_pr=create_pr,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        )
    except Exception as error:  # offline mode, no or bad token, network errors, the Hub refusing the commit
        raise UsageError(
            f"cannot upload {folder} to {repo_id} ({step} on {api.endpoint}): {_describe(error)}"
        ) from error


def _describe(error: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return f"offline mode is enabled (unset HF_HUB_OFFLINE to upload): {error}"
    if isinstance(error, LocalTokenNotFoundError):
        return f"no Hub token (run `hf auth login`, set HF_TOKEN or pass --token): {error}"
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered: {error}"
    return f"{type(error).__name__}: {error}"


__all__ = ["IncompleteFolderError", "UPLOAD_IGNORE_PATTERNS", "plan_upload", "push_folder", "upload_files"]
