"""RetNet on ONNX Runtime: `export_onnx(folder, out)` writes a model folder as two ONNX graphs (float32, or with
weights quantized by ONNX Runtime's own quantizers), and `OnnxRetNet` (or the one-call `generate`) decodes with them,
greedy or sampled, on left-padded batches: the runner computes with onnxruntime and numpy, and samples with
transformers' logits warpers. `OnnxRetNetForCausalLM` puts the graphs behind transformers' causal-LM interface
(`generate()`, a `RetNetCache`, lm-eval), and `exported_for_inference` makes the quantized export that the commands'
`--quantize` runs, once per model.

The two graphs are traced by `torch.onnx.export(..., dynamo=True)` from small wrappers around the model's own
`forward` (nothing of the math is written again here); every input and output is a plain tensor:

    prefill.onnx   input_ids [batch, length] int64, attention_mask [batch, length] int64, num_tokens [] int64,
                   logit_positions [kept] int64, state.{i} [batch, H, D, Dv] float32, scale.{i} [batch, H] float32
               ->  logits [batch, kept, V] float32 (of the tokens at logit_positions), next_state.{i}, next_scale.{i}
    step.onnx      input_ids [batch, 1] int64, num_tokens [] int64, state.{i}, scale.{i}
               ->  logits [batch, V], next_state.{i}, next_scale.{i}                          (i < layers)

`batch`, `length` and `kept` are dynamic: a prompt asks for its last token's logits only (the output head is a
quarter of a small model's work per token), scoring a text (`eval`) for every token's. `num_tokens` is the number of tokens the state has seen (padding included), as
`RetNetCache.num_tokens`: the first new token's position. A state is the layer's `(S, scale)` pair of
`RetNetCache.states`; the empty state is zeros with `num_tokens` 0.

`prefill.onnx` runs the parallel form on one chunk with the state before it and returns the state after it; the
runner feeds a prompt to it `recurrent_chunk_size` tokens at a time, which is exactly the model's chunkwise form
(`chunkwise_retention` is the parallel form per chunk with the state carried). The loop over chunks stays in the
runner because its trip count depends on the prompt's length: torch.export unrolls a Python loop, so the chunkwise
form traced whole would fix the length to the example's. `step.onnx` is the recurrent form on one token. A
left-padded batch is handled as by `generate()`: the mask zeroes the padding's weight in the state and the rotation
and decay are relative, so the padded rows share one count; decoding steps need no mask.

The export folder holds the two graphs, `retnet_onnx.json` (names, shapes, special tokens, versions), the source's
`config.json` and `generation_config.json`, and its tokenizer. Each graph carries its own float32 copy of the
weights. The graphs are checked against PyTorch on ONNX Runtime before the folder is published; the folder is
written under a staging name next to OUT (`.OUT.exporting-PID-HOST-RANDOM`, `model_folder.staged_folder`) and
renamed at the end, so a failed export leaves no OUT, and a killed one's staging folder is removed by the next export
into OUT. Needs the `onnx` extra (onnx, onnxscript, onnxruntime).
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import UsageError, require
from .model import CACHE_NAME, RetNetCache, RetNetGenerationMixin, RetNetPreTrainedModel
from .model.modeling_retnet import _one_cache, _refuse_attentions, _split_kwargs
from .model_folder import WeightIndexError, require_model_folder, resolve_source, staged_folder, weight_files


MANIFEST = "retnet_onnx.json"
FORMAT = "retnet-hf-onnx"
FORMAT_VERSION = 2  # 2: prefill.onnx takes logit_positions
GRAPHS = {"prefill": "prefill.onnx", "step": "step.onnx"}
CHECK_TOLERANCE = 1e-4  # max |ONNX - PyTorch| / max |PyTorch| of the logits in the check before publishing
# Quantized graphs (ONNX Runtime's own quantizers on the exported float32 graphs), and how far their logits may be
# from PyTorch's float32 ones in the same check: what quantization costs, measured on random 125m weights (int8
# 2.3e-2, int4 9.5e-2), with room; a broken graph is far beyond it
QUANTIZATIONS = {
    "int8": "weights int8 per channel, activations quantized at run time (onnxruntime.quantization.quantize_dynamic)",
    "int4": "matrix weights int4 in blocks of 32, symmetric, activations int8 in the products (onnxruntime "
    "MatMulNBitsQuantizer, accuracy_level 4); embeddings float32",
}
QUANTIZED_TOLERANCE = {"int8": 0.1, "int4": 0.3}
# int4 products with int8 activations (MatMulNBits accuracy_level 4): 1.4x the float32-compute kernel's decode on
# 125m (2 cores), the logits as close
INT4_ACCURACY_LEVEL = 4
COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")  # a folder with either has a tokenizer to export

States = List[np.ndarray]  # [state.0, scale.0, state.1, scale.1, ...], the graphs' input order


def state_names(num_layers: int, prefix: str = "") -> List[str]:
    """`[f"{prefix}state.0", f"{prefix}scale.0", ...]`: the graphs' state inputs (prefix "") or outputs ("next_")."""
    return [f"{prefix}{kind}.{i}" for i in range(num_layers) for kind in ("state", "scale")]


