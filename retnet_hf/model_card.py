"""Model cards for RetNet folders, and the check that a folder is complete enough to share.

`write_model_card` renders `model_cards/retnet.md` (installed as `retnet_hf.model_cards`) with
`huggingface_hub.ModelCard.from_template` and writes it as the folder's `README.md`. `check_folder` lists what a
folder lacks before it can go on the Hub: the config with `auto_map`, the code it names, safetensors weights whose
every value is finite, a tokenizer, the generation config and a card whose metadata parses; each as a regular file
inside the folder (a symlink is never followed), as `retnet_hf.hub` uploads it.
"""

import json
import math
import os
import re
import stat
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


TEMPLATE_PACKAGE = "retnet_hf.model_cards"
TEMPLATE_NAME = "retnet.md"
TAGS = ["retnet", "retnet_hf", "retention", "custom_code"]

# config.json fields shown in the card's architecture table, with their labels
_ARCHITECTURE_FIELDS = (
    ("decoder_layers", "layers"),
    ("decoder_embed_dim", "model width"),
    ("decoder_value_embed_dim", "value width"),
    ("decoder_ffn_embed_dim", "feed-forward width"),
    ("decoder_retention_heads", "retention heads"),
    ("vocab_size", "vocabulary"),
    ("activation_fn", "activation"),
    ("recurrent_chunk_size", "chunk size (chunkwise form)"),
)


def template_text() -> str:
    """The model-card template, read from the installed package data."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(values: Optional[Dict[str, Any]]) -> Dict[str, str]:
    return {str(key): _format(value) for key, value in (values or {}).items() if value is not None}


def _weight_files(folder: Path) -> List[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        return [folder / shard for shard in shards if (folder / shard).is_file()]
    return []


def count_parameters(folder: Union[str, Path]) -> Optional[int]:
    """The number of weights stored in the folder's safetensors files (read from their headers), or None."""
    from safetensors import safe_open

    files = _weight_files(Path(folder))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def _architecture(folder: Path) -> Dict[str, str]:
    rows: Dict[str, Any] = {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key, label in _ARCHITECTURE_FIELDS:
        if key in config:
            rows[label] = config[key]
    try:
        parameters = count_parameters(folder)
    except Exception:  # an unreadable weight file is check_folder's business, not the card's
        parameters = None
    if parameters:
        rows["values stored in the weights (incl. buffers)"] = parameters
    return _table(rows)


def write_model_card(
    folder: Union[str, Path],
    *,
    model_name: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    training: Optional[Dict[str, Any]] = None,
    evaluation: Optional[Dict[str, Any]] = None,
    source: Optional[str] = None,
    license: str = "mit",
    language: Optional[Union[str, Sequence[str]]] = None,
    local_data: Optional[Sequence[str]] = None,
    evaluation_note: Optional[str] = None,
    example_prompt: str = "Once upon a time",
) -> Path:
    """Render the RetNet model card for `folder` and write it as `folder/README.md`; returns that path.

    `datasets` are Hub data set ids (they go into the metadata); `local_data` names local training files, which
    only the text mentions. `base_model` (a Hub id) marks a fine-tune. `training` holds the run's settings and
    `evaluation` the figures it measured, each shown as a table; `source` is free text on where the weights come
    from (a conversion, say).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_name = model_name or folder.resolve().name
    datasets = list(datasets) if datasets else None
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        datasets=datasets,
        base_model=base_model,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=model_name,
        model_id=model_name,
        base_model=base_model,
        datasets=datasets or [],
        local_data=list(local_data or []),
        training=_table(training),
        evaluation=_table(evaluation),
        evaluation_note=evaluation_note,
        architecture=_architecture(folder),
        source=source,
        retnet_hf_version=__version__,
        example_prompt=example_prompt.replace('"', '\\"'),
    )
    path = folder / "README.md"
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"  # the template's {% if %} lines leave blank runs
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Is a folder complete?
#
# A file counts as there only where `push` can upload it: a regular file inside the folder, reached through no
# symlink. A symlink is reported as such and never followed, so a folder that passes has every file it was checked
# for in the upload (retnet_hf.hub builds its allow-list from the same names: `weight_file_names`,
# `code_file_names`).

_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import\s", re.MULTILINE)

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_INDEX_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)

# The safetensors dtypes that can hold NaN or infinity (integer and packed dtypes cannot, exotic ones are not read)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Values read at once when looking for non-finite weights (64 MB of float32), however large the tensor
SCAN_ELEMENTS = 1 << 24
# Tensors a non-finite-weights problem names, at most (a diverged run has NaN everywhere)
_NAMED_TENSORS = 5


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


def _index_shards(folder: Path) -> List[str]:
    """The shard names model.safetensors.index.json lists, sorted; raises one of _INDEX_ERRORS for a bad index."""
    shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    if not all(isinstance(shard, str) for shard in shards):
        raise TypeError("a shard name in weight_map is not a string")
    return shards


def weight_file_names(folder: Union[str, Path]) -> List[str]:
    """The weight files the folder's model loads (paths relative to it): model.safetensors where it is there, else
    model.safetensors.index.json and the shards it lists that are there; [] where there are none."""
    folder = Path(folder)
    if os.path.lexists(folder / SINGLE_WEIGHTS):
        return [SINGLE_WEIGHTS] if is_shareable(folder, SINGLE_WEIGHTS) else []
    if not is_shareable(folder, WEIGHTS_INDEX):
        return []
    try:
        shards = _index_shards(folder)
    except _INDEX_ERRORS:
        return []
    return [WEIGHTS_INDEX] + [shard for shard in shards if is_shareable(folder, shard)]


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
    if os.path.lexists(folder / SINGLE_WEIGHTS):
        why = absence(folder, SINGLE_WEIGHTS)
        if why:
            return [f"weights: {SINGLE_WEIGHTS} is {why}"]
        files = [SINGLE_WEIGHTS]
    elif os.path.lexists(folder / WEIGHTS_INDEX):
        why = absence(folder, WEIGHTS_INDEX)
        if why:
            return [f"weights: {WEIGHTS_INDEX} is {why}"]
        try:
            shards = _index_shards(folder)
        except _INDEX_ERRORS as error:
            return [f"{WEIGHTS_INDEX}: not a valid index ({error})"]
        if not shards:
            return [f"{WEIGHTS_INDEX}: lists no shards"]
        absent = [(shard, absence(folder, shard)) for shard in shards]
        problems = [f"weights: shard {shard} (listed in {WEIGHTS_INDEX}) is {why}" for shard, why in absent if why]
        if problems:
            return problems
        files = shards
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: save with safe_serialization)" if others else ""
        return [f"weights: no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}{hint}"]
    problems = []
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
