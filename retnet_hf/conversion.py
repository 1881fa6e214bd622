"""Convert public RetNet checkpoints into retnet-hf folders: torchscale/fairseq, syncdoth-format and fla.

`convert_checkpoint(source_format, src, out)` reads

- ``"torchscale"``: a fairseq-style ``.pt`` holding ``model`` (keys under ``decoder.``) and the training ``args``
  (an ``argparse.Namespace``) or ``cfg`` (a dict whose ``model`` section holds the fields); or a bare torchscale
  ``RetNetDecoder`` state dict (``.pt``/``.bin``/``.safetensors``) whose config comes from ``config_json`` or
  ``config_overrides`` (torchscale's field names, its defaults for what is left out);
- ``"syncdoth"``: a folder in syncdoth/RetNet's layout (torchscale keys under ``model.``, ``lm_head``; a
  ``config.json`` with torchscale's field names), safetensors or ``pytorch_model.bin`` weights, maybe sharded;
- ``"fla"``: a flash-linear-attention RetNet folder (fla's ``config.json``, safetensors weights, maybe sharded),
  converted to the config variant ``rotary_style="neox"``, ``retention_normalization=False``,
  ``group_norm_affine=True``, ``no_scale_embedding=True``;

and writes OUT: ``config.json`` (with ``auto_map`` and the model code, so it loads with ``trust_remote_code``
where retnet-hf is not installed), safetensors weights (sharded above ``max_shard_size``, with an index),
``generation_config.json``, the tokenizer files when the source has them, and a model card.

Memory: the source is read one shard at a time (one file for a single-file checkpoint; a ``.pt`` is memory-mapped),
tensor by tensor for safetensors, and the output is written shard by shard as it fills. At any time at most one
source shard is open and at most one output shard (``max_shard_size``) is held in memory; the model itself is never
built with real weights (only on the ``meta`` device, to know the expected names and shapes).

Safety: only safetensors files and ``torch.load(weights_only=True)`` are read (``argparse.Namespace`` is allowed
for fairseq's ``args``); anything that needs arbitrary code to unpickle is refused with a `ConversionError`.
Keys and shapes are checked against the model before anything is written; a mismatch raises a `ConversionError`
listing the missing, unexpected and mis-shaped keys; the checkpoint's keys decide how many layers there are, so a
config that claims another count is refused before a model of its size is built. Everything is written into a staging
folder next to OUT, ``.OUT.converting-PID-HOST-RANDOM`` (created first, so an output location that cannot be written is
reported before any work), renamed to OUT at the end, and removed on failure: a failed or interrupted conversion
leaves no OUT. A staging folder left by a killed conversion (its process gone, on this machine) is removed by the
next conversion into the same OUT, which says so; nothing else is removed. OUT gets the mode a new folder gets from
the umask, as with ``mkdir``.
"""

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UsageError
from .model import RetNetConfig, RetNetForCausalLM
from .model.modeling_retnet import RetNetRelPos
from .model_folder import (
    PICKLED_INDEX,
    WEIGHTS_INDEX,
    WeightIndexError,
    is_local,
    resolve_source,
    staged_folder,
    weight_files,
)


SOURCE_FORMATS = ("torchscale", "syncdoth", "fla")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
BUFFERS = ("model.retnet_rel_pos.angle", "model.retnet_rel_pos.decay")

# torchscale's RetNetConfig defaults (torchscale 0.3.0), used for fields a checkpoint or JSON leaves out.
TORCHSCALE_DEFAULTS = dict(
    decoder_embed_dim=768,
    decoder_value_embed_dim=1280,
    decoder_ffn_embed_dim=1280,
    decoder_layers=12,
    decoder_retention_heads=3,
    activation_fn="gelu",
    dropout=0.0,
    activation_dropout=0.0,
    no_scale_embedding=True,
    layernorm_embedding=False,
    layernorm_eps=1e-6,
    deepnorm=False,
    decoder_normalize_before=True,
    share_decoder_input_output_embed=False,
    recurrent_chunk_size=512,
)
# syncdoth/RetNet's config defaults differ in places (vocab 50257, tie_word_embeddings, pad/eos 0).
SYNCDOTH_DEFAULTS = dict(TORCHSCALE_DEFAULTS, vocab_size=50257, pad_token_id=0, eos_token_id=0)


