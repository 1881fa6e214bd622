"""The one-token decoding step: its fast path is exact, updates the state in place, stays within an aten-call
budget, and generate() compiles it when given a `compile_config`."""

import collections

import pytest
import torch
from transformers import CompileConfig

from retnet_hf.model.modeling_retnet import rotate, rotate_signed, signed_sin
from retnet_hf.model.retention import parallel_retention, recurrent_retention

from conftest import cache_of, random_ids, tiny_model


def random_step(batch=3, heads=2, dk=4, dv=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, 1, dk, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, heads, 1, dv, generator=generator, dtype=torch.float64)
    state = (
        torch.randn(batch, heads, dk, dv, generator=generator, dtype=torch.float64),
        torch.rand(batch, heads, generator=generator, dtype=torch.float64) * 20,
    )
    log_decay = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float64)))
    return q, k, v, state, log_decay


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_one_token_step_equals_the_parallel_form(normalize, masked):
    q, k, v, state, log_decay = random_step()
    valid = torch.tensor([[True], [False], [True]]) if masked else None
    expected = parallel_retention(q, k, v, log_decay=log_decay, initial_state=state, valid=valid, normalize=normalize)
    got = recurrent_retention(
        q, k, v, log_decay=log_decay, initial_state=tuple(t.clone() for t in state), valid=valid, normalize=normalize
    )
    for a, b in zip((got[0], *got[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_step_updates_the_state_in_place_and_hands_it_on():
    """Without autograd the incoming state itself is the state returned (no copy per token), ready for the next
    call; with autograd the incoming state is left alone and gradients reach it."""
    q, k, v, state, log_decay = random_step()
    incoming = tuple(t.clone() for t in state)
    with torch.no_grad():
        _, (s, scale) = recurrent_retention(q, k, v, log_decay=log_decay, initial_state=incoming)
        assert s is incoming[0] and s.is_contiguous()
        _, (s2, _) = recurrent_retention(q, k, v, log_decay=log_decay, initial_state=(s, scale))
        assert s2 is s
    leaf = state[0].clone().requires_grad_()
    out, (s, _) = recurrent_retention(q, k, v, log_decay=log_decay, initial_state=(leaf, state[1]))
    assert s is not leaf
    (out.sum() + s.sum()).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def reference_rotate(x, cos, sin, style):
    """The rotation written out: partner of (a, b) is (-b, a), by pairs or by halves."""
    if style == "neox":
        first, second = x.chunk(2, dim=-1)
        partner = torch.cat((-second, first), dim=-1)
    else:
        pairs = x.unflatten(-1, (-1, 2))
        partner = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + partner * sin


@pytest.mark.parametrize("style", ["torchscale", "neox"])
def test_rotation_with_the_sign_moved_into_sin(style):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64)
    phase = torch.rand(5, 8, generator=generator, dtype=torch.float64) * 6
    cos, sin = phase.cos(), phase.sin()
    expected = reference_rotate(x, cos, sin, style)
    torch.testing.assert_close(rotate(x, cos, sin, style), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rotate_signed(x, cos, signed_sin(sin, style), style), expected, rtol=1e-14, atol=1e-14)


def aten_calls_per_step(model, batch=1):
    ids = random_ids(batch, 6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        model(token, cache=cache, use_cache=True)
        with torch.profiler.profile() as profile:
            model(token, cache=cache, use_cache=True)
    return collections.Counter(event.name for event in profile.events() if event.name.startswith("aten::"))


def test_a_decode_step_stays_within_its_aten_call_budget():
    """Every aten call (views included) of one decoding step of the float32 model, per layer. The step made about
    310 per layer before the decode path was trimmed (casts, reshapes, dropouts, a loop over one token), about 225
    after; the budget leaves room for small changes, not for a return of the per-layer casts and copies."""
    model = tiny_model(decoder_layers=4)
    calls = aten_calls_per_step(model)
    per_layer = sum(calls.values()) / model.config.decoder_layers
    assert per_layer <= 250, calls.most_common(20)
    assert calls["aten::dropout"] == 0, calls  # nor a stack per layer, only the step's one (its rotation)
    assert calls["aten::stack"] <= 1, calls


def generate_tokens(model, **kwargs):
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the compiled step takes the mask as it is
    return model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0, **kwargs
    )


def test_generate_compiles_the_step_when_given_a_compile_config():
    """On the CPU, transformers compiles nothing unless told; with `compile_config` generate() runs its one-token
    steps through torch.compile of the forward, as one graph (fullgraph), with the same tokens. (The "eager"
    backend traces the graph without generating code, to keep the test short.)"""
    model = tiny_model(torch.float64)
    expected = generate_tokens(model)
    assert not hasattr(model, "_compiled_call")
    torch._dynamo.reset()
    got = generate_tokens(model, compile_config=CompileConfig(backend="eager", fullgraph=True))
    assert hasattr(model, "_compiled_call")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    disabled = tiny_model(torch.float64)
    generate_tokens(disabled, compile_config=CompileConfig(backend="eager"), disable_compile=True)
    assert not hasattr(disabled, "_compiled_call")
