"""RetNet (Sun et al. 2023) as a transformers model, weight-compatible with Microsoft's torchscale `RetNetDecoder`.

Parameter names follow torchscale under a `model.` prefix (`lm_head` is torchscale's `output_projection`), so a
torchscale state dict loads by renaming alone. The retention math lives in `retention.py`; this file holds the
modules, from the smallest part to the heads, and the recurrent cache.
"""

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import is_torchdynamo_compiling, logging

from .configuration_retnet import RETENTION_FORMS, RetNetConfig
from .fla_retention import FLA_RETENTION_FUNCTIONS, fla_unavailable
from .retention import RETENTION_FUNCTIONS, RetentionState, states_after_tokens


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------- transformers versions
# This file runs under every transformers from 4.48 (AutoTrain's pin) to the newest release. What differs between
# them is bridged here, and nowhere else.

try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

try:  # transformers >= 4.52: the base class of decoder layers, which gradient checkpointing wraps
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers 4.48 sets `gradient_checkpointing` and `_gradient_checkpointing_func` on any module

    class GradientCheckpointingLayer(nn.Module):
        """A layer that runs under `_gradient_checkpointing_func` while checkpointing is on in training, as the
        class of the same name in later transformers. Tensors that need gradients must be passed positionally."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)


# transformers 5.25's linear-attention cache layers count their tokens and can roll a recurrent state back (past
# recording and `crop(-n)`, which assisted decoding uses). Where they do, RetNet's cache is made of them; before
# (4.48 ... 5.24) a stand-in with the part of their interface that RetNet uses keeps the state, and rolling back is
# refused naming the release that can. `NATIVE_RECURRENT_CACHE` is the one place that decides.
try:
    from transformers.cache_utils import LinearAttentionLayer

    NATIVE_RECURRENT_CACHE = (
        "recurrent_states_to_keep" in inspect.signature(LinearAttentionLayer.activate_past_recording).parameters
    )
except (ImportError, AttributeError):
    NATIVE_RECURRENT_CACHE = False

ROLLBACK_NEEDS = (
    "Rolling a RetNet state back to an earlier token (assisted generation, prompt lookup, `cache.crop`) needs "
    "transformers >= 5.25, whose recurrent cache layers record the states they may return to; this is transformers "
    f"{transformers.__version__}. Upgrade it (pip install -U transformers), or keep a copy of the cache "
    "(copy.deepcopy) from the point you want to return to."
)

if not NATIVE_RECURRENT_CACHE:

    class LinearAttentionLayer:
        """The part of transformers 5.25's `LinearAttentionLayer` that RetNet uses, for the releases before it:
        numbered recurrent states, the token count, row operations; no rollback."""

        is_compileable = False
        is_croppable = False
        record_past = False

        def __init__(self, number_of_states: int = 1):
            self.number_of_states = number_of_states
            self.recurrent_states = dict.fromkeys(range(number_of_states))
            self.is_recurrent_states_initialized = dict.fromkeys(range(number_of_states), False)
            self.has_previous_state = dict.fromkeys(range(number_of_states), False)
            self.cumulative_length_linear = torch.tensor(0, dtype=torch.long)
            self.device = None

        def lazy_initialization(self, recurrent_states: torch.Tensor, state_idx: int = 0) -> None:
            self.is_recurrent_states_initialized[state_idx] = True

        def update_recurrent_state(self, recurrent_states, state_idx: int = 0) -> torch.Tensor:
            if not self.is_recurrent_states_initialized[state_idx]:
                self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
            last = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1]
            self.recurrent_states[state_idx] = last
            return last

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            for i, state in self.recurrent_states.items():
                if state is not None:
                    self.recurrent_states[i] = state.index_select(0, beam_idx.to(state.device))

        def reset(self) -> None:
            self.cumulative_length_linear.zero_()
            for i in range(self.number_of_states):
                self.recurrent_states[i] = None
                self.is_recurrent_states_initialized[i] = self.has_previous_state[i] = False

        def get_seq_length(self) -> torch.Tensor:
            return self.cumulative_length_linear

        def activate_past_recording(self, recurrent_states_to_keep: Optional[int] = None) -> None:
            raise NotImplementedError(ROLLBACK_NEEDS)


# transformers 5.24 renamed the cache from `past_key_values` to `cache`: the forward argument that generate()
# passes, the key of its model kwargs and the field of every output class. `CACHE_NAME` is the running version's
# name; the forwards here take both names, and outputs are read with `getattr(outputs, CACHE_NAME)`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 5.24 also renamed gradient checkpointing to activation checkpointing (`model.<name>_enable`,
# `TrainingArguments(<name>=...)`); `ACTIVATION_CHECKPOINTING` is the running version's name.
ACTIVATION_CHECKPOINTING = (
    "activation_checkpointing"
    if hasattr(PreTrainedModel, "activation_checkpointing_enable")
    else "gradient_checkpointing"
)


def enable_activation_checkpointing(model: nn.Module, **checkpoint_kwargs) -> None:
    """`model.activation_checkpointing_enable(...)` (`gradient_checkpointing_enable` before transformers 5.24);
    `checkpoint_kwargs` go to `torch.utils.checkpoint.checkpoint` (`use_reentrant=False` if not given)."""
    getattr(model, f"{ACTIVATION_CHECKPOINTING}_enable")(
        **{f"{ACTIVATION_CHECKPOINTING}_kwargs": {"use_reentrant": False, **checkpoint_kwargs}}
    )


# ------------------------------------------------------------------------------------------------------------------

ACTIVATION_FUNCTIONS = {"swish": F.silu, "gelu": F.gelu}

# The eight projections of every layer, the default LoRA targets (PEFT has no entry for this model type).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "fc1", "gate", "fc2"]


def deepnorm_init_gain(config: RetNetConfig) -> float:
    """DeepNet's down-scaling (8N)^(-1/4) of v_proj, out_proj, fc1 and fc2 at initialisation; 1 without deepnorm."""
    return math.pow(8.0 * config.decoder_layers, -0.25) if config.deepnorm else 1.0


