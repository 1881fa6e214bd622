"""A model folder, for every tool, as transformers' `utils/hub.py` is for its loaders: which folder, which files,
is it complete, and how a new one is written.

Which folder: `resolve_source` tells a local path from a Hub id (and downloads one where a tool reads the files
itself), `is_model_folder` / `require_model_folder` whether a path is a model folder (a folder with config.json).

Which files: `weight_files` lists the weights the model loads, as transformers chooses them (`index_shards` reads a
sharded index), `code_file_names` the code config.json's auto_map needs; `count_parameters` counts the stored values.

Is it complete: `check_folder` lists what a folder lacks before it can go on the Hub (`absence` / `is_shareable`:
whether a file is one `push` uploads, a regular file reached through no symlink).

Writing folders and files so that nothing is half-written or lost: a new output folder is built under a staging
name beside it and published by one rename (`staged_folder`); a scratch folder lives in the system's temporary
folder (`scratch_folder`); a file is written beside its place and renamed over it (`write_file_whole`). Each staging
or scratch name records the process and the machine (`NAME-PID-HOST-RANDOM`), so that the next run removes what a
killed one left (its process gone, on this machine) and leaves everything else alone, saying so (`remove_stale`)."""

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

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


# ---------------------------------------------------------------------------------------------------------------
# Which folder: a local path or a Hub id, and whether it is a model folder


def is_local(source: Union[str, Path]) -> bool:
    """Whether `source` names something on this machine (a path that exists, `~` expanded) rather than a Hub id."""
    return Path(source).expanduser().exists()


