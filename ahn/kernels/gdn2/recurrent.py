"""Recurrent reference of GDN-2 (and KDA, its special case): the specification, one token at a time.

    D_t = Diag(exp g_t) h_{t-1}                      per-key-channel decay, g_t [K] <= 0
    h_t = D_t + k_t (w_t * v_t - D_t^T (b_t * k_t))^T   erase at the key b * k, write w * v
    o_t = h_t^T (scale q_t)

``b [K]`` is the channel-wise erase gate on the key axis, ``w [V]`` the channel-wise write gate on
the value axis (fla's ``fla/ops/gdn2/naive.py`` defines the same recurrence). KDA is
``b = beta 1_K, w = beta 1_V``: ``h_t = (I - beta k k^T) D_t + beta k v^T``. One token is
:func:`ahn.kernels.step.channel_step_ref`; this reference is that step in a loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..step import channel_step_ref


def recurrent_gdn2(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: torch.Tensor,  # [B, T, H, K] log decay per key channel
    b: torch.Tensor,  # [B, T, H, K] erase gate (a view of [B, T, H, 1] for KDA)
    w: torch.Tensor,  # [B, T, H, V] write gate
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o, h = channel_step_ref(q[:, t], k[:, t], v[:, t], g[:, t], b[:, t], w[:, t], scale, h)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, h
