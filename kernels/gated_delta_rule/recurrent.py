"""Recurrent reference of the gated delta rule: the specification, one token at a time.

    D_t = exp(g_t) S_{t-1}
    S_t = D_t + beta_t k_t (v_t - D_t^T k_t)^T
    o_t = S_t^T (scale q_t)

``g = None`` is the plain delta rule (no decay). :func:`gated_delta_rule_step_ref` is one
token of it; the recurrent reference is that step in a loop, and the decode path of the
model calls the step directly.
"""

from __future__ import annotations

import functools
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

    Each k / v head serves H / Hk consecutive query heads (GQA). Written as batched
    matrix products over the B * H states, with as few tensor ops as the math allows: the
    model's decode loop runs this once per layer per generated token, where per-op
    overhead, not arithmetic, is the cost. Returns ``(o [B, H, V], state [B, H, K, V])``.
    """
    B, H, K = q.shape
    V = state.shape[-1]
    S = state.reshape(B * H, K, V)
    if k is not None:
        if g is not None:
            S = S * g.reshape(B * H, 1, 1).exp()  # D_t
        k_t = expand_heads(k, H).reshape(B * H, 1, K)
        u = (expand_heads(v, H).reshape(B * H, 1, V) - torch.bmm(k_t, S)) * beta.reshape(B * H, 1, 1)
        S = torch.addcmul(S, k_t.transpose(1, 2), u)  # D_t + k_t (beta_t (v_t - D_t^T k_t))^T
    o = torch.bmm(q.reshape(B * H, 1, K), S).view(B, H, V) * scale
    return o, S.view(B, H, K, V)


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hk, D]`` -> ``[B, heads, D]``: k / v head j serves query heads j*R .. j*R+R-1 (GQA, R = heads / Hk)."""
    Hk = x.shape[1]
    return x if Hk == heads else x.index_select(1, _head_index(Hk, heads, x.device))


@functools.lru_cache(maxsize=None)
def _head_index(kv_heads: int, heads: int, device: torch.device) -> torch.Tensor:
    return torch.arange(heads, device=device) // (heads // kv_heads)


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
