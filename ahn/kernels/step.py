"""The one-token step of the rules in torch ops: the specification of the decode step.

:func:`step_ref` (scalar gates: the gated delta rule, the delta rule, SSD) and :func:`channel_step_ref`
(gates per key / value channel: GDN-2, KDA) decay the state, write the evicted token and read with q.
The recurrent references of the rules are them in a loop, and each rule's ``Rule.step`` is one of them;
:func:`ahn.kernels.dispatch.run_step` runs it with one of three backends sharing its arguments:

* ``"torch"``: these functions as a few batched tensor ops (any device and dtype, autograd);
* ``"cpp"``: one compiled C++ call (``cpu_step.cpp``, loaded by :mod:`.cpu_step`; float32 CPU tensors, no autograd);
* ``"triton"``: one fused launch (``_triton/step.py``; CUDA, or the Triton interpreter; no autograd).

The memory modules' decode (``ahn.memory``) goes through the same dispatcher; its C++ form also computes
the token's write gates and the read-out in the same call.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


def step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H] log decay, or None (no decay)
    beta: Optional[torch.Tensor],  # [B, H] write strength, or None (1)
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
    *,
    delta: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``state <- exp(g) state``; ``u = beta (v - state^T k)`` (delta rules) or ``beta v`` (SSD);
    ``state <- state + k u^T``; ``o = scale state^T q``. Returns ``(o [B, H, V], state [B, H, K, V])``.

    Each k / v head serves H / Hk consecutive query heads (GQA). Written as batched matrix
    products over the B * H states with as few tensor ops as the maths allows: the torch
    backend of the decode step is this function, run once per layer per generated token.
    """
    B, H, K = q.shape
    V = state.shape[-1]
    h = state.reshape(B * H, K, V)
    if k is not None:
        if g is not None:
            h = h * g.reshape(B * H, 1, 1).exp()
        k_t = expand_heads(k, H).reshape(B * H, 1, K)
        u = expand_heads(v, H).reshape(B * H, 1, V)
        if delta:
            u = u - torch.bmm(k_t, h)  # v - h^T k
        if beta is not None:
            u = u * beta.reshape(B * H, 1, 1)
        h = torch.addcmul(h, k_t.transpose(1, 2), u)  # h + k u^T
    o = torch.bmm(q.reshape(B * H, 1, K), h).view(B, H, V) * scale
    return o, h.view(B, H, K, V)


def channel_step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H, K] log decay per key channel
    b: Optional[torch.Tensor],  # [B, H, K] erase gate (or [B, H, 1])
    w: Optional[torch.Tensor],  # [B, H, V] write gate (or [B, H, 1])
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of GDN-2 (KDA: ``b = w = beta``): ``state <- Diag(exp g) state``; ``u = w * v - state^T (b * k)``;
    ``state <- state + k u^T``; ``o = scale state^T q``. Returns ``(o [B, H, V], state [B, H, K, V])``.

    The channel-wise counterpart of :func:`step_ref` (whose decay and strength are one scalar per
    head); each k / v head serves H / Hk consecutive query heads (GQA).
    """
    B, H, K = q.shape
    h = state
    if k is not None:
        k_t, v_t = expand_heads(k, H), expand_heads(v, H)  # [B, H, K], [B, H, V]
        h = h * g.exp().unsqueeze(-1)
        u = v_t * w - torch.einsum("bhk,bhkv->bhv", k_t * b, h)
        h = h + k_t.unsqueeze(-1) * u.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q, h) * scale
    return o, h


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hk, ...]`` -> ``[B, heads, ...]``: k / v head j serves query heads j*R .. j*R+R-1 (GQA, R = heads / Hk)."""
    Hk = x.shape[1]
    return x if Hk == heads else x.index_select(1, _head_index(Hk, heads, x.device))


@functools.lru_cache(maxsize=None)
def _head_index(kv_heads: int, heads: int, device: torch.device) -> torch.Tensor:
    return torch.arange(heads, device=device) // (heads // kv_heads)