class RetNetCacheLayer(LinearAttentionLayer):
    """One layer's retention state, as transformers' recurrent cache layer (`LinearAttentionLayer`): recurrent state
    0 is `S` `[B, H, D, Dv]`, state 1 the `scale` `[B, H]` (see `retention.py`), both float32 (float64 for a
    float64 model) whatever the model's dtype; `cumulative_length_linear` counts the tokens seen. Their size does not
    grow with the context. Where transformers can roll a state back (5.25+), a recording layer keeps the states
    after each of its last `recurrent_states_to_keep` tokens, and `crop(-n)` returns to one of them."""

    def __init__(self):
        super().__init__(number_of_states=2)

    @property
    def state(self) -> Optional[RetentionState]:
        """`(S, scale)`, or None before the first token."""
        if not self.has_previous_state[0]:
            return None
        return self.recurrent_states[0], self.recurrent_states[1]

    def update(self, state: Union[RetentionState, List[RetentionState]], num_tokens: int) -> None:
        """Store the state after `num_tokens` more tokens: one `(S, scale)`, or (while recording) the states after
        each of the last tokens, the final one last."""
        states = state if isinstance(state, list) else [state]
        for i, history in enumerate(zip(*states)):
            self.update_recurrent_state(list(history), i)
            self.has_previous_state[i] = True
        self.cumulative_length_linear.add_(num_tokens)

    def lazy_initialization(self, recurrent_states=None, state_idx: int = 0, **kwargs) -> None:
        super().lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx, **kwargs)
        first = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[0]
        if self.device is None:  # the row operations move indices to `device`; the count goes along with the state
            self.device, self.dtype = first.device, first.dtype
            self.cumulative_length_linear = self.cumulative_length_linear.to(first.device)

    def activate_past_recording(self, recurrent_states_to_keep: Optional[int] = None) -> None:
        super().activate_past_recording(recurrent_states_to_keep)
        # one history per state (transformers 5.25 gives all of a layer's states one shared list)
        self.recurrent_states_history = {i: [] for i in range(self.number_of_states)}

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs) -> torch.Tensor:
        state = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        keep = getattr(self, "recurrent_states_to_keep", None)
        if self.record_past and keep:  # what a rollback can reach, and no more: memory bounded by the draft length
            del self.recurrent_states_history[state_idx][:-keep]
        return state

    def crop(self, tokens_to_remove: int) -> None:
        """Return to the state before the last `-tokens_to_remove` tokens (a negative number, as transformers'
        linear-attention layers take it), from the states recorded since `activate_past_recording`; then forget them.
        """
        if not NATIVE_RECURRENT_CACHE:
            raise NotImplementedError(ROLLBACK_NEEDS)
        history = getattr(self, "recurrent_states_history", {}).get(0, [])
        if not self.record_past or tokens_to_remove > 0 or -tokens_to_remove > len(history):
            raise ValueError(
                f"crop({tokens_to_remove}): a RetNet state rolls back only by a negative number of tokens, at most "
                f"as many as it recorded since activate_past_recording ({len(history) if self.record_past else 0} "
                "here); keep a copy of the cache (copy.deepcopy) to return to any other point."
            )
        if tokens_to_remove:
            self.cumulative_length_linear.sub_(-tokens_to_remove)
            for i in range(self.number_of_states):  # copied in: the states keep their addresses (compiled steps)
                self.recurrent_states[i].copy_(self.recurrent_states_history[i][tokens_to_remove])
        self.recurrent_states_history = {i: [] for i in range(self.number_of_states)}

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i, state in self.recurrent_states.items():
            if state is not None:
                self.recurrent_states[i] = state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


