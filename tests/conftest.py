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


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def model64():
    return tiny_model(torch.float64)


def _timm_drop_path(x, drop_prob=0.0, training=False):
    """timm's stochastic depth: zero whole samples with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def import_torchscale():
    """torchscale 0.3.0's `(RetNetConfig, RetNetDecoder)`, imported with a stand-in for timm's `drop_path`.

    torchscale imports `timm.models.layers.drop_path` (stochastic depth only); timm does not import next to the
    CPU torch wheel, so a stand-in is put into `sys.modules` during the import and taken out again afterwards
    (as test_torchscale.py does). Skips the calling test module when torchscale is not installed.
    """
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchscale") is None or importlib.util.find_spec("fairscale") is None:
        pytest.skip("torchscale is not installed (pip install --no-deps torchscale==0.3.0 fairscale==0.4.0)",
                    allow_module_level=True)
    names = ("timm", "timm.models", "timm.models.layers")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    stubbed = "timm.models.layers" not in sys.modules
    if stubbed:
        timm, models, layers = (types.ModuleType(name) for name in names)
        layers.drop_path = _timm_drop_path
        timm.models, models.layers = models, layers
        sys.modules.update(dict(zip(names, (timm, models, layers))))
    try:
        from torchscale.architecture.config import RetNetConfig as TorchscaleConfig
        from torchscale.architecture.retnet import RetNetDecoder
    finally:
        if stubbed:
            for name in names:
                sys.modules.pop(name, None)
            sys.modules.update(saved)
    return TorchscaleConfig, RetNetDecoder
