"""Model cards for RetNet folders.

`write_model_card` renders `model_cards/retnet.md` (installed as `retnet_hf.model_cards`) with
`huggingface_hub.ModelCard.from_template` and writes it, whole, as the folder's `README.md`. Whether a folder is
complete enough to share is `retnet_hf.model_folder.check_folder`'s business.
"""

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from .model_folder import count_parameters, write_file_whole


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
    write_file_whole(path, text)
    return path
