"""KDA memory (Kimi Delta Attention): the gated delta rule with a decay per key channel.

    c_s = f_proj(x_s)                                          a rank-r code per head, [H, r]
    g_s = -exp(A_log) * softplus(c_s f_up + dt_bias)           log decay per head and key channel, [H, D]
    beta_s = sigmoid(b_proj(x_s))
    M <- (I - beta_s k_s k_s^T) Diag(exp g_s) M + beta_s k_s v_s^T,   o_t = M^T q_t / sqrt(D)

As fla's KDA layer, the decay goes through a low-rank bottleneck and a per-channel ``dt_bias``
(log-uniform time scales, so the channels start with different memories: some forget within a few
tokens, others hold for hundreds), with a per-head rate ``A_log``. Here the bottleneck is per head,
of rank ``decay_rank`` (default 4), because the cache keeps each window token's write gates until it
is written: the code (r floats per head) is what is kept, not the ``[H, D]`` decay, which would cost
more than the token's KV itself. ``memory_kwargs={"decay_rank": r}`` changes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahn.kernels import log_decay
from ahn.kernels.kda import RULE

from .base import INIT_STD, Gate, Memory, MemoryCost, RMSNormWeight, StepSpec, init_dt_bias, linear, register_memory

# Rank of the per-head decay code (cached per window token and head): KDA's decay bottleneck.
DEFAULT_DECAY_RANK = 4
# fla's KDA layer: A = U(1, 16), stored as A_log.
KDA_A_INIT_RANGE = (1.0, 16.0)


def decay_rank(name: str, options: dict) -> int:
    r = options.get("decay_rank", DEFAULT_DECAY_RANK)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"memory {name!r}: decay_rank={r!r} must be an int >= 1 (the rank of the per-channel "
                         f"decay's code; default {DEFAULT_DECAY_RANK})")
    return r


def expand_code(code: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``code [..., H, r]`` through the per-head map ``up [H, r, D]`` plus ``bias [H, D]`` -> ``[..., H, D]`` in the
    code's dtype (the cached gates': float32)."""
    return torch.einsum("...hr,hrd->...hd", code, up.to(code.dtype)) + bias.to(code.dtype)


@register_memory("kda")
class KDAMemory(Memory):
    rule = RULE
    allowed_options = ("decay_rank",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H, D = self.num_heads, self.head_dim
        self.rank = r = decay_rank(self.name, self.options)
        self.step_spec = StepSpec(gates=(Gate("f_proj", "identity", channels=r), Gate("b_proj", "sigmoid")),
                                  decay=None, strength=1, norm="o_norm")
        self.step_spec.check(self.rule)
        self.f_proj = linear(self.hidden_size, H * r)
        self.f_up = nn.Parameter(torch.randn(H, r, D) * INIT_STD)
        self.b_proj = linear(self.hidden_size, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*KDA_A_INIT_RANGE).log())
        self.dt_bias = nn.Parameter(init_dt_bias(H * D).view(H, D))
        self.o_norm = RMSNormWeight(D)

    @classmethod
    def cost(cls, options=None) -> MemoryCost:
        r = decay_rank(cls.name, options or {})
        return MemoryCost(channels=r + 1, update=4, expansion=2 * r)  # the code, beta; one r x D map

    def rule_gates(self, gates: torch.Tensor):
        """``gates [..., H, r + 1]`` -> the log decay ``g [..., H, D]`` (float32, <= 0) and ``beta [..., H]``."""
        f = expand_code(gates[..., : self.rank], self.f_up, self.dt_bias)
        return log_decay(self.A_log, F.softplus(f), per_channel=True), gates[..., self.rank]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decay_rank={self.rank}"