# ---------------------------------------------------------------------------------------------------- export


def _wrappers(model):
    """The two nn.Modules that torch.onnx.export traces: the model's forward on plain tensors in and out."""
    from torch import nn

    from .model import RetNetCache

    layers = model.config.decoder_layers

    def run(module, input_ids, attention_mask, num_tokens, states, form, logit_positions=None):
        # clones: the recurrent form updates a state in place when autograd is off, and graph inputs stay inputs;
        # the count stays a tensor: the positions are computed from it in the graph
        pairs = [(states[2 * i].clone(), states[2 * i + 1].clone()) for i in range(layers)]
        cache = RetNetCache.from_states(pairs, num_tokens)
        out = module.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if logit_positions is None else logit_positions,
            retention_form=form,
            return_dict=True,
        )
        logits = out.logits[:, -1] if logit_positions is None else out.logits
        return (logits, *[tensor for state in cache.states for tensor in state])

    class Prefill(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, num_tokens, logit_positions, *states):
            return run(self, input_ids, attention_mask, num_tokens, states, "parallel", logit_positions)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, num_tokens, *states):
            return run(self, input_ids, None, num_tokens, states, "recurrent")

    return Prefill().eval(), Step().eval()


def _example_states(config, batch: int):
    import torch

    heads = config.decoder_retention_heads
    key, value = config.decoder_embed_dim // heads, config.decoder_value_embed_dim // heads
    generator = torch.Generator().manual_seed(0)
    states = []
    for _ in range(config.decoder_layers):
        states.append(torch.randn(batch, heads, key, value, generator=generator) * 0.1)
        states.append(torch.rand(batch, heads, generator=generator) * 4 + 1)
    return states


def _export_graph(module, args: tuple, input_names: List[str], output_names: List[str], path: Path) -> None:
    """Trace `module` (`forward(*named, *states)`) on `args` and save it to `path`: every input's first axis is the
    dynamic `batch`, and `input_ids` and `attention_mask` have a dynamic `length` unless it is 1 (the step)."""
    import torch

    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    named = len(input_names) - 2 * module.model.config.decoder_layers
    shapes = []
    for name, tensor in zip(input_names[:named], args):
        if name in ("input_ids", "attention_mask"):
            shapes.append({0: batch, 1: length} if tensor.shape[1] > 1 else {0: batch})
        elif name == "logit_positions":
            shapes.append({0: torch.export.Dim("kept")})
        else:
            shapes.append(None)  # num_tokens, a scalar
    shapes.append(tuple({0: batch} for _ in args[named:]))  # the states, one tuple as the signature's *states
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(shapes),
            custom_translation_table={torch.ops.aten.scalar_tensor.default: _exact_scalar_tensor},
            verbose=False,
        )
    program.save(str(path))


