"""Gated DeltaProduct memory: n delta-rule (Householder) writes per evicted token after one decay.

    g_s = -exp(A_log) * softplus(a_proj(x_s) + dt_bias)                        one decay per head
    beta_sj = sigmoid(b_proj(x_s))_j,   k_sj = P_j k_s,   v_sj = Q_j v_s       j = 1..n
    M <- exp(g_s) M;  for j = 1..n: M <- M + beta_sj k_sj (v_sj - M^T k_sj)^T;   o_t = M^T q_t / sqrt(D)

fla's Gated DeltaProduct layer projects n keys and values from the hidden state. ahn's memory has no
key or value projections of its own: it writes the frozen attention's k_s and v_s, which are what the
cache holds. The n writes are therefore per-head learned maps of them (``P_1 = Q_1 = I``; ``P_j``,
``Q_j`` ``[H, D, D]`` start as the identity, so a fresh memory writes the token n times with n
strengths, and training turns the extra writes into other directions). Keys are L2-normalised after
the map, so each write is a Householder-like reflection. ``memory_kwargs={"householder": n}``
(default 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ahn.kernels.gated_delta_product import RULE

from .base import A_INIT_RANGE, Gate, Memory, MemoryCost, RMSNormWeight, StepSpec, init_dt_bias, linear, register_memory

# Writes per token: fla's GatedDeltaProduct default num_householder.
DEFAULT_HOUSEHOLDER = 2


def householder(options: dict) -> int:
    n = options.get("householder", DEFAULT_HOUSEHOLDER)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"memory 'gated_deltaproduct': householder={n!r} must be an int >= 1 (writes per token; "
                         f"default {DEFAULT_HOUSEHOLDER})")
    return n


@register_memory("gated_deltaproduct")
class GatedDeltaProductMemory(Memory):
    rule = RULE
    allowed_options = ("householder",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H, D = self.num_heads, self.head_dim
        self.householder = n = householder(self.options)
        self.step_spec = StepSpec(
            gates=(Gate("a_proj", "softplus", bias="dt_bias"), Gate("b_proj", "sigmoid", channels=n)),
            decay=0, strength=1, norm="o_norm",
        )
        self.step_spec.check(self.rule)
        self.a_proj = linear(self.hidden_size, H)
        self.b_proj = linear(self.hidden_size, H * n)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(H))
        eye = torch.eye(D).expand(max(n - 1, 0), H, D, D)
        self.key_maps = nn.Parameter(eye.clone())  # P_2 .. P_n
        self.value_maps = nn.Parameter(eye.clone())  # Q_2 .. Q_n
        self.o_norm = RMSNormWeight(D)

    @classmethod
    def cost(cls, options=None) -> MemoryCost:
        n = householder(options or {})
        # n delta writes (4 D^2 each) and the maps of the n - 1 extra keys and values (2 D^2 each).
        return MemoryCost(channels=1 + n, update=4 * n + 4 * (n - 1))

    def writes(self, k: torch.Tensor, v: torch.Tensor):
        """The token's n writes: ``k, v [..., H, D]`` -> ``[..., n, H, D]`` (the first is the token's own)."""
        ks, vs = [k], [v]
        for P, Q in zip(self.key_maps, self.value_maps):
            ks.append(torch.einsum("...hd,hde->...he", k, P.to(k.dtype)))
            vs.append(torch.einsum("...hd,hde->...he", v, Q.to(v.dtype)))
        return torch.stack(ks, dim=-3), torch.stack(vs, dim=-3)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, householder={self.householder}"
