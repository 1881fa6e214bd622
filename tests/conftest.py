"""Shared fixtures: tiny RetNet configs and models, built locally (nothing is downloaded)."""

import pytest
import torch

from retnet_hf import RetNetConfig, RetNetForCausalLM


def tiny_config(**overrides) -> RetNetConfig:
    """A RetNet small enough for a test: d 32, dv 48, 2 layers, 2 heads (key head dim 16), vocab 64."""
    fields = dict(
        vocab_size=64,
        decoder_embed_dim=32,
        decoder_value_embed_dim=48,
        decoder_ffn_embed_dim=64,
        decoder_layers=2,
        decoder_retention_heads=2,
        recurrent_chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def tiny_model(dtype=torch.float32, seed=0, **overrides) -> RetNetForCausalLM:
    torch.manual_seed(seed)
    return RetNetForCausalLM(tiny_config(**overrides)).to(dtype).eval()


@torch.no_grad()
def logits_token_by_token(model, ids, cache=None):
    """Feed `ids` [B, T] one token per call through the recurrent cache; the logits of every step, [B, T, V]."""
    steps = []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def model64():
    return tiny_model(torch.float64)


def import_torchscale():
    """torchscale 0.3.0's `(RetNetConfig, RetNetDecoder)` through `retnet_hf.benchmarking.import_torchscale` (a
    stand-in for timm's `drop_path` during the import); skips the calling test module when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("torchscale") is None or importlib.util.find_spec("fairscale") is None:
        pytest.skip("torchscale is not installed (pip install --no-deps torchscale==0.3.0 fairscale==0.4.0)",
                    allow_module_level=True)
    from retnet_hf.benchmarking import import_torchscale as package_import

    return package_import()
