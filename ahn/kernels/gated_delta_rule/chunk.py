"""Chunkwise gated delta rule in plain torch (the CPU path; differentiable by autograd).

Derivation (one head, one chunk of length C, state h0 at its start). Let G_i be the
cumulative log decay inside the chunk (G_i = g_1 + ... + g_i), gamma_i = exp(G_i) and
Gamma_ij = exp(G_i - G_j) for j <= i. Unrolling the recurrence gives

    h_i = gamma_i h0 + sum_{j <= i} Gamma_ij k_j u_j^T

with "pseudo-values" u_i = beta_i (v_i - exp(g_i) h_{i-1}^T k_i). Substituting h_{i-1}:

    u_i + beta_i sum_{j < i} Gamma_ij (k_i . k_j) u_j = beta_i v_i - beta_i gamma_i h0^T k_i

i.e. (I + A) u = beta*v - (beta*gamma*K) h0 with A strictly lower triangular,
A_ij = beta_i Gamma_ij (k_i . k_j). With T = (I + A)^{-1} (the WY representation):

    u = U - W h0,      U = T (beta*v),   W = T (beta*gamma*K)
    o_i = scale * (gamma_i q_i^T h0 + sum_{j <= i} Gamma_ij (q_i . k_j) u_j)
    h_C = gamma_C h0 + sum_j Gamma_Cj k_j u_j^T

U, W and the intra-chunk scores do not depend on h0, so they are computed for all chunks
at once (a batched unit-triangular solve); only the state is carried chunk to chunk.
``g = None`` (the delta rule) sets every gamma to 1.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..chunking import chunk_decay, to_chunks


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: Optional[torch.Tensor],  # [B, T, H] log decay, or None for the delta rule
    beta: torch.Tensor,  # [B, T, H]
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    # Padding (k = v = beta = g = 0) writes nothing into the state.
    qc, kc, vc, bc = (to_chunks(x, C) for x in (q * scale, k, v, beta))  # [B, H, N, C, *]
    N = qc.shape[2]
    G, decay = chunk_decay(g, (B, H, N, C), C, q)  # [B, H, N, C], [B, H, N, C, C]
    gamma = G.exp()[..., None]  # [B, H, N, C, 1]

    k_beta = kc * bc[..., None]  # [B, H, N, C, K]
    A = ((k_beta @ kc.transpose(-1, -2)) * decay).tril(-1)  # [B, H, N, C, C], strictly lower
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([vc * bc[..., None], k_beta * gamma], dim=-1)  # [B, H, N, C, V + K]
    UW = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U, W = UW.split([V, K], dim=-1)  # [B, H, N, C, V], [B, H, N, C, K]

    scores = (qc @ kc.transpose(-1, -2)) * decay  # [B, H, N, C, C], causal incl. diagonal
    q_decay = qc * gamma  # reads h0 decayed to position i
    k_decay = kc * (G[..., -1:] - G).exp()[..., None]  # k_j decayed to the chunk end
    chunk_decay_total = G[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    states, pseudo_values = [], []
    # unbind, not U[:, :, n] per chunk: a slice's backward writes into a zero tensor of the whole input, N times
    # over (O(N^2) memory traffic at long contexts); unbind's backward stacks the N gradients once.
    per_chunk = zip(U.unbind(2), W.unbind(2), chunk_decay_total.unbind(2), k_decay.transpose(-1, -2).unbind(2))
    for U_n, W_n, decay_n, k_decay_n in per_chunk:
        u = U_n - W_n @ h  # [B, H, C, V]
        states.append(h)
        pseudo_values.append(u)
        h = h * decay_n + k_decay_n @ u
    h_start = torch.stack(states, dim=2)  # [B, H, N, K, V]
    u = torch.stack(pseudo_values, dim=2)  # [B, H, N, C, V]
    o = q_decay @ h_start + scores @ u  # [B, H, N, C, V]
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T]
    return o, h
