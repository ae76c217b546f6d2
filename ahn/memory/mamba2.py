"""Mamba2 memory (AHN-Mamba2) in its state-space-duality form, on the attention's own tensors.

With B = k, C = q and x = v (q, k L2-normalised, no query scale):

    dt_s = softplus(dt_proj(x_s) + dt_bias),   A = -exp(A_log)
    M <- exp(dt_s A) M + k_s (dt_s v_s)^T,     o_t = M^T q_t

Read-out as in the release: ``o_proj(rmsnorm(o * silu(z)))`` with ``z = g_proj(x)`` one
scalar per head and the norm over all H*D channels. No D skip term (the release has none).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahn.kernels import ssd
from ahn.kernels._common import step_unchecked
from ahn.kernels.ssd import RULE

from .base import Memory, RMSNormWeight, linear, register_memory, rms_norm


@register_memory("mamba2")
class Mamba2Memory(Memory):
    gate_channels = 1
    output_gate_bias = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        H, D = self.num_heads, self.head_dim
        self.dt_proj = linear(self.hidden_size, H, bias=True)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.arange(1, H + 1, dtype=torch.float32).log())
        self.norm = RMSNormWeight(H * D)

    gate_projections = ("dt_proj",)

    def gates_from(self, dt):  # [..., H] -> dt [..., H, 1]
        return F.softplus(dt + self.dt_bias.float()).unsqueeze(-1)

    def read(self, q, k, v, gates, mask, initial_state=None, backend="auto"):
        dt = gates[..., 0]  # [B, T, H]
        k, g = self.masked(k, -self.A_log.float().exp() * dt, mask)
        return ssd(
            q, k, v * dt[..., None].to(v.dtype), g, scale=1.0, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=self.use_qk_l2norm, backend=backend,
        )

    def step(self, q, k, v, gates, mask, state):
        g = None
        if k is not None:
            dt = gates[..., 0]  # [B, H]
            g = -self.A_log.float().exp() * dt
            # dt differs between the query heads that share a k / v head: repeat them here.
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # [B, H, D]
            k, g = self.masked(k, g, mask)
            v = v * dt[..., None].to(v.dtype)
        return step_unchecked(RULE, q, k, v, g, None, state, scale=1.0, use_qk_l2norm=self.use_qk_l2norm)

    def read_out(self, o, z):  # o [..., H, D], z [..., H]
        *lead, H, D = o.shape
        y = rms_norm((o.float() * F.silu(z).unsqueeze(-1)).reshape(*lead, H * D), self.norm.weight)
        return self.project_out(y.view(*lead, H, D))
