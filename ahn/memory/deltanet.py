"""DeltaNet memory (AHN-DN): per-head write strength, no decay.

    beta_s = sigmoid(b_proj(x_s))
    M <- M + beta_s k_s (v_s - M^T k_s)^T,   o_t = M^T q_t / sqrt(D)
"""

from __future__ import annotations

import torch

from ahn.kernels import delta_rule
from ahn.kernels._common import step_unchecked
from ahn.kernels.delta_rule import RULE

from .base import Memory, RMSNormWeight, linear, register_memory


@register_memory("deltanet")
class DeltaNetMemory(Memory):
    gate_channels = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.b_proj = linear(self.hidden_size, self.num_heads)
        self.o_norm = RMSNormWeight(self.head_dim)

    fused_cpu_decode = True
    gate_projections = ("b_proj",)

    def gates_from(self, b):  # [..., H] -> [..., H, 1]
        return torch.sigmoid(b).unsqueeze(-1)

    def read(self, q, k, v, gates, mask, initial_state=None, backend="auto"):
        k, _ = self.masked(k, None, mask)
        return delta_rule(
            q, k, v, gates[..., 0], initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=self.use_qk_l2norm, backend=backend,
        )

    def step(self, q, k, v, gates, mask, state):
        beta = None
        if k is not None:
            k, _ = self.masked(k, None, mask)
            beta = gates[..., 0]  # [B, H]
        return step_unchecked(RULE, q, k, v, None, beta, state, use_qk_l2norm=self.use_qk_l2norm)
