"""RetNet as a vLLM model: the retention state in vLLM's state cache, continuous batching and chunked prefill.

The layers mirror `retnet_hf.model.modeling_retnet` (same parameter names, so a folder's safetensors load as they
are) with vLLM's tensor-parallel linears: the q, k, v and gate projections are one column-parallel matrix, the
output projections row-parallel, so each rank holds H / tp heads with their decays. The retention itself is the
package's own (`retnet_hf.model.retention`): a prefill runs the chunkwise form from the sequence's state, the
decodes of a step run the recurrent form together.

vLLM hands a step's tokens flattened, `[N, d]`: first the decodes (one token each), then the prefills (a prompt or
a part of one, when chunked prefill split it); `LinearAttentionMetadata` says where each sequence starts
(`query_start_loc`), how long it is with its past (`seq_lens`) and which state slot it owns
(`state_indices_tensor`). A slot's state is `(S [H, D, Dv], scale [H])` in float32, as `RetNetCache`'s.
"""

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.linear_attn import LinearAttentionMetadata
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..model import RetNetConfig
from ..model.modeling_retnet import ACTIVATION_FUNCTIONS, RetNetRelPos, RetNetRMSNorm, rotate
from ..model.retention import chunkwise_retention, recurrent_retention
from . import require_supported_vllm


STATE_DTYPE = torch.float32  # the retention state's dtype whatever the model's, as in RetNetCache


