"""Rotation phases at large absolute positions: a float32 model stays at float32 rounding at 100M tokens.

The position of a token is the number of tokens its cache has seen (`RetNetCache.num_tokens`), so a model far into
a long stream is a cache whose counter says so. Rotations are relative, so a sequence gives the same logits at
every start position; the float64 model shows it, and the float32 model must follow it.
"""

import copy

import pytest
import torch

from retnet_hf import RetNetCache
from retnet_hf.model.configuration_retnet import ROTARY_STYLES

from conftest import cache_of, random_ids, relative_difference, tiny_model


@torch.no_grad()
def logits_from(model, ids, start: int) -> torch.Tensor:
    """The logits `[B, T, V]` of `ids` placed at positions start .. start + T - 1: a prefill over more than one
    chunk (chunkwise form), then three one-token steps (recurrent form)."""
    cache = RetNetCache(model.config.decoder_layers)
    cache.num_tokens = start  # the tokens seen before: the position of the first of `ids`
    prefill = model(ids[:, :-3], cache=cache, use_cache=True)
    logits, cache = [prefill.logits], cache_of(prefill)
    for t in range(ids.shape[1] - 3, ids.shape[1]):
        step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(step.logits)
        cache = cache_of(step)
    assert cache.get_seq_length() == start + ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("rotary_style", ROTARY_STYLES)
@pytest.mark.parametrize("start", [10**5, 10**6, 10**8, 10**8 + 12345])
def test_float32_logits_at_large_positions_match_float64(rotary_style, start):
    model32 = tiny_model(rotary_style=rotary_style, recurrent_chunk_size=8)
    model64 = copy.deepcopy(model32).double()  # the same weights and the same angles, in float64
    ids = random_ids(length=15)
    reference = logits_from(model64, ids, start)
    # the float64 reference is itself exact: the same sequence from position 0 gives the same logits
    assert relative_difference(reference, logits_from(model64, ids, 0)) <= 1e-9
    assert relative_difference(logits_from(model32, ids, start).double(), reference) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_phases_are_reduced_into_one_turn(dtype):
    """cos and sin come from phases in [0, 2 pi): at position 1e8 they equal those of the exact phase."""
    rel_pos = tiny_model(dtype).model.retnet_rel_pos
    start = 10**8 + 7
    (cos, sin), _ = rel_pos(torch.tensor([start, start + 1]), dtype)
    assert cos.dtype == sin.dtype == dtype
    exact = torch.tensor([start, start + 1], dtype=torch.float64)[:, None] * rel_pos.angle.double()[None, :]
    torch.testing.assert_close(cos.double(), exact.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), exact.sin(), rtol=0, atol=1e-6)
