"""DeltaNet memory (AHN-DN): per-head write strength, no decay.

    beta_s = sigmoid(b_proj(x_s))
    M <- M + beta_s k_s (v_s - M^T k_s)^T,   o_t = M^T q_t / sqrt(D)
"""

from __future__ import annotations

from ahn.kernels.delta_rule import RULE

from .base import Gate, Memory, RMSNormWeight, StepSpec, linear, register_memory


@register_memory("deltanet")
class DeltaNetMemory(Memory):
    rule = RULE
    step_spec = StepSpec(gates=(Gate("b_proj", "sigmoid"),), decay=None, strength=0, norm="o_norm")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.b_proj = linear(self.hidden_size, self.num_heads)
        self.o_norm = RMSNormWeight(self.head_dim)
