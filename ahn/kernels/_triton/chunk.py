"""Chunkwise gated delta rule / delta rule / SSD in Triton: forward, backward, varlen, state in and out.

One code path serves the three rules (``IS_DELTA``: delta-rule write through the WY form,
else SSD's plain outer-product write; ``HAS_G``: a per-head log decay). Batches are packed
along time first (``[B, T, ...] -> [B * T, ...]`` with boundaries ``0, T, 2T, ...``), so
B > 1 and ``cu_seqlens`` varlen are the same case. Each sequence is cut into chunks of
``BT`` tokens; a global chunk index enumerates the chunks of all sequences in order.

Kernels (derivation in ahn/kernels/README.md; ``N`` sequences, ``NT`` chunks in all):

* ``_wy_fwd``   grid (NT, H): in-chunk decay, ``T = (I + A)^-1`` by forward substitution,
  ``W = T (beta gamma K)``, ``U = T (beta V)``; delta rules only.
* ``_fwd_h``    grid (V blocks, N * H): the sequential chunk-to-chunk state pass; stores
  each chunk's start state ``h`` and (delta) the pseudo-values ``vn = U - W h``.
* ``_fwd_o``    grid (V blocks, NT, H): ``o = scale (gamma q h + (q k^T * D) vn)``.
* ``_bwd_dh``   grid (V blocks, N * H): the reverse state pass: each chunk's end-state
  gradient ``dh``, ``dvn`` (SSD: that is dv) and ``dh0``.
* ``_bwd_dqkg`` grid (NT, H): everything else of one chunk: dq, dk, dg, and (delta) dv, dbeta.

All accumulation is float32; ``tl.dot`` runs in IEEE float32 for float32 inputs and in
tf32 for half-precision inputs (whose own mantissa is shorter than tf32's).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting

# Largest head size a program holds whole (q / k tiles [BT, BK], state tiles [BK, BV]). At
# K = 256 the state passes need over 300 KB of shared memory on sm_90 (measured as below):
# more than a GPU has per block, so larger heads are refused rather than failing at launch.
MAX_HEAD_DIM = 128
# V is split into blocks of at most this many columns (the state's columns are independent).
MAX_BLOCK_V = 64
# Column blocks by K block: shared memory grows with BK * BV. Measured by compiling for sm_90
# without a GPU (triton.compile with GPUTarget("cuda", 90, 32), BT = 64, bf16 inputs): at
# BK = 128, BV = 64 needs 232 KB in _bwd_dqkg (over an H100's 227 KB per block), BV = 32 at
# most 221 KB. float32 inputs (IEEE tl.dot) need more: 246 KB in _bwd_dh at BK = 128, BV = 32
# with Triton's default 3 pipeline stages, 140 KB with 2 (NUM_STAGES).
BLOCK_V_FOR_BK = {16: 64, 32: 64, 64: 64, 128: 32}
NUM_STAGES = 2
# tl.dot needs every dimension >= 16 on GPUs.
MIN_BLOCK = 16


def _block(n: int, cap: int = MAX_HEAD_DIM) -> int:
    return min(max(MIN_BLOCK, triton.next_power_of_2(n)), cap)


def _num_warps(default: int) -> int:
    return 1 if interpreting() else default


@triton.jit
def _chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """Token rows of global chunk ``i_c``: (row indices [BT] int64, row mask [BT], chunk's sequence)."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rows = bos + i_t * BT + tl.arange(0, BT)
    return rows, rows < eos, i_n


@triton.jit
def _sequence_span(cu_seqlens, chunk_offsets, i_nh, H):
    """Program ``i_nh`` of a sequence-wide state pass: (sequence, head, first row, end row, first chunk)."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return i_n, i_h, bos, eos, tl.load(chunk_offsets + i_n)


@triton.jit
def _load_tile(ptr, rows, m_t, i_h, H, D, cols, m_c):
    """Rows ``rows`` of head ``i_h`` of a [total_T, H, D] tensor, columns ``cols``, as float32 (0 outside)."""
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(p, mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, rows, m_t, i_h, H, D, cols, m_c):
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _load_gate(ptr, rows, m_t, i_h, H):
    return tl.load(ptr + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)


@triton.jit
def _chunk_decay(g, rows, m_t, i_h, H, BT: tl.constexpr, HAS_G: tl.constexpr):
    """In-chunk cumulative log decay G [BT] (padding adds 0) and the causal decay matrix D [BT, BT]."""
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    if HAS_G:
        G = tl.cumsum(_load_gate(g, rows, m_t, i_h, H), 0)
        # Mask before exp: above the diagonal G_i - G_j >= 0 could overflow.
        D = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    else:
        G = tl.zeros([BT], dtype=tl.float32)
        D = tl.where(causal, 1.0, 0.0)
    return G, D


@triton.jit
def _state_ptr(h, i_c, i_h, H, K, V, o_k, o_v):
    """Pointers of the [BK, BV] tile of state ``i_c`` (a chunk or a sequence) of head ``i_h`` in [*, H, K, V]."""
    return h + ((i_c.to(tl.int64) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]


@triton.jit
def _wy_fwd(
    k, v, g, beta, w, u, Tm, cu_seqlens, chunk_indices,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, _ = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    G, D = _chunk_decay(g, rows, m_t, i_h, H, BT, HAS_G)
    b = _load_gate(beta, rows, m_t, i_h, H)
    kt = _load_tile(k, rows, m_t, i_h, H, K, o_k, o_k < K)  # [BT, BK]
    kk = tl.dot(kt, tl.trans(kt), input_precision=PREC)  # [BT, BT]
    A = tl.where(o_i[:, None] > o_i[None, :], b[:, None] * D * kk, 0.0)  # strictly lower
    # T = (I + A)^-1 row by row: T_r = e_r - sum_{j<r} A_rj T_j (rows j < r are final; A_rj = 0 for j >= r).
    Ti = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_r = tl.sum(tl.where(o_i[:, None] == r, A, 0.0), 0)  # row r of A, [BT] over j
        t_r = tl.sum(a_r[:, None] * Ti, 0)  # sum_j A_rj T_j, [BT]
        Ti = tl.where(o_i[:, None] == r, Ti - t_r[None, :], Ti)
    _store_tile(Tm, Ti, rows, m_t, i_h, H, BT, o_i, o_i < BT)
    wt = tl.dot(Ti, kt * (b * tl.exp(G))[:, None], input_precision=PREC)  # [BT, BK]
    _store_tile(w, wt, rows, m_t, i_h, H, K, o_k, o_k < K)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        vt = _load_tile(v, rows, m_t, i_h, H, V, o_v, o_v < V)
        _store_tile(u, tl.dot(Ti, vt * b[:, None], input_precision=PREC), rows, m_t, i_h, H, V, o_v, o_v < V)


@triton.jit
def _fwd_h(
    k, u, w, g, h0, h, vn, ht, cu_seqlens, chunk_offsets,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, IS_DELTA: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, boh = _sequence_span(cu_seqlens, chunk_offsets, tl.program_id(1), H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(_state_ptr(h0, i_n, i_h, H, K, V, o_k, o_v), mask=m_s, other=0.0).to(tl.float32)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        tl.store(_state_ptr(h, boh + i_t, i_h, H, K, V, o_k, o_v), b_h, mask=m_s)
        rows = bos + i_t * BT + tl.arange(0, BT)
        m_t = rows < eos
        kt = _load_tile(k, rows, m_t, i_h, H, K, o_k, m_k)
        ut = _load_tile(u, rows, m_t, i_h, H, V, o_v, m_v)  # U (delta) or v (SSD)
        if IS_DELTA:
            wt = _load_tile(w, rows, m_t, i_h, H, K, o_k, m_k)
            ut = ut - tl.dot(wt, b_h, input_precision=PREC)  # pseudo-values vn = U - W h
            _store_tile(vn, ut, rows, m_t, i_h, H, V, o_v, m_v)
        if HAS_G:
            G = tl.cumsum(_load_gate(g, rows, m_t, i_h, H), 0)
            g_last = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, G, 0.0))  # padding adds 0: the last real G
            b_h = b_h * tl.exp(g_last)
            kt = kt * tl.exp(g_last - G)[:, None]
        b_h += tl.dot(tl.trans(kt), ut, input_precision=PREC)
    if STORE_HT:
        tl.store(_state_ptr(ht, i_n, i_h, H, K, V, o_k, o_v), b_h, mask=m_s)


@triton.jit
def _fwd_o(
    q, k, vn, g, h, o, cu_seqlens, chunk_indices, scale,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, _ = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    G, D = _chunk_decay(g, rows, m_t, i_h, H, BT, HAS_G)
    qt = _load_tile(q, rows, m_t, i_h, H, K, o_k, m_k)
    kt = _load_tile(k, rows, m_t, i_h, H, K, o_k, m_k)
    vt = _load_tile(vn, rows, m_t, i_h, H, V, o_v, m_v)
    b_h = tl.load(_state_ptr(h, i_c, i_h, H, K, V, o_k, o_v), mask=m_k[:, None] & m_v[None, :], other=0.0)
    P = tl.dot(qt, tl.trans(kt), input_precision=PREC) * D  # [BT, BT], causal
    ot = tl.dot(qt, b_h, input_precision=PREC) * tl.exp(G)[:, None] + tl.dot(P, vt, input_precision=PREC)
    _store_tile(o, ot * scale, rows, m_t, i_h, H, V, o_v, m_v)


@triton.jit
def _bwd_dh(
    q, k, w, g, do, dht, dh, dv, dh0, cu_seqlens, chunk_offsets, scale,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, IS_DELTA: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, boh = _sequence_span(cu_seqlens, chunk_offsets, tl.program_id(1), H)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)  # gradient of the state at the current chunk's end
    if HAS_DHT:
        b_dh += tl.load(_state_ptr(dht, i_n, i_h, H, K, V, o_k, o_v), mask=m_s, other=0.0).to(tl.float32)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        tl.store(_state_ptr(dh, boh + i_t, i_h, H, K, V, o_k, o_v), b_dh, mask=m_s)
        rows = bos + i_t * BT + o_i
        m_t = rows < eos
        qt = _load_tile(q, rows, m_t, i_h, H, K, o_k, m_k)
        kt = _load_tile(k, rows, m_t, i_h, H, K, o_k, m_k)
        dot_ = _load_tile(do, rows, m_t, i_h, H, V, o_v, m_v)
        G, D = _chunk_decay(g, rows, m_t, i_h, H, BT, HAS_G)
        g_last = tl.sum(tl.where(o_i == BT - 1, G, 0.0))
        # d vn_j = scale sum_i D_ij (q_i . k_j) do_i + exp(G_C - G_j) dh^T k_j
        kq = tl.dot(kt, tl.trans(qt), input_precision=PREC) * tl.trans(D)  # [BT (j), BT (i)]
        dvt = tl.dot(kq, dot_, input_precision=PREC) * scale
        dvt += tl.dot(kt * tl.exp(g_last - G)[:, None], b_dh, input_precision=PREC)
        _store_tile(dv, dvt, rows, m_t, i_h, H, V, o_v, m_v)
        # d h_start = exp(G_C) dh + scale (gamma q)^T do - W^T d vn
        b_dh = b_dh * tl.exp(g_last) + tl.dot(tl.trans(qt * (tl.exp(G) * scale)[:, None]), dot_, input_precision=PREC)
        if IS_DELTA:
            wt = _load_tile(w, rows, m_t, i_h, H, K, o_k, m_k)
            b_dh -= tl.dot(tl.trans(wt), dvt, input_precision=PREC)
    if STORE_DH0:
        tl.store(_state_ptr(dh0, i_n, i_h, H, K, V, o_k, o_v), b_dh, mask=m_s)


@triton.jit
def _bwd_dqkg(
    q, k, v, g, beta, Tm, h, vn, do, dh, dvn, dq, dk, dv, dg, dbeta, cu_seqlens, chunk_indices, scale,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, IS_DELTA: tl.constexpr,
    PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, _ = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    G, D = _chunk_decay(g, rows, m_t, i_h, H, BT, HAS_G)
    gamma = tl.exp(G)
    g_last = tl.sum(tl.where(o_i == BT - 1, G, 0.0))
    e_c = tl.exp(g_last - G)  # k_j decayed to the chunk end
    qt = _load_tile(q, rows, m_t, i_h, H, K, o_k, m_k)
    kt = _load_tile(k, rows, m_t, i_h, H, K, o_k, m_k)
    if IS_DELTA:
        b = _load_gate(beta, rows, m_t, i_h, H)
        Ti = _load_tile(Tm, rows, m_t, i_h, H, BT, o_i, o_i < BT)  # (I + A)^-1, [BT, BT]
        dW = tl.zeros([BT, BK], dtype=tl.float32)
        dT = tl.zeros([BT, BT], dtype=tl.float32)
        db = tl.zeros([BT], dtype=tl.float32)
    dqt = tl.zeros([BT, BK], dtype=tl.float32)  # sum_v do h^T (scaled by scale gamma after the loop)
    dkt = tl.zeros([BT, BK], dtype=tl.float32)  # sum_v vn dh^T (scaled by e_c after the loop)
    dP = tl.zeros([BT, BT], dtype=tl.float32)  # do vn^T
    dG = tl.zeros([BT], dtype=tl.float32)
    e_acc = tl.zeros([BT], dtype=tl.float32)  # k_j^T dh vn_j
    dg_last = tl.zeros([BK], dtype=tl.float32)  # <dh, h> partial sums (summed after the loop)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_s = m_k[:, None] & m_v[None, :]
        b_h = tl.load(_state_ptr(h, i_c, i_h, H, K, V, o_k, o_v), mask=m_s, other=0.0)  # chunk start state
        b_dh = tl.load(_state_ptr(dh, i_c, i_h, H, K, V, o_k, o_v), mask=m_s, other=0.0)  # chunk end gradient
        vnt = _load_tile(vn, rows, m_t, i_h, H, V, o_v, m_v)
        dot_ = _load_tile(do, rows, m_t, i_h, H, V, o_v, m_v)
        dP += tl.dot(dot_, tl.trans(vnt), input_precision=PREC)
        dqt += tl.dot(dot_, tl.trans(b_h), input_precision=PREC)
        dkt += tl.dot(vnt, tl.trans(b_dh), input_precision=PREC)
        if HAS_G:
            dG += tl.sum(tl.dot(qt, b_h, input_precision=PREC) * dot_, 1)
            e_acc += tl.sum(tl.dot(kt, b_dh, input_precision=PREC) * vnt, 1)
            dg_last += tl.sum(b_h * b_dh, 1)
        if IS_DELTA:
            dvt = _load_tile(dvn, rows, m_t, i_h, H, V, o_v, m_v)
            vt = _load_tile(v, rows, m_t, i_h, H, V, o_v, m_v)
            dW -= tl.dot(dvt, tl.trans(b_h), input_precision=PREC)
            dT += tl.dot(dvt, tl.trans(vt * b[:, None]), input_precision=PREC)
            Tdv = tl.dot(tl.trans(Ti), dvt, input_precision=PREC)
            _store_tile(dv, Tdv * b[:, None], rows, m_t, i_h, H, V, o_v, m_v)
            db += tl.sum(Tdv * vt, 1)
    dqt = dqt * (scale * gamma)[:, None]
    dkt = dkt * e_c[:, None]
    dG = dG * scale * gamma
    # Intra-chunk attention o += (scale q k^T * D) vn.
    dPm = dP * D * scale
    dqt += tl.dot(dPm, kt, input_precision=PREC)
    dkt += tl.dot(tl.trans(dPm), qt, input_precision=PREC)
    if HAS_G:
        R = dPm * tl.dot(qt, tl.trans(kt), input_precision=PREC)
        dG += tl.sum(R, 1) - tl.sum(R, 0)
        e = e_acc * e_c
        dG -= e
        dg_l = tl.sum(dg_last, 0) * tl.exp(g_last) + tl.sum(e, 0)
    if IS_DELTA:
        # W = T (beta gamma K), U = T (beta V) (dU = dvn, handled in the loop).
        TdW = tl.dot(tl.trans(Ti), dW, input_precision=PREC)  # [BT, BK]
        bg = b * gamma
        dT += tl.dot(dW, tl.trans(kt * bg[:, None]), input_precision=PREC)
        dkt += TdW * bg[:, None]
        TdWk = tl.sum(TdW * kt, 1)
        db += TdWk * gamma
        # T = (I + A)^-1: dA = -T^T dT T^T on the strict lower triangle.
        dA = -tl.dot(tl.dot(tl.trans(Ti), dT, input_precision=PREC), tl.trans(Ti), input_precision=PREC)
        dA = tl.where(o_i[:, None] > o_i[None, :], dA, 0.0)
        # A_ij = beta_i D_ij (k_i . k_j)
        kk = tl.dot(kt, tl.trans(kt), input_precision=PREC)
        dKK = dA * b[:, None] * D
        dkt += tl.dot(dKK, kt, input_precision=PREC) + tl.dot(tl.trans(dKK), kt, input_precision=PREC)
        db += tl.sum(dA * D * kk, 1)
        if HAS_G:
            dG += bg * TdWk
            Rg = dKK * kk
            dG += tl.sum(Rg, 1) - tl.sum(Rg, 0)
        tl.store(dbeta + rows * H + i_h, db, mask=m_t)
    if HAS_G:
        dG += tl.where(o_i == BT - 1, dg_l, 0.0)
        # G = cumsum(g): dg_m = sum_{i >= m} dG_i
        dgt = tl.sum(tl.where(o_i[:, None] >= o_i[None, :], dG[:, None], 0.0), 0)
        tl.store(dg + rows * H + i_h, dgt, mask=m_t)
    _store_tile(dq, dqt, rows, m_t, i_h, H, K, o_k, m_k)
    _store_tile(dk, dkt, rows, m_t, i_h, H, K, o_k, m_k)


def _chunk_layout(cu_seqlens: torch.Tensor, BT: int):
    """Per global chunk its (sequence, chunk within it) [NT, 2] int32, and each sequence's first chunk [N + 1]."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_chunks = (lengths + BT - 1) // BT
    chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), n_chunks)
    within = torch.arange(len(seq), device=cu_seqlens.device) - chunk_offsets[seq]
    chunk_indices = torch.stack([seq, within], 1).to(torch.int32).contiguous()
    return chunk_indices, chunk_offsets.to(torch.int32), int(chunk_offsets[-1])


