"""Recurrent reference of the gated delta rule: the specification, one token at a time.

    D_t = exp(g_t) S_{t-1}
    S_t = D_t + beta_t k_t (v_t - D_t^T k_t)^T
    o_t = S_t^T (scale q_t)

``g = None`` is the plain delta rule (no decay). :func:`gated_delta_rule_step_ref` is one
token of it; the recurrent reference is that step in a loop, and the decode path of the
model calls the step directly.
"""

from __future__ import annotations

from typing import Optional

import torch


def gated_delta_rule_step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H] log decay, or None
    beta: Optional[torch.Tensor],  # [B, H]
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: write (k, v) with decay g and strength beta, then read with q.

    Each k / v head serves H / Hk consecutive query heads (GQA), by broadcasting, so
    grouped keys and values need no repeat. Returns ``(o [B, H, V], state [B, H, K, V])``.
    """
    B, H, K = q.shape
    V = state.shape[-1]
    if k is not None:
        Hk = k.shape[1]
        S = state.reshape(B, Hk, H // Hk, K, V)  # query heads grouped by their k / v head
        if g is not None:
            S = S * g.view(B, Hk, H // Hk, 1, 1).exp()
        k_t = k.reshape(B, Hk, 1, 1, K)
        u = (v.reshape(B, Hk, 1, 1, V) - k_t @ S) * beta.view(B, Hk, H // Hk, 1, 1)  # [B, Hk, G, 1, V]
        state = torch.addcmul(S, k.reshape(B, Hk, 1, K, 1), u).view(B, H, K, V)  # rank-1 update k_t u^T
    o = (q.reshape(B, H, 1, K) @ state).view(B, H, V) * scale  # [B, H, V]
    return o, state


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
        o, S = gated_delta_rule_step_ref(
            q[:, t], k[:, t], v[:, t], g[:, t] if g is not None else None, beta[:, t], scale, S
        )
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, S
