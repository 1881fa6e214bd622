"""Model cards for RetNet folders, and the check that a folder is complete enough to share.

`write_model_card` renders `model_cards/retnet.md` (installed as `retnet_hf.model_cards`) with
`huggingface_hub.ModelCard.from_template` and writes it as the folder's `README.md`. `check_folder` lists what a
folder lacks before it can go on the Hub: the config with `auto_map`, the code it names, safetensors weights,
a tokenizer, the generation config and a card whose metadata parses.
"""

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union


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
        path = folder / queue.pop()
        if not path.is_file():
            continue
        for module in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8", errors="replace")):
            name = module + ".py"
            if name not in wanted:
                wanted.append(name)
                queue.append(name)
    return wanted


def _check_weights(folder: Path) -> List[str]:
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return [f"model.safetensors.index.json: not a valid index ({error})"]
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            return [f"weights: shard {shard} (listed in model.safetensors.index.json) is missing" for shard in missing]
        if not shards:
            return ["model.safetensors.index.json: lists no shards"]
        files = [folder / shard for shard in shards]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: save with safe_serialization)" if others else ""
        return [f"weights: no model.safetensors or model.safetensors.index.json{hint}"]
    problems = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                if not list(weights.keys()):
                    problems.append(f"{file.name}: holds no tensors")
        except Exception as error:  # truncated or not safetensors at all
            problems.append(f"{file.name}: unreadable safetensors file ({error})")
    return problems


def _check_card(folder: Path) -> List[str]:
    from huggingface_hub import ModelCard

    path = folder / "README.md"
    if not path.is_file():
        return ["README.md: no model card (write one with retnet_hf.model_card.write_model_card)"]
    try:
        card = ModelCard.load(path)
    except Exception as error:  # invalid YAML, metadata that is not a mapping, ...
        return [f"README.md: the metadata does not parse ({error})"]
    metadata = card.data.to_dict()
    if not metadata:
        return ["README.md: no YAML metadata block"]
    return [f"README.md: metadata lacks {key}" for key in ("library_name", "pipeline_tag") if not metadata.get(key)]


def check_folder(folder: Union[str, Path]) -> List[str]:
    """What `folder` lacks to be shared as a complete RetNet model; an empty list when nothing is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    problems: List[str] = []

    config_path = folder / "config.json"
    auto_map: Dict[str, Any] = {}
    if not config_path.is_file():
        problems.append("config.json: missing")
    else:
        try:
            config = json.loads(config_path.read_text())
        except ValueError as error:
            config = None
            problems.append(f"config.json: not valid JSON ({error})")
        if isinstance(config, dict):
            auto_map = config.get("auto_map") or {}
            if not isinstance(auto_map, dict) or not auto_map:
                auto_map = {}
                problems.append("config.json: no auto_map (the folder would not load without retnet_hf)")
            elif "AutoModelForCausalLM" not in auto_map:
                problems.append("config.json: auto_map has no AutoModelForCausalLM entry")
        elif config is not None:
            problems.append("config.json: not a JSON object")
    for name in _code_files(folder, auto_map):
        if not (folder / name).is_file():
            problems.append(f"code: {name} is missing (named by auto_map or imported by the model code)")

    problems += _check_weights(folder)

    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        problems.append("tokenizer: no tokenizer.json or tokenizer.model")
    if not (folder / "tokenizer_config.json").is_file():
        problems.append("tokenizer: tokenizer_config.json is missing")

    generation = folder / "generation_config.json"
    if not generation.is_file():
        problems.append("generation_config.json: missing")
    else:
        try:
            json.loads(generation.read_text())
        except ValueError as error:
            problems.append(f"generation_config.json: not valid JSON ({error})")

    problems += _check_card(folder)
    return problems
