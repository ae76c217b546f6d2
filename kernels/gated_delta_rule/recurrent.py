"""Recurrent reference of the gated delta rule: the specification, one token at a time.

    D_t = exp(g_t) S_{t-1}
    S_t = D_t + beta_t k_t (v_t - D_t^T k_t)^T
    o_t = S_t^T (scale q_t)

``g = None`` is the plain delta rule (no decay).
"""

from __future__ import annotations

from typing import Optional

import torch


def recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: Optional[torch.Tensor],  # [B, T, H] log decay, or None
    beta: torch.Tensor,  # [B, T, H]
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        u = (v[:, t, :, None, :] - k_t @ S) * beta[:, t, :, None, None]  # [B, H, 1, V]
        S = S + k_t.transpose(-1, -2) * u  # rank-1 update k_t u^T
        outs.append(((q[:, t, :, None, :] * scale) @ S).squeeze(-2))  # [B, H, V]
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, S