class RetNetCache(Cache):
    """RetNet's cache (`cache`, called `past_key_values` before transformers 5.24): one `RetNetCacheLayer` per
    decoder layer in `layers`, each holding its recurrent state and token count. Its size does not grow with the
    context.

    From transformers 5.25 on it is a cache of transformers' own recurrent layers, which its generic code knows:
    `generate()`, beam search, assisted decoding and prompt lookup (which record the states of draft tokens and
    roll back with `crop(-n)`), `torch.compile` (the states keep static addresses). Before 5.25 it keeps the same
    states in a stand-in layer, and `crop` raises.
    """

    def __init__(self, num_layers: int):
        layers = [RetNetCacheLayer() for _ in range(num_layers)]
        if NATIVE_RECURRENT_CACHE:
            super().__init__(layers=layers)
        else:  # 4.48's Cache is an nn.Module and takes no layers: not initialised
            self.layers = layers

    @classmethod
    def from_states(cls, states: List[RetentionState], num_tokens: Union[int, torch.Tensor]) -> "RetNetCache":
        """A cache holding `states` (one `(S, scale)` per layer) after `num_tokens` tokens (an int, or a 0-d tensor:
        traced graphs take the count as an input)."""
        cache = cls(len(states))
        for layer, state in zip(cache.layers, states):
            layer.update(state, 0)
        cache.num_tokens = num_tokens
        return cache

    def __len__(self) -> int:
        return len(self.layers)

    def __deepcopy__(self, memo) -> "RetNetCache":
        """An independent copy (to return to this point later); the copy stays differentiable."""

        def copied(value):
            if isinstance(value, torch.Tensor):
                return value.clone()
            if isinstance(value, dict):
                return {key: copied(item) for key, item in value.items()}
            if isinstance(value, list):
                return [copied(item) for item in value]
            return value

        copy = RetNetCache(len(self.layers))
        for layer, source in zip(copy.layers, self.layers):
            layer.__dict__.update(copied(source.__dict__))
        return copy

    def __repr__(self) -> str:
        return f"RetNetCache(num_layers={len(self.layers)}, num_tokens={self.num_tokens})"

    @property
    def states(self) -> List[Optional[RetentionState]]:
        """Every layer's `(S, scale)` (None before the first token)."""
        return [layer.state for layer in self.layers]

    @property
    def num_tokens(self) -> int:
        """The tokens seen (padding included): the position of the next token."""
        return int(self.layers[0].cumulative_length_linear)

    @num_tokens.setter
    def num_tokens(self, value: Union[int, torch.Tensor]) -> None:
        """Set the count (an int or a 0-d tensor) of every layer: the next token's position."""
        for layer in self.layers:
            device = layer.cumulative_length_linear.device
            layer.cumulative_length_linear = torch.as_tensor(value, dtype=torch.long).to(device)

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """The positions `[T]` of the next `length` tokens (from the count as a tensor: a compiled step does not
        specialise on it)."""
        return self.layers[0].cumulative_length_linear.to(device) + torch.arange(length, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].cumulative_length_linear)

    def get_max_length(self) -> Optional[int]:
        return None

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return all(layer.is_compileable for layer in self.layers)

    @property
    def is_croppable(self) -> bool:
        return all(layer.is_croppable for layer in self.layers)

    def states_to_keep(self) -> int:
        """How many tokens the cache can roll back by (`recurrent_states_to_keep`): 0 unless it records its past
        (transformers >= 5.25)."""
        layer = self.layers[0]
        return (getattr(layer, "recurrent_states_to_keep", None) or 0) if layer.record_past else 0

    def stop_past_recording(self) -> None:
        """Record no more per-token states (those recorded are dropped)."""
        for layer in self.layers:
            layer.record_past = False
            layer.recurrent_states_history = {i: [] for i in range(layer.number_of_states)}

    def read_state(self, layer_idx: int) -> Optional[RetentionState]:
        """The state a layer continues from: the layer's own tensors (the recurrent form may update them in place),
        or copies while recording, so that the recorded states stay as they were."""
        state = self.layers[layer_idx].state
        if state is not None and self.layers[layer_idx].record_past:
            state = tuple(t.clone() for t in state)
        return state

    def update_state(self, layer_idx: int, state: Union[RetentionState, List[RetentionState]], num_tokens: int):
        self.layers[layer_idx].update(state, num_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Undo the last `-tokens_to_remove` tokens (a negative number) of a recording cache (transformers 5.25+)."""
        for layer in self.layers:
            layer.crop(tokens_to_remove)


def recompute_in_backward(function, *args):
    """`function(*args)`; with autograd on, only `args` are kept for the backward pass, which runs `function`
    again. Used for the cheap element-wise parts of a layer (norms, rotation, retention, gates), so that a layer
    keeps little more than its matrix-multiply inputs: training needs less memory than a Transformer's."""
    if not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, not called where it is the identity (evaluation, or p = 0): a decoding step calls no dropout."""
    return module(x) if module.training and module.p > 0 else x


class RetNetRMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` computed in float32, cast back, then times `weight` if it has one.

    Shape: `[..., dim]` -> `[..., dim]`.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if x.dtype in (torch.float32, torch.float64):  # no casts, no copies
            x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        else:
            x = x.float()
            x = (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)).to(hidden_states.dtype)
        return x if self.weight is None else x * self.weight


class RetNetRelPos(nn.Module):
    """Rotation angles and per-head decays, as torchscale's `RetNetRelPos` (its buffers, same names and values).

    `angle` [D]: with `rotary_style="torchscale"`, theta_i = 10000^-(i / (D/2 - 1)), i < D/2, each repeated twice
    (pairs (x_2i, x_2i+1) are rotated, GPT-J style); with `"neox"`, theta_i = 10000^-(2i / D) for the two halves
    (x_i, x_i+D/2) are rotated, as in flash-linear-attention.
    `decay` [H]: log(gamma_h) with gamma_h = 1 - 2^(-5-h).
    """

    def __init__(self, config: RetNetConfig):
        super().__init__()
        heads = config.decoder_retention_heads
        self.key_head_dim = config.decoder_embed_dim // heads
        self.rotary_style = config.rotary_style
        self.register_buffer("angle", torch.zeros(self.key_head_dim, dtype=torch.float32))
        self.register_buffer("decay", torch.zeros(heads, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self):
        half = self.key_head_dim // 2
        if self.rotary_style == "neox":
            theta = 1.0 / (10000 ** (torch.arange(0, self.key_head_dim, 2, dtype=torch.float) / self.key_head_dim))
            angle = torch.cat([theta, theta])
        else:
            angle = (1.0 / (10000 ** torch.linspace(0, 1, half))).repeat_interleave(2)
        decay = torch.log(1 - 2 ** (-5 - torch.arange(self.decay.shape[0], dtype=torch.float)))
        with torch.no_grad():
            self.angle.copy_(angle)
            self.decay.copy_(decay)

    def _apply(self, fn, recurse=True):
        # A cast to half precision would round the angles, and position * angle would then be off by whole
        # radians at long contexts: the buffers stay float32 (float64 is kept) whatever the model is cast to.
        super()._apply(fn, recurse)
        if self.angle.dtype in (torch.float16, torch.bfloat16):
            self.angle, self.decay = self.angle.float(), self.decay.float()
            self.reset_parameters()
        return self

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`((cos, sin), log_decay)`: `cos`, `sin` of shape `[T, D]` for the positions `[T]` given, in at least
        float32, and the per-head log decays `[H]` (returned here, not read from the buffer elsewhere, so that
        accelerate's offloading hooks around this module apply).

        The phases position * angle are computed in float64 and reduced modulo 2 pi before they are cast: a float32
        product keeps 24 bits, several radians off at 100M tokens; reduced, a phase is exact to float32 rounding at
        any position."""
        positions = positions.to(self.angle.device)
        phase = torch.remainder(positions.double()[:, None] * self.angle[None, :], 2 * math.pi)  # float64
        phase = phase.to(torch.promote_types(dtype, torch.float32))
        return (phase.cos(), phase.sin()), self.decay


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """`x * cos + partner(x) * sin`, where the partner of (a, b) is (-b, a): pairs (x_2i, x_2i+1) for
    `style="torchscale"`, halves (x_i, x_i+D/2) for `"neox"`. `x`: `[..., D]`; `cos`, `sin` broadcast to it
    (`[T, D]` for `x` `[B, H, T, D]`). Many calls with the same angles: `rotate_signed` with `signed_sin` made once."""
    return rotate_signed(x, cos, signed_sin(sin, style), style)


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, style: str) -> torch.Tensor:
    """`rotate(x, cos, sin, style)` as `x * cos + swap(x) * signed_sin`, where `swap` exchanges the partners and
    `signed_sin = signed_sin(sin, style)` carries the partner's sign: four small kernels, in `cos`'s dtype."""
    if x.dtype != cos.dtype:
        x = x.to(cos.dtype)
    if style == "neox":
        swapped = x.roll(x.shape[-1] // 2, dims=-1)
    else:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def signed_sin(sin: torch.Tensor, style: str) -> torch.Tensor:
    """`sin` `[..., D]` with the sign of the partner in `rotate`: negated at the first of each pair
    (`"torchscale"`) or in the first half (`"neox"`)."""
    if style == "neox":
        first, second = sin.chunk(2, dim=-1)
        return torch.cat((-first, second), dim=-1)
    pairs = sin.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 0], pairs[..., 1]), dim=-1).flatten(-2)


