"""Writing folders and files so that nothing is half-written or lost: a new output folder is built under a staging
name beside it and published by one rename; a scratch folder lives in the system's temporary folder; a file is
written beside its place and renamed over it. Each staging or scratch name records the process and the machine
(`NAME-PID-HOST-RANDOM`), so that the next run removes what a killed one left (its process gone, on this machine)
and leaves everything else alone, saying so."""

import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Type, Union

from .errors import UsageError


def host_tag() -> str:
    """8 hex digits naming this machine: a pid means something only on the machine that recorded it."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def process_alive(pid: int) -> bool:
    """Whether process `pid` (on this machine) exists; True when that cannot be told, so nothing is removed."""
    if os.name == "nt" or pid <= 0:  # os.kill on Windows terminates; pid 0 would be this process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, as another user
        return True
    return True


def _tagged_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}"


def remove_stale(parent: Path, prefix: str, kind: str, what: str, notify: Callable[[str], None]) -> None:
    """Remove the folders `PREFIX-PID-HOST-RANDOM` in `parent` whose process is gone on this machine (the `kind` of
    a killed `what`, e.g. the staging folder of a conversion), saying so; leave the others (a live process, another
    machine, an older naming) and say that."""
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return
    pattern, host = re.compile(rf"{re.escape(prefix)}-(\d+)-([0-9a-f]{{8}})-[0-9a-f]{{8}}"), host_tag()
    for entry in entries:
        if not entry.name.startswith(f"{prefix}-"):
            continue
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or match.group(2) != host:
            if match or re.fullmatch(
                rf"{re.escape(prefix)}-[a-z0-9_]{{8}}|{re.escape(prefix)}-\d+-[0-9a-f]{{8}}", entry.name
            ):
                notify(
                    f"left {entry} alone: it looks like the {kind} of a {what} on another machine or by an older "
                    "retnet-hf; remove it if no such run is going on."
                )
            continue
        pid = int(match.group(1))
        if process_alive(pid):
            notify(f"left {entry} alone: another {what} (process {pid}) seems to be running.")
            continue
        try:
            shutil.rmtree(entry)
        except OSError as error:
            notify(f"could not remove {entry}, left by an interrupted {what} (process {pid}): {error}")
        else:
            notify(f"removed {entry}, the {kind} of an interrupted {what} (process {pid}).")


def location_error(path: Path, error: OSError, what: str, error_class: Type[Exception] = UsageError) -> Exception:
    """The error to raise when `path` (a `what`) cannot be created: a file on the way, or a place not writable."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return error_class(
            f"{path}: cannot create the {what}: {blocker} is a file, not a folder; choose another {what}."
        )
    where = Path(error.filename).parent if error.filename else path.parent
    return error_class(
        f"{path}: cannot create the {what}: cannot write in {where} ({error.strerror or error}); choose an {what} "
        f"in a location you can write to, or make {where} writable."
    )


def _remove_if_empty(folders: List[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def staged_folder(
    out: Path, verb: str, what: str, notify: Callable[[str], None], error_class: Type[Exception] = UsageError
) -> Iterator[Path]:
    """Yield a new folder `.OUT.VERB-PID-HOST-RANDOM` next to OUT (creating OUT's parents; mode as mkdir gives, since
    it becomes OUT) and rename it to OUT when the body succeeds; on any failure (Ctrl-C included) remove it and the
    parents it created. A kill -9 leaves only the staging folder, which the next `what` into OUT removes (`notify`
    is told). OUT must not exist, or be an empty folder."""
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # deepest first
    temporary = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, f".{out.name}.{verb}", "staging folder", f"{what} into {out.name}", notify)
        while temporary is None:
            name = _tagged_name(f".{out.name}.{verb}")
            try:
                os.mkdir(out.parent / name)  # mode 0o777 less the umask (not mkdtemp's 0o700)
            except FileExistsError:
                continue
            temporary = out.parent / name
        yield temporary
        try:
            if out.exists():
                out.rmdir()  # an empty folder, checked before
            os.replace(temporary, out)
        except OSError as error:
            raise error_class(
                f"{out}: cannot put the finished folder in place ({error.strerror or error}); was {out.name} "
                "created meanwhile? Choose a new output folder."
            ) from error
    except BaseException as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        _remove_if_empty(created)
        if temporary is None and isinstance(error, OSError):
            raise location_error(out, error, "output folder", error_class) from error
        raise


@contextmanager
def scratch_folder(purpose: str, notify: Callable[[str], None]) -> Iterator[Path]:
    """A new folder `retnet-hf-PURPOSE-PID-HOST-RANDOM` in the system's temporary folder, removed when the body
    ends; those of killed runs are removed first."""
    parent = Path(tempfile.gettempdir())
    prefix = f"retnet-hf-{purpose}"
    remove_stale(parent, prefix, "scratch folder", f"retnet-hf {purpose}", notify)
    while True:
        folder = parent / _tagged_name(prefix)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue
        break
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_writable_file(path: Path, what: str) -> None:
    """A UsageError now, before any work, if `path` cannot be written as a file: it is a folder, a file stands where
    one of its folders should, or the nearest existing folder is not writable."""
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give the path of the {what} file to write")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{path}: cannot write the {what} there: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise UsageError(f"{path}: cannot write the {what}: {existing} is not writable; choose another path")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{path}: cannot write the {what}: the file is read-only; choose another path")


def write_file_whole(path: Path, data: Union[str, bytes]) -> None:
    """Write `data` to `path` whole or not at all: into a temporary file beside it, flushed to disk, then renamed
    over it (a full disk or a kill leaves the earlier file as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{_tagged_name('writing')}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