def _exact_scalar_tensor(s: float, dtype: int = -1, layout: str = "", device: str = "", pin_memory: bool = False):
    """`aten.scalar_tensor` as an ONNX constant of its own dtype, the Python number written at that precision.

    torch.onnx's own translation (torch 2.13, onnxscript 0.7.2) makes a float32 constant of the number and casts it:
    the 2 pi by which the model reduces the float64 rotation phases became 6.28318548 (float32's 2 pi), and at
    position 1.2e8 the phases were off by radians (logits 3% apart from PyTorch's)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    dtype = ir.DataType.FLOAT if dtype in (None, -1) else ir.DataType(dtype)
    return op.Constant(value=ir.tensor(s, dtype=dtype))


@contextmanager
def _quiet_exporter():
    """Silence what torch.onnx's exporter says about itself on every export (its torchvision operators skipped,
    axis names merged, a deprecation inside torch.export); anything else it warns of still shows."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _loaded_for_export(folder: Path):
    """The folder's RetNetForCausalLM in float32 and eval mode, and its tokenizer (None when the folder has no
    tokenizer files: the runner then takes token ids)."""
    from .loading import load_causal_lm, load_tokenizer
    from .model import RetNetForCausalLM

    model = load_causal_lm(str(folder))
    if not isinstance(model, RetNetForCausalLM):
        raise UsageError(f"{folder}: loads as {type(model).__name__}, not RetNetForCausalLM; nothing to export")
    if not any((folder / name).exists() for name in TOKENIZER_MARKERS):
        return model.float().eval(), None
    try:
        return model.float().eval(), load_tokenizer(str(folder))
    except UsageError as error:
        raise UsageError(
            f"{folder}: its tokenizer does not load ({error}); repair or remove the tokenizer files, or export a "
            "folder without them (the runner then takes token ids)"
        ) from error


def _export_graphs(model, staging: Path) -> None:
    """`prefill.onnx` and `step.onnx` of `model` into `staging`, traced on small examples."""
    import torch

    config = model.config
    layers = config.decoder_layers
    prefill, step = _wrappers(model)
    batch, length = 2, 3  # examples: neither dimension may be 0 or 1 in a trace, or it would be fixed
    ids = torch.arange(batch * length, dtype=torch.long).reshape(batch, length) % config.vocab_size
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    count = torch.tensor(4, dtype=torch.long)
    states = _example_states(config, batch)
    names_in, names_out = state_names(layers), ["logits", *state_names(layers, "next_")]
    _export_graph(
        prefill,
        (ids, mask, count, torch.tensor([0, length - 1]), *states),
        ["input_ids", "attention_mask", "num_tokens", "logit_positions", *names_in],
        names_out,
        staging / GRAPHS["prefill"],
    )
    _export_graph(
        step, (ids[:, :1], count, *states), ["input_ids", "num_tokens", *names_in], names_out, staging / GRAPHS["step"]
    )


def _manifest(model, has_tokenizer: bool) -> dict:
    """`retnet_onnx.json`'s content for `model`'s graphs (the runner reads the shapes and tokens from it)."""
    import torch

    from . import __version__

    config = model.config
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    pad = getattr(generation, "pad_token_id", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphs": GRAPHS,
        "num_layers": config.decoder_layers,
        "num_heads": config.decoder_retention_heads,
        "key_head_dim": config.decoder_embed_dim // config.decoder_retention_heads,
        "value_head_dim": config.decoder_value_embed_dim // config.decoder_retention_heads,
        "vocab_size": config.vocab_size,
        "chunk_size": config.recurrent_chunk_size,
        "state_dtype": "float32",
        "eos_token_id": config.eos_token_id if eos is None else eos,
        "pad_token_id": config.pad_token_id if pad is None else pad,
        "tokenizer": has_tokenizer,
        "exported_with": {"retnet_hf": __version__, "torch": torch.__version__},
    }