class ConversionError(ValueError):
    """The source cannot be converted: the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`, memory-mapped when the file allows it; refuses pickles needing code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise ConversionError(
            f"{path}: refused: this file needs arbitrary code to unpickle ({detail.strip()}). Only safetensors and "
            "files readable with torch.load(weights_only=True) are read. If you trust the file, re-save the weights "
            "(and the config) in a trusted environment, e.g. "
            "`ckpt = torch.load(path, weights_only=False); torch.save({'model': ckpt['model'], "
            "'cfg': {'model': vars(ckpt['args'])}}, 'clean.pt')`, or save them as safetensors."
        ) from error
    except (OSError, RuntimeError, EOFError) as error:
        raise ConversionError(f"{path}: cannot read it as a PyTorch checkpoint: {error}") from error


class _Shard:
    """One source weight file: its header (name -> shape, dtype) without reading tensors, then its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.is_safetensors = self.path.suffix == ".safetensors"
        self._header: Optional[Dict[str, Tuple[Tuple[int, ...], str]]] = None

    @contextmanager
    def open(self) -> Iterator[Dict[str, Callable[[], torch.Tensor]]]:
        """Yield `{name: loader}`; tensors are read when their loader is called; the file is closed on exit."""
        if self.is_safetensors:
            try:
                handle_cm = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{self.path}: cannot read it as safetensors: {error}") from error
            with handle_cm as handle:
                yield {name: (lambda name=name: handle.get_tensor(name)) for name in handle.keys()}
        else:
            state = _torch_load(self.path)
            state = _state_dict_of(state, self.path)
            try:
                yield {name: (lambda value=value: value) for name, value in state.items()}
            finally:
                del state

    def header(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """`{name: (shape, dtype name)}` (safetensors: from the header alone), read once."""
        if self._header is None:
            self._header = self._read_header()
        return self._header

    def _read_header(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        if self.is_safetensors:
            try:
                with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                    result = {}
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        result[name] = (tuple(piece.get_shape()), piece.get_dtype())
                    return result
            except Exception as error:  # noqa: BLE001
                raise ConversionError(f"{self.path}: cannot read it as safetensors: {error}") from error
        with self.open() as loaders:
            return {name: (tuple(load().shape), str(load().dtype)) for name, load in loaders.items()}


def _state_dict_of(obj, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model').")
    bad = [name for name, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: the state dict holds non-tensor entries: {', '.join(map(str, bad[:10]))}.")
    return obj


def _namespace_fields(value) -> Dict:
    if value is None:
        return {}
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "items"):  # omegaconf-like
        return dict(value.items())
    return dict(vars(value))


def _weight_files(folder: Path) -> List[Path]:
    """The weight files of a transformers-style folder, as transformers picks them (`model_folder.weight_files`,
    pytorch_model.bin and its index too; shards in the order their index names them); else its .safetensors files."""
    try:
        names = weight_files(folder, pickled=True)
    except WeightIndexError as error:
        raise ConversionError(f"{folder / error.index}: not a valid index (no weight_map): {error}") from error
    if names[:1] in ([WEIGHTS_INDEX], [PICKLED_INDEX]):
        missing = [name for name in names[1:] if not (folder / name).is_file()]
        if missing:
            raise ConversionError(f"{folder / names[0]}: lists shards that are not in the folder: {', '.join(missing)}")
        return [folder / name for name in names[1:]]
    if names:
        return [folder / names[0]]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ConversionError(
        f"{folder}: no weights found (model.safetensors, its sharded index, pytorch_model.bin or its index)."
    )


_JSON_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_json(path: Path) -> Dict:
    """A JSON file of config fields: one JSON object, or a ConversionError that says what the file holds instead."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConversionError(f"{path}: not found") from error
    except ValueError as error:  # includes a file that is not UTF-8 text
        raise ConversionError(f"{path}: not valid JSON: {error}") from error
    except OSError as error:  # a folder, no permission, ...
        raise ConversionError(f"{path}: cannot read it: {error.strerror or error}") from error
    if not isinstance(value, dict):
        raise ConversionError(
            f"{path}: holds a JSON {_JSON_KINDS.get(type(value), type(value).__name__)}, not an object of config "
            'fields; write the config as one JSON object of field names and values, e.g. {"vocab_size": 32000}.'
        )
    return value


# ----------------------------------------------------------------------------------------------------------------
# The three formats: config and key mapping
# ----------------------------------------------------------------------------------------------------------------


class _Plan:
    """What a conversion needs: the output config, the source shards, and how source keys map to ours."""

    def __init__(
        self,
        config: RetNetConfig,
        shards: List[_Shard],
        rename: Callable[[str], Optional[str]],
        source_name: Callable[[str], str],
        folder: Optional[Path],
        generation: Dict,
        split=None,
        layers_field: str = "decoder_layers",
        layers_given: bool = True,
    ):
        self.config = config
        self.shards = shards
        self.rename = rename  # source key -> our key (None: not a key of this format)
        self.source_name = source_name  # our key -> the source key it would come from (for error messages)
        self.folder = folder  # a folder with tokenizer / generation config files, if any
        self.generation = generation  # bos/eos/pad ids known from the source
        self.split = split  # source key -> [(our key, rows)] for a fused weight, else None
        self.layers_field = layers_field  # the source format's name of the layer count, for messages
        self.layers_given = layers_given  # False: the layer count is the format's default, the source sets none


def _make_config(fields: Dict, what: str) -> RetNetConfig:
    try:
        return RetNetConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{what}: the config does not describe a valid RetNet: {error}") from error


def _special_ids(fields: Dict) -> Dict:
    return {
        name: fields[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id") if fields.get(name) is not None
    }


def _torchscale_model_fields(fields: Dict, defaults: Dict, what: str) -> Dict:
    """RetNetConfig fields from torchscale-named ones, refusing features the model does not have."""
    refusals = {
        "moe_freq": (lambda v: bool(v), "mixture-of-experts layers"),
        "multiway": (lambda v: bool(v), "multiway layers"),
        "no_output_layer": (lambda v: bool(v), "a decoder without an output layer"),
        "use_lm_decay": (lambda v: bool(v), "use_lm_decay (learned-schedule decays)"),
        "use_glu": (lambda v: v is False, "a plain (non-GLU) feed-forward block"),
        "xpos_rel_pos": (lambda v: bool(v), "xPos relative positions (RetNet v1)"),
    }
    for name, (test, feature) in refusals.items():
        if name in fields and test(fields[name]):
            raise ConversionError(f"{what}: {name}={fields[name]!r}: {feature} is not supported by retnet-hf.")
    result = {name: fields.get(name, default) for name, default in defaults.items()}
    if "tie_word_embeddings" in fields and "share_decoder_input_output_embed" not in fields:
        result["share_decoder_input_output_embed"] = bool(fields["tie_word_embeddings"])
    if fields.get("deepnorm"):
        result["decoder_normalize_before"] = False
    result.update(_special_ids(fields))
    return result


def from_torchscale_key(key: str) -> str:
    """A torchscale `RetNetDecoder` parameter name -> ours: `output_projection` is `lm_head`, the rest under
    `model.` (the one home of this map; `to_torchscale_key` is its inverse)."""
    return "lm_head.weight" if key == "output_projection.weight" else "model." + key


def to_torchscale_key(key: str) -> str:
    """Our parameter name -> torchscale's: `lm_head` is `output_projection`, `model.` dropped."""
    return "output_projection.weight" if key == "lm_head.weight" else key[len("model.") :]


def _plan_torchscale(src: Path, config_fields: Dict) -> _Plan:
    if src.is_dir():
        candidates = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".bin", ".safetensors"))
        if len(candidates) != 1:
            raise ConversionError(
                f"{src}: expected one checkpoint file (.pt, .bin or .safetensors) in the folder, found "
                f"{len(candidates)}; pass the file itself."
            )
        src = candidates[0]
    if src.suffix == ".safetensors":
        training_fields, prefix = {}, ""
    else:
        obj = _torch_load(src)
        training_fields = {}
        if isinstance(obj, dict) and obj.get("args") is not None:
            training_fields = _namespace_fields(obj["args"])
        elif isinstance(obj, dict) and isinstance(obj.get("cfg"), dict) and obj["cfg"].get("model") is not None:
            training_fields = _namespace_fields(obj["cfg"]["model"])
        del obj
        prefix = None  # decided from the keys below
    shard = _Shard(src)
    header = shard.header()
    if prefix is None:
        prefix = "decoder." if any(name.startswith("decoder.") for name in header) else ""
    fields = dict(training_fields)
    fields.update(config_fields)
    if not fields:
        raise ConversionError(
            f"{src}: the checkpoint holds no training args/cfg; give the torchscale config as a JSON file "
            "(--config) or as overrides."
        )
    embed = header.get(prefix + "embed_tokens.weight")
    if fields.get("vocab_size") in (None, -1) and embed is not None:
        fields["vocab_size"] = embed[0][0]
    if fields.get("vocab_size") in (None, -1):
        raise ConversionError(f"{src}: vocab_size is unknown (no embed_tokens.weight); give it in the config.")
    model_fields = _torchscale_model_fields(
        fields, dict(TORCHSCALE_DEFAULTS, vocab_size=fields["vocab_size"]), str(src)
    )
    config = _make_config(model_fields, str(src))

    def rename(key):
        return from_torchscale_key(key[len(prefix) :]) if key.startswith(prefix) else None

    def source_name(key):
        return prefix + to_torchscale_key(key)

    given = "decoder_layers" in fields
    return _Plan(config, [shard], rename, source_name, None, _special_ids(fields), layers_given=given)


def _plan_syncdoth(src: Path, config_fields: Dict) -> _Plan:
    fields = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    fields.update(config_fields)
    if not fields:
        raise ConversionError(f"{src}: no config.json; give the config as a JSON file (--config).")
    config = _make_config(_torchscale_model_fields(fields, SYNCDOTH_DEFAULTS, str(src)), str(src))
    shards = [_Shard(p) for p in _weight_files(src)]
    given = "decoder_layers" in fields
    return _Plan(config, shards, lambda key: key, lambda key: key, src, _special_ids(fields), layers_given=given)


_FLA_LAYER_KEYS = {
    "attn_norm.weight": "retention_layer_norm.weight",
    "attn.q_proj.weight": "retention.q_proj.weight",
    "attn.k_proj.weight": "retention.k_proj.weight",
    "attn.v_proj.weight": "retention.v_proj.weight",
    "attn.g_proj.weight": "retention.g_proj.weight",
    "attn.o_proj.weight": "retention.out_proj.weight",
    "attn.g_norm_swish_gate.weight": "retention.group_norm.weight",
    "attn.g_norm.weight": "retention.group_norm.weight",
    "mlp_norm.weight": "final_layer_norm.weight",
    "mlp.gate_proj.weight": "ffn.fc1.weight",  # the activated projection
    "mlp.up_proj.weight": "ffn.gate.weight",
    "mlp.down_proj.weight": "ffn.fc2.weight",
}
_FLA_TOP_KEYS = {
    "model.embeddings.weight": "model.embed_tokens.weight",
    "model.embed_tokens.weight": "model.embed_tokens.weight",  # fla's name until spring 2024
    "model.norm.weight": "model.layer_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def fla_intermediate_size(hidden_size: int, hidden_ratio: Optional[float]) -> int:
    """fla's GatedMLP width when `intermediate_size` is not given: 2/3 * hidden * ratio, rounded up to 256."""
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def _fla_fields(src: Path, config_fields: Dict) -> Dict:
    """fla's config fields of `src` (with `config_fields` over them), early names read as current ones; refuses the
    variants retnet-hf cannot express, naming the field."""
    fields = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    fields.update(config_fields)
    if not fields:
        raise ConversionError(f"{src}: no config.json; an fla folder needs fla's config.json.")
    if fields.get("model_type", "retnet") != "retnet":
        raise ConversionError(f"{src}: model_type={fields.get('model_type')!r}, expected fla's 'retnet'.")
    # fla's early (2024) configs spell some fields as Llama does: num_attention_heads, rms_norm_eps, ...
    for name, old_name in (
        ("num_heads", "num_attention_heads"),
        ("norm_eps", "rms_norm_eps"),
        ("num_kv_heads", "num_key_value_heads"),
    ):
        if fields.get(name) is None and fields.get(old_name) is not None:
            fields[name] = fields[old_name]
    heads = fields.get("num_heads", 8)
    checks = [
        (fields.get("expand_k", 1.0) != 1, f"expand_k={fields.get('expand_k')} (a key width other than hidden_size)"),
        (fields.get("num_kv_heads") not in (None, heads), f"num_kv_heads={fields.get('num_kv_heads')} (grouped keys)"),
        (bool(fields.get("use_gk")) or bool(fields.get("use_gv")), "use_gk/use_gv (gated keys or values)"),
        (fields.get("feature_map") is not None, f"feature_map={fields.get('feature_map')!r}"),
        (bool(fields.get("use_short_conv", False)), "use_short_conv=True (short convolutions)"),
        (fields.get("use_output_gate", True) is False, "use_output_gate=False"),
        (fields.get("hidden_act", "swish") not in ("swish", "silu"), f"hidden_act={fields.get('hidden_act')!r}"),
        (fields.get("attn") is not None, "attn (hybrid attention layers)"),
        (fields.get("attnres_block_size") is not None, "attnres_block_size (attention residuals)"),
    ]
    for failed, feature in checks:
        if failed:
            raise ConversionError(f"{src}: {feature} is not supported by retnet-hf.")
    return fields


def _fla_model_fields(fields: Dict) -> Dict:
    """Our `RetNetConfig` fields for fla's (`_fla_fields`)."""
    hidden = fields.get("hidden_size", 2048)
    return dict(
        vocab_size=fields.get("vocab_size", 32000),
        decoder_embed_dim=hidden,
        decoder_value_embed_dim=int(hidden * fields.get("expand_v", 2.0)),
        decoder_ffn_embed_dim=fields.get("intermediate_size")
        or fla_intermediate_size(hidden, fields.get("hidden_ratio", 2)),
        decoder_layers=fields.get("num_hidden_layers", 24),
        decoder_retention_heads=fields.get("num_heads", 8),
        activation_fn="swish",
        no_scale_embedding=True,
        layernorm_embedding=False,
        layernorm_eps=fields.get("norm_eps", 1e-6),
        deepnorm=False,
        decoder_normalize_before=True,
        share_decoder_input_output_embed=bool(fields.get("tie_word_embeddings", False)),
        rotary_style="neox",
        retention_normalization=False,
        group_norm_affine=bool(fields.get("elementwise_affine", True)),
        bos_token_id=fields.get("bos_token_id", 1),
        eos_token_id=fields.get("eos_token_id", 2),
        pad_token_id=fields.get("pad_token_id"),
    )


def fla_config_fields(config: RetNetConfig) -> Dict:
    """flash-linear-attention's `RetNetConfig` fields for a model of our `config`'s size (the inverse of
    `_fla_model_fields`, for the benchmarks' fla RetNet): the same width, value width, MLP width, depth, heads,
    vocabulary, norm epsilon, embedding tying and group-norm weight, and fla's own defaults for the rest (its fused
    norm, SwiGLU and cross-entropy kernels), so that its parameter count equals ours."""
    return dict(
        hidden_size=config.decoder_embed_dim,
        expand_k=1.0,
        expand_v=config.decoder_value_embed_dim / config.decoder_embed_dim,
        intermediate_size=config.decoder_ffn_embed_dim,
        num_hidden_layers=config.decoder_layers,
        num_heads=config.decoder_retention_heads,
        hidden_act="swish",
        norm_eps=config.layernorm_eps,
        elementwise_affine=config.group_norm_affine,
        tie_word_embeddings=config.share_decoder_input_output_embed,
        vocab_size=config.vocab_size,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def _plan_fla(src: Path, config_fields: Dict) -> _Plan:
    fields = _fla_fields(src, config_fields)
    model_fields = _fla_model_fields(fields)
    intermediate = model_fields["decoder_ffn_embed_dim"]
    what = str(src)
    config = _make_config(model_fields, what)
    group_norm = "attn.g_norm_swish_gate.weight" if fields.get("fuse_norm", True) else "attn.g_norm.weight"
    inverse_layer = {ours: theirs for theirs, ours in _FLA_LAYER_KEYS.items()}
    inverse_layer["retention.group_norm.weight"] = group_norm
    inverse_top = {ours: theirs for theirs, ours in reversed(list(_FLA_TOP_KEYS.items()))}  # current names

    def rename(key):
        if key in _FLA_TOP_KEYS:
            return _FLA_TOP_KEYS[key]
        match = _LAYER_KEY.match(key)
        if match and match.group(2) in _FLA_LAYER_KEYS:
            return f"model.layers.{match.group(1)}.{_FLA_LAYER_KEYS[match.group(2)]}"
        return None

    def source_name(key):
        if key in inverse_top:
            return inverse_top[key]
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
        if match and match.group(2) in inverse_layer:
            return f"model.layers.{match.group(1)}.{inverse_layer[match.group(2)]}"
        return key

    # Until early 2025 fla's GatedMLP had one fused `gate_proj` [2f, d] (gate rows, then up rows) and no up_proj.
    shards = [_Shard(p) for p in _weight_files(src)]
    fused = not any(name.endswith("mlp.up_proj.weight") for shard in shards for name in shard.header())

    def split(key):
        match = _LAYER_KEY.match(key)
        if not fused or not match or match.group(2) != "mlp.gate_proj.weight":
            return None
        layer = f"model.layers.{match.group(1)}.ffn."
        return [(layer + "fc1.weight", slice(0, intermediate)), (layer + "gate.weight", slice(intermediate, None))]

    if fused:  # name the fused weight in "missing" messages
        inverse_layer["ffn.gate.weight"] = "mlp.gate_proj.weight (fused, rows f..2f)"
    given = "num_hidden_layers" in fields
    return _Plan(
        config, shards, rename, source_name, src, _special_ids(model_fields), split, "num_hidden_layers", given
    )


# ----------------------------------------------------------------------------------------------------------------
# Checking and writing
# ----------------------------------------------------------------------------------------------------------------


_OUR_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _check_layer_count(plan: _Plan) -> None:
    """The checkpoint's keys decide how many layers there are: a config that claims another count is refused here,
    before a model of the claimed size is built (on the meta device that still takes a few ms a layer)."""
    indices = set()
    for shard in plan.shards:
        for key in shard.header():
            for ours, _rows in _targets(plan, key):
                match = _OUR_LAYER_KEY.match(ours or "")
                if match:
                    indices.add(int(match.group(1)))
    claimed = plan.config.decoder_layers
    if len(indices) == claimed:
        return
    says = f"{plan.layers_field}={claimed}" + ("" if plan.layers_given else " (the default: the config sets none)")
    if not indices:
        raise ConversionError(
            f"the config says {says}, but the source's weights hold no layer weights at all; check that the source "
            "is a checkpoint of this format."
        )
    held = f"{len(indices)} layer{'s' if len(indices) != 1 else ''} (numbered {min(indices)} to {max(indices)})"
    raise ConversionError(
        f"the config says {says}, but the source's weights hold {held}; set {plan.layers_field} to {len(indices)} "
        "in the config (--config), or check that the config belongs to this checkpoint."
    )


def _expected_shapes(config: RetNetConfig) -> Dict[str, Tuple[int, ...]]:
    try:
        with torch.device("meta"):
            model = RetNetForCausalLM(config)
    except (RuntimeError, ValueError, OverflowError) as error:  # sizes whose product overflows, ...
        raise ConversionError(
            f"the config describes a model that cannot be built ({str(error).splitlines()[0]}); check its sizes "
            f"(vocab_size={config.vocab_size}, decoder_embed_dim={config.decoder_embed_dim}, "
            f"decoder_value_embed_dim={config.decoder_value_embed_dim}, "
            f"decoder_ffn_embed_dim={config.decoder_ffn_embed_dim})."
        ) from error
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.share_decoder_input_output_embed:
        shapes.pop("lm_head.weight", None)
    return shapes


def _targets(plan: _Plan, key: str) -> List[Tuple[Optional[str], Optional[slice]]]:
    """The keys of ours a source key fills: `[(our key or None, rows or None)]`; several for a fused weight."""
    if plan.split is not None:
        parts = plan.split(key)
        if parts is not None:
            return parts
    return [(plan.rename(key), None)]


def _check_keys(plan: _Plan, expected: Dict[str, Tuple[int, ...]]) -> Dict[str, List[Tuple[str, Optional[slice]]]]:
    """Map every source key to ours (or to nothing), raising a ConversionError that lists every mismatch."""
    mapping: Dict[str, List[Tuple[str, Optional[slice]]]] = {}  # source key -> [(our key, rows)]
    seen: Dict[str, Tuple[int, ...]] = {}
    unexpected, misshaped = [], []
    tied = plan.config.share_decoder_input_output_embed
    for shard in plan.shards:
        for key, (shape, _dtype) in shard.header().items():
            for ours, rows in _targets(plan, key):
                if ours == "lm_head.weight" and tied:
                    continue  # the tied output layer is the embedding
                if ours in BUFFERS:
                    mapping.setdefault(key, []).append((ours, None))
                    continue
                if ours is None or ours not in expected:
                    unexpected.append(key)
                    continue
                if ours in seen:
                    unexpected.append(f"{key} (a second source for {ours})")
                    continue
                part = shape if rows is None else (len(range(shape[0])[rows]),) + tuple(shape[1:])
                seen[ours] = part
                if rows is not None and shape[0] != 2 * expected[ours][0]:
                    misshaped.append(
                        f"{key}: {list(shape)} in the source, [2 x {expected[ours][0]}, "
                        f"{', '.join(map(str, expected[ours][1:]))}] expected (fused)"
                    )
                    break
                if part != expected[ours]:
                    misshaped.append(f"{key}: {list(shape)} in the source, {list(expected[ours])} expected")
                mapping.setdefault(key, []).append((ours, rows))
    missing = [f"{plan.source_name(ours)}" for ours in expected if ours not in seen and ours not in BUFFERS]
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{title} ({len(items)}): " + "; ".join(items))
        raise ConversionError(
            "the source's weights do not match the model its config describes ("
            f"{plan.config.decoder_layers} layers, d={plan.config.decoder_embed_dim}, "
            f"dv={plan.config.decoder_value_embed_dim}, f={plan.config.decoder_ffn_embed_dim}, "
            f"H={plan.config.decoder_retention_heads}, vocab={plan.config.vocab_size}):\n  " + "\n  ".join(parts)
        )
    return mapping


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1GiB", "10KB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not match:
        raise ConversionError(f"max_shard_size={size!r}: give bytes or a size such as 2GB, 500MB, 1GiB.")
    number, unit, suffix = float(match.group(1)), match.group(2), match.group(3) or "B"
    base = 1024 if suffix == "IB" else 1000
    return int(number * base ** " KMGT".index(unit or " "))


class _ShardWriter:
    """Accumulates tensors and writes a safetensors shard each time `max_bytes` would be exceeded."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> List[str]:
        self.flush()
        count = len(self.files)
        if count == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (temporary, keys) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temporary, self.folder / final)
            weight_map.update({key: final for key in keys})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _check_buffer(name: str, value: torch.Tensor, computed: torch.Tensor) -> None:
    if value.shape != computed.shape:
        raise ConversionError(f"{name}: shape {list(value.shape)} in the source, {list(computed.shape)} expected.")
    reference = computed.to(value.dtype).to(torch.float64)
    if not torch.allclose(value.to(torch.float64), reference, rtol=1e-3, atol=1e-6):
        raise ConversionError(
            f"{name}: the source's values differ from those its config implies (a different rotation or decay "
            "scheme, e.g. RetNet v1 / xPos); this checkpoint is not supported."
        )


def _check_weight(name: str, value: torch.Tensor) -> None:
    """A weight is a floating-point tensor of finite values: an integer one (quantized, or not a weight) or one
    holding NaN or infinity would load and compute garbage."""
    if not value.is_floating_point():
        raise ConversionError(
            f"{name}: a {str(value.dtype).replace('torch.', '')} tensor where a floating-point weight belongs (a "
            "quantized checkpoint?); convert the unquantized weights."
        )
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ConversionError(
            f"{name}: {bad:,} of its {value.numel():,} values are NaN or infinite; the source checkpoint is damaged "
            "(convert an earlier, finite one)."
        )


def _dominant_dtype(counts: Counter) -> Optional[torch.dtype]:
    return counts.most_common(1)[0][0] if counts else None


def _check_new_output(out: Path) -> None:
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as error:
        raise ConversionError(f"{out}: cannot look inside it ({error.strerror or error}); choose a new output folder.")
    if taken:
        raise ConversionError(f"{out}: already exists and is not an empty folder; choose a new output folder.")


def convert_checkpoint(
    source_format: str,
    src: Union[str, Path],
    out: Union[str, Path],
    *,
    config_json: Optional[Union[str, Path]] = None,
    config_overrides: Optional[Dict] = None,
    max_shard_size: Union[int, str] = "2GB",
    notify: Optional[Callable[[str], None]] = None,
) -> Path:
    """Convert a RetNet checkpoint into a retnet-hf folder OUT (see the module docstring); return OUT.

    Args:
        source_format: ``"torchscale"``, ``"syncdoth"`` or ``"fla"``.
        src: a local file/folder, or a Hub id (downloaded with ``huggingface_hub.snapshot_download``).
        out: the folder to create; it must not exist (or be empty).
        config_json: a JSON file of source-format config fields (torchscale's names for torchscale and syncdoth,
            fla's for fla), applied over what the source holds.
        config_overrides: a dict of source-format config fields applied last.
        max_shard_size: the largest output shard, bytes or a string such as ``"2GB"``.
        notify: called with a line for each staging folder of OUT found beside it (removed when its process is
            gone, else left alone); default `warnings.warn`.

    Memory: one source shard at a time (safetensors read tensor by tensor, ``.pt`` memory-mapped) plus at most one
    output shard of ``max_shard_size`` in memory.

    Raises:
        ConversionError: a source that cannot be read, is not weights-only, or whose keys, layer count or shapes do
            not match (the message lists the missing, unexpected and mis-shaped keys); a config file that is not a
            JSON object; an output location that cannot be written. OUT is then not created.
    """
    if source_format not in SOURCE_FORMATS:
        raise ConversionError(f"source format {source_format!r}; allowed: {', '.join(SOURCE_FORMATS)}.")
    out = Path(os.path.abspath(Path(out).expanduser()))  # a name to stage beside, even for "." or "a/.."
    _check_new_output(out)
    max_bytes = parse_size(max_shard_size)
    if max_bytes < 1:
        raise ConversionError(f"max_shard_size={max_shard_size!r} must be positive.")
    config_fields = dict(_read_json(Path(config_json))) if config_json is not None else {}
    config_fields.update(config_overrides or {})
    notify = notify or (lambda message: warnings.warn(f"retnet-hf convert: {message}"))
    with staged_folder(out, "converting", "conversion", notify, ConversionError) as temporary:
        source = Path(resolve_source(src, files=True, download=True, error_class=ConversionError))
        planners = {"torchscale": _plan_torchscale, "syncdoth": _plan_syncdoth, "fla": _plan_fla}
        if source_format in ("syncdoth", "fla") and not source.is_dir():
            raise ConversionError(f"{source}: a {source_format} source is a folder (config.json and weights).")
        plan = planners[source_format](source, config_fields)
        _check_layer_count(plan)
        mapping = _check_keys(plan, _expected_shapes(plan.config))
        _write_weights(plan, mapping, temporary, max_bytes)

        config = plan.config
        config.architectures = [RetNetForCausalLM.__name__]
        _write_config_and_code(config, temporary)
        _write_generation_config(plan, temporary)
        _copy_tokenizer(plan.folder, temporary)
        _write_card(temporary, source_format, src, plan, out.name)
    return out


def _write_weights(plan: _Plan, mapping, folder: Path, max_bytes: int) -> None:
    """The source's tensors under our names, shard by shard; the config's dtype becomes the weights' main one."""
    rel_pos = RetNetRelPos(plan.config)
    computed = {"model.retnet_rel_pos.angle": rel_pos.angle, "model.retnet_rel_pos.decay": rel_pos.decay}
    writer = _ShardWriter(folder, max_bytes)
    dtypes: Counter = Counter()
    for shard in plan.shards:
        with shard.open() as loaders:
            for key, load in loaders.items():
                targets = mapping.get(key)
                if not targets:
                    continue
                tensor = load()
                for ours, rows in targets:
                    if ours in BUFFERS:
                        _check_buffer(key, tensor, computed[ours])
                        continue
                    _check_weight(key, tensor)
                    dtypes[tensor.dtype] += tensor.numel()
                    writer.add(ours, tensor if rows is None else tensor[rows].clone())
                del tensor
    for name, value in computed.items():  # recomputed from the config, float32 as the model keeps them
        writer.add(name, value.detach().clone())
    writer.finish()
    dtype = _dominant_dtype(dtypes)
    if dtype is not None:
        plan.config.dtype = dtype


def _write_config_and_code(config: RetNetConfig, folder: Path) -> None:
    """config.json with auto_map, and the model's code beside it, as `RetNetForCausalLM.save_pretrained` does."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)


def _write_generation_config(plan: _Plan, folder: Path) -> None:
    from transformers import GenerationConfig

    generation = None
    if plan.folder is not None and (plan.folder / "generation_config.json").is_file():
        try:
            generation = GenerationConfig.from_pretrained(plan.folder)
        except Exception:  # noqa: BLE001 - fall back to the ids from the config
            generation = None
    if generation is None:
        generation = GenerationConfig(**plan.generation)
    generation.save_pretrained(folder)


def _copy_tokenizer(source: Optional[Path], folder: Path) -> None:
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def _source_license(folder: Optional[Path]) -> Optional[str]:
    """The `license:` of the source's model card front matter, if it has one."""
    readme = folder / "README.md" if folder is not None else None
    if readme is None or not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    front = re.match(r"^---\s*\n(.*?)\n---", text, re.DOTALL)
    found = re.search(r"^license:\s*([^\s#]+)", front.group(1), re.MULTILINE) if front else None
    return found.group(1).strip("'\"") if found else None


def _write_card(folder: Path, source_format: str, src, plan: _Plan, model_name: str) -> None:
    """The model card (README.md), when retnet_hf.model_card is available; a failure there only warns."""
    try:
        from .model_card import write_model_card
    except ImportError:
        return
    local = is_local(src)
    where = f"`{src}`" if local else f"[`{src}`](https://huggingface.co/{src})"
    names = {
        "torchscale": "a torchscale/fairseq",
        "syncdoth": "a syncdoth/RetNet-format",
        "fla": "a flash-linear-attention",
    }
    license_name = _source_license(plan.folder)
    source = (
        f"Converted with `retnet-hf convert --from {source_format}` from {names[source_format]} RetNet checkpoint, "
        f"{where}; the weights are unchanged, only renamed. "
        + ("" if license_name else "The source's license applies; check it before use. ")
    )
    try:
        write_model_card(folder, model_name=model_name, source=source, license=license_name or "other")
    except Exception as error:  # noqa: BLE001 - a card is not worth losing a finished conversion
        warnings.warn(f"retnet-hf convert: the model card was not written: {error}")


# ----------------------------------------------------------------------------------------- `retnet-hf convert`


@dataclass
class ConvertSettings:
    """One conversion; `retnet-hf convert`'s options are made from these fields (`convert_checkpoint` checks them)."""

    source_format: str = field(
        default="",
        metadata=dict(flag="--from", metavar=None, required=True, choices=SOURCE_FORMATS, help="the source's format"),
    )
    src: str = field(default="", metadata=dict(positional=True, help="a checkpoint file or folder, or a Hub id"))
    out: str = field(default="", metadata=dict(positional=True, help="the folder to write (must not exist)"))
    config: Optional[str] = field(
        default=None,
        metadata=dict(
            help="a JSON file of source config fields (needed for a bare torchscale state dict; overrides what the "
            "source holds)"
        ),
    )
    max_shard_size: str = field(default="2GB", metadata=dict(help="largest output weight file (default 2GB)"))


def convert_command(settings: ConvertSettings) -> None:
    """`retnet-hf convert`: a torchscale/fairseq, syncdoth-format or fla RetNet checkpoint into a retnet-hf folder."""
    s = settings

    def notify(message: str) -> None:  # a staging folder of OUT removed or left alone
        print(f"retnet-hf convert: {message}", file=sys.stderr)

    try:
        out = convert_checkpoint(
            s.source_format, s.src, s.out, config_json=s.config, max_shard_size=s.max_shard_size, notify=notify
        )
    except ConversionError as error:
        raise UsageError(str(error)) from error
    print(
        f"converted {s.source_format} checkpoint {s.src} -> {out} "
        "(load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
    )


__all__ = [
    "ConversionError",
    "ConvertSettings",
    "SOURCE_FORMATS",
    "convert_checkpoint",
    "convert_command",
    "fla_intermediate_size",
    "parse_size",
]
