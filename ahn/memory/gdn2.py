"""GDN-2 memory (Gated DeltaNet 2): per-channel decay, erase gate on the key axis, write gate on the value axis.

    c_s = f_proj(x_s)                                               a rank-r code per head, [H, r]
    g_s = -exp(A_log) * softplus(c_s g_up + dt_bias)                log decay, [H, D]
    s_s = sigmoid(s_proj(x_s))                                      write strength, one per head
    b_s = s_s sigmoid(c_s b_up + b_bias),  w_s = s_s sigmoid(c_s w_up + w_bias)     erase [H, D], write [H, D]
    M <- (I - k_s (b_s * k_s)^T) Diag(exp g_s) M + k_s (w_s * v_s)^T,   o_t = M^T q_t / sqrt(D)

fla's GDN-2 layer gives b and w full projections of the hidden state and the decay a low-rank one.
Here the three channel-wise gates share one rank-r code per head (``decay_rank``, default 4): the
cache keeps each window token's gates until it is written, and the code (r + 1 floats per head) is
what it keeps. The per-head strength ``s`` is ahn's addition: it is the channel that salience-gated
writes scale (``AHNConfig.salience_writes``), as beta is for the other delta rules; with
``b = w = s`` (saturated channel gates) the rule is KDA.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahn.kernels import log_decay
from ahn.kernels.gdn2 import RULE

from .base import INIT_STD, Gate, Memory, MemoryCost, RMSNormWeight, StepSpec, init_dt_bias, linear, register_memory
from .kda import KDA_A_INIT_RANGE, decay_rank, expand_code


@register_memory("gdn2")
class GDN2Memory(Memory):
    rule = RULE
    allowed_options = ("decay_rank",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H, D = self.num_heads, self.head_dim
        self.rank = r = decay_rank(self.name, self.options)
        self.step_spec = StepSpec(gates=(Gate("f_proj", "identity", channels=r), Gate("s_proj", "sigmoid")),
                                  decay=None, strength=1, norm="o_norm")
        self.step_spec.check(self.rule)
        self.f_proj = linear(self.hidden_size, H * r)
        self.g_up, self.b_up, self.w_up = (nn.Parameter(torch.randn(H, r, D) * INIT_STD) for _ in range(3))
        self.s_proj = linear(self.hidden_size, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*KDA_A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(H * D).view(H, D))
        self.b_bias = nn.Parameter(torch.zeros(H, D))  # fla's b / w projections have no bias: sigmoid(0) = 1/2
        self.w_bias = nn.Parameter(torch.zeros(H, D))
        self.o_norm = RMSNormWeight(D)

    @classmethod
    def cost(cls, options=None) -> MemoryCost:
        r = decay_rank(cls.name, options or {})
        return MemoryCost(channels=r + 1, update=4, expansion=3 * 2 * r)  # the code, s; three r x D maps

    def rule_gates(self, gates: torch.Tensor):
        """``gates [..., H, r + 1]`` -> log decay ``g``, erase ``b`` and write ``w`` gates, ``[..., H, D]`` float32."""
        code, s = gates[..., : self.rank], gates[..., self.rank, None]
        g = log_decay(self.A_log, F.softplus(expand_code(code, self.g_up, self.dt_bias)), per_channel=True)
        b = s * torch.sigmoid(expand_code(code, self.b_up, self.b_bias))
        w = s * torch.sigmoid(expand_code(code, self.w_up, self.w_bias))
        return g, b, w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decay_rank={self.rank}"