def export_onnx(
    folder: Union[str, Path],
    out: Union[str, Path],
    *,
    check: bool = True,
    quantize: Optional[str] = None,
    notify: Optional[Callable[[str], None]] = None,
) -> Path:
    """Export the RetNet causal LM in `folder` to a new folder `out` (see the module docstring); returns `out`.

    `quantize` ("int8" or "int4", `QUANTIZATIONS`) quantizes the graphs' weights with ONNX Runtime's own quantizers
    (the recurrent state stays float32); the check then allows `QUANTIZED_TOLERANCE`, and the manifest records the
    scheme and the measured difference.

    Raises UsageError when `out` exists or cannot be written, `folder` is not a RetNet model folder, its tokenizer
    files do not load, the model cannot be exported (quantized weights), or the graphs disagree with PyTorch on ONNX
    Runtime (`check`); `out` is then not created. A killed export's staging folder is removed by the next export
    into `out` (`notify` hears of it; default: a warning).
    """
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"quantize={quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose a new output folder (an export never overwrites one)")
    _check_retnet_folder(folder)  # a RetNet folder, said before the exporters are looked for
    require("onnx", "onnx")
    require("onnxscript", "onnx")  # torch.onnx's dynamo exporter translates with it
    if check:
        require("onnxruntime", "onnx")

    model, tokenizer = _loaded_for_export(folder)
    notify = notify or (lambda message: warnings.warn(f"retnet-hf export-onnx: {message}"))
    with staged_folder(out, "exporting", "export", notify) as staging:
        _export_graphs(model, staging)
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staging / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        manifest = _manifest(model, tokenizer is not None)
        if quantize is not None:
            for graph in GRAPHS.values():
                _quantize_graph(staging / graph, quantize)
            manifest["quantization"] = {"scheme": quantize, "method": QUANTIZATIONS[quantize]}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check:
            differences = _check_against_pytorch(model, staging, QUANTIZED_TOLERANCE.get(quantize, CHECK_TOLERANCE))
            if quantize is not None:  # what quantization costs, measured, beside the scheme
                manifest["quantization"]["checked_logit_difference"] = differences
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def exported_for_inference(folder: Union[str, Path], quantize: str, notify: Callable[[str], None]) -> Path:
    """The `export_onnx(folder, ..., quantize=quantize)` folder that the commands' `--quantize` runs: made once per
    model content (config, generation config and weight files by SHA-256), scheme and retnet-hf version, in
    `HF_HOME/retnet-hf/onnx/`, and reused after (`notify` hears when it is made). Never written into `folder`."""
    from huggingface_hub import constants

    from . import __version__
    from .data import file_sha256

    folder = Path(folder)
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"quantize={quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{__version__}/{quantize}".encode())
    try:
        weights = weight_files(folder, pickled=True)  # the files the model loads, as transformers picks them
    except WeightIndexError as error:
        raise UsageError(f"{folder}: {error.index} is not a valid index ({error})") from error
    for name in sorted({*COPIED_FILES, *weights}):
        if (folder / name).is_file():
            digest.update(f"{name}:{file_sha256(folder / name)}".encode())
    out = (
        Path(constants.HF_HOME) / "retnet-hf" / "onnx" / f"{folder.resolve().name}-{quantize}-{digest.hexdigest()[:16]}"
    )
    if (out / MANIFEST).is_file():
        return out
    notify(f"exporting {folder} to ONNX with {quantize} weights, once (reused after): {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(folder, out, quantize=quantize, notify=notify)
    except UsageError:
        if not (out / MANIFEST).is_file():  # else another process made it meanwhile
            raise
    return out


def _quantize_graph(path: Path, scheme: str) -> None:
    """Quantize the float32 graph at `path` in place with ONNX Runtime's own quantizers (`QUANTIZATIONS`)."""
    quantization = require("onnxruntime.quantization", "onnx")
    quantized = path.with_name(f"quantized-{path.name}")
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs a line per node at INFO
    advice = _WithoutPreProcessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        if scheme == "int8":
            quantization.quantize_dynamic(
                str(path), str(quantized), weight_type=quantization.QuantType.QInt8, per_channel=True
            )
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(path)), block_size=32, is_symmetric=True, bits=4, accuracy_level=INT4_ACCURACY_LEVEL
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
    finally:
        logger.setLevel(level)
        logging.getLogger().removeFilter(advice)
    os.replace(quantized, path)


