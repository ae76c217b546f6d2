"""Fused decode step in Triton: decay, write the evicted token, read with q; one launch per layer for a batch.

The ``"triton"`` backend of :func:`ahn.kernels.dispatch.step_unchecked`, with its arguments. One
program per (V block, batch row, query head) holds its [K, BV] slice of the state in registers
and does, in order (see ``ahn/kernels/README.md``):

    h <- exp(g) h                                               (HAS_G)
    u  = beta (v - h^T k)   (delta rules)   or   u = beta v     (SSD; beta = 1 without HAS_BETA)
    h <- h + k u^T
    o  = scale h^T q

with optional L2 normalisation of q and k in the kernel; a masked row (HAS_MASK, mask False)
multiplies k and g by 0 (:func:`ahn.kernels.rule.inert_writes`): it writes nothing and keeps its
state. Grouped k / v heads (GQA) are an index map (query head i reads k / v head i // (H / Hk));
nothing is repeated in memory. A
read-only step (no k / v) only computes o. Inference only: there is no backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..rule import L2NORM_EPS
from . import MAX_STEP_HEAD_DIM
from .chunk import MAX_BLOCK_V, _block, _num_warps


@triton.jit
def _step_kernel(
    q, k, v, g, beta, mask, s_in, s_out, o, scale, eps,
    H, HK, K, V,
    BK: tl.constexpr, BV: tl.constexpr, HAS_KV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr,
    IS_DELTA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, L2NORM: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_bk = i_b * HK + i_h // (H // HK)  # the k / v head serving query head i_h
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = (i_bh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_STATE:
        b_h += tl.load(s_in + p_s, mask=m_s, other=0.0).to(tl.float32)
    qv = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    if L2NORM:
        qv = qv * tl.rsqrt(tl.sum(qv * qv, 0) + eps)
    if HAS_KV:
        kv = tl.load(k + i_bk * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if L2NORM:
            kv = kv * tl.rsqrt(tl.sum(kv * kv, 0) + eps)
        keep = 1.0
        if HAS_MASK:
            keep = tl.load(mask + i_b).to(tl.float32)
            kv = kv * keep
        u = tl.load(v + i_bk * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_G:
            b_h = b_h * tl.exp(tl.load(g + i_bh).to(tl.float32) * keep)
        if IS_DELTA:
            u = u - tl.sum(b_h * kv[:, None], 0)
        if HAS_BETA:
            u = u * tl.load(beta + i_bh).to(tl.float32)
        b_h += kv[:, None] * u[None, :]
        tl.store(s_out + p_s, b_h, mask=m_s)
    ov = tl.sum(b_h * qv[:, None], 0) * scale
    tl.store(o + i_bh * V + o_v, ov.to(o.dtype.element_ty), mask=m_v)


def fused_step(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K] or None (read only)
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H] log decay or None
    beta: Optional[torch.Tensor],  # [B, H] write strength or None (1)
    state: Optional[torch.Tensor],  # [B, H, K, V] or None (zeros)
    mask: Optional[torch.Tensor],  # [B] bool or None (every row writes)
    *,
    scale: float,
    use_qk_l2norm: bool,
    delta: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step in one launch; returns ``(o [B, H, V] in v's dtype (q's when read only), state float32)``.

    The dispatcher (``resolve_step_backend``) checked the device, dtype and head size. A written
    step returns a new state tensor; a read-only step returns ``state`` itself (as float32).
    """
    B, H, K = q.shape
    V = state.shape[-1] if k is None else v.shape[-1]
    assert max(K, V) <= MAX_STEP_HEAD_DIM, "resolve_step_backend refuses larger heads"
    q = q.contiguous()
    if state is not None:
        state = state.float().contiguous()
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype if v is None else v.dtype)
    s_out = state if k is None else torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    HK = H if k is None else k.shape[1]
    BK, BV = _block(K, MAX_STEP_HEAD_DIM), _block(V, MAX_BLOCK_V)
    contiguous = [None if x is None else x.contiguous() for x in (k, v, g, beta, mask)]
    _step_kernel[(triton.cdiv(V, BV), B * H)](
        q, *contiguous, state, s_out, o, scale, L2NORM_EPS, H, HK, K, V,
        BK=BK, BV=BV, HAS_KV=k is not None, HAS_G=g is not None, HAS_BETA=beta is not None, IS_DELTA=delta,
        HAS_MASK=mask is not None, HAS_STATE=state is not None, L2NORM=use_qk_l2norm, num_warps=_num_warps(4),
    )
    return o, s_out
