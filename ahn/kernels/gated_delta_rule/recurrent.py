"""Recurrent reference of the gated delta rule: the specification, one token at a time.

    D_t = exp(g_t) h_{t-1}
    h_t = D_t + beta_t k_t (v_t - D_t^T k_t)^T
    o_t = h_t^T (scale q_t)

``g = None`` is the plain delta rule (no decay). One token of it is
:func:`ahn.kernels.step.step_ref` with ``delta=True``; the recurrent reference is that step in a
loop, and the decode path of the model calls the step directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..step import step_ref


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
    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o, h = step_ref(q[:, t], k[:, t], v[:, t], g[:, t] if g is not None else None, beta[:, t], scale, h, delta=True)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, h
