"""RetNet configuration: torchscale's field names and meanings, with transformers' standard names as aliases."""

import difflib
import functools
import math
import warnings

from transformers import GenerationConfig


try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x, as pinned by AutoTrain
    from transformers import PretrainedConfig as PreTrainedConfig


RETENTION_FORMS = ("auto", "parallel", "chunkwise", "recurrent")
RETENTION_BACKENDS = ("auto", "torch", "fla")
ROTARY_STYLES = ("torchscale", "neox")
ACTIVATIONS = ("swish", "gelu")

CHOICES = {
    "activation_fn": ACTIVATIONS,
    "rotary_style": ROTARY_STYLES,
    "retention_form": RETENTION_FORMS,
    "retention_backend": RETENTION_BACKENDS,
}
POSITIVE_INTEGERS = (
    "vocab_size",
    "decoder_embed_dim",
    "decoder_value_embed_dim",
    "decoder_ffn_embed_dim",
    "decoder_layers",
    "decoder_retention_heads",
    "recurrent_chunk_size",
)
BOOLEANS = (
    "no_scale_embedding",
    "layernorm_embedding",
    "deepnorm",
    "decoder_normalize_before",
    "share_decoder_input_output_embed",
    "retention_normalization",
    "group_norm_affine",
    "use_cache",
)
PROBABILITIES = ("dropout", "activation_dropout")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")

# Names that transformers releases from 4.48 on write into a config.json or pass to a config, beyond those that a
# default config of the running release has (`_transformers_names`): 4.x attributes that 5.x dropped, 5.x's `dtype`
# (4.x's `torch_dtype`), and keys that loading, saving or quantising a model adds.
OTHER_RELEASES_NAMES = frozenset(
    (
        "_attn_implementation_autoset",
        "_commit_hash",
        "_experts_implementation_internal",
        "add_cross_attention",
        "attn_implementation",
        "auto_map",
        "cross_attention_hidden_size",
        "custom_pipelines",
        "dtype",
        "experts_implementation",
        "finetuning_task",
        "is_decoder",
        "per_layer_config",
        "prefix",
        "pruned_heads",
        "quantization_config",
        "sep_token_id",
        "task_specific_params",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "torchscript",
        "transformers_weights",
        "use_bfloat16",
    )
)


@functools.lru_cache(maxsize=None)
def _transformers_names() -> frozenset:
    """Every name transformers itself may put into a config: the attributes of a default config of the running
    release, the generation parameters that older configs carry, and `OTHER_RELEASES_NAMES`."""
    return frozenset(dir(PreTrainedConfig())) | frozenset(vars(GenerationConfig())) | OTHER_RELEASES_NAMES


