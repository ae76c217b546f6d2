"""Chunkwise SSD in plain torch (Mamba2's "state space duality" algorithm).

One chunk of length C with state h0 at its start, G_i the cumulative in-chunk log decay:

    o_i = scale * (exp(G_i) q_i^T h0 + sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j)
    h_C = exp(G_C) h0 + sum_j exp(G_C - G_j) k_j v_j^T

The intra-chunk part (a decay-masked attention) is computed for all chunks at once; the
chunk-to-chunk state passing is a short loop over T / C chunks.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..chunking import chunk_decay, to_chunks


def chunk_ssd(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: torch.Tensor,  # [B, T, H] log decay
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    qc, kc, vc = (to_chunks(x, C) for x in (q * scale, k, v))  # [B, H, N, C, *]
    N = qc.shape[2]
    G, decay = chunk_decay(g, (B, H, N, C), C, q)  # [B, H, N, C], [B, H, N, C, C]
    o_intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # [B, H, N, C, V]
    k_decay = kc * (G[..., -1:] - G).exp()[..., None]  # k_j decayed to the chunk end
    chunk_states = k_decay.transpose(-1, -2) @ vc  # [B, H, N, K, V]: what each chunk writes
    chunk_decay_total = G[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    states = []
    for decay_n, state_n in zip(chunk_decay_total.unbind(2), chunk_states.unbind(2)):  # unbind: see gated_delta_rule
        states.append(h)
        h = h * decay_n + state_n
    h_start = torch.stack(states, dim=2)  # [B, H, N, K, V]
    o = (qc * G.exp()[..., None]) @ h_start + o_intra  # [B, H, N, C, V]
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T]
    return o, h