class _WithoutPreProcessingAdvice(logging.Filter):
    """Drops quantize_dynamic's advice (on the root logger) to pre-process the graph first: measured on the 125m
    step graph (2 cores), `quant_pre_process` did not make int8 decoding faster (99-108 tokens/s against 101-114)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing before quantization" not in record.getMessage()


def _check_retnet_folder(folder: Path) -> None:
    """A UsageError that says why `folder` cannot be exported, unless its config.json is a valid RetNetConfig."""
    from .model import RetNetConfig

    # resolve_source first: a local path that is not there is "no such model folder"
    path = require_model_folder(resolve_source(folder)) / "config.json"
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{folder}: cannot read config.json: {error}") from error
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type != RetNetConfig.model_type:
        raise UsageError(
            f"{folder} is not a RetNet folder (model_type {model_type!r}, expected {RetNetConfig.model_type!r}); "
            "export-onnx exports RetNet causal LMs, whose state it passes between the graphs"
        )
    if fields.get("quantization_config"):
        method = fields["quantization_config"].get("quant_method", "?")
        raise UsageError(
            f"{folder} holds quantized weights ({method}), which the ONNX graphs cannot represent; export the "
            "unquantized model (for a QLoRA fine-tune: the merged model)"
        )
    try:
        RetNetConfig.from_pretrained(str(folder))
    except Exception as error:
        raise UsageError(f"{folder}: invalid config.json: {error}") from error


def _check_against_pytorch(model, folder: Path, tolerance: float = CHECK_TOLERANCE) -> dict:
    """Run both graphs of `folder` on ONNX Runtime on a left-padded batch and a step after it; a UsageError when
    the logits differ from PyTorch's by more than `tolerance` of their scale. Returns each graph's difference."""
    import torch

    from .model import CACHE_NAME

    runner = OnnxRetNet(folder)
    length = min(2 * runner.chunk_size + 1, 24)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        expected = [out.logits[:, -1]]
        token = out.logits[:, -1:].argmax(-1)
        expected.append(model(token, cache=getattr(out, CACHE_NAME)).logits[:, -1])
    logits, states, count = runner.prefill(ids.numpy(), mask.numpy())
    got = [logits, runner.step(token.numpy(), states, count)[0]]
    differences = {}
    for name, a, b in zip(("prefill", "step"), got, expected):
        difference = float(np.abs(a - b.numpy()).max() / max(float(b.abs().max()), 1e-30))
        if not difference <= tolerance:
            raise UsageError(
                f"the exported {name} graph disagrees with PyTorch on ONNX Runtime (relative logit difference "
                f"{difference:.2e} > {tolerance:g}); nothing was written"
            )
        differences[name] = difference
    return differences


# ---------------------------------------------------------------------------------------------------- runner


class OnnxRetNet:
    """An exported folder on ONNX Runtime: `prefill`, `step`, `generate` (token ids) and `generate_text`.

    `threads`: ONNX Runtime's intra-op threads (default: its own choice, the physical cores); `providers`: its
    execution providers (default CPU).
    """

    def __init__(self, folder: Union[str, Path], *, threads: Optional[int] = None, providers=None):
        ort = require("onnxruntime", "onnx")
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise UsageError(f"{folder}: not an exported RetNet folder (no {MANIFEST}); make one with export-onnx")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"{folder}: {MANIFEST} is format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('format_version')!r}; this retnet-hf reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / file), options, providers=providers)
            for name, file in self.manifest["graphs"].items()
        }
        self.num_layers = self.manifest["num_layers"]
        self.vocab_size = self.manifest["vocab_size"]
        self.chunk_size = self.manifest["chunk_size"]
        self.eos_token_id = self.manifest.get("eos_token_id")
        self.pad_token_id = self.manifest.get("pad_token_id")
        self._state_inputs = state_names(self.num_layers)
        self._outputs = ["logits", *state_names(self.num_layers, "next_")]
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The folder's tokenizer (transformers' AutoTokenizer), loaded on first use."""
        if self._tokenizer is None:
            if not self.manifest.get("tokenizer"):
                raise UsageError(f"{self.folder} has no tokenizer (its source had none); pass token ids")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        return self._tokenizer

    def empty_states(self, batch: int) -> States:
        """The state before any token: zeros, for `batch` rows."""
        m = self.manifest
        heads = m["num_heads"]
        states = []
        for _ in range(self.num_layers):
            states.append(np.zeros((batch, heads, m["key_head_dim"], m["value_head_dim"]), dtype=np.float32))
            states.append(np.zeros((batch, heads), dtype=np.float32))
        return states

    def _run(self, graph: str, feed: dict, states: States) -> Tuple[np.ndarray, States]:
        ids = feed["input_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            # (ONNX's Gather would read a negative id from the end of the embedding table, and fail on a large one)
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {int(bad.flat[0])}")
        feed.update(zip(self._state_inputs, states))
        logits, *states = self.sessions[graph].run(self._outputs, feed)
        return logits, states

    def prefill(
        self,
        input_ids,
        attention_mask=None,
        states: Optional[States] = None,
        num_tokens: int = 0,
        *,
        all_logits: bool = False,
    ) -> Tuple[np.ndarray, States, int]:
        """Feed `input_ids` `[B, T]` (after `states` at `num_tokens`, or from the start) in chunks of
        `chunk_size`; returns the last token's logits `[B, V]` (with `all_logits`, every token's: `[B, T, V]`), the
        new states and the new count."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or mask.shape != ids.shape:
            raise ValueError(f"input_ids must be [batch, length > 0] with a mask of that shape, got {ids.shape}")
        states = self.empty_states(ids.shape[0]) if states is None else states
        pieces = []
        for start in range(0, ids.shape[1], self.chunk_size):
            chunk = ids[:, start : start + self.chunk_size]
            width = chunk.shape[1]
            feed = {
                "input_ids": chunk,
                "attention_mask": mask[:, start : start + width],
                "num_tokens": np.array(num_tokens + start, dtype=np.int64),
                "logit_positions": np.arange(width) if all_logits else np.array([width - 1]),
            }
            logits, states = self._run("prefill", feed, states)
            if all_logits:
                pieces.append(logits)
        logits = np.concatenate(pieces, axis=1) if all_logits else logits[:, -1]
        return logits, states, num_tokens + ids.shape[1]

    def step(self, tokens, states: States, num_tokens: int) -> Tuple[np.ndarray, States]:
        """One token per row (`[B]` or `[B, 1]`) after `states` at `num_tokens`: its logits `[B, V]` and the new
        states (the count is then `num_tokens + 1`)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1)
        return self._run("step", {"input_ids": ids, "num_tokens": np.array(num_tokens, dtype=np.int64)}, states)

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        top_p: Optional[float] = 1.0,
        seed: Optional[int] = None,
        eos_token_id: Union[None, int, Sequence[int]] = None,
        pad_token_id: Optional[int] = None,
    ) -> np.ndarray:
        """Continue each row of `input_ids` (`[B, T]` array or lists of ids of any lengths, which are left-padded
        here); returns `[B, T + n]` ids as `generate()` does: n <= `max_new_tokens` (fewer when every row has
        ended with an end token), the rows that ended filled with the pad id. Greedy unless `do_sample`, then
        `temperature`, `top_k` and `top_p` in that order (transformers' logits warpers), drawn with a torch generator
        seeded with `seed`. The end and
        pad ids default to the folder's (its generation config's, else its config's)."""
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample:
            _check_sampling(temperature, top_k, top_p)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        ids, mask = left_padded(input_ids, attention_mask, pad)
        if max_new_tokens == 0:
            return ids
        sample = _sampler(temperature, top_k, top_p, seed) if do_sample else None
        logits, states, count = self.prefill(ids, mask)
        finished = np.zeros(ids.shape[0], dtype=bool)
        new = []
        for index in range(max_new_tokens):
            token = sample(logits) if do_sample else logits.argmax(-1)
            token = np.where(finished, pad, token)
            new.append(token)
            finished |= np.isin(token, eos)
            if finished.all() or index == max_new_tokens - 1:
                break
            logits, states = self.step(token, states, count)
            count += 1
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1)

    def generate_text(self, prompts: Union[str, Sequence[str]], **kwargs) -> Union[str, List[str]]:
        """`generate` on text: each prompt's continuation (special tokens left out), a str for a str."""
        single = isinstance(prompts, str)
        tokenizer = self.tokenizer
        rows = [tokenizer(prompt).input_ids for prompt in ([prompts] if single else prompts)]
        if any(len(row) == 0 for row in rows):
            if tokenizer.bos_token_id is None:
                raise ValueError("an empty prompt needs a beginning-of-text token, which this tokenizer lacks")
            rows = [row or [tokenizer.bos_token_id] for row in rows]
        width = max(len(row) for row in rows)
        output = self.generate(rows, **kwargs)
        texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output.tolist()]
        return texts[0] if single else texts