def _warn_of_unknown_fields(kwargs: dict, known: list) -> None:
    """Warn of the keys of `kwargs` that neither RetNet (`known`) nor transformers knows, each with the known field
    it most resembles: a misspelled field is ignored, and its default gives a model of another shape or leaves
    checkpoint weights unread."""
    unknown = sorted(set(kwargs) - set(known) - _transformers_names())
    if not unknown:
        return
    described = []
    for name in unknown:
        match = difflib.get_close_matches(name, known, n=1)
        described.append(repr(name) + (f" (did you mean {match[0]!r}?)" if match else ""))
    warnings.warn(
        f"RetNetConfig got field(s) that RetNet does not know and ignores: {', '.join(described)}. Correct or "
        "remove them (in config.json or in the arguments).",
        stacklevel=3,
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RetNetConfig(PreTrainedConfig):
    r"""
    Configuration of a RetNet decoder (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
    Language Models"), laid out as Microsoft's torchscale `RetNetDecoder`, so that a torchscale checkpoint's
    arguments map one to one. The defaults are torchscale's `retnet_base` training preset.

    Each field must have its type (a bool is `true`/`false`, not a string or a number; an int is not a bool or a
    float) and its range, or a ValueError names it; a name that is neither a field here nor one of transformers'
    own is ignored with a warning that names the field it resembles (a misspelled `rotary_stlye` would otherwise
    leave the default in place unnoticed).

    Notation used in the docstrings: d = `decoder_embed_dim`, dv = `decoder_value_embed_dim`,
    f = `decoder_ffn_embed_dim`, H = `decoder_retention_heads`, key head dim D = d / H, value head dim Dv = dv / H.

    Args:
        vocab_size (`int`): number of tokens V.
        decoder_embed_dim (`int`, alias `hidden_size`): model width d.
        decoder_value_embed_dim (`int`): width dv of the values and the gate in retention.
        decoder_ffn_embed_dim (`int`, alias `intermediate_size`): hidden width f of the gated feed-forward block.
        decoder_layers (`int`, alias `num_hidden_layers`): number of layers N.
        decoder_retention_heads (`int`, alias `num_attention_heads`): number of heads H; head h decays with
            gamma_h = 1 - 2^(-5-h).
        activation_fn (`str`): activation of the gated feed-forward block, `"swish"` or `"gelu"`.
        dropout (`float`): dropout after the embedding, retention and feed-forward blocks.
        activation_dropout (`float`): dropout inside the feed-forward block.
        no_scale_embedding (`bool`): if False the embeddings are multiplied by sqrt(d).
        layernorm_embedding (`bool`): an RMSNorm after the embedding.
        layernorm_eps (`float`): epsilon of every RMSNorm, the per-head group norm included.
        deepnorm (`bool`): DeepNet residual scaling, residual * (2N)^(1/4), and its initialisation; as in
            torchscale it implies post-norm layers (`decoder_normalize_before=False`).
        decoder_normalize_before (`bool`): pre-norm layers with a final RMSNorm (True), or post-norm layers
            without one (False).
        share_decoder_input_output_embed (`bool`, alias `tie_word_embeddings`): tie `lm_head` to the embedding.
        recurrent_chunk_size (`int`): chunk length of the chunkwise form; the result does not depend on it, the
            speed does. 64 (flash-linear-attention's chunk too) was the fastest for the 125m preset on a CPU: from
            2k tokens 8-16% faster than torchscale's 512 (docs/benchmarks.md), equal at 512 tokens.
        rotary_style (`str`): `"torchscale"`: rotate pairs (x_2i, x_2i+1) by 10000^-(i / (D/2 - 1)) per position;
            `"neox"`: rotate halves (x_i, x_i+D/2) by 10000^-(2i / D) (flash-linear-attention's RetNet).
        retention_normalization (`bool`): divide retention outputs by the square root of the decay sum, as
            torchscale (True), or not, as flash-linear-attention (False).
        group_norm_affine (`bool`): a learnable weight [Dv] in the per-head group norm (flash-linear-attention).
        retention_form (`str`): `"parallel"`, `"chunkwise"`, `"recurrent"`, or `"auto"`: recurrent for one-token
            steps, chunkwise otherwise (a sequence no longer than one chunk is then computed in parallel).
        retention_backend (`str`): what computes retention: `"torch"`, this package's PyTorch code (`retention.py`,
            the reference, in float32 at least); `"fla"`, flash-linear-attention's Triton kernels
            (`fla_retention.py`: on a CUDA device, in the model's dtype with float32 accumulation); `"auto"`, fla
            on a CUDA device when it is installed, else torch. Where fla cannot run a call (not installed, a CPU,
            float64, the parallel form with a state), torch computes it and one log line says why.
    """

    model_type = "retnet_hf"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the name from transformers 5.24, and before
    attribute_map = {
        "hidden_size": "decoder_embed_dim",
        "num_hidden_layers": "decoder_layers",
        "num_attention_heads": "decoder_retention_heads",
        "intermediate_size": "decoder_ffn_embed_dim",
        "tie_word_embeddings": "share_decoder_input_output_embed",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        decoder_embed_dim: int = 512,
        decoder_value_embed_dim: int = 864,
        decoder_ffn_embed_dim: int = 864,
        decoder_layers: int = 6,
        decoder_retention_heads: int = 2,
        activation_fn: str = "swish",
        dropout: float = 0.0,
        activation_dropout: float = 0.0,
        no_scale_embedding: bool = False,
        layernorm_embedding: bool = False,
        layernorm_eps: float = 1e-6,
        deepnorm: bool = False,
        decoder_normalize_before: bool = True,
        share_decoder_input_output_embed: bool = False,
        recurrent_chunk_size: int = 64,
        rotary_style: str = "torchscale",
        retention_normalization: bool = True,
        group_norm_affine: bool = False,
        retention_form: str = "auto",
        retention_backend: str = "auto",
        use_cache: bool = True,
        pad_token_id: int = None,
        bos_token_id: int = None,
        eos_token_id: int = None,
        **kwargs,
    ):
        fields = dict(
            vocab_size=vocab_size,
            decoder_embed_dim=decoder_embed_dim,
            decoder_value_embed_dim=decoder_value_embed_dim,
            decoder_ffn_embed_dim=decoder_ffn_embed_dim,
            decoder_layers=decoder_layers,
            decoder_retention_heads=decoder_retention_heads,
            activation_fn=activation_fn,
            dropout=dropout,
            activation_dropout=activation_dropout,
            no_scale_embedding=no_scale_embedding,
            layernorm_embedding=layernorm_embedding,
            layernorm_eps=layernorm_eps,
            deepnorm=deepnorm,
            decoder_normalize_before=decoder_normalize_before,
            share_decoder_input_output_embed=share_decoder_input_output_embed,
            recurrent_chunk_size=recurrent_chunk_size,
            rotary_style=rotary_style,
            retention_normalization=retention_normalization,
            group_norm_affine=group_norm_affine,
            retention_form=retention_form,
            retention_backend=retention_backend,
            use_cache=use_cache,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        # transformers' standard names (hidden_size, ...) are accepted too, and win when given.
        fields.update({name: kwargs.pop(alias) for alias, name in self.attribute_map.items() if alias in kwargs})
        _warn_of_unknown_fields(kwargs, known=list(fields) + list(self.attribute_map))
        for name, value in fields.items():
            setattr(self, name, value)
        self.validate()
        self.decoder_normalize_before = self.decoder_normalize_before and not self.deepnorm
        super().__init__(
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            tie_word_embeddings=self.share_decoder_input_output_embed,
            **kwargs,
        )

    def validate(self):
        """Raise a ValueError that names the field, its value and what it must be."""

        def refuse(name, expected):
            value = getattr(self, name)
            raise ValueError(f"RetNetConfig.{name} must be {expected}, got {value!r} ({type(value).__name__}).")

        for name in BOOLEANS:
            if not isinstance(getattr(self, name), bool):
                refuse(name, "a bool (true or false in config.json)")
        for name in POSITIVE_INTEGERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                refuse(name, "a positive int")
        for name in PROBABILITIES:
            if not (_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                refuse(name, "a float in [0, 1)")
        if not (_is_number(self.layernorm_eps) and 0 < self.layernorm_eps < math.inf):
            refuse("layernorm_eps", "a float > 0 (1e-6 is torchscale's; 0 gives NaN at padding)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                refuse(name, f"one of {', '.join(allowed)}")
        for name in TOKEN_IDS:
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                refuse(name, "an int or None" + (" (or a list of ints)" if name == "eos_token_id" else ""))
        heads = self.decoder_retention_heads
        for name in ("decoder_embed_dim", "decoder_value_embed_dim"):
            if getattr(self, name) % heads:
                raise ValueError(
                    f"RetNetConfig.{name}={getattr(self, name)} must be divisible by "
                    f"decoder_retention_heads={heads}; choose a multiple of {heads} or another head count."
                )
        if (self.decoder_embed_dim // heads) % 2:
            raise ValueError(
                f"The key head dim decoder_embed_dim / decoder_retention_heads = {self.decoder_embed_dim // heads} "
                "must be even (the rotation acts on pairs); change decoder_embed_dim or decoder_retention_heads."
            )


__all__ = ["RetNetConfig", "RETENTION_BACKENDS", "RETENTION_FORMS"]