def _state_shapes(config: RetNetConfig, tp_size: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Per sequence and rank: `S` `[H / tp, D, Dv]` and `scale` `[H / tp]`."""
    heads = config.decoder_retention_heads
    if heads % tp_size:
        raise ValueError(
            f"RetNet's {heads} retention heads cannot be split over tensor_parallel_size={tp_size}; choose a "
            "tensor parallel size that divides the head count."
        )
    key_dim, value_dim = config.decoder_embed_dim // heads, config.decoder_value_embed_dim // heads
    return (heads // tp_size, key_dim, value_dim), (heads // tp_size,)


class RetNetRetention(nn.Module, MambaBase):
    """Multi-scale retention over vLLM's flattened tokens: `[N, d]` -> `[N, d]`, each sequence continuing from
    (and writing back) the state in its slot. As `MultiScaleRetention.forward` for every sequence of the step."""

    def __init__(self, config: RetNetConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        d, dv = config.decoder_embed_dim, config.decoder_value_embed_dim
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        (self.num_heads, self.key_head_dim, self.value_head_dim), _ = _state_shapes(config, self.tp_size)
        self.scaling = self.key_head_dim**-0.5
        self.chunk_size = config.recurrent_chunk_size
        self.rotary_style = config.rotary_style
        self.normalize = config.retention_normalization
        self.config = config
        quant_config = vllm_config.quant_config
        self.qkvg_proj = MergedColumnParallelLinear(
            d, [d, d, dv, dv], bias=False, quant_config=quant_config, prefix=f"{prefix}.qkvg_proj"
        )
        self.out_proj = RowParallelLinear(dv, d, bias=False, quant_config=quant_config, prefix=f"{prefix}.out_proj")
        self.group_norm = RetNetRMSNorm(
            self.value_head_dim, eps=config.layernorm_eps, elementwise_affine=config.group_norm_affine
        )
        self.prefix = prefix
        forward_context = vllm_config.compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_context[prefix] = self  # where vLLM binds this layer's state cache and metadata

    # MambaBase: what vLLM allocates per sequence for this layer
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        return _state_shapes(self.config, self.tp_size)

    def get_state_dtype(self) -> Tuple[torch.dtype, torch.dtype]:
        return STATE_DTYPE, STATE_DTYPE

    def forward(
        self, hidden_states: torch.Tensor, rotation: Tuple[torch.Tensor, torch.Tensor], log_decay: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states` `[N, d]`; `rotation` `(cos, sin)` `[N, D]` at each token's position; `log_decay`
        `[H / tp]` (this rank's heads). Returns `[N, d]`; the states of the step's sequences are updated."""
        qkvg, _ = self.qkvg_proj(hidden_states)
        heads, key_dim, value_dim = self.num_heads, self.key_head_dim, self.value_head_dim
        q, k, v, g = qkvg.split([heads * key_dim, heads * key_dim, heads * value_dim, heads * value_dim], dim=-1)
        cos, sin = (x[:, None, :] for x in rotation)  # [N, 1, D], broadcast over the heads
        q = rotate(q.view(-1, heads, key_dim).to(cos.dtype), cos, sin, self.rotary_style)
        k = rotate((k * self.scaling).view(-1, heads, key_dim).to(cos.dtype), cos, sin, self.rotary_style)
        v = v.view(-1, heads, value_dim)
        out = torch.zeros(hidden_states.shape[0], heads, value_dim, dtype=q.dtype, device=q.device)
        torch.ops.vllm.retnet_retention(q, k, v, log_decay, out, self.prefix)
        out = self.group_norm(out).to(g.dtype).flatten(1)
        out, _ = self.out_proj(F.silu(g) * out)
        return out

    def retain(self, q, k, v, log_decay, out: torch.Tensor) -> None:
        """Retention of every sequence of the step into `out` `[N, H, Dv]`, from and back into its state slot.
        `q`, `k` `[N, H, D]`, `v` `[N, H, Dv]`. Nothing in vLLM's dummy runs, which have no states."""
        plan = StepPlan.of_this_step(self.prefix)
        if plan is None:
            return
        states, scales = self.kv_cache
        decodes = plan.decodes
        if decodes:  # one token each, all at once in the recurrent form
            state = states[plan.decode_slots], scales[plan.decode_slots]
            if plan.decode_fresh is not None:  # one-token prompts: no state yet (their slots hold an old one)
                state = (
                    state[0].masked_fill(plan.decode_fresh[..., None, None], 0),
                    state[1].masked_fill(plan.decode_fresh, 0),
                )
            o, state = recurrent_retention(
                *(x[:decodes, :, None] for x in (q, k, v)),
                log_decay=log_decay,
                initial_state=state,
                normalize=self.normalize,
            )
            out[:decodes] = o[:, :, 0].to(out.dtype)
            states[plan.decode_slots], scales[plan.decode_slots] = state
        for begin, end, slot, continues in plan.prefills:  # each prompt (or part of one) from its state
            o, (s, scale) = chunkwise_retention(
                *(x[begin:end].transpose(0, 1)[None] for x in (q, k, v)),
                log_decay=log_decay,
                chunk_size=self.chunk_size,
                initial_state=(states[slot, None], scales[slot, None]) if continues else None,
                normalize=self.normalize,
            )
            out[begin:end] = o[0].transpose(0, 1).to(out.dtype)
            states[slot], scales[slot] = s[0], scale[0]


@dataclass
class StepPlan:
    """The sequences of one step, read once from vLLM's metadata for every layer.

    decodes: how many sequences decode one token (they come first); decode_slots `[decodes]` their state slots;
    decode_fresh bool `[decodes, 1]`, True for a one-token prompt (no state yet), or None when there is none;
    prefills: `(begin, end, slot, continues)` per prompt or part of one: its tokens `begin:end` of the step, its
    slot, and whether it continues a state (a later part of a prompt that chunked prefill split).
    """

    decodes: int
    decode_slots: torch.Tensor
    decode_fresh: Optional[torch.Tensor]
    prefills: List[Tuple[int, int, int, bool]]

    @classmethod
    def of_this_step(cls, layer_name: str) -> Optional["StepPlan"]:
        """The plan of the forward pass under way, for layer `layer_name` (None in vLLM's dummy runs, which have no
        metadata): made once per pass and metadata object, which vLLM shares among the layers of a cache group, not
        once per layer (`of` reads the metadata back to the host)."""
        context = get_forward_context()
        metadata = context.attn_metadata  # {layer: metadata}
        metadata = metadata.get(layer_name) if isinstance(metadata, dict) else None
        if metadata is None:
            return None
        made = _PLAN_MADE[0]
        if made is None or made[0] is not context or made[1] is not metadata:
            # the pass and metadata are held, so no later object takes their ids (vLLM may reuse a metadata object
            # across passes, updated in place: the pass is part of the key)
            _PLAN_MADE[0] = made = (context, metadata, cls.of(metadata))
        return made[2]

    @classmethod
    def of(cls, metadata: LinearAttentionMetadata) -> "StepPlan":
        slots = metadata.state_indices_tensor.long()
        starts = metadata.query_start_loc.tolist()
        past = (metadata.seq_lens - metadata.query_start_loc.diff()).tolist()  # each sequence's earlier tokens
        decodes = metadata.num_decodes
        fresh = [n == 0 for n in past[:decodes]]
        prefills = [
            (starts[i], starts[i + 1], int(slots[i]), past[i] > 0)
            for i in range(decodes, decodes + metadata.num_prefills)
        ]
        return cls(
            decodes=decodes,
            decode_slots=slots[:decodes],
            decode_fresh=torch.tensor(fresh, device=slots.device)[:, None] if any(fresh) else None,
            prefills=prefills,
        )


_PLAN_MADE: List[Optional[Tuple[object, object, StepPlan]]] = [None]  # (forward context, metadata, its plan)


def retnet_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, output: torch.Tensor, layer_name: str
) -> None:
    """The layer `layer_name`'s retention of the step into `output` (`RetNetRetention.retain`), as vLLM's custom op
    `vllm::retnet_retention`: opaque to torch.compile, which compiles the rest of the model around it (the op is a
    split point of vLLM's piecewise graphs, as attention and Mamba's mixers are)."""
    get_forward_context().no_compile_layers[layer_name].retain(q, k, v, log_decay, output)