def resolve_source(
    source: Union[str, Path],
    what: str = "model",
    *,
    files: bool = False,
    download: bool = False,
    error_class: Type[Exception] = UsageError,
) -> str:
    """Where `source` is, for every loader: an existing local path as given (`~` expanded; a file only with
    `files`), else a Hub id ("name" or "owner/name") as given, or with `download` the local folder of its snapshot
    (`huggingface_hub.snapshot_download`). An `error_class` for a file where a `what` folder is wanted, a local path
    that does not exist (`./x`, `/x`, `~/x`, `a/b/c`, a name no Hub id can have; with `files` also a bare name such
    as `model.pt`: a Hub id of a checkpoint names its owner), and a failed download."""
    path = Path(source).expanduser()
    if path.exists():
        if not files and not path.is_dir():
            raise error_class(f"{source}: a file, not a {what} folder")
        return str(path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or (files and "/" not in text)
    try:
        validate_repo_id(text)
    except HFValidationError:
        looks_local = True
    if looks_local and files:
        raise error_class(f"{source}: no such file or folder (and not a Hub id of the form owner/name).")
    if looks_local:
        raise error_class(f"{source}: no such {what} folder")
    if not download:
        return text
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(text)
    except Exception as error:  # noqa: BLE001 - offline, missing, gated, ...
        raise error_class(
            f"{source}: not a local path, and downloading it from the Hugging Face Hub failed: {error}"
        ) from error


def is_model_folder(path: Union[str, Path]) -> bool:
    """Whether `path` is a model folder: a folder holding config.json (found as transformers finds it)."""
    return (Path(path).expanduser() / "config.json").is_file()


def require_model_folder(path: Union[str, Path], hint: str = "") -> Path:
    """`path` (`~` expanded) when it is a model folder; else a UsageError "PATH: not a model folder (WHY)" and
    `hint` (how to get one), WHY being "no such folder", "a file" or "no config.json"."""
    folder = Path(path).expanduser()
    if is_model_folder(folder):
        return folder
    why = "no such folder" if not folder.exists() else "a file" if not folder.is_dir() else "no config.json"
    raise UsageError(f"{path}: not a model folder ({why}){hint}")


# ---------------------------------------------------------------------------------------------------------------
# Which files: the weights the model loads, the code config.json names
#
# Two views of a folder. transformers' (the default of `weight_files`): a file is there where it is a file, a link
# followed. push's (`links=False`, and the whole check below): a file counts as there only where `push` can upload
# it, a regular file inside the folder reached through no symlink; a symlink is reported as such and never followed,
# so a folder that passes has every file it was checked for in the upload (retnet_hf.hub builds its allow-list from
# the same names: `weight_files`, `code_file_names`).

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = "pytorch_model.bin"  # read only where asked (`pickled`): a checkpoint to convert
PICKLED_INDEX = "pytorch_model.bin.index.json"


class WeightIndexError(ValueError):
    """An index of sharded weights (`index`, its name in the folder) that cannot be read, is not JSON, or has no
    weight_map from tensor names to shard file names; the error it comes from, if any, is its `__cause__`."""

    def __init__(self, index: str, reason: str):
        super().__init__(reason)
        self.index = index


def index_shards(folder: Union[str, Path], index: str = WEIGHTS_INDEX) -> List[str]:
    """The shard names the index's weight_map lists (paths relative to the folder), in the order it first names
    them; a WeightIndexError for an index that cannot be read, is not UTF-8 JSON or has no such map."""
    try:
        data = json.loads((Path(folder) / index).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise WeightIndexError(index, str(error)) from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise WeightIndexError(index, "no weight_map from tensor names to shard file names")
    return list(dict.fromkeys(weight_map.values()))


def weight_files(folder: Union[str, Path], *, pickled: bool = False, links: bool = True) -> List[str]:
    """The weight files the model of `folder` loads, chosen as transformers chooses them (paths relative to the
    folder): model.safetensors; else model.safetensors.index.json and the shards it names; with `pickled`, then
    pytorch_model.bin, then its index and shards. [] where there are none. A shard the index names is listed whether
    it is there or not (the caller says what is missing).

    With `links=False` (push's view) a name is taken by whatever has it, a link too, which is never followed: a
    link at model.safetensors leaves no weights `push` can upload, and an index that is not a regular file is listed
    alone, unread. Raises WeightIndexError for an index that does not give its shards."""
    folder = Path(folder)
    there = os.path.isfile if links else os.path.lexists
    formats = [(SINGLE_WEIGHTS, WEIGHTS_INDEX)] + ([(PICKLED_WEIGHTS, PICKLED_INDEX)] if pickled else [])
    for single, index in formats:
        if there(folder / single):
            return [single]
        if there(folder / index):
            if not links and not is_shareable(folder, index):
                return [index]
            return [index] + index_shards(folder, index)
    return []


def count_parameters(folder: Union[str, Path]) -> Optional[int]:
    """The number of values stored in the folder's safetensors weights (read from their headers), or None."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        names = weight_files(folder)
    except WeightIndexError:
        return None
    files = [folder / name for name in names if name.endswith(".safetensors") and (folder / name).is_file()]
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def absence(folder: Union[str, Path], name: str) -> Optional[str]:
    """Why `name` (a path relative to `folder`) is not a file `push` would upload, as a phrase ("missing", "a
    symlink to ...", "not a regular file", "outside the folder"); None where it is a regular file inside the folder
    reached through no symlink."""
    relative = PurePosixPath(name)
    if not relative.parts or relative.is_absolute() or ".." in relative.parts:
        return "outside the folder (a path that leaves the folder is never read nor uploaded)"
    path = Path(folder)
    for depth, part in enumerate(relative.parts, 1):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return "missing"
        if stat.S_ISLNK(mode):
            where = "" if depth == len(relative.parts) else f"inside {PurePosixPath(*relative.parts[:depth])}, "
            return (
                f"{where}a symlink to {os.readlink(path)}, which push does not follow "
                "(put a copy of the file in place of the link)"
            )
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def is_shareable(folder: Union[str, Path], name: str) -> bool:
    """Whether `name` is a regular file inside `folder`, reached through no symlink: a file `push` can upload."""
    return absence(folder, name) is None


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import\s", re.MULTILINE)


def _code_files(folder: Path, auto_map: Dict[str, Any]) -> List[str]:
    """The .py files the auto_map names, and those they import relatively (`from .retention import ...`)."""
    wanted: List[str] = []
    for reference in auto_map.values():
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            if not isinstance(item, str) or "." not in item or "--" in item:  # "repo--module.Class": another repo
                continue
            name = item.rsplit(".", 1)[0].replace(".", "/") + ".py"
            if name not in wanted:
                wanted.append(name)
    queue = list(wanted)
    while queue:
        name = queue.pop()
        if not is_shareable(folder, name):
            continue
        for module in _RELATIVE_IMPORT.findall((folder / name).read_text(encoding="utf-8", errors="replace")):
            name = module + ".py"
            if name not in wanted:
                wanted.append(name)
                queue.append(name)
    return wanted


def _auto_map(folder: Path) -> Dict[str, Any]:
    """config.json's auto_map; {} where there is none or config.json does not parse (check_folder says which)."""
    if not is_shareable(folder, "config.json"):
        return {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


def code_file_names(folder: Union[str, Path]) -> List[str]:
    """The code the folder needs to load without retnet_hf: the .py files config.json's auto_map names and those
    they import relatively (paths relative to the folder; some may be missing, which check_folder reports)."""
    return _code_files(Path(folder), _auto_map(Path(folder)))


# ---------------------------------------------------------------------------------------------------------------
# Is a folder complete? What it lacks before it can go on the Hub: the config with `auto_map`, the code it names,
# safetensors weights whose every value is finite, a tokenizer, the generation config and a card whose metadata
# parses; each as a regular file inside the folder (push's view above), as `retnet_hf.hub` uploads it.

# The safetensors dtypes that can hold NaN or infinity (integer and packed dtypes cannot, exotic ones are not read)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Values read at once when looking for non-finite weights (64 MB of float32), however large the tensor
SCAN_ELEMENTS = 1 << 24
# Tensors a non-finite-weights problem names, at most (a diverged run has NaN everywhere)
_NAMED_TENSORS = 5


def _non_finite_counts(weights, name: str) -> Tuple[int, int]:
    """How many NaN and how many infinite values tensor `name` of an open safetensors file holds, reading at most
    about SCAN_ELEMENTS values at a time (slices along the first dimension)."""
    import torch

    piece = weights.get_slice(name)
    if piece.get_dtype() not in _FLOAT_DTYPES:
        return 0, 0
    shape = piece.get_shape()
    if not shape:
        chunks = iter([piece[...]])
    else:
        rows = max(1, SCAN_ELEMENTS // max(1, math.prod(shape[1:])))
        chunks = (piece[start : start + rows] for start in range(0, shape[0], rows))
    nan = infinite = 0
    for chunk in chunks:
        if chunk.element_size() == 1:  # torch has no isfinite for float8: widen it (exactly)
            chunk = chunk.float()
        if not bool(torch.isfinite(chunk).all()):
            nan += int(torch.isnan(chunk).sum())
            infinite += int(torch.isinf(chunk).sum())
    return nan, infinite


def _check_weight_file(folder: Path, name: str) -> List[str]:
    """A weight file's problems: not a safetensors file, no tensors, or tensors holding NaN or infinite values."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / name), framework="pt") as weights:
            tensors = list(weights.keys())
            counts = [(tensor, _non_finite_counts(weights, tensor)) for tensor in tensors]
    except Exception as error:  # truncated or not safetensors at all
        return [f"{name}: unreadable safetensors file ({error})"]
    if not tensors:
        return [f"{name}: holds no tensors"]
    bad = [(tensor, nan, infinite) for tensor, (nan, infinite) in counts if nan or infinite]
    if not bad:
        return []
    named = ", ".join(
        f"{tensor} ({nan:,} NaN, {infinite:,} infinite)" for tensor, nan, infinite in bad[:_NAMED_TENSORS]
    )
    more = f" and {len(bad) - _NAMED_TENSORS} more" if len(bad) > _NAMED_TENSORS else ""
    return [
        f"{name}: non-finite weights in {len(bad)} of {len(tensors)} tensors: {named}{more} (a diverged or "
        "corrupted model must not be shared: save it again from a checkpoint whose weights are finite)"
    ]


def _check_weights(folder: Path) -> List[str]:
    """The weights' problems: missing, a shard missing, unreadable, or non-finite (every value is read)."""
    try:
        names = weight_files(folder, links=False)
    except WeightIndexError as error:
        return [f"{error.index}: not a valid index ({error})"]
    if not names:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: save with safe_serialization)" if others else ""
        return [f"weights: no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}{hint}"]
    why = absence(folder, names[0])
    if why:
        return [f"weights: {names[0]} is {why}"]
    files = sorted(names[1:]) if names[0] == WEIGHTS_INDEX else names
    if not files:
        return [f"{WEIGHTS_INDEX}: lists no shards"]
    absent = [(shard, absence(folder, shard)) for shard in files]
    problems = [f"weights: shard {shard} (listed in {WEIGHTS_INDEX}) is {why}" for shard, why in absent if why]
    if problems:
        return problems
    for name in files:
        problems += _check_weight_file(folder, name)
    return problems


def _check_card(folder: Path) -> List[str]:
    from huggingface_hub import ModelCard

    why = absence(folder, "README.md")
    if why == "missing":
        return ["README.md: no model card (write one with retnet_hf.model_card.write_model_card)"]
    if why:
        return [f"README.md: {why}"]
    try:
        card = ModelCard.load(folder / "README.md")
    except Exception as error:  # invalid YAML, metadata that is not a mapping, ...
        return [f"README.md: the metadata does not parse ({error})"]
    metadata = card.data.to_dict()
    if not metadata:
        return ["README.md: no YAML metadata block"]
    return [f"README.md: metadata lacks {key}" for key in ("library_name", "pipeline_tag") if not metadata.get(key)]


def _check_config(folder: Path) -> Tuple[List[str], Dict[str, Any]]:
    """config.json's problems, and its auto_map ({} where it has none)."""
    why = absence(folder, "config.json")
    if why:
        return [f"config.json: {why}"], {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        return [f"config.json: not valid JSON ({error})"], {}
    if not isinstance(config, dict):
        return ["config.json: not a JSON object"], {}
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict) or not auto_map:
        return ["config.json: no auto_map (the folder would not load without retnet_hf)"], {}
    if "AutoModelForCausalLM" not in auto_map:
        return ["config.json: auto_map has no AutoModelForCausalLM entry"], auto_map
    return [], auto_map


def _check_tokenizer(folder: Path) -> List[str]:
    problems = []
    files = ("tokenizer.json", "tokenizer.model")
    why = {name: absence(folder, name) for name in files}
    if all(why.values()):
        detail = "; ".join(f"{name} is {reason}" for name, reason in why.items() if reason != "missing")
        problems.append("tokenizer: no tokenizer.json or tokenizer.model" + (f" ({detail})" if detail else ""))
    config_why = absence(folder, "tokenizer_config.json")
    if config_why:
        problems.append(f"tokenizer: tokenizer_config.json is {config_why}")
    return problems


def _check_generation_config(folder: Path) -> List[str]:
    why = absence(folder, "generation_config.json")
    if why:
        return [f"generation_config.json: {why}"]
    try:
        json.loads((folder / "generation_config.json").read_text())
    except ValueError as error:
        return [f"generation_config.json: not valid JSON ({error})"]
    return []


def check_folder(folder: Union[str, Path]) -> List[str]:
    """What `folder` lacks to be shared as a complete RetNet model; an empty list when nothing is missing.

    Every file is looked for as `push` uploads it (a regular file inside the folder, no symlink), and every value in
    the weights is read, one tensor (or slice of one) at a time: NaN or infinite weights are a problem naming the
    tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    problems, auto_map = _check_config(folder)
    for name in _code_files(folder, auto_map):
        why = absence(folder, name)
        if why:
            problems.append(f"code: {name} is {why} (named by auto_map or imported by the model code)")
    problems += _check_weights(folder)
    problems += _check_tokenizer(folder)
    problems += _check_generation_config(folder)
    problems += _check_card(folder)
    return problems
