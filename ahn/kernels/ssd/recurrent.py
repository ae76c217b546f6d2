"""Recurrent reference of Mamba2's state-space duality (SSD) form, one token at a time.

    h_t = exp(g_t) h_{t-1} + k_t v_t^T
    o_t = h_t^T (scale q_t)

In Mamba2's names: k = B, q = C, g = dt * A, and the caller folds dt into v (x * dt).
One token is :func:`ahn.kernels.step.step_ref` with ``delta=False``; the recurrent reference
is that step in a loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..step import step_ref


def recurrent_ssd(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: torch.Tensor,  # [B, T, H] log decay
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o, h = step_ref(q[:, t], k[:, t], v[:, t], g[:, t], None, scale, h, delta=False)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, h
