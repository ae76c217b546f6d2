"""Mamba2 memory (AHN-Mamba2) in its state-space-duality form, on the attention's own tensors.

With B = k, C = q and x = v (q, k L2-normalised, no query scale):

    dt_s = softplus(dt_proj(x_s) + dt_bias),   A = -exp(A_log)
    M <- exp(dt_s A) M + k_s (dt_s v_s)^T,     o_t = M^T q_t

dt is both the decay's time step and the write strength of the SSD step (``StepSpec``: decay and
strength read the same gate channel). Read-out as in the release: ``o_proj(rmsnorm(o * silu(z)))``
with ``z = g_proj(x)`` one scalar per head and the norm over all H*D channels. No D skip term
(the release has none).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ahn.kernels.ssd import RULE

from .base import Gate, Memory, RMSNormWeight, StepSpec, linear, register_memory


@register_memory("mamba2")
class Mamba2Memory(Memory):
    rule = RULE
    step_spec = StepSpec(
        gates=(Gate("dt_proj", "softplus", bias="dt_bias"),), decay=0, strength=0, norm="norm",
        joint_norm=True, scale=1.0,
    )
    output_gate_bias = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H, D = self.num_heads, self.head_dim
        self.dt_proj = linear(self.hidden_size, H, bias=True)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.arange(1, H + 1, dtype=torch.float32).log())
        self.norm = RMSNormWeight(H * D)