class _Meta:
    """Shapes, block sizes and chunk layout of one call, shared by forward and backward."""

    def __init__(self, q, v, cu_seqlens, chunk_size, is_delta, has_g):
        B, T, H, K = q.shape
        self.shape, self.H, self.K, self.V = (B, T), H, K, v.shape[-1]
        if cu_seqlens is None:
            cu_seqlens = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        self.cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        self.N = self.cu.numel() - 1
        half = q.dtype in (torch.bfloat16, torch.float16) or v.dtype in (torch.bfloat16, torch.float16)
        self.BT, self.BK = chunk_size, _block(self.K)
        self.BV = _block(self.V, BLOCK_V_FOR_BK[self.BK])
        self.chunk_indices, self.chunk_offsets, self.NT = _chunk_layout(self.cu, chunk_size)
        self.is_delta, self.has_g = is_delta, has_g
        self.prec = "tf32" if half and not interpreting() else "ieee"
        self.consts = dict(BT=self.BT, BK=self.BK, BV=self.BV, HAS_G=has_g, PREC=self.prec, num_warps=_num_warps(4),
                           num_stages=NUM_STAGES)

    def n_v(self):
        return triton.cdiv(self.V, self.BV)


def _flat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, T, H, ...] -> [B * T, H, ...] contiguous (time-major packing of the batch)."""
    return None if x is None else x.reshape(-1, *x.shape[2:]).contiguous()


def _forward(m: _Meta, q, k, v, g, beta, scale, h0, store_ht):
    """Runs the forward kernels on flat tensors; returns (o, ht, w, Tm, h, vn) (w / Tm / vn None for SSD)."""
    TT, H, K, V, dev = q.shape[0], m.H, m.K, m.V, q.device
    f32 = dict(device=dev, dtype=torch.float32)
    w = Tm = None
    u = v
    if m.is_delta:
        w, u, Tm = torch.empty(TT, H, K, **f32), torch.empty(TT, H, V, **f32), torch.empty(TT, H, m.BT, **f32)
        _wy_fwd[(m.NT, H)](k, v, g, beta, w, u, Tm, m.cu, m.chunk_indices, H, K, V, **m.consts)
    h = torch.empty(m.NT, H, K, V, **f32)
    vn = torch.empty(TT, H, V, **f32) if m.is_delta else v
    ht = torch.empty(m.N, H, K, V, **f32) if store_ht else None
    _fwd_h[(m.n_v(), m.N * H)](
        k, u, w, g, h0, h, vn, ht, m.cu, m.chunk_offsets, H, K, V,
        IS_DELTA=m.is_delta, HAS_H0=h0 is not None, STORE_HT=store_ht, **m.consts,
    )
    o = torch.empty(TT, H, V, device=dev, dtype=v.dtype)
    _fwd_o[(m.n_v(), m.NT, H)](q, k, vn, g, h, o, m.cu, m.chunk_indices, scale, H, K, V, **m.consts)
    return o, ht, w, Tm, h, vn


class ChunkRuleFunction(torch.autograd.Function):
    """Autograd wrapper: the forward saves only the inputs; the backward recomputes W, U, T and the states."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, output_final_state, cu_seqlens, chunk_size, is_delta):
        m = _Meta(q, v, cu_seqlens, chunk_size, is_delta, g is not None)
        q, k, v, g, beta = (_flat(x) for x in (q, k, v, g, beta))
        h0 = h0.contiguous() if h0 is not None else None
        o, ht, *_ = _forward(m, q, k, v, g, beta, scale, h0, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.m, ctx.scale = m, scale
        B, T = m.shape
        return o.view(B, T, m.H, m.V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        m, scale = ctx.m, ctx.scale
        TT, H, K, V = q.shape[0], m.H, m.K, m.V
        f32 = dict(device=q.device, dtype=torch.float32)
        _, _, w, Tm, h, vn = _forward(m, q, k, v, g, beta, scale, h0, False)
        do = _flat(do)
        dh = torch.empty(m.NT, H, K, V, **f32)
        dvn = torch.empty(TT, H, V, **f32)
        dh0 = torch.empty(m.N, H, K, V, **f32) if h0 is not None else None
        _bwd_dh[(m.n_v(), m.N * H)](
            q, k, w, g, do, dht.contiguous() if dht is not None else None, dh, dvn, dh0, m.cu, m.chunk_offsets,
            scale, H, K, V, IS_DELTA=m.is_delta, HAS_DHT=dht is not None, STORE_DH0=h0 is not None, **m.consts,
        )
        dq, dk = torch.empty(TT, H, K, **f32), torch.empty(TT, H, K, **f32)
        dv = torch.empty(TT, H, V, **f32) if m.is_delta else dvn
        dg = torch.empty(TT, H, **f32) if g is not None else None
        dbeta = torch.empty(TT, H, **f32) if m.is_delta else None
        _bwd_dqkg[(m.NT, H)](
            q, k, v, g, beta, Tm, h, vn, do, dh, dvn, dq, dk, dv, dg, dbeta, m.cu, m.chunk_indices, scale,
            H, K, V, IS_DELTA=m.is_delta, **m.consts,
        )
        B, T = m.shape

        def back(dx, x):  # flat float32 gradient -> the input's shape and dtype
            return None if dx is None else dx.view(B, T, *dx.shape[1:]).to(x.dtype)

        return (
            back(dq, q), back(dk, k), back(dv, v), back(dg, g), back(dbeta, beta),
            dh0.to(h0.dtype) if dh0 is not None else None, None, None, None, None, None,
        )


def chunk_rule(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: Optional[torch.Tensor],  # [B, T, H] log decay, or None (no decay)
    beta: Optional[torch.Tensor],  # [B, T, H] for the delta rules, None for SSD
    *,
    scale: float,
    initial_state: Optional[torch.Tensor],  # [N, H, K, V]
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],  # [N + 1] int, B == 1
    chunk_size: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The Triton chunkwise rule: delta-rule write when ``beta`` is given, else SSD's.

    Inputs may be float32 / bfloat16 / float16 (each tensor its own); returns
    ``(o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32 or None)``.
    Differentiable in q, k, v, g, beta and initial_state.
    """
    K, V = q.shape[-1], v.shape[-1]
    if chunk_size < MIN_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(f"backend='triton' needs chunk_size a power of two >= {MIN_BLOCK}, got {chunk_size}")
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head sizes up to {MAX_HEAD_DIM}, got K = {K}, V = {V}")
    return ChunkRuleFunction.apply(
        q, k, v, g, beta, initial_state, scale, output_final_state, cu_seqlens, chunk_size, beta is not None,
    )