@dataclass(frozen=True)
class RetentionInputs:
    """What every layer of one forward call shares, made once by `RetNetModel.forward`.

    rotation: `(cos, signed_sin(sin))`, each `[T, D]`, for the positions of this call's tokens (at least float32).
    log_decay: `[H]`, log(gamma_h).
    form: `"parallel"`, `"chunkwise"` or `"recurrent"`.
    backend: `"torch"` (`retention.py`) or `"fla"` (`fla_retention.py`).
    valid: bool `[B, T]`, False at padding; None when every token is real.
    resets: bool `[B, T]`, True where a document starts and the state before it is discarded; None if none.
    output_final_state: whether the layers return their new state (False in training without a cache).
    states_to_keep: how many of the last tokens' states the layers return, as a list (a cache that records them
        for a rollback, transformers >= 5.25); 0: only the final state.
    """

    rotation: Tuple[torch.Tensor, torch.Tensor]
    log_decay: torch.Tensor
    form: str
    backend: str = "torch"
    valid: Optional[torch.Tensor] = None
    resets: Optional[torch.Tensor] = None
    output_final_state: bool = True
    states_to_keep: int = 0


class MultiScaleRetention(nn.Module):
    """Multi-scale retention: per-head retention with its own decay, a group norm, and a swish gate.

    `[B, T, d]` -> `[B, T, d]`, with the layer's recurrent state in and out.
    """

    def __init__(self, config: RetNetConfig):
        super().__init__()
        d, dv, heads = config.decoder_embed_dim, config.decoder_value_embed_dim, config.decoder_retention_heads
        self.num_heads = heads
        self.key_head_dim = d // heads
        self.value_head_dim = dv // heads
        self.scaling = self.key_head_dim**-0.5
        self.retention_functions = {
            "torch": dict(
                RETENTION_FUNCTIONS,
                chunkwise=partial(RETENTION_FUNCTIONS["chunkwise"], chunk_size=config.recurrent_chunk_size),
            ),
            "fla": dict(FLA_RETENTION_FUNCTIONS),
        }
        self.rotary_style = config.rotary_style
        self.retention_normalization = config.retention_normalization
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, dv, bias=False)
        self.g_proj = nn.Linear(d, dv, bias=False)
        self.out_proj = nn.Linear(dv, d, bias=False)
        # torchscale's init (read by `_init_weights`): xavier_uniform with these gains, deepnorm's scaling included
        deepnorm_gain = deepnorm_init_gain(config)
        for proj, gain in (
            (self.q_proj, 2**-2.5),
            (self.k_proj, 2**-2.5),
            (self.g_proj, 2**-2.5),
            (self.v_proj, 2**-2.5 * deepnorm_gain),
            (self.out_proj, 2**-1 * deepnorm_gain),
        ):
            proj.xavier_gain = gain
        self.group_norm = RetNetRMSNorm(
            self.value_head_dim, eps=config.layernorm_eps, elementwise_affine=config.group_norm_affine
        )

    def forward(
        self, hidden_states: torch.Tensor, inputs: RetentionInputs, state: Optional[RetentionState] = None
    ) -> Tuple[torch.Tensor, Optional[RetentionState]]:
        """`hidden_states` `[B, T, d]` and the state before them -> `([B, T, d], the state after them)`."""
        projections = (
            self.q_proj(hidden_states),
            self.k_proj(hidden_states),
            self.v_proj(hidden_states),
            self.g_proj(hidden_states),
        )
        # the backward pass keeps the four projections, not the [H, C, C] scores or [B, T, dv] intermediates,
        # nor out_proj's input: its backward recomputes retention (which retention's own backward needs anyway) and
        # out_proj's product, one [T, dv] x [dv, d] product more than keeping that input
        return recompute_in_backward(self.retain_and_project, *projections, inputs, state)

    def retain_and_project(self, q, k, v, g, inputs: RetentionInputs, state: Optional[RetentionState]):
        """`out_proj(retain(q, k, v, g, inputs, state))` `[B, T, d]`, and the new state."""
        out, state = self.retain(q, k, v, g, inputs, state)
        return self.out_proj(out), state

    def retain(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        inputs: RetentionInputs,
        state: Optional[RetentionState],
    ) -> Tuple[torch.Tensor, Optional[RetentionState]]:
        """From the projections `q`, `k` `[B, T, d]`, `v`, `g` `[B, T, dv]` to the gated, normalised retention
        output `[B, T, dv]` (the input of `out_proj`), and the new state (a list of states with
        `inputs.states_to_keep`)."""
        batch, length, _ = q.shape
        q = q.view(batch, length, self.num_heads, self.key_head_dim).transpose(1, 2)
        k = (k * self.scaling).view(batch, length, self.num_heads, self.key_head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_heads, self.value_head_dim).transpose(1, 2)
        cos, sin = inputs.rotation
        q = rotate_signed(q, cos, sin, self.rotary_style)
        k = rotate_signed(k, cos, sin, self.rotary_style)
        common = dict(initial_state=state, valid=inputs.valid, resets=inputs.resets, log_decay=inputs.log_decay)
        # the states after each of the last tokens, the final one last (first: the recurrent form may update the
        # incoming state in place)
        history = states_after_tokens(k, v, keep=inputs.states_to_keep, **common) if inputs.states_to_keep else None
        out, state = self.retention_functions[inputs.backend][inputs.form](
            q,
            k,
            v,
            output_final_state=inputs.output_final_state and history is None,
            normalize=self.retention_normalization,
            **common,
        )
        out = self.group_norm(out)  # [B, H, T, Dv]
        if out.dtype != g.dtype:
            out = out.to(g.dtype)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.value_head_dim)
        return F.silu(g) * out, state if history is None else history