direct_register_custom_op(op_name="retnet_retention", op_func=retnet_retention, mutates_args=["output"])
RETENTION_OP = "vllm::retnet_retention"


class RetNetGLU(nn.Module):
    """`fc2(act(fc1(x)) * gate(x))`, fc1 and gate as one column-parallel matrix: `[N, d]` -> `[N, d]`."""

    def __init__(self, config: RetNetConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        d, f = config.decoder_embed_dim, config.decoder_ffn_embed_dim
        quant_config = vllm_config.quant_config
        self.fc1_gate = MergedColumnParallelLinear(
            d, [f, f], bias=False, quant_config=quant_config, prefix=f"{prefix}.fc1_gate"
        )
        self.fc2 = RowParallelLinear(f, d, bias=False, quant_config=quant_config, prefix=f"{prefix}.fc2")
        self.activation_fn = ACTIVATION_FUNCTIONS[config.activation_fn]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, gate = self.fc1_gate(hidden_states)[0].chunk(2, dim=-1)
        x = self.activation_fn(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype) * gate
        return self.fc2(x)[0]


class RetNetDecoderLayer(nn.Module):
    """Retention then the gated feed-forward block, pre- or post-norm with deepnorm's alpha, as
    `modeling_retnet.RetNetDecoderLayer`. `[N, d]` -> `[N, d]`."""

    def __init__(self, config: RetNetConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        d = config.decoder_embed_dim
        self.retention = RetNetRetention(config, vllm_config, prefix=f"{prefix}.retention")
        self.retention_layer_norm = RetNetRMSNorm(d, eps=config.layernorm_eps)
        self.ffn = RetNetGLU(config, vllm_config, prefix=f"{prefix}.ffn")
        self.final_layer_norm = RetNetRMSNorm(d, eps=config.layernorm_eps)
        self.normalize_before = config.decoder_normalize_before
        self.alpha = math.pow(2.0 * config.decoder_layers, 0.25) if config.deepnorm else 1.0

    def forward(self, hidden_states, rotation, log_decay) -> torch.Tensor:
        if self.normalize_before:
            hidden_states = hidden_states * self.alpha + self.retention(
                self.retention_layer_norm(hidden_states), rotation, log_decay
            )
            return hidden_states * self.alpha + self.ffn(self.final_layer_norm(hidden_states))
        hidden_states = hidden_states * self.alpha + self.retention(hidden_states, rotation, log_decay)
        hidden_states = self.retention_layer_norm(hidden_states)
        return self.final_layer_norm(hidden_states * self.alpha + self.ffn(hidden_states))


@support_torch_compile
class RetNetModel(nn.Module):
    """Embeddings, the layers, the final norm: `input_ids` `[N]` and `positions` `[N]` -> `[N, d]`. vLLM compiles
    it (unless `enforce_eager`), all but the retention op."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: RetNetConfig = vllm_config.model_config.hf_config
        d = config.decoder_embed_dim
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(d)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, d, prefix=f"{prefix}.embed_tokens")
        self.layernorm_embedding = RetNetRMSNorm(d, eps=config.layernorm_eps) if config.layernorm_embedding else None
        self.layers = nn.ModuleList(
            RetNetDecoderLayer(config, vllm_config, prefix=f"{prefix}.layers.{index}")
            for index in range(config.decoder_layers)
        )
        self.layer_norm = RetNetRMSNorm(d, eps=config.layernorm_eps) if config.decoder_normalize_before else None
        self.retnet_rel_pos = RetNetRelPos(config)
        tp_size = get_tensor_model_parallel_world_size()
        self.heads_per_rank = config.decoder_retention_heads // tp_size
        self.first_head = get_tensor_model_parallel_rank() * self.heads_per_rank

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: Optional[IntermediateTensors] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        embeds = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states = embeds * self.embed_scale
        if self.layernorm_embedding is not None:
            hidden_states = self.layernorm_embedding(hidden_states)
        rotation, log_decay = self.retnet_rel_pos(positions, hidden_states.dtype)
        log_decay = log_decay[self.first_head : self.first_head + self.heads_per_rank]
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotation, log_decay)
        return hidden_states if self.layer_norm is None else self.layer_norm(hidden_states)


class RetNetForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """RetNet with its language-modelling head, for vLLM (architecture `RetNetForCausalLM`)."""

    # checkpoint names -> (merged vLLM parameter, shard id)
    stacked_params_mapping = (
        ("qkvg_proj", "q_proj", 0),
        ("qkvg_proj", "k_proj", 1),
        ("qkvg_proj", "v_proj", 2),
        ("qkvg_proj", "g_proj", 3),
        ("fc1_gate", "fc1", 0),
        ("fc1_gate", "gate", 1),
    )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return _state_shapes(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return STATE_DTYPE, STATE_DTYPE

    @classmethod
    def get_mamba_state_copy_func(cls):
        return get_temporal_copy_spec, get_temporal_copy_spec

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        require_supported_vllm()
        super().__init__()
        if get_pp_group().world_size > 1:
            raise NotImplementedError(
                "RetNet's vLLM model does not support pipeline parallelism; use tensor_parallel_size instead."
            )
        config: RetNetConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = RetNetModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.decoder_embed_dim, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.share_decoder_input_output_embed:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"RetNet's vLLM forward got unexpected argument(s) {', '.join(map(repr, kwargs))}.")
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Load a folder's tensors under their `modeling_retnet` names (torchscale's, under `model.`)."""
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.share_decoder_input_output_embed:
                continue  # the embedding's
            for merged, part, shard in self.stacked_params_mapping:
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{merged}.")
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name in buffers:  # retnet_rel_pos.angle and .decay
                    buffers[name].copy_(tensor)
                elif name in params:
                    getattr(params[name], "weight_loader", default_weight_loader)(params[name], tensor)
                else:
                    raise ValueError(f"The checkpoint holds {name!r}, which RetNet's vLLM model does not know.")
                loaded.add(name)
        missing = sorted(
            set(params) - loaded - ({"lm_head.weight"} if self.config.share_decoder_input_output_embed else set())
        )
        if missing:
            raise ValueError(f"The checkpoint lacks {', '.join(missing)}.")
        return loaded
