"""Retention, RetNet's token mixer, in its three equivalent forms, as pure functions.

All three compute the same thing. For one head with decay ``gamma = exp(log_decay)`` and token weights
``w_m`` (1 for a real token, 0 for padding), inside one document::

    scale_n = sum_{m <= n} gamma^(n-m) w_m
    o_n     = sum_{m <= n} gamma^(n-m) w_m (q_n . k_m) v_m / sqrt(max(scale_n, 1))

This is torchscale's retention with its decay normalisation (each row of the decay matrix divided by the
square root of its sum). torchscale's parallel form also divides each row by its detached absolute sum;
that factor, like every positive factor per (batch, head, position), is removed by the group norm that
follows retention, and it has no recurrent counterpart, so it is left out: the three forms here are then
equal before the group norm, not only after it. ``max(scale_n, 1)`` equals ``scale_n`` at every real token
(the token itself contributes 1) and keeps padding positions finite.

The state after token ``n`` is ``(S_n, scale_n)`` with::

    S_n = sum_{m <= n} gamma^(n-m) w_m k_m^T v_m / sqrt(max(scale_n, 1))        # [Dk, Dv]

so that ``o_n = q_n S_n``; this is torchscale's recurrent state (transposed to key-major).

Every form is called ``form(q, k, v, *, log_decay, initial_state=None, output_final_state=True, valid=None,
resets=None, normalize=True)`` (flash-linear-attention's names; the chunkwise form also takes ``chunk_size``).
Shapes: ``q``, ``k`` are ``[B, H, T, Dk]``, ``v`` is ``[B, H, T, Dv]``, ``log_decay`` is ``[H]``; a state is
``(S [B, H, Dk, Dv], scale [B, H])``. Optional ``valid`` ``[B, T]`` (bool) marks real tokens; optional
``resets`` ``[B, T]`` (bool) marks the first token of a document: the state before it is discarded, so
documents packed in one row do not see each other. Every form returns ``(o [B, H, T, Dv], state)``.
Computation runs in float32 at least (float64 stays float64), so half-precision inputs cannot overflow.
With ``normalize=False`` the outputs are not divided by ``sqrt(max(scale_n, 1))`` (flash-linear-attention's
RetNet); the state keeps the same form either way.
"""

from typing import List, Optional, Tuple

import torch