# ------------------------------------------------------------------------- the exported folder in transformers


class OnnxRetNetForCausalLM(RetNetPreTrainedModel, RetNetGenerationMixin):
    """An exported folder (`export_onnx`, float32 or quantized) as a transformers causal LM: `generate()` with
    every decoding strategy but assisted ones, streaming, `stop_strings`, a `RetNetCache` to continue from (chat),
    and lm-eval's `HFLM` run on ONNX Runtime through it, as optimum's ORT models do for others. The forward
    takes token ids: a prompt runs the prefill graph chunk by chunk, a token after a state the step graph, and
    the cache holds the graphs' states (copied into its own tensors each call: transformers' recurrent layers keep
    their addresses). Made by `from_folder`; it holds no torch weights. CPU only. Run it with
    `torch.set_num_threads(1)`: torch's threads would busy-wait between generate()'s small operations and take the
    cores from ONNX Runtime's (the commands do so; on 2 cores decoding ran 2-2.5x faster)."""

    def __init__(self, config, runner: "OnnxRetNet"):
        super().__init__(config)
        self.runner = runner
        self.eval()

    @classmethod
    def from_folder(cls, folder: Union[str, Path], *, threads: Optional[int] = None) -> "OnnxRetNetForCausalLM":
        """The causal LM of an exported `folder` (its `config.json` and `generation_config.json`)."""
        from transformers import GenerationConfig

        from .model import RetNetConfig

        runner = OnnxRetNet(folder, threads=threads)
        model = cls(RetNetConfig.from_pretrained(str(folder)), runner)
        if (Path(folder) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        return model

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        from transformers.generation.utils import GenerationMode

        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "assisted generation and prompt lookup roll the state back, which the ONNX graphs do not record; "
                "run them on the PyTorch model (without --quantize)"
            )
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[RetNetCache] = None,
        inputs_embeds=None,
        labels=None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[RetNetCache] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`input_ids` `[B, T]` after the state in `cache` (none: from the start); `attention_mask` `[B, T]` or
        `[B, past + T]` (its last T columns are these tokens'). Returns `logits` `[B, T', V]` float32 as
        `RetNetForCausalLM` (`logits_to_keep`), and the cache, written, with `use_cache`. What the graphs cannot
        take (embeddings, labels, hidden states; `position_ids` and a form are not arguments) is refused, naming it."""
        _split_kwargs(kwargs)
        _refuse_attentions(output_attentions)
        named = {"inputs_embeds": inputs_embeds, "labels": labels, "output_hidden_states": output_hidden_states}
        given = [name for name, value in named.items() if value is not None and value is not False]
        if given or input_ids is None:
            raise ValueError(
                f"the ONNX Runtime model takes input_ids only, not {', '.join(given) or 'inputs_embeds'}; use the "
                "PyTorch model (RetNetForCausalLM, or the commands without --quantize) for that"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _one_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, RetNetCache):
            raise TypeError(f"cache must be a RetNetCache (as returned by this model), got {type(cache)}")
        if cache is not None and cache.states_to_keep():
            raise ValueError("the cache records draft states for a rollback, which the ONNX graphs do not do")
        ids = input_ids.detach().cpu().numpy()
        length = ids.shape[1]
        mask = None if attention_mask is None else attention_mask[:, -length:].detach().cpu().numpy()
        has_state = cache is not None and cache.layers[0].state is not None
        states = [t.numpy() for state in cache.states for t in state] if has_state else None
        count = cache.num_tokens if has_state else 0
        if has_state and length == 1 and (mask is None or mask.all()):
            logits, states = self.runner.step(ids, states, count)
            logits = logits[:, None]
        else:
            last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1
            logits, states, _ = self.runner.prefill(ids, mask, states, count, all_logits=not last_only)
            logits = logits[:, None] if last_only else logits
        logits = torch.from_numpy(logits)
        if not isinstance(logits_to_keep, int):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        if use_cache:
            cache = RetNetCache(self.config.decoder_layers) if cache is None else cache
            for i in range(self.config.decoder_layers):
                cache.update_state(i, (torch.from_numpy(states[2 * i]), torch.from_numpy(states[2 * i + 1])), length)
        output = CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache if use_cache else None})
        return output if return_dict is not False else output.to_tuple()


def left_padded(input_ids, attention_mask=None, pad_token_id: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """`(ids [B, T], mask [B, T])` int64 from an array (with its mask, which must be left padding: zeros, then
    ones, at least one per row) or from lists of ids of any lengths (left-padded here with `pad_token_id`)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], (int, np.integer)):
        rows = [list(row) for row in input_ids]
        if attention_mask is not None:
            raise ValueError("pass attention_mask with an array of ids, not with lists (they are padded here)")
        if any(len(row) == 0 for row in rows):
            raise ValueError("every row of input_ids needs at least one token")
        width = max(len(row) for row in rows)
        ids = np.array([[pad_token_id] * (width - len(row)) + row for row in rows], dtype=np.int64)
        mask = np.array([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=np.int64)
        return ids, mask
    ids = np.asarray(getattr(input_ids, "numpy", lambda: input_ids)(), dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, length > 0], got {ids.shape}")
    if attention_mask is None:
        return ids, np.ones_like(ids)
    mask = np.asarray(getattr(attention_mask, "numpy", lambda: attention_mask)(), dtype=np.int64).reshape(ids.shape)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 1 for tokens and 0 for padding")
    if not (mask[:, -1] == 1).all() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError(
            "attention_mask must be left padding (zeros, then ones, the last column all ones): a row's "
            "continuation starts after its last token (tokenize with padding_side='left')"
        )
    return ids, mask


def _check_sampling(temperature, top_k, top_p) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 (greedy: do_sample=False), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 or None: off), got {top_p!r}")


def _sampler(temperature: float, top_k: Optional[int], top_p: Optional[float], seed: Optional[int]):
    """A function from logits `[B, V]` to one sampled token per row, with transformers' own temperature, top-k and
    top-p warpers (in `generate()`'s order) and a torch generator seeded with `seed`."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    def sample(logits: np.ndarray) -> np.ndarray:
        scores = warpers(None, torch.from_numpy(logits.astype(np.float32)))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0].numpy()

    return sample


def generate(
    folder: Union[str, Path, OnnxRetNet], inputs, max_new_tokens: int = 20, **kwargs
) -> Union[str, List[str], np.ndarray]:
    """Text in, text out; ids in, ids out: `OnnxRetNet(folder).generate_text(inputs, ...)` for a str or a list of
    str, else `.generate(inputs, ...)` (arrays or lists of ids; `attention_mask=` with an array). `folder` may be
    an `OnnxRetNet` already loaded. Keyword arguments as `OnnxRetNet.generate`."""
    runner = folder if isinstance(folder, OnnxRetNet) else OnnxRetNet(folder)
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        return runner.generate_text(inputs, max_new_tokens=max_new_tokens, **kwargs)
    return runner.generate(inputs, max_new_tokens=max_new_tokens, **kwargs)


# ------------------------------------------------------------------------------------- `retnet-hf export-onnx`


@dataclass
class ExportOnnxSettings:
    """One export; `retnet-hf export-onnx`'s options are made from these fields (`export_onnx` checks them)."""

    folder: str = field(default="", metadata=dict(positional=True, help="a RetNet model folder"))
    out: str = field(default="", metadata=dict(positional=True, help="the folder to write (must not exist)"))
    quantize: Optional[str] = field(
        default=None,
        metadata=dict(
            choices=tuple(QUANTIZATIONS),
            metavar=None,
            help="quantize the graphs' weights with ONNX Runtime's own quantizers (int8: per channel, activations at "
            "run time; int4: blocks of 32); the state stays float32, the check allows the measured quantization "
            "error",
        ),
    )


def export_onnx_command(settings: ExportOnnxSettings) -> None:
    """`retnet-hf export-onnx`: export a model folder to ONNX (prefill and step graphs, tokenizer, config) and check
    it on ONNX Runtime."""
    s = settings
    notify = lambda message: print(message, file=sys.stderr)  # noqa: E731
    out = export_onnx(s.folder, s.out, quantize=s.quantize, notify=notify)
    sizes = ", ".join(  # a graph over 2 GB keeps its weights in files beside it (FILE.data)
        f"{file} ({sum(path.stat().st_size for path in out.glob(file + '*')) / 2**20:.1f} MiB)"
        for file in GRAPHS.values()
    )
    print(
        f"exported {s.folder} -> {out}: {sizes}, checked against PyTorch on ONNX Runtime; decode with "
        f"python -c \"from retnet_hf.onnx_runtime import generate; print(generate('{out}', 'Hello', 20))\""
    )


__all__ = [
    "MANIFEST",
    "ExportOnnxSettings",
    "OnnxRetNet",
    "exported_for_inference",
    "OnnxRetNetForCausalLM",
    "export_onnx",
    "export_onnx_command",
    "generate",
    "left_padded",
    "state_names",
]
