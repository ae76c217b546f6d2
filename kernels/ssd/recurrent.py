"""Recurrent reference of Mamba2's state-space duality (SSD) form, one token at a time.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale q_t)

In Mamba2's names: k = B, q = C, g = dt * A, and the caller folds dt into v (x * dt).
:func:`ssd_step_ref` is one token; the recurrent reference is that step in a loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..gated_delta_rule.recurrent import expand_heads


def ssd_step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H] log decay
    beta: None,  # SSD has no write strength; kept for the common signature
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: decay, write k v^T, read with q; k / v heads serve H / Hk query heads each (GQA).

    Batched matrix products over the B * H states, few ops (see ``gated_delta_rule_step_ref``).
    """
    B, H, K = q.shape
    V = state.shape[-1]
    S = state.reshape(B * H, K, V)
    if k is not None:
        S = torch.addcmul(S * g.reshape(B * H, 1, 1).exp(), expand_heads(k, H).reshape(B * H, K, 1),
                          expand_heads(v, H).reshape(B * H, 1, V))  # + k_t v_t^T
    o = torch.bmm(q.reshape(B * H, 1, K), S).view(B, H, V) * scale
    return o, S.view(B, H, K, V)


def recurrent_ssd(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    g: torch.Tensor,  # [B, T, H] log decay
    beta: None,  # SSD has no write strength; kept for the common signature
    scale: float,
    initial_state: Optional[torch.Tensor],  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o, S = ssd_step_ref(q[:, t], k[:, t], v[:, t], g[:, t], None, scale, S)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, S
