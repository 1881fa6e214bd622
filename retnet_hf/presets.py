"""Model sizes by name: small ones for CPUs, a 125M one, and the paper's training presets (torchscale's fairseq
example, key head dim 256). Used by `retnet-hf train --preset`, the benchmarks and the tests."""

from typing import Dict

from .errors import UsageError
from .model import RetNetConfig


# Sizes: the paper's training presets (torchscale's fairseq example, key head dim 256) and small ones for CPUs.
PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": dict(
        decoder_embed_dim=128,
        decoder_value_embed_dim=256,
        decoder_ffn_embed_dim=256,
        decoder_layers=2,
        decoder_retention_heads=2,
    ),
    "small": dict(
        decoder_embed_dim=256,
        decoder_value_embed_dim=512,
        decoder_ffn_embed_dim=512,
        decoder_layers=4,
        decoder_retention_heads=2,
    ),
    # GPT-2-small scale, the benchmarks' 125M model: with vocab 32000, untied, 124,373,760 parameters
    "125m": dict(
        decoder_embed_dim=768,
        decoder_value_embed_dim=1104,
        decoder_ffn_embed_dim=1104,
        decoder_layers=12,
        decoder_retention_heads=3,
    ),
    "retnet_base": dict(
        decoder_embed_dim=512,
        decoder_value_embed_dim=864,
        decoder_ffn_embed_dim=864,
        decoder_layers=6,
        decoder_retention_heads=2,
    ),
    "retnet_medium": dict(
        decoder_embed_dim=1024,
        decoder_value_embed_dim=1728,
        decoder_ffn_embed_dim=1728,
        decoder_layers=16,
        decoder_retention_heads=4,
    ),
    "retnet_xl": dict(
        decoder_embed_dim=2048,
        decoder_value_embed_dim=3456,
        decoder_ffn_embed_dim=3456,
        decoder_layers=24,
        decoder_retention_heads=8,
    ),
    "retnet_3b": dict(
        decoder_embed_dim=2560,
        decoder_value_embed_dim=4280,
        decoder_ffn_embed_dim=4280,
        decoder_layers=32,
        decoder_retention_heads=10,
    ),
    "retnet_7b": dict(
        decoder_embed_dim=4096,
        decoder_value_embed_dim=6912,
        decoder_ffn_embed_dim=6912,
        decoder_layers=32,
        decoder_retention_heads=16,
    ),
}


def preset_config(preset: str, vocab_size: int, tokenizer=None, **overrides) -> RetNetConfig:
    """A swish-GLU `RetNetConfig` of the preset's shape; `tokenizer` (if given) supplies the special token ids."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    special = {}
    if tokenizer is not None:
        special = dict(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return RetNetConfig(vocab_size=vocab_size, activation_fn="swish", **{**special, **PRESETS[preset], **overrides})
