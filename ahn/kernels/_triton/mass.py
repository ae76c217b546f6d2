"""Each key's received attention mass in Triton: the second pass over a block's keys, from the log-sum-exp.

The Triton form of :func:`ahn.kernels.attention_lse.received_mass` (same arguments; its specification is
:func:`ahn.kernels.attention_lse.received_mass_reference`). One program per (tile of BK context keys, batch row,
kv head) holds its keys and, for every tile of BQ queries and every query head h of the kv head, computes

    p = exp(scale q_h k^T - lse_h)   [BQ, BK], 0 where the mask hides the pair
    acc += sum over the queries of p

then writes ``acc / R`` (the mean over the R query heads): a column sum, so each program owns its keys and
nothing is written twice (no atomics). Nothing of size [T, N] exists outside registers. Inference only: the mass
is a salience statistic, read without gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting

# Tiles and warps by the padded head size BD (tl.dot needs at least 16 per side): (BQ, BK, num_warps). Sized by
# compiling for sm_90 without a GPU (triton.compile with GPUTarget("cuda", 90, 32), then cuobjdump -res-usage),
# bf16 and float32 inputs, 2026-12-02: none spills registers. With 64 x 64 tiles and 4 warps, BD = 128 spilled
# (255 registers + 24 bytes of stack in bf16, 528 in float32), so 128 takes 8 warps (177 / 192 registers); BD = 256
# with 8 warps still spilled (32 / 1200 bytes) and takes 32-query tiles (175 / 140 registers). Untuned for speed:
# no autotuning (it cannot run in the interpreter) and no GPU has timed it.
GPU_CONFIGS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 8), 256: (32, 64, 8)}
MAX_HEAD_DIM = 256
# The interpreter runs a few large numpy tiles much faster than many small ones (the tests pass small tiles to
# cover several).
INTERPRET_BLOCK = 128


@triton.jit
def _mass_kernel(
    q, k, mask, lse, out, scale,
    T, NC, D, R, HKV, n_sinks,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sm_b, sm_h, sm_t, sl_b, sl_h,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    o_k = i_k * BK + tl.arange(0, BK)  # context keys (after the sinks)
    o_d = tl.arange(0, BD)
    m_k, m_d = o_k < NC, o_d < D
    # The key tile is loaded transposed, [BD, BK]: the right operand of q k^T as it is, for every query tile.
    p_k = k + i_b.to(tl.int64) * sk_b + i_hk * sk_h + (n_sinks + o_k)[None, :].to(tl.int64) * sk_n + o_d[:, None]
    b_k = tl.load(p_k, mask=m_d[:, None] & m_k[None, :], other=0.0)  # [BD, BK]
    if UPCAST:
        b_k = b_k.to(tl.float32)
    acc = tl.zeros([BK], dtype=tl.float32)
    for i_q in range(0, tl.cdiv(T, BQ)):
        o_q = i_q * BQ + tl.arange(0, BQ)
        m_q = o_q < T
        visible = m_q[:, None] & m_k[None, :]
        if HAS_MASK:
            p_m = mask + i_b.to(tl.int64) * sm_b + i_hk * sm_h + o_q[:, None].to(tl.int64) * sm_t \
                + (n_sinks + o_k)[None, :]
            visible = visible & (tl.load(p_m, mask=visible, other=0) != 0)
        for r in range(0, R):
            h = i_hk * R + r
            p_q = q + i_b.to(tl.int64) * sq_b + h * sq_h + o_q[:, None].to(tl.int64) * sq_t + o_d[None, :]
            b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BQ, BD]
            if UPCAST:
                b_q = b_q.to(tl.float32)
            if IEEE:
                s = tl.dot(b_q, b_k, input_precision="ieee")
            else:
                s = tl.dot(b_q, b_k)
            b_lse = tl.load(lse + i_b.to(tl.int64) * sl_b + h * sl_h + o_q, mask=m_q, other=0.0)
            p = tl.where(visible, tl.exp(s * scale - b_lse[:, None]), 0.0)
            acc += tl.sum(p, 0)
    tl.store(out + i_bh.to(tl.int64) * NC + o_k, acc / R, mask=m_k)


def triton_received_mass(q: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor], lse: torch.Tensor,
                         scale: float, n_sinks: int, tile: Optional[int] = None) -> torch.Tensor:
    """:func:`ahn.kernels.attention_lse.received_mass` in one launch: ``q [B, Hq, T, D]``, ``keys [B, Hkv, N, D]``,
    ``mask [B, T, N]`` / ``[B, Hkv, T, N]`` bool or None, ``lse [B, Hq, T]``; ``tile``: queries and keys per tile (a
    power of two >= 16; default GPU_CONFIGS, INTERPRET_BLOCK in the interpreter). Returns
    ``[B, Hkv, N - n_sinks]`` float32."""
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"the Triton received-mass kernel takes head sizes up to {MAX_HEAD_DIM}, got {D}; "
                         "set AHN_RECEIVED_MASS=torch")
    NC = N - n_sinks
    out = torch.empty(B, Hkv, NC, device=q.device, dtype=torch.float32)
    if NC <= 0 or T == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    lse = lse.float()
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    if mask is not None:
        mask = mask.view(B, 1, T, N) if mask.dim() == 3 else mask
        mask = mask.contiguous().view(torch.uint8)  # bool as bytes: [B, 1 or Hkv, T, N]
        sm = (mask.stride(0), 0 if mask.shape[1] == 1 else mask.stride(1), mask.stride(2))
    else:
        sm = (0, 0, 0)
    interp = interpreting()
    BD = max(16, triton.next_power_of_2(D))
    BQ, BK, num_warps = GPU_CONFIGS[BD]
    if interp:
        BQ = BK = INTERPRET_BLOCK
        num_warps = 1
    if tile:
        BQ = BK = tile
    # bf16 tl.dot gives wrong results in the interpreter: it computes in float32 there.
    upcast = interp or q.dtype == torch.float32
    grid = (triton.cdiv(NC, BK), B * Hkv)
    _mass_kernel[grid](
        q, keys, mask if mask is not None else out, lse, out, float(scale),
        T, NC, D, Hq // Hkv, Hkv, n_sinks,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), *sm,
        lse.stride(0), lse.stride(1),
        BQ=BQ, BK=BK, BD=BD, HAS_MASK=mask is not None, UPCAST=upcast, IEEE=upcast, num_warps=num_warps,
    )
    return out
