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

from typing import Optional, Tuple

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
    decay: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """All positions at once, with a ``[T, T]`` decay matrix per head::

        O = ((Q K^T) * D) V  +  gamma^(n+1) Q S_0'      then each row divided by sqrt(max(scale_n, 1))

    where ``D[n, m] = gamma^(n-m) w_m [m <= n, same document]`` and ``S_0'`` is the incoming state
    unnormalised (it reaches only the tokens before the first reset). Cost O(T^2) time and memory.
    ``output_final_state=False`` skips the final state (returns None in its place), which training does not need;
    ``decay`` may pass ``decay_matrix(log_decay, n)`` for some ``n >= T``, computed once for many calls.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q.dtype)
    q, k, v, log_decay = q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype)

    decay = decay_matrix(log_decay, length) if decay is None else decay[:, :length, :length].to(dtype)
    mask = decay[None]  # [1, H, T, T]
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

        O[c] = parallel_retention(Q[c], K[c], V[c], state_{c-1});   state_c = its final state

    Exact for any length (the last chunk may be shorter). Cost O(T * chunk_size) time and memory.
    """
    length = q.shape[2]
    decay = decay_matrix(log_decay.to(_compute_dtype(q.dtype)), min(chunk_size, length))
    # split, not slicing: the backward of a slice writes into a zero tensor of the full length, once per chunk
    q, k, v = (x.split(chunk_size, dim=2) for x in (q, k, v))
    valid, resets = ([None] * len(q) if x is None else x.split(chunk_size, dim=1) for x in (valid, resets))
    outputs, state = [], initial_state
    for index in range(len(q)):
        out, state = parallel_retention(
            q[index],
            k[index],
            v[index],
            log_decay=log_decay,
            initial_state=state,
            output_final_state=output_final_state or index < len(q) - 1,
            valid=valid[index],
            resets=resets[index],
            normalize=normalize,
            decay=decay,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=2), state


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

    (``gamma`` is 0 at a reset). Cost O(1) per token: this is the decoding step. When autograd is off and the
    incoming state already has the compute dtype, the state is updated in place (no copy of it per token).
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q.dtype)
    q, k, v, log_decay = q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype)
    gamma = log_decay.exp()[None, :].expand(batch, heads)
    if initial_state is None:
        s = torch.zeros(batch * heads, dk, dv, dtype=dtype, device=q.device)
        scale = torch.zeros(batch, heads, dtype=dtype, device=q.device)
        in_place = not torch.is_grad_enabled()
    else:
        s, scale = initial_state[0].to(dtype).reshape(batch * heads, dk, dv), initial_state[1].to(dtype)
        in_place = not torch.is_grad_enabled() and initial_state[0].dtype == dtype

    root = scale.clamp(min=1).sqrt()
    outputs = []
    for t in range(length):
        keep = gamma if resets is None else gamma * (~resets[:, t, None]).to(dtype)
        weight = 1.0 if valid is None else valid[:, t, None].to(dtype)
        scale = keep * scale + weight
        new_root = scale.clamp(min=1).sqrt()
        carry = (keep * root / new_root).reshape(-1, 1, 1)
        k_t = (k[:, :, t] * (weight / new_root)[..., None]).reshape(-1, dk, 1)
        v_t = v[:, :, t].reshape(-1, 1, dv)
        s = s.mul_(carry).baddbmm_(k_t, v_t) if in_place else torch.baddbmm(s * carry, k_t, v_t)
        out = torch.bmm(q[:, :, t].reshape(-1, 1, dk), s).reshape(batch, heads, dv)
        outputs.append(out if normalize else out * new_root[..., None])
        root = new_root
    state = (s.reshape(batch, heads, dk, dv), scale) if output_final_state else None
    return torch.stack(outputs, dim=2), state


# The three forms by name (`RetNetConfig.retention_form`); they share one keyword-only signature, the chunkwise
# form's `chunk_size` aside.
RETENTION_FUNCTIONS = {
    "parallel": parallel_retention,
    "chunkwise": chunkwise_retention,
    "recurrent": recurrent_retention,
}
