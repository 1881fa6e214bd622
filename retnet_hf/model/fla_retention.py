"""Retention computed by flash-linear-attention's Triton kernels (`pip install flash-linear-attention`): the
`"fla"` backend (`RetNetConfig.retention_backend`).

`FLA_RETENTION_FUNCTIONS` holds the three forms with the signature and result of `retention.py`'s, which stays
the reference: `fla_retention` with one of fla's simple-GLA kernels, whose decay is our per-head ``log_decay``
(``g_gamma``)::

    chunkwise   chunk_simple_gla            prompts and training
    recurrent   fused_recurrent_simple_gla  one-token steps
    parallel    parallel_simple_gla         no state in or out (training)

fla computes the unnormalised form, ``o_n = sum_{m <= n} gamma^(n-m) (q_n . k_m) v_m + gamma^(n+1) q_n S'_0``, with
``S'`` the unnormalised state (our ``S sqrt(max(scale, 1))``), on ``[B, T, H, D]`` tensors, in the values' dtype
with float32 accumulation (so a half-precision model runs its kernels in half precision) and float32 states. The
mapping:

- padding: a padding token's key is zero (it adds nothing), and the decay still runs across it, as in
  `retention.py`;
- documents (``resets``): the rows are laid end to end as one sequence cut at every row start and reset, fla's
  ``cu_seqlens``; each row's first document starts from the row's incoming state, the others from zero;
- the scale ``scale_n = sum_{m <= n} gamma^(n-m) w_m + gamma^(n+1) scale_0``, which normalises the outputs and
  the state: a first call of the same kernel in float32 with ``q = e_0``, ``k = w e_0``, ``v = e_0`` and the state
  ``scale_0 e_0 e_0^T`` (one-hot vectors of 16 elements, the smallest operands of Triton's matrix products on a
  GPU). The outputs are normalised through the queries, ``o_n = (q_n / sqrt(max(scale_n, 1))) S'_n``, so that
  the kernel's half-precision outputs are the normalised ones, not sums of up to ``1 / (1 - gamma)`` terms.

fla is imported when first needed, never at import time: the model files run without it.
"""

import os
from functools import partial
from typing import Callable, Optional, Tuple

import torch

from .retention import RetentionState


SCALE_WIDTH = 16  # the width of the scale call's one-hot q, k, v


_IMPORTED = []  # fla's simple-GLA module (or None) once `fla_kernels` has tried the import


def fla_kernels():
    """fla's `fla.ops.simple_gla` module, or None when flash-linear-attention does not import. (Remembered in a
    list, not with functools.lru_cache, which torch.compile warns of when it traces the model.)"""
    if not _IMPORTED:
        try:
            from fla.ops import simple_gla
        except ImportError:
            simple_gla = None
        _IMPORTED.append(simple_gla)
    return _IMPORTED[0]


def fla_unavailable(hidden_states: torch.Tensor, form: str, stateful: bool) -> Optional[str]:
    """Why fla's kernels cannot compute retention for this input (a sentence), or None when they can.

    hidden_states: the layers' input `[B, T, d]` (its device and dtype are the kernels' inputs').
    form: `"parallel"`, `"chunkwise"` or `"recurrent"`.
    stateful: whether a state goes in or comes out (fla's parallel kernel carries none).
    """
    if not hidden_states.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the model is on {hidden_states.device.type}, and fla's Triton kernels need a CUDA device"
    if fla_kernels() is None:  # (imported only now: fla's import takes seconds)
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"fla's kernels take float32, float16 or bfloat16, and the model is in {hidden_states.dtype}"
    if form == "parallel" and stateful:
        return "fla's parallel kernel takes and returns no state (use retention_form='chunkwise')"
    return None


