"""The three retention forms against each other and against a direct evaluation of the defining sum."""

from functools import partial

import pytest
import torch

from retnet_hf.model.retention import chunkwise_retention, parallel_retention, recurrent_retention


def random_inputs(dtype, batch=2, heads=3, length=37, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dk, generator=g, dtype=dtype)
    k = torch.randn(batch, heads, length, dk, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, length, dv, generator=g, dtype=dtype)
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))).to(dtype)
    valid = torch.rand(batch, length, generator=g) > 0.2
    resets = torch.rand(batch, length, generator=g) > 0.9
    return q, k, v, log_decay, valid, resets


def direct_sum(q, k, v, log_decay, valid=None, resets=None):
    """o_n = sum_{m<=n, same document} gamma^(n-m) w_m (q_n.k_m) v_m / sqrt(max(scale_n, 1)), term by term."""
    batch, heads, length, _ = q.shape
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        start = 0
        for n in range(length):
            if resets is not None and resets[b, n]:
                start = n
            for h in range(heads):
                gamma = log_decay[h].double().exp()
                acc = torch.zeros(v.shape[-1], dtype=torch.float64)
                scale = torch.zeros((), dtype=torch.float64)
                for m in range(start, n + 1):
                    w = 1.0 if valid is None else float(valid[b, m])
                    acc += gamma ** (n - m) * w * (q[b, h, n].double() @ k[b, h, m].double()) * v[b, h, m].double()
                    scale += gamma ** (n - m) * w
                out[b, h, n] = acc / scale.clamp(min=1).sqrt()
    return out


MASKS = ["none", "padding", "documents", "both"]


def select(mask_kind, valid, resets):
    return {
        "none": {},
        "padding": {"valid": valid},
        "documents": {"resets": resets},
        "both": {"valid": valid, "resets": resets},
    }[mask_kind]


@pytest.mark.parametrize("mask_kind", MASKS)
def test_parallel_matches_the_defining_sum(mask_kind):
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=13)
    masks = select(mask_kind, valid, resets)
    out, _ = parallel_retention(q, k, v, log_decay=log_decay, **masks)
    torch.testing.assert_close(out, direct_sum(q, k, v, log_decay, **masks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 37, 64])
def test_chunkwise_equals_parallel_float64(mask_kind, chunk_size):
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64)
    masks = select(mask_kind, valid, resets)
    ref, (ref_s, ref_scale) = parallel_retention(q, k, v, log_decay=log_decay, **masks)
    out, (s, scale) = chunkwise_retention(q, k, v, log_decay=log_decay, chunk_size=chunk_size, **masks)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_recurrent_equals_parallel_float64(mask_kind):
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64)
    masks = select(mask_kind, valid, resets)
    ref, (ref_s, ref_scale) = parallel_retention(q, k, v, log_decay=log_decay, **masks)
    out, (s, scale) = recurrent_retention(q, k, v, log_decay=log_decay, **masks)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [3, 16])
def test_forms_agree_in_float32(chunk_size):
    q, k, v, log_decay, valid, resets = random_inputs(torch.float32, length=50)
    ref, _ = parallel_retention(
        q.double(), k.double(), v.double(), log_decay=log_decay.double(), valid=valid, resets=resets
    )
    for out, _ in (
        parallel_retention(q, k, v, log_decay=log_decay, valid=valid, resets=resets),
        chunkwise_retention(q, k, v, log_decay=log_decay, chunk_size=chunk_size, valid=valid, resets=resets),
        recurrent_retention(q, k, v, log_decay=log_decay, valid=valid, resets=resets),
    ):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


FORMS = {
    "parallel": parallel_retention,
    "chunkwise": partial(chunkwise_retention, chunk_size=4),
    "recurrent": recurrent_retention,
}


@pytest.mark.parametrize("first", list(FORMS))
@pytest.mark.parametrize("second", list(FORMS))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_state_hands_over_between_forms(first, second, mask_kind):
    """Process a prefix in one form and continue from its state in another: same as one pass."""
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=23)
    masks = select(mask_kind, valid, resets)
    ref, (ref_s, ref_scale) = parallel_retention(q, k, v, log_decay=log_decay, **masks)
    split = 10
    head = {name: m[:, :split] for name, m in masks.items()}
    tail = {name: m[:, split:] for name, m in masks.items()}
    out1, state = FORMS[first](q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay=log_decay, **head)
    out2, (s, scale) = FORMS[second](
        q[:, :, split:], k[:, :, split:], v[:, :, split:], log_decay=log_decay, initial_state=state, **tail
    )
    torch.testing.assert_close(torch.cat([out1, out2], dim=2), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=1e-12)


