"""RetNet configuration: torchscale's field names and meanings, with transformers' standard names as aliases."""

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x, as pinned by AutoTrain
    from transformers import PretrainedConfig as PreTrainedConfig


RETENTION_FORMS = ("auto", "parallel", "chunkwise", "recurrent")
ROTARY_STYLES = ("torchscale", "neox")
ACTIVATIONS = ("swish", "gelu")


class RetNetConfig(PreTrainedConfig):
    r"""
    Configuration of a RetNet decoder (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
    Language Models"), laid out as Microsoft's torchscale `RetNetDecoder`, so that a torchscale checkpoint's
    arguments map one to one. The defaults are torchscale's `retnet_base` training preset.

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
        recurrent_chunk_size (`int`): chunk length of the chunkwise form.
        rotary_style (`str`): `"torchscale"`: rotate pairs (x_2i, x_2i+1) by 10000^-(i / (D/2 - 1)) per position;
            `"neox"`: rotate halves (x_i, x_i+D/2) by 10000^-(2i / D) (flash-linear-attention's RetNet).
        retention_normalization (`bool`): divide retention outputs by the square root of the decay sum, as
            torchscale (True), or not, as flash-linear-attention (False).
        group_norm_affine (`bool`): a learnable weight [Dv] in the per-head group norm (flash-linear-attention).
        retention_form (`str`): `"parallel"`, `"chunkwise"`, `"recurrent"`, or `"auto"`: recurrent for one-token
            steps, chunkwise otherwise (a sequence no longer than one chunk is then computed in parallel).
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
        recurrent_chunk_size: int = 512,
        rotary_style: str = "torchscale",
        retention_normalization: bool = True,
        group_norm_affine: bool = False,
        retention_form: str = "auto",
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
            decoder_normalize_before=decoder_normalize_before and not deepnorm,
            share_decoder_input_output_embed=share_decoder_input_output_embed,
            recurrent_chunk_size=recurrent_chunk_size,
            rotary_style=rotary_style,
            retention_normalization=retention_normalization,
            group_norm_affine=group_norm_affine,
            retention_form=retention_form,
            use_cache=use_cache,
        )
        # transformers' standard names (hidden_size, ...) are accepted too, and win when given.
        fields.update({name: kwargs.pop(alias) for alias, name in self.attribute_map.items() if alias in kwargs})
        for name, value in fields.items():
            setattr(self, name, value)
        self.validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=self.share_decoder_input_output_embed,
            **kwargs,
        )

    def validate(self):
        """Raise a ValueError that names the field and what it may be."""

        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RetNetConfig.{name} must be a positive integer, got {value!r}.")

        for name in (
            "vocab_size",
            "decoder_embed_dim",
            "decoder_value_embed_dim",
            "decoder_ffn_embed_dim",
            "decoder_layers",
            "decoder_retention_heads",
        ):
            positive_int(name)
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
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"RetNetConfig.activation_fn={self.activation_fn!r}; allowed: {', '.join(ACTIVATIONS)}.")
        if self.rotary_style not in ROTARY_STYLES:
            raise ValueError(f"RetNetConfig.rotary_style={self.rotary_style!r}; allowed: {', '.join(ROTARY_STYLES)}.")
        if self.retention_form not in RETENTION_FORMS:
            raise ValueError(
                f"RetNetConfig.retention_form={self.retention_form!r}; allowed: {', '.join(RETENTION_FORMS)}."
            )
        if not isinstance(self.recurrent_chunk_size, int) or self.recurrent_chunk_size < 1:
            raise ValueError(
                f"RetNetConfig.recurrent_chunk_size must be an integer >= 1, got {self.recurrent_chunk_size!r}."
            )
        if not self.layernorm_eps >= 0:
            raise ValueError(f"RetNetConfig.layernorm_eps must be >= 0, got {self.layernorm_eps!r}.")
        for name in ("dropout", "activation_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"RetNetConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")


__all__ = ["RetNetConfig", "RETENTION_FORMS"]