class RetNetGLU(nn.Module):
    """Gated feed-forward block `fc2(act(fc1(x)) * gate(x))`, the activation in float32 at least.

    `[B, T, d]` -> `[B, T, d]`.
    """

    def __init__(self, config: RetNetConfig):
        super().__init__()
        d, f = config.decoder_embed_dim, config.decoder_ffn_embed_dim
        self.activation_fn = ACTIVATION_FUNCTIONS[config.activation_fn]
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.fc1 = nn.Linear(d, f, bias=False)
        self.gate = nn.Linear(d, f, bias=False)
        self.fc2 = nn.Linear(f, d, bias=False)
        # nn.Linear's default init, uniform(+-gain/sqrt(fan_in)), fc1 and fc2 scaled down under deepnorm
        self.fc1.uniform_gain = self.fc2.uniform_gain = deepnorm_init_gain(config)
        self.gate.uniform_gain = 1.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the backward pass keeps fc1's and gate's outputs, not fc2's input (it recomputes the gate and fc2)
        return recompute_in_backward(self.gated_and_projected, self.fc1(hidden_states), self.gate(hidden_states))

    def gated_and_projected(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """`fc2(dropout(gated(x, gate)))`: `[B, T, f]` twice -> `[B, T, d]`."""
        return self.fc2(_dropout(self.activation_dropout, self.gated(x, gate)))

    def gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """`act(x) * gate`, the activation in float32 at least; `[B, T, f]` twice -> `[B, T, f]`."""
        if x.dtype in (torch.float32, torch.float64):
            return self.activation_fn(x) * gate
        return self.activation_fn(x.float()).to(x.dtype) * gate


class RetNetDecoderLayer(GradientCheckpointingLayer):
    """Retention then the gated feed-forward block, each in a residual branch.

    Pre-norm (the default): `x = alpha x + MSR(norm(x))`, then `x = alpha x + GLU(norm(x))`. Post-norm
    (`decoder_normalize_before=False`, which deepnorm implies, as in torchscale): `x = norm(alpha x + MSR(x))`,
    then `x = norm(alpha x + GLU(x))`. alpha = (2N)^(1/4) with deepnorm, else 1.
    """

    def __init__(self, config: RetNetConfig):
        super().__init__()
        d = config.decoder_embed_dim
        self.retention = MultiScaleRetention(config)
        self.retention_layer_norm = RetNetRMSNorm(d, eps=config.layernorm_eps)
        self.ffn = RetNetGLU(config)
        self.final_layer_norm = RetNetRMSNorm(d, eps=config.layernorm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.normalize_before = config.decoder_normalize_before
        self.alpha = math.pow(2.0 * config.decoder_layers, 0.25) if config.deepnorm else 1.0

    def forward(
        self, hidden_states: torch.Tensor, inputs: RetentionInputs, state: Optional[RetentionState] = None
    ) -> Tuple[torch.Tensor, Optional[RetentionState]]:
        """`hidden_states` `[B, T, d]` and the layer's state -> `([B, T, d], new state)`."""
        if self.normalize_before:
            normed = recompute_in_backward(self.retention_layer_norm, hidden_states)
            mixed, state = self.retention(normed, inputs, state)
            hidden_states = self._residual(hidden_states, mixed)
            normed = recompute_in_backward(self.final_layer_norm, hidden_states)
            return self._residual(hidden_states, self.ffn(normed)), state
        mixed, state = self.retention(hidden_states, inputs, state)
        hidden_states = recompute_in_backward(self.retention_layer_norm, self._residual(hidden_states, mixed))
        hidden_states = self._residual(hidden_states, self.ffn(hidden_states))
        return recompute_in_backward(self.final_layer_norm, hidden_states), state

    def _residual(self, hidden_states: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """`alpha x + dropout(branch)`, both `[B, T, d]`."""
        branch = _dropout(self.dropout, branch)
        return hidden_states + branch if self.alpha == 1.0 else hidden_states * self.alpha + branch


class RetNetPackingKwargs(TypedDict, total=False):
    """A packed row's document boundaries in flash-attention's varlen form, which TRL's padding-free collator sends
    beside `position_ids`. `cu_seq_lens_q` (`[D + 1]`, the offsets of the D documents of one flattened row) gives
    the document starts when `position_ids` is not given; the others say the same again and are not needed."""

    cu_seq_lens_q: torch.Tensor
    cu_seq_lens_k: torch.Tensor
    max_length_q: int
    max_length_k: int
    seq_idx: torch.Tensor


class RetNetLossKwargs(TypedDict, total=False):
    """Passed on to transformers' loss function."""

    num_items_in_batch: Union[int, torch.Tensor]  # tokens in the whole accumulated batch (Trainer)
    ignore_index: int
    shift_labels: torch.Tensor


class RetNetKwargs(RetNetPackingKwargs, RetNetLossKwargs):
    """The keyword arguments the forwards with a head take beyond their named ones."""


# generate() hands some of its own arguments on to forward: `tokenizer` and `assistant_tokenizer` (transformers 5,
# for `stop_strings`), `cache_position` (transformers 4; positions here come from the cache). They are dropped.
GENERATE_ARGUMENTS_FOR_NO_MODEL = ("tokenizer", "assistant_tokenizer", "cache_position")


def _split_kwargs(kwargs: dict, *kinds: type) -> List[dict]:
    """`kwargs` sorted into one dict per TypedDict of `kinds`; a key none of them declares is a TypeError naming it."""
    kwargs = {key: value for key, value in kwargs.items() if key not in GENERATE_ARGUMENTS_FOR_NO_MODEL}
    known = [name for kind in kinds for name in kind.__annotations__]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(
            f"RetNet's forward got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; beyond the named "
            f"arguments of its signature it takes {', '.join(known)}."
        )
    return [{key: kwargs[key] for key in kind.__annotations__ if key in kwargs} for kind in kinds]


def _one_cache(cache: Optional[RetNetCache], past_key_values: Optional[RetNetCache]) -> Optional[RetNetCache]:
    """The state, passed as `cache` or as `past_key_values` (its name before transformers 5.24)."""
    if past_key_values is None or past_key_values is cache:
        return cache
    if cache is not None:
        raise ValueError(
            "Both `cache` and `past_key_values` were given, as two different objects; they are two names of the "
            "same argument (`past_key_values` before transformers 5.24): pass the state once, as `cache`."
        )
    return past_key_values


def _refuse_attentions(output_attentions: Optional[bool]) -> None:
    if output_attentions:
        raise ValueError(
            "RetNet has no attention weights to return (retention is computed without a softmax over positions); "
            "call it with output_attentions=False or None."
        )


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _keep_in_fp32_modules_strict = ["retnet_rel_pos"]  # angles and decays stay float32 under bf16 and fp16
    _is_stateful = not NATIVE_RECURRENT_CACHE  # before 5.25, generate() refuses assisted decoding by this flag
    _supports_cache_class = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers' `save_pretrained`; `auto_map` names every RetNet Auto class, so that a causal-LM folder
        also loads as `AutoModel` or `AutoModelForSequenceClassification` with `trust_remote_code=True`."""
        if getattr(self, "_auto_class", None) is None:
            # transformers 4.x does not mark a class loaded with trust_remote_code for saving its code
            self._auto_class = {
                "RetNetModel": "AutoModel",
                "RetNetForCausalLM": "AutoModelForCausalLM",
                "RetNetForSequenceClassification": "AutoModelForSequenceClassification",
            }.get(type(self).__name__)
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_retnet.RetNetConfig",
            "AutoModel": "modeling_retnet.RetNetModel",
            "AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM",
            "AutoModelForSequenceClassification": "modeling_retnet.RetNetForSequenceClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own RetNetCache

    def _init_weights(self, module: nn.Module):
        """torchscale's initialisation (its repository HEAD), deepnorm's down-scaling included."""
        std = self.config.decoder_embed_dim**-0.5
        if isinstance(module, nn.Linear) and hasattr(module, "xavier_gain"):
            init.xavier_uniform_(module.weight, gain=module.xavier_gain)
        elif isinstance(module, nn.Linear) and hasattr(module, "uniform_gain"):
            bound = module.uniform_gain / math.sqrt(module.in_features)
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Linear):  # the heads: lm_head (torchscale's output_projection), score
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RetNetRMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        elif isinstance(module, RetNetRelPos):
            module.reset_parameters()


class RetNetModel(RetNetPreTrainedModel):
    """The RetNet decoder without a head: embeddings, N layers, a final RMSNorm.

    `forward` arguments:
        input_ids (`[B, T]`): token ids; or `inputs_embeds` (`[B, T, d]`), not both.
        attention_mask (`[B, T]` or `[B, past + T]`): 1 for real tokens, 0 for padding, which contributes nothing
            to the state (or True and False); any other value (an additive mask) is a ValueError.
        position_ids (`[B, T]` or `[1, T]`): only their restarts matter: a token at position 0 that follows other
            tokens starts a new document (packed rows), and the state before it is discarded. Rotations and decays
            are relative, so they are taken from the token count.
        cache (`RetNetCache`): the state to continue from, which this model returned for the tokens before these
            (one of another layer count, width or batch is a ValueError; as with a KV cache, one of another
            same-shape model or of other tokens cannot be told apart and is continued as it is); updated in place
            and returned. The first new token's position is the number of tokens it has seen, `cache.num_tokens`.
        retention_form (`str`): override `config.retention_form` for this call.
        past_key_values (`RetNetCache`): the name of `cache` before transformers 5.24 (either may be given).
        output_attentions: RetNet has no attention weights; only None or False is accepted.
        kwargs: `RetNetPackingKwargs` (document boundaries of a packed row, as TRL's padding-free collator sends).
    Returns `BaseModelOutputWithPast` with `last_hidden_state` `[B, T, d]` and the cache in its field named
    `CACHE_NAME` (`cache`, or `past_key_values` before transformers 5.24).
    """

    def __init__(self, config: RetNetConfig):
        config.validate()  # again: fields set after the config was made (from_pretrained's overrides) are checked
        super().__init__(config)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.layernorm_embedding = (
            RetNetRMSNorm(config.decoder_embed_dim, eps=config.layernorm_eps) if config.layernorm_embedding else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RetNetDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = (
            RetNetRMSNorm(config.decoder_embed_dim, eps=config.layernorm_eps)
            if config.decoder_normalize_before
            else None
        )
        self.retnet_rel_pos = RetNetRelPos(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def _choose_form(self, form: Optional[str], length: int) -> str:
        form = form or self.config.retention_form
        if form not in RETENTION_FORMS:
            raise ValueError(f"retention_form={form!r}; allowed: {', '.join(RETENTION_FORMS)}.")
        if form == "auto":
            return "recurrent" if length == 1 else "chunkwise"
        return form

    def _choose_backend(self, hidden_states: torch.Tensor, form: str, stateful: bool) -> str:
        """`"fla"` or `"torch"` for this call, from `config.retention_backend`; a fallback to torch that the user
        would not expect (fla asked for, or a CUDA device) logs its reason once."""
        requested = self.config.retention_backend
        if requested == "torch" or (requested == "auto" and not hidden_states.is_cuda):
            return "torch"
        reason = fla_unavailable(hidden_states, form, stateful)
        if reason is None:
            return "fla"
        logger.warning_once(
            f"RetNet: retention_backend={requested!r}, but this call runs retention in PyTorch "
            f"(retention_backend='torch'): {reason}."
        )
        return "torch"

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RetNetCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        retention_form: Optional[str] = None,
        past_key_values: Optional[RetNetCache] = None,
        output_attentions: Optional[bool] = None,
        **kwargs: Unpack[RetNetPackingKwargs],
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        """Arguments and output in the class docstring."""
        (packing,) = _split_kwargs(kwargs, RetNetPackingKwargs)
        _refuse_attentions(output_attentions)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a checkpointed layer runs twice; the state must be written once
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch, length = hidden_states.shape[:2]
        cache = self._cache_for(_one_cache(cache, past_key_values), use_cache, batch)
        has_state = cache is not None and cache.layers[0].state is not None
        device = hidden_states.device
        positions = cache.positions(length, device) if cache is not None else torch.arange(length, device=device)

        (cos, sin), log_decay = self.retnet_rel_pos(positions, hidden_states.dtype)
        form = self._choose_form(retention_form, length)
        inputs = RetentionInputs(
            rotation=(cos, signed_sin(sin, self.config.rotary_style)),
            log_decay=log_decay,
            form=form,
            backend=self._choose_backend(hidden_states, form, stateful=has_state or bool(use_cache)),
            valid=self._valid_tokens(attention_mask, batch, length, cache),
            resets=self._document_starts(position_ids, packing.get("cu_seq_lens_q"), batch, length, has_state),
            output_final_state=use_cache,
            states_to_keep=self._states_to_keep(cache, length) if use_cache else 0,
        )
        all_hidden_states = [] if output_hidden_states else None  # kept only when asked: a prefill holds no copies
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, state = layer(hidden_states, inputs, cache.read_state(idx) if has_state else None)
            if use_cache:
                cache.update_state(idx, state, length)  # the one place the cache is written
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = tuple(all_hidden_states) + (hidden_states,)
        cache = cache if use_cache else None
        if not (return_dict if return_dict is not None else self.config.return_dict):
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_NAME: cache}
        )

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        """The scaled (and normalised) embeddings `[B, T, d]` of `input_ids` or of `inputs_embeds`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids ([batch, length]) and inputs_embeds ([batch, length, d]).")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.decoder_embed_dim:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {self.config.decoder_embed_dim}], "
                f"got {tuple(inputs_embeds.shape)}."
            )
        if inputs_embeds.shape[1] == 0:
            raise ValueError("The input has no tokens (length 0).")
        hidden_states = inputs_embeds if self.embed_scale == 1.0 else inputs_embeds * self.embed_scale
        if self.layernorm_embedding is not None:
            hidden_states = self.layernorm_embedding(hidden_states)
        return _dropout(self.dropout, hidden_states)

    def _cache_for(self, cache: Optional[RetNetCache], use_cache: bool, batch: int) -> Optional[RetNetCache]:
        """The cache to read (and, with `use_cache`, to write): the one given, checked, or a new one."""
        if cache is not None and not isinstance(cache, RetNetCache):
            raise TypeError(f"cache must be a RetNetCache (as returned by this model), got {type(cache)}.")
        if cache is None:
            return RetNetCache(self.config.decoder_layers) if use_cache else None
        heads = self.config.decoder_retention_heads
        shape = (heads, self.config.decoder_embed_dim // heads, self.config.decoder_value_embed_dim // heads)
        state = cache.layers[0].state if len(cache) else None
        if len(cache) != len(self.layers) or (state is not None and tuple(state[0].shape[1:]) != shape):
            found = "" if state is None else f", states [batch, H, D, Dv] = {list(state[0].shape)}"
            raise ValueError(
                f"The cache was made for another model ({len(cache)} layers{found}); this model has "
                f"{len(self.layers)} layers and states [batch, {', '.join(map(str, shape))}] (H heads, key and value "
                "head dims D and Dv). Pass the cache that this model returned, or none to start a new one."
            )
        if state is not None and state[0].shape[0] != batch:
            raise ValueError(
                f"The cache holds a batch of {state[0].shape[0]} rows but the input has {batch}; pass a "
                "cache made for this batch."
            )
        return cache

    @staticmethod
    def _states_to_keep(cache: RetNetCache, length: int) -> int:
        """How many of the last tokens' states the layers return for a cache that may roll back by up to N tokens:
        the states after the last N + 1 tokens, N of which the cache records; 0 when it records nothing."""
        depth = cache.states_to_keep()
        return min(depth + 1, length) if depth else 0

    @staticmethod
    def _valid_tokens(attention_mask, batch, length, cache: Optional[RetNetCache]) -> Optional[torch.Tensor]:
        """The mask columns of the current tokens as bool `[B, T]`, or None when every token is real."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            raise ValueError(
                f"attention_mask must be 2D [batch, length] with batch {batch}, got {tuple(attention_mask.shape)}."
            )
        columns = attention_mask[:, -length:]
        # (under torch.compile / torch.export the mask is neither checked nor dropped: a branch on tensor values
        # would break the graph, and so would reading the cache's count)
        if is_torchdynamo_compiling():
            return columns.bool()
        past_length = cache.num_tokens if cache is not None else 0
        if attention_mask.shape[1] not in (length, past_length + length):
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {length} (the new tokens) or "
                f"{past_length + length} (the cached and the new tokens)."
            )
        if (columns == 1).all():
            return None
        valid = columns.bool()
        odd = columns[valid.to(columns.dtype) != columns]  # the values other than 0 and 1
        if odd.numel():
            raise ValueError(
                f"attention_mask must hold 1 for real tokens and 0 for padding (or True and False), got "
                f"{odd[0].item()!r}. Additive masks (0 to keep, a large negative number at padding) are not "
                "accepted: pass (additive_mask == 0).long() instead."
            )
        return valid

    @staticmethod
    def _document_starts(position_ids, cu_seq_lens, batch, length, has_state) -> Optional[torch.Tensor]:
        """Bool `[B, T]` marking tokens at position 0 (or, without `position_ids`, at the document offsets
        `cu_seq_lens` of one packed row) that discard the state before them; None if there are none."""
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"position_ids must have shape [{batch} or 1, {length}], got {tuple(position_ids.shape)}."
                )
            resets = (position_ids == 0).expand(batch, length)
        elif cu_seq_lens is not None:
            if batch != 1 or cu_seq_lens.dim() != 1:
                raise ValueError(
                    f"cu_seq_lens_q ({tuple(cu_seq_lens.shape)}) describes the documents of one flattened row; the "
                    f"input has {batch} rows. Pass position_ids restarting at 0 per document instead."
                )
            starts = cu_seq_lens[:-1].long()
            resets = torch.zeros(1, length, dtype=torch.bool, device=starts.device).index_fill_(1, starts, True)
        else:
            return None
        if not has_state:
            resets = torch.cat([torch.zeros_like(resets[:, :1]), resets[:, 1:]], dim=1)
        return resets if is_torchdynamo_compiling() or resets.any() else None


class RetNetGenerationMixin(GenerationMixin):
    """What generate() needs to know of a RetNet causal LM: it makes a `RetNetCache` up front, refuses a rollback
    transformers cannot do, and may compile the one-token step. Shared by `RetNetForCausalLM` and the causal LMs that
    run the same model elsewhere (`retnet_hf.onnx_runtime.OnnxRetNetForCausalLM`)."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Give generate() a fresh RetNetCache up front (chunked prefill needs one); the base class would not. An
        assistant's cache records its draft tokens' states, as the base class does for its own caches (5.25+)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_NAME) is None:
            model_kwargs[CACHE_NAME] = RetNetCache(self.config.decoder_layers)
            if getattr(generation_config, "is_assistant", False):
                model_kwargs[CACHE_NAME].activate_past_recording(
                    recurrent_states_to_keep=generation_config.num_assistant_tokens
                )

    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        """Before transformers 5.25, assisted generation and prompt lookup are refused naming the release that
        rolls a recurrent state back (transformers 4.48 refuses them itself, as for any stateful model)."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION and not NATIVE_RECURRENT_CACHE:
            raise ValueError(ROLLBACK_NEEDS)
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def _assisted_decoding(self, *args, **kwargs):
        """transformers' assisted decoding; the cache it returns stops recording draft states (as generate()'s other
        loops leave theirs), so that continuing from it costs what continuing from any cache costs."""
        try:
            return super()._assisted_decoding(*args, **kwargs)
        finally:
            if isinstance(kwargs.get(CACHE_NAME), RetNetCache):
                kwargs[CACHE_NAME].stop_past_recording()

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        """Whether generate() (transformers >= 5) runs its one-token steps through `torch.compile` of the forward
        (`generation_config.compile_config` sets its options; the prefill stays eager unless chunked): when a
        `compile_config` is given, on any device, unless `disable_compile`, offloading or a quantizer that cannot
        compile. transformers itself compiles only caches of fixed size, and on CPUs never; a RetNet step is one
        graph (no graph breaks) with a state of fixed size on every device."""
        if generation_config.compile_config is None or generation_config.disable_compile:
            return False
        devices = set(getattr(self, "hf_device_map", {}).values())
        quantizer = getattr(self, "hf_quantizer", None)
        offloaded = "disk" in devices or ("cpu" in devices and len(devices) > 1)
        return not offloaded and (quantizer is None or quantizer.is_compileable)


class RetNetForCausalLM(RetNetPreTrainedModel, RetNetGenerationMixin):
    """RetNet with a language-modelling head (`lm_head`, torchscale's `output_projection`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RetNetCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        retention_form: Optional[str] = None,
        past_key_values: Optional[RetNetCache] = None,
        output_attentions: Optional[bool] = None,
        **kwargs: Unpack[RetNetKwargs],
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        """
        labels (`[B, T]`): next-token targets (shifted inside), -100 ignored.
        logits_to_keep (`int` or 1D tensor): compute logits for the last `logits_to_keep` positions only (0: all),
            or for the given positions.
        kwargs: `RetNetKwargs`: document boundaries of a packed row (to the backbone) and loss arguments.
        Returns `CausalLMOutputWithPast` with `logits` `[B, T', V]`. Other arguments as `RetNetModel.forward`.
        """
        packing, loss_kwargs = _split_kwargs(kwargs, RetNetPackingKwargs, RetNetLossKwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            retention_form=retention_form,
            output_attentions=output_attentions,
            **packing,
        )
        cache = getattr(outputs, CACHE_NAME)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = hidden_states.shape[1] if logits_to_keep == 0 else logits_to_keep
            hidden_states = hidden_states if keep >= hidden_states.shape[1] else hidden_states[:, -keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        if not return_dict:
            output = (logits,) + tuple(v for v in (cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: cache}
        )


class RetNetForSequenceClassification(RetNetPreTrainedModel):
    """RetNet with a linear head `score` on the last real token (the last one before padding) of each row."""

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RetNetModel(config)
        self.score = nn.Linear(config.decoder_embed_dim, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RetNetCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        retention_form: Optional[str] = None,
        past_key_values: Optional[RetNetCache] = None,
        output_attentions: Optional[bool] = None,
        **kwargs: Unpack[RetNetKwargs],
    ) -> Union[Tuple, SequenceClassifierOutputWithPast]:
        """Returns `SequenceClassifierOutputWithPast` with `logits` `[B, num_labels]`; `labels` `[B]` give the loss.
        Arguments as `RetNetForCausalLM.forward`."""
        packing, loss_kwargs = _split_kwargs(kwargs, RetNetPackingKwargs, RetNetLossKwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            retention_form=retention_form,
            output_attentions=output_attentions,
            **packing,
        )
        cache = getattr(outputs, CACHE_NAME)
        logits = self.score(outputs.last_hidden_state)
        batch, length = logits.shape[:2]
        if attention_mask is not None:
            real = attention_mask[:, -length:].to(logits.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(batch, length, dtype=torch.bool, device=logits.device)
        positions = torch.arange(length, device=logits.device)
        last = (positions * real).argmax(-1)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config, **loss_kwargs
            )
        if not return_dict:
            output = (pooled_logits,) + tuple(v for v in (cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: cache}
        )


__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "CACHE_NAME",
    "LORA_TARGET_MODULES",
    "RetNetCache",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetGenerationMixin",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "enable_activation_checkpointing",
]
