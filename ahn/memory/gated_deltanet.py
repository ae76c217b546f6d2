"""GatedDeltaNet memory (the paper's AHN-GDN): per-head decay and write strength.

    g_s = -exp(A_log) * softplus(a_proj(x_s) + dt_bias)      (log decay, <= 0)
    beta_s = sigmoid(b_proj(x_s))
    M <- exp(g_s) M + beta_s k_s (v_s - exp(g_s) M^T k_s)^T,   o_t = M^T q_t / sqrt(D)

The cached gates are ``softplus(a_proj(x) + dt_bias)`` and ``beta``; ``-exp(A_log)`` applies when
the token is written (``StepSpec.decay``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ahn.kernels.gated_delta_rule import RULE

from .base import A_INIT_RANGE, Gate, Memory, RMSNormWeight, StepSpec, init_dt_bias, linear, register_memory


@register_memory("gated_deltanet")
class GatedDeltaNetMemory(Memory):
    rule = RULE
    step_spec = StepSpec(
        gates=(Gate("a_proj", "softplus", bias="dt_bias"), Gate("b_proj", "sigmoid")), decay=0, strength=1,
        norm="o_norm",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H = self.num_heads
        self.a_proj = linear(self.hidden_size, H)
        self.b_proj = linear(self.hidden_size, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(H))
        self.o_norm = RMSNormWeight(self.head_dim)
