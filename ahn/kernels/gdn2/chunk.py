"""Chunkwise GDN-2 (and KDA) in plain torch: the CPU path, differentiable by autograd.

One head, one chunk of C tokens with state h0 at its start. G_i = g_1 + ... + g_i is the
in-chunk cumulative log decay, now a vector over the K key channels, and
``Gamma_ij = exp(G_i - G_j)`` (per channel, j <= i). Write the update as
``h_i = Diag(exp g_i) h_{i-1} + k_i u_i^T`` with the pseudo-value
``u_i = w_i * v_i - (Diag(exp g_i) h_{i-1})^T (b_i * k_i)``. Unrolling
``h_{i-1}`` gives a unit lower triangular system (the WY representation):

    (I + A) u = (w * V) - (b * K * exp(G)) h0,    A_ij = sum_c b_ic k_ic k_jc Gamma_ijc   (i > j)
    o_i  = scale ((q_i * exp(G_i))^T h0 + sum_{j <= i} (sum_c q_ic k_jc Gamma_ijc) u_j)
    h_C  = Diag(exp G_C) h0 + sum_j (k_j * exp(G_C - G_j)) u_j^T

The per-channel decay does not factor out of the key products as a scalar one does: the
scores need ``Gamma [C, C, K]``, masked above the diagonal *before* the exp (there
``G_i - G_j >= 0`` can overflow), so every factor is at most 1 whatever the gates. Writing
``exp(G_i) exp(-G_j)`` instead would overflow once a chunk's decay passes ~88 in float32.
The state-independent work (the decay tensor, the triangular solve, the scores) is batched over
a group of chunks whose ``[C, C, K]`` tensors together stay under ``GROUP_ELEMENTS``, so a long
prefill's transient memory is bounded; the default chunk is shorter than the scalar rules' for
the same reason (``CHANNEL_CHUNK_SIZE``).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..chunking import to_chunks


# Chunk length of the channel-wise rules' torch path: each chunk builds a [C, C, K] decay tensor
# (a per-channel decay does not factor out of the key products), so a shorter chunk than the
# scalar rules' 64 keeps that tensor, and the work spent on it (C K per token), small.
CHANNEL_CHUNK_SIZE = 16
# Elements of the [B, H, n, C, C, K] decay tensor built at once: chunks are processed in groups of this
# size (all of a group's state-independent work batched), which bounds the transient memory of a long
# prefill while keeping the per-chunk Python overhead off short sequences (a training batch is one group).
GROUP_ELEMENTS = 1 << 25


def chunk_gdn2(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: torch.Tensor,  # [B, T, H, K] log decay
    b: torch.Tensor,  # [B, T, H, K] erase gate (or [B, T, H, 1], broadcast)
    w: torch.Tensor,  # [B, T, H, V] write gate (or [B, T, H, 1], broadcast)
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
    chunk_size: int = CHANNEL_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    # Padding rows (k = v = g = gates = 0) write nothing and do not decay.
    qc, kc, vc, gc, bc, wc = (to_chunks(x, C) for x in (q * scale, k, v, g, b, w))  # [B, H, N, C, *]
    N = qc.shape[2]
    G = gc.cumsum(-2)  # [B, H, N, C, K]
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    group = max(1, GROUP_ELEMENTS // max(1, B * H * C * C * K))

    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for n0 in range(0, N, group):
        sl = slice(n0, min(N, n0 + group))
        Gn, qn, kn = G[:, :, sl], qc[:, :, sl], kc[:, :, sl]  # [B, H, n, C, K]
        diff = Gn[..., :, None, :] - Gn[..., None, :, :]  # [B, H, n, C, C, K]: G_i - G_j
        gamma = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()  # 0 above the diagonal
        kb = kn * bc[:, :, sl]  # b * k
        # A_ij = sum_c kb_ic k_jc gamma_ijc and scores_ij = sum_c q_ic k_jc gamma_ijc share k_j gamma_ij: one
        # [C, C, K] product, then a batched mat-vec per row i for both.
        kg = gamma * kn[..., None, :, :]  # [B, H, n, C, C, K]
        A, scores = (kg @ torch.stack([kb, qn], dim=-1)).unbind(-1)  # [B, H, n, C, C] each; scores causal
        A = A.masked_fill(~strict, 0.0)
        rhs = torch.cat([vc[:, :, sl] * wc[:, :, sl], kb * Gn.exp()], dim=-1)  # [B, H, n, C, V + K]
        U, W = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)
        q_decay = qn * Gn.exp()  # reads h0 decayed to position i
        G_end = Gn[..., -1, :]  # [B, H, n, K]
        k_decay = kn * (G_end[..., None, :] - Gn).exp()  # k_j decayed to the chunk end
        # The state passing, the only sequential part (unbind, not [:, :, i]: see gated_delta_rule's chunk.py).
        per_chunk = zip(U.unbind(2), W.unbind(2), q_decay.unbind(2), scores.unbind(2), G_end.exp()[..., None].unbind(2),
                        k_decay.transpose(-1, -2).unbind(2))
        for U_i, W_i, q_decay_i, scores_i, decay_i, k_decay_i in per_chunk:
            u = U_i - W_i @ h  # [B, H, C, V]
            outs.append(q_decay_i @ h + scores_i @ u)
            h = h * decay_i + k_decay_i @ u
    o = torch.stack(outs, dim=2)  # [B, H, N, C, V]
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T]
    return o, h