def test_state_is_the_closed_form():
    """S_L = sum_t gamma^(L-1-t) k_t^T v_t / sqrt(scale_L), scale_L = sum_{i<L} gamma^i (retention.py)."""
    q, k, v, log_decay, _, _ = random_inputs(torch.float64, length=12)
    _, (s, scale) = parallel_retention(q, k, v, log_decay=log_decay)
    length = q.shape[2]
    gamma = log_decay.exp()
    powers = gamma[:, None] ** torch.arange(length - 1, -1, -1, dtype=torch.float64)  # [H, T]
    expected_scale = powers.sum(-1)
    expected_s = torch.einsum("ht,bhtk,bhtv->bhkv", powers, k, v) / expected_scale.sqrt()[None, :, None, None]
    torch.testing.assert_close(scale, expected_scale.expand_as(scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, expected_s, rtol=1e-12, atol=1e-12)


def test_padding_contributes_nothing():
    """Left padding with any content gives the same outputs at real tokens and the same final state."""
    q, k, v, log_decay, _, _ = random_inputs(torch.float64, batch=1, length=15)
    pad = 4
    noise = [torch.randn(1, q.shape[1], pad, x.shape[-1], dtype=torch.float64) * 100 for x in (q, k, v)]
    padded = [torch.cat([n, x], dim=2) for n, x in zip(noise, (q, k, v))]
    valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 15, dtype=torch.bool)], dim=1)
    ref, (ref_s, _) = parallel_retention(q, k, v, log_decay=log_decay)
    for form in FORMS.values():
        out, (s, _) = form(*padded, log_decay=log_decay, valid=valid)
        torch.testing.assert_close(out[:, :, pad:], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(out).all()


def test_half_precision_inputs_compute_in_float32():
    q, k, v, log_decay, _, _ = random_inputs(torch.float32, length=40)
    out, (s, scale) = chunkwise_retention(
        (q * 300).half(), (k * 300).half(), (v * 300).half(), log_decay=log_decay, chunk_size=16
    )
    assert out.dtype == s.dtype == scale.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("mask_kind", MASKS)
def test_unnormalized_forms_agree_and_equal_the_plain_sum(mask_kind):
    """normalize=False (flash-linear-attention's RetNet): o_n = sum_m gamma^(n-m) w_m (q_n.k_m) v_m."""
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=21)
    masks = select(mask_kind, valid, resets)
    ref, ref_state = parallel_retention(q, k, v, log_decay=log_decay, normalize=False, **masks)
    normalized, _ = parallel_retention(q, k, v, log_decay=log_decay, **masks)
    scale_sqrt = ref.norm(dim=-1) / normalized.norm(dim=-1).clamp(min=1e-300)
    assert (scale_sqrt[normalized.norm(dim=-1) > 0] >= 1 - 1e-12).all()  # the only difference: a factor >= 1
    for out, state in (
        chunkwise_retention(q, k, v, log_decay=log_decay, chunk_size=4, normalize=False, **masks),
        recurrent_retention(q, k, v, log_decay=log_decay, normalize=False, **masks),
    ):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state[0], ref_state[0], rtol=1e-12, atol=1e-12)
    # against the defining sum: undo the normalisation of the direct evaluation
    direct = direct_sum(q, k, v, log_decay, **masks)
    torch.testing.assert_close(
        ref / ref.norm(dim=-1, keepdim=True).clamp(min=1e-300),
        direct / direct.norm(dim=-1, keepdim=True).clamp(min=1e-300),
        rtol=1e-10,
        atol=1e-10,
    )


def test_skipping_the_state_changes_nothing_else():
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=29)
    ref, _ = parallel_retention(q, k, v, log_decay=log_decay, valid=valid, resets=resets)
    out, state = parallel_retention(q, k, v, log_decay=log_decay, valid=valid, resets=resets, output_final_state=False)
    assert state is None
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out, state = chunkwise_retention(
        q, k, v, log_decay=log_decay, chunk_size=8, valid=valid, resets=resets, output_final_state=False
    )
    assert state is None
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_gradients_agree_across_forms_float64(mask_kind):
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=23)
    masks = select(mask_kind, valid, resets)
    incoming = parallel_retention(q[:, :, :5], k[:, :, :5], v[:, :, :5], log_decay=log_decay)[1]
    probe = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    forms = {**FORMS, "chunkwise": partial(chunkwise_retention, chunk_size=7)}
    grads = {}
    for name, form in forms.items():
        inputs = [x.clone().requires_grad_() for x in (q, k, v, *incoming)]
        out, (s, scale) = form(*inputs[:3], log_decay=log_decay, initial_state=tuple(inputs[3:]), **masks)
        ((out * probe).sum() + s.square().sum() + scale.sum()).backward()
        grads[name] = [x.grad for x in inputs]
    for name in ("chunkwise", "recurrent"):
        for got, expected in zip(grads[name], grads["parallel"]):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_chunkwise_gradient_matches_finite_differences():
    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, batch=1, heads=2, length=9, dk=3, dv=2)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunkwise_retention(q, k, v, log_decay=log_decay, chunk_size=4, valid=valid, resets=resets)[0],
        inputs,
    )


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("keep", [1, 5, 13])
def test_states_after_tokens_equal_the_recurrence_token_by_token(mask_kind, with_state, keep):
    """The states a recording cache keeps (after each of the last `keep` tokens, computed at once) are those the
    recurrent form reaches token by token, padding, document starts and an incoming state included."""
    from retnet_hf.model.retention import states_after_tokens

    q, k, v, log_decay, valid, resets = random_inputs(torch.float64, length=13)
    masks = select(mask_kind, valid, resets)
    state = None
    if with_state:
        _, state = parallel_retention(*random_inputs(torch.float64, length=6, seed=1)[:3], log_decay=log_decay)
    expected, running = [], state
    for t in range(13):
        step = {name: mask[:, t : t + 1] for name, mask in masks.items()}
        _, running = recurrent_retention(
            q[:, :, t : t + 1],
            k[:, :, t : t + 1],
            v[:, :, t : t + 1],
            log_decay=log_decay,
            initial_state=running,
            **step,
        )
        expected.append(tuple(x.clone() for x in running))
    got = states_after_tokens(k, v, log_decay=log_decay, keep=keep, initial_state=state, **masks)
    assert len(got) == keep
    for (s, scale), (s_ref, scale_ref) in zip(got, expected[-keep:]):
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-12, atol=1e-12)
