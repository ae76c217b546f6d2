"""Chunk helpers of the torch chunkwise forms: cutting ``[B, T, H, ...]`` into chunks and the in-chunk decay."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C."""
    T = x.shape[1]
    pad = (-T) % chunk_size
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
    if x.dim() == 3:
        return rearrange(x, "b (n c) h -> b h n c", c=chunk_size)
    return rearrange(x, "b (n c) h d -> b h n c d", c=chunk_size)


def chunk_decay(g: Optional[torch.Tensor], shape, chunk_size: int, ref: torch.Tensor):
    """Cumulative in-chunk log decay G [B, H, N, C] and the causal decay matrix [B, H, N, C, C].

    ``decay[..., i, j] = exp(G_i - G_j)`` for j <= i and 0 above the diagonal
    (exactly the causal mask when ``g`` is None).
    """
    C = chunk_size
    causal = torch.ones(C, C, dtype=torch.bool, device=ref.device).tril()
    if g is None:
        G = ref.new_zeros(shape)
        return G, causal.to(ref.dtype).expand(*shape, C)
    G = to_chunks(g, C).cumsum(-1)  # [B, H, N, C]
    diff = G[..., :, None] - G[..., None, :]  # [B, H, N, C, C]
    # Mask before exp: above the diagonal G_i - G_j >= 0 could overflow.
    return G, diff.masked_fill(~causal, float("-inf")).exp()
