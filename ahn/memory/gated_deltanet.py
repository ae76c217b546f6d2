"""GatedDeltaNet memory (the paper's AHN-GDN): per-head decay and write strength.

    g_s = -exp(A_log) * softplus(a_proj(x_s) + dt_bias)      (log decay, <= 0)
    beta_s = sigmoid(b_proj(x_s))
    M <- exp(g_s) M + beta_s k_s (v_s - exp(g_s) M^T k_s)^T,   o_t = M^T q_t / sqrt(D)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahn.kernels import gated_delta_rule
from ahn.kernels._common import step_unchecked
from ahn.kernels.gated_delta_rule import RULE

from .base import A_INIT_RANGE, Memory, RMSNormWeight, init_dt_bias, linear, register_memory


@register_memory("gated_deltanet")
class GatedDeltaNetMemory(Memory):
    gate_channels = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H = self.num_heads
        self.a_proj = linear(self.hidden_size, H)
        self.b_proj = linear(self.hidden_size, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(H))
        self.o_norm = RMSNormWeight(self.head_dim)

    fused_cpu_decode = True
    gate_projections = ("a_proj", "b_proj")

    def gates_from(self, a, b):  # [..., H] each -> [..., H, 2]
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        return torch.stack([g, torch.sigmoid(b)], dim=-1)

    def read(self, q, k, v, gates, mask, initial_state=None, backend="auto"):
        k, g = self.masked(k, gates[..., 0], mask)
        return gated_delta_rule(
            q, k, v, g, gates[..., 1], initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=self.use_qk_l2norm, backend=backend,
        )

    def step(self, q, k, v, gates, mask, state):
        g = beta = None
        if k is not None:
            g, beta = gates.unbind(-1)  # [B, H] each
            if mask is not None:
                k, g = self.masked(k, g, mask)
        return step_unchecked(RULE, q, k, v, g, beta, state, use_qk_l2norm=self.use_qk_l2norm)