def _fla_layout(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, D]` -> fla's `[B, T, H, D]`."""
    return x.transpose(1, 2).contiguous()


def _documents(resets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows laid end to end: fla's ``cu_seqlens`` (the start of every document, then the end) and, per row,
    the index of its first and last document."""
    batch, length = resets.shape
    starts = resets.clone()
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat((offsets, offsets.new_tensor([batch * length])))
    first = starts.flatten().long().cumsum(0).view(batch, length)[:, 0] - 1
    last = torch.cat((first[1:], first.new_tensor([len(offsets)]))) - 1
    return cu_seqlens, first, last


def _retention(
    kernel: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: Optional[RetentionState],
    output_final_state: bool,
    valid: Optional[torch.Tensor],
    resets: Optional[torch.Tensor],
    normalize: bool,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """`kernel` (one of fla's simple-GLA functions, called as ``kernel(q, k, v, g_gamma=, scale=, initial_state=,
    output_final_state=, cu_seqlens=)``) on `retention.py`'s inputs and outputs."""
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    if valid is not None:
        k = k * valid[:, None, :, None].to(k.dtype)
    # in the values' dtype, the model's: q and k come rotated in float32 at least
    q, k, v = (_fla_layout(x.to(v.dtype)) for x in (q, k, v))  # [B, T, H, D]
    one_hot = torch.zeros(SCALE_WIDTH, device=q.device)
    one_hot[0] = 1.0
    ones = one_hot.expand(batch, length, heads, SCALE_WIDTH)
    unit = (ones, ones if valid is None else valid.float()[:, :, None, None] * ones, ones)  # the scale call's q, k, v

    if initial_state is None:
        states = None
    else:
        s, scale = (x.float() for x in initial_state)
        root = scale.clamp(min=1).sqrt()[..., None, None]
        scale_state = scale[..., None, None] * (one_hot[:, None] * one_hot)  # [B, H, W, W]
        states = (s * root, scale_state)

    cu_seqlens, last = None, None
    if resets is not None:
        cu_seqlens, first, last = _documents(resets)
        q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        unit = tuple(x.flatten(0, 1)[None] for x in unit)
        if states is not None:  # each row's first document continues the row's state, unless it starts anew
            carried = (~resets[:, 0]).float()[:, None, None, None]
            documents = len(cu_seqlens) - 1
            states = tuple(x.new_zeros(documents, *x.shape[1:]).index_copy(0, first, x * carried) for x in states)

    common = dict(g_gamma=log_decay.float(), scale=1.0, cu_seqlens=cu_seqlens)
    if normalize or output_final_state:
        running, scale_final = kernel(
            *unit, initial_state=None if states is None else states[1], output_final_state=output_final_state, **common
        )
    if normalize:  # o_n / sqrt(max(scale_n, 1)) = (q_n / sqrt(max(scale_n, 1))) S'_n: float16 outputs stay in range
        q = (q * running[..., :1].clamp(min=1).rsqrt()).to(v.dtype)
    out, s_final = kernel(
        q, k, v, initial_state=None if states is None else states[0], output_final_state=output_final_state, **common
    )
    out = out.view(batch, length, heads, dv).transpose(1, 2)  # [B, H, T, Dv]
    if not output_final_state:
        return out, None
    scale_final = scale_final[..., 0, 0]
    if last is not None:
        s_final, scale_final = s_final[last], scale_final[last]
    return out, (s_final / scale_final.clamp(min=1).sqrt()[..., None, None], scale_final)


def _parallel_kernel(q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens):
    """fla's parallel kernel behind the chunk kernel's signature, for inputs with no state in or out."""
    assert initial_state is None and not output_final_state, "fla_unavailable keeps states from the parallel kernel"
    gates = g_gamma.expand(*q.shape[:2], -1)  # [B, T, H]: the same log decay at every token
    return fla_kernels().parallel_simple_gla(q, k, v, g=gates, scale=scale, cu_seqlens=cu_seqlens)[0], None


def fla_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel: str,
    log_decay: torch.Tensor,
    initial_state: Optional[RetentionState] = None,
    output_final_state: bool = True,
    valid: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Tuple[torch.Tensor, Optional[RetentionState]]:
    """Retention by fla's `<kernel>_simple_gla`, with `retention.py`'s arguments and result. `kernel`: `"chunk"`,
    `"fused_recurrent"` or `"parallel"` (no state in or out: `fla_unavailable` keeps such calls from it)."""
    call = _parallel_kernel if kernel == "parallel" else getattr(fla_kernels(), f"{kernel}_simple_gla")
    return _retention(call, q, k, v, log_decay, initial_state, output_final_state, valid, resets, normalize)


# The forms by name, as `retention.RETENTION_FUNCTIONS`, each with `retention.py`'s signature.
FLA_RETENTION_FUNCTIONS = {
    "parallel": partial(fla_retention, kernel="parallel"),
    "chunkwise": partial(fla_retention, kernel="chunk"),  # fla's chunk of 64 tokens
    "recurrent": partial(fla_retention, kernel="fused_recurrent"),  # the decoding step
}