RetentionState = Tuple[torch.Tensor, torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _unnormalized(state: Optional[RetentionState], batch, heads, dk, dv, dtype, device):
    """The state as ``(sum_m gamma^(n-m) w_m k_m^T v_m, scale)``, zeros when there is none."""
    if state is None:
        return (
            torch.zeros(batch, heads, dk, dv, dtype=dtype, device=device),
            torch.zeros(batch, heads, dtype=dtype, device=device),
        )
    s, scale = state
    s, scale = s.to(dtype), scale.to(dtype)
    return s * scale.clamp(min=1).sqrt()[..., None, None], scale


def _normalized(s_raw: torch.Tensor, scale: torch.Tensor) -> RetentionState:
    return s_raw / scale.clamp(min=1).sqrt()[..., None, None], scale


def decay_matrix(log_decay: torch.Tensor, length: int) -> torch.Tensor:
    """``D[h, n, m] = gamma_h^(n-m)`` for ``m <= n``, else 0. Shape ``[H, T, T]``."""
    index = torch.arange(length, device=log_decay.device)
    distance = index[:, None] - index[None, :]
    exponent = distance.to(log_decay.dtype)[None] * log_decay[:, None, None]
    return torch.exp(exponent.masked_fill(distance[None] < 0, float("-inf")))


def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor,
    initial_state: Optional[RetentionState] = None,
    output_final_state: bool = True,
    valid: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """All positions at once, with a ``[T, T]`` decay matrix per head::

        O = ((Q K^T) * D) V  +  gamma^(n+1) Q S_0'      then each row divided by sqrt(max(scale_n, 1))

    where ``D[n, m] = gamma^(n-m) w_m [m <= n, same document]`` and ``S_0'`` is the incoming state
    unnormalised (it reaches only the tokens before the first reset). Cost O(T^2) time and memory.
    ``output_final_state=False`` skips the final state (returns None in its place), which training does not need.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q.dtype)
    q, k, v, log_decay = q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype)

    mask = decay_matrix(log_decay, length)[None]  # [1, H, T, T]
    if resets is not None:
        document = resets.long().cumsum(-1)  # [B, T]
        mask = mask * (document[:, :, None] == document[:, None, :])[:, None].to(dtype)
    if valid is not None:
        mask = mask * valid[:, None, None, :].to(dtype)

    out = (q @ k.transpose(-1, -2) * mask) @ v
    scale = mask.sum(-1).expand(batch, heads, length)  # [B, H, T]

    s_raw, scale_in = _unnormalized(initial_state, batch, heads, dk, dv, dtype, q.device)
    position = torch.arange(1, length + 1, device=q.device, dtype=dtype)
    carry = torch.exp(log_decay[:, None] * position)[None].expand(batch, heads, length)  # gamma^(n+1)
    if resets is not None:
        carry = carry * (document == 0)[:, None, :].to(dtype)
    out = out + carry[..., None] * (q @ s_raw)
    scale = scale + carry * scale_in[..., None]
    if normalize:
        out = out / scale.clamp(min=1).sqrt()[..., None]

    if not output_final_state:
        return out, None
    last_row = mask[:, :, -1, :].expand(batch, heads, length)  # weight of every token in the final state
    s_raw = (k * last_row[..., None]).transpose(-1, -2) @ v + carry[..., -1, None, None] * s_raw
    return out, _normalized(s_raw, scale[..., -1])


def chunkwise_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor,
    chunk_size: int,
    initial_state: Optional[RetentionState] = None,
    output_final_state: bool = True,
    valid: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """The parallel form inside chunks of ``chunk_size`` tokens, the state carried across chunks::

        O[c] = ((Q[c] K[c]^T) * D) V[c]  +  gamma^(i+1) Q[c] S'_{c-1}      (row i of chunk c)
        S'_c = gamma^C S'_{c-1} + K[c]^T (gamma^(C-1-j) V[c])              (unnormalised states, S'_{-1} = S_0')

    then each row divided by sqrt(max(scale_n, 1)). All chunks are computed at once (batched matrix products);
    only the ``[B, H, Dk, Dv]`` states are carried in a loop over chunks. Exact for any length: the tokens after
    the last whole chunk are one more, shorter chunk. Cost per head O(T * (chunk_size * (Dk + Dv) + Dk * Dv))
    time and O(T * chunk_size) memory.
    """
    length = q.shape[2]
    size = min(chunk_size, length)
    whole = length - length % size
    if whole == length:
        return _chunks(q, k, v, log_decay, size, initial_state, output_final_state, valid, resets, normalize)
    # split, not slicing: the backward of a slice writes into a zero tensor of the full length
    sizes = [whole, length - whole]
    (q0, q1), (k0, k1), (v0, v1) = (x.split(sizes, dim=2) for x in (q, k, v))
    (valid0, valid1), (resets0, resets1) = (
        (None, None) if x is None else x.split(sizes, dim=1) for x in (valid, resets)
    )
    head, state = _chunks(q0, k0, v0, log_decay, size, initial_state, True, valid0, resets0, normalize)
    tail, state = _chunks(q1, k1, v1, log_decay, sizes[1], state, output_final_state, valid1, resets1, normalize)
    return torch.cat((head, tail), dim=2), state


def _chunks(q, k, v, log_decay, size, initial_state, output_final_state, valid, resets, normalize):
    """`chunkwise_retention` of ``q``, ``k`` ``[B, H, N * C, Dk]``, ``v`` ``[B, H, N * C, Dv]``, with
    ``C = size``: the output ``[B, H, N * C, Dv]`` and the final state (None unless ``output_final_state``)."""
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    chunks = length // size
    dtype = _compute_dtype(q.dtype)
    log_decay = log_decay.to(dtype)
    q, k, v = (x.to(dtype).unflatten(2, (chunks, size)) for x in (q, k, v))  # [B, H, N, C, D]

    decay = decay_matrix(log_decay, size)[None, :, None]  # [1, H, 1, C, C]: gamma^(i-j), j <= i
    position = torch.arange(1, size + 1, device=q.device, dtype=dtype)
    incoming = torch.exp(log_decay[:, None] * position)[None, :, None]  # [1, H, 1, C]: gamma^(i+1)
    mask = decay
    if valid is not None:  # a padding token's key is 0: it adds nothing to scores, states or scales
        weight = valid.reshape(batch, 1, chunks, size).to(dtype)
        k = k * weight[..., None]
    if resets is not None:
        document = resets.reshape(batch, chunks, size).long().cumsum(-1)[:, None]  # [B, 1, N, C], 0 until a reset
        mask = mask * (document[..., :, None] == document[..., None, :]).to(dtype)
        incoming = incoming * (document == 0).to(dtype)
    last = mask[..., -1, :]  # [*, H, *, C]: the weight of each token in the chunk's final state
    if valid is None:
        local_scale, last_scale = mask.sum(-1), last.sum(-1)
    else:
        local_scale, last_scale = (mask @ weight[..., None])[..., 0], (last * weight).sum(-1)

    # the unnormalised state and scale before each chunk, and after the last
    s, scale_in = _unnormalized(initial_state, batch, heads, dk, dv, dtype, q.device)
    need_states = initial_state is not None or chunks > 1
    if need_states or output_final_state:
        carry = incoming[..., -1].expand(batch, heads, chunks)  # gamma^C, 0 after a reset
        contribution = (k * last[..., None]).transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]
        last_scale = last_scale.expand(batch, heads, chunks)
        states, scales = [], []
        # unbind, not indexing: the backward of an index writes into a zero tensor of all chunks, once per chunk
        for decay_c, s_c, scale_c in zip(carry.unbind(-1), contribution.unbind(2), last_scale.unbind(-1)):
            states.append(s)
            scales.append(scale_in)
            s = decay_c[..., None, None] * s + s_c
            scale_in = decay_c * scale_in + scale_c
        before = torch.stack(scales, dim=2)  # [B, H, N]
    else:
        before = torch.zeros(batch, heads, chunks, dtype=dtype, device=q.device)
    scale = local_scale + incoming * before[..., None]  # [B, H, N, C]
    if normalize:
        row = scale.clamp(min=1).rsqrt()[..., None]
        q_in = q * row
    else:
        q_in = q
    out = (q_in @ k.transpose(-1, -2) * mask) @ v
    if need_states:
        q_carry, before_states = (q_in * incoming[..., None]).flatten(0, 2), torch.stack(states, dim=2).flatten(0, 2)
        out = torch.baddbmm(out.flatten(0, 2), q_carry, before_states).view(out.shape)  # + gamma^(i+1) q S'_{c-1}
    out = out.flatten(2, 3)
    if not output_final_state:
        return out, None
    return out, _normalized(s, scale_in)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _recurrent_token(q, k, v, s, scale, keep, weight, in_place):
    """One token of the recurrence: `q`, `k` `[B, H, 1, Dk]`, `v` `[B, H, 1, Dv]`, the state `s` `[B, H, Dk, Dv]`
    and `scale` `[B, H]`, `keep` (gamma, 0 at a reset) `[H]` or `[B, H]`, `weight` `[B, 1]` (None: the token is
    real in every row) -> `(o [B, H, 1, Dv], s, scale, sqrt(max(scale, 1)))`. Every tensor is in the compute dtype;
    `s` is updated in place when `in_place`. The decoding step is one call of this per layer: a dozen small kernels
    and three passes over the state (decay, rank-1 update, `q_n S_n`), the last two from the cache when a layer's
    state fits in it."""
    batch, heads = q.shape[:2]
    if weight is None:  # scale_n >= 1: the token itself weighs 1
        new_scale = scale * keep + 1.0
        new_root = new_scale.sqrt()
    else:
        new_scale = scale * keep + weight
        new_root = new_scale.clamp(min=1).sqrt()
    carry = (scale.clamp(min=1).sqrt() * keep / new_root).view(batch, heads, 1, 1)
    k = k / new_root.view(batch, heads, 1, 1) if weight is None else k * (weight / new_root).view(batch, heads, 1, 1)
    s = s.mul_(carry).addcmul_(k.mT, v) if in_place else torch.addcmul(s * carry, k.mT, v)
    return q @ s, s, new_scale, new_root


def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor,
    initial_state: Optional[RetentionState] = None,
    output_final_state: bool = True,
    valid: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """One token at a time, torchscale's recurrence::

        scale_n = gamma scale_{n-1} + w_n
        S_n     = (gamma sqrt(max(scale_{n-1}, 1)) S_{n-1} + w_n k_n^T v_n) / sqrt(max(scale_n, 1))
        o_n     = q_n S_n

    (``gamma`` is 0 at a reset). Cost O(1) per token: this is the decoding step. When autograd is off, the state
    is updated in place (the incoming one itself if it already has the compute dtype and is contiguous: no copy
    of it per token), and the state returned is ready to be passed to the next call.
    """
    batch, heads, length, dk = q.shape
    dtype = _compute_dtype(q.dtype)
    q, k, v = _as(q, dtype), _as(k, dtype), _as(v, dtype)
    gamma = _as(log_decay, dtype).exp()  # [H]
    if initial_state is None:
        s = q.new_zeros(batch, heads, dk, v.shape[-1])
        scale = q.new_zeros(batch, heads)
    else:
        s, scale = _as(initial_state[0], dtype), _as(initial_state[1], dtype)
    in_place = not torch.is_grad_enabled() and s.is_contiguous()

    outputs = []
    for t in range(length):
        keep = gamma if resets is None else gamma * (~resets[:, t, None]).to(dtype)
        weight = None if valid is None else valid[:, t, None].to(dtype)
        token = (q, k, v) if length == 1 else (x[:, :, t : t + 1] for x in (q, k, v))
        out, s, scale, root = _recurrent_token(*token, s, scale, keep, weight, in_place)
        outputs.append(out if normalize else out * root.view(batch, heads, 1, 1))
        in_place = not torch.is_grad_enabled()  # s is now this function's own tensor
    out = outputs[0] if length == 1 else torch.cat(outputs, dim=2)
    return out, ((s, scale) if output_final_state else None)


def states_after_tokens(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor,
    keep: int,
    initial_state: Optional[RetentionState] = None,
    valid: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
) -> List[RetentionState]:
    """The states after each of the last ``keep`` tokens of ``k``, ``v`` (``1 <= keep <= T``), all at once::

        S'_n = sum_{m <= n} D[n, m] k_m^T v_m  +  gamma^(n+1) S'_0        (unnormalised, rows n of the last keep)

    with ``D`` the parallel form's decay matrix (padding and document boundaries included) and ``S'_0`` the
    incoming state unnormalised (up to the first reset), each then normalised by its scale. A cache that may roll
    back to one of them (assisted decoding's rejected draft tokens) records them. Cost per head
    O(keep * T * Dk * Dv)."""
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(k.dtype)
    k, v, log_decay = k.to(dtype), v.to(dtype), log_decay.to(dtype)
    rows = decay_matrix(log_decay, length)[None, :, -keep:, :]  # [1, H, keep, T]
    position = torch.arange(length - keep + 1, length + 1, device=k.device, dtype=dtype)
    carry = torch.exp(log_decay[:, None] * position)[None].expand(batch, heads, keep)  # gamma^(n+1)
    if resets is not None:
        document = resets.long().cumsum(-1)  # [B, T]
        rows = rows * (document[:, -keep:, None] == document[:, None, :])[:, None].to(dtype)
        carry = carry * (document[:, -keep:] == 0)[:, None, :].to(dtype)
    if valid is not None:
        rows = rows * valid[:, None, None, :].to(dtype)
    rows = rows.expand(batch, heads, keep, length)
    s_raw = (rows[..., None] * k[:, :, None]).transpose(-1, -2) @ v[:, :, None]  # [B, H, keep, Dk, Dv]
    scale = rows.sum(-1)  # [B, H, keep]
    s0, scale0 = _unnormalized(initial_state, batch, heads, dk, dv, dtype, k.device)
    s_raw = s_raw + carry[..., None, None] * s0[:, :, None]
    scale = scale + carry * scale0[..., None]
    return [_normalized(s_raw[:, :, i], scale[:, :, i]) for i in range(keep)]


# The three forms by name (`RetNetConfig.retention_form`); they share one keyword-only signature, the chunkwise
# form's `chunk_size` aside.
RETENTION_FUNCTIONS = {
    "parallel": parallel_retention,
    "chunkwise": chunkwise_retention,
    "recurrent": recurrent_retention,
}
