"""The memory base class and registry (see the package docstring).

Parameter names, shapes and initialisations follow the official AHN release
(ByteDance-Seed/AHN, ``src/ahn/rnn/*``), so its checkpoints load by renaming only
(see :mod:`ahn.adapters`).
"""

from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahn import _cpu_decode
from ahn.kernels._common import L2NORM_EPS, constant

_REGISTRY: dict[str, type["Memory"]] = {}

# Output RMSNorm epsilon of the official release (fla's FusedRMSNormSwishGate / RMSNormGated, eps=1e-5).
NORM_EPS = 1e-5
# GatedDeltaNet's dt initialisation (fla / mamba_ssm defaults): dt = exp(U(log DT_MIN, log DT_MAX)),
# clamped below by DT_INIT_FLOOR; dt_bias = softplus^{-1}(dt).
DT_MIN, DT_MAX, DT_INIT_FLOOR = 0.001, 0.1, 1e-4
# GatedDeltaNet's A = U(A_INIT_RANGE), stored as A_log = log(A) (fla's GatedDeltaNet).
A_INIT_RANGE = (0.0, 16.0)
# Std of the normal initialisation of projection weights (transformers' initializer_range default).
INIT_STD = 0.02


def register_memory(name: str):
    """Class decorator: make a :class:`Memory` subclass available as ``AHNConfig(memory=name)``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"memory {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_memories() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_memory(name: str, **kwargs) -> "Memory":
    if name not in _REGISTRY:
        raise ValueError(f"memory={name!r} is unknown; choose one of {available_memories()}")
    return _REGISTRY[name](**kwargs)


def init_dt_bias(n: int) -> torch.Tensor:
    """softplus^{-1} of dt drawn log-uniformly in [DT_MIN, DT_MAX]."""
    dt = torch.exp(torch.rand(n) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))


def linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, std=INIT_STD)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class GroupLinear(nn.Module):
    """Per-head linear map, weight ``[H, D_in, D_out]`` (the release's layout), initialised to zero."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, T, H, D], or one token [B, H, D]
        return group_linear(x, self.weight)


def group_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-head ``x @ weight[h]``: ``x [B, T, H, D]`` or one token ``[B, H, D]``, ``weight [H, D, D]``."""
    x = x.to(weight.dtype)
    if x.dim() == 3:
        return torch.bmm(x.transpose(0, 1), weight).transpose(0, 1)  # [H, B, D] @ [H, D, D]
    return (x.transpose(1, 2) @ weight).transpose(1, 2)  # [B, H, T, D] @ [H, D, D]


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm weight; the norm itself is applied in float32 by the memory."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension, in float32.

    Computed as ``x / hypot(|x|, sqrt(D eps)) * (sqrt(D) weight)``: few tensor ops, since the
    decode step runs it once per layer per token and ``F.rms_norm`` is several times slower
    on CPU for one token.
    """
    x = x.float()
    D = x.shape[-1]
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.hypot(norm, constant((D * eps) ** 0.5)) * (weight.float() * D**0.5)


class Memory(nn.Module):
    """Shared parts of every memory rule.

    Args:
        hidden_size: the model's hidden size (gates read the layer's normed hidden state).
        num_heads: query heads H (k and v are repeated to H heads, as GQA does): H states of D x D.
        head_dim: D.
        use_qk_l2norm: L2-normalise q and k before the memory.
        options: rule-specific options (``AHNConfig.memory_kwargs``), checked against
            ``allowed_options``.

    The default read-out (GatedDeltaNet, DeltaNet) is ``o_proj(rmsnorm(o_h) * silu(g_h))`` per
    head h, with ``g = g_proj(x)`` one scalar per head from the current token.
    """

    name: str = ""
    gate_channels: int = 0
    output_gate_bias: bool = False
    allowed_options: tuple[str, ...] = ()
    # Linear layers (attribute names) that read the token for its write gates, in the order
    # gates_from() takes their outputs. A decode step runs them and g_proj as one matmul. A
    # rule that leaves this empty overrides write_gates() and decodes through it.
    gate_projections: tuple[str, ...] = ()
    # The (gated) delta rules' decode step has a compiled CPU form (ahn._cpu_decode).
    fused_cpu_decode: bool = False

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, use_qk_l2norm: bool = True,
                 options: dict | None = None):
        super().__init__()
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.allowed_options))
        if unknown:
            raise ValueError(
                f"memory {self.name!r} does not take options {unknown}; allowed: {list(self.allowed_options) or 'none'}"
            )
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.use_qk_l2norm = use_qk_l2norm
        self.options = options
        self.g_proj = linear(hidden_size, num_heads, bias=self.output_gate_bias)
        self.o_proj = GroupLinear(num_heads, head_dim)

    def write_gates(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., H, G] float32
        return self.gates_from(*(getattr(self, name)(x).float() for name in self.gate_projections))

    def gates_from(self, *projections: torch.Tensor) -> torch.Tensor:
        """The write gates ``[..., H, G]`` from the gate projections' outputs (``[..., H]`` float32 each)."""
        raise NotImplementedError

    def read(self, q, k, v, gates, mask, initial_state=None, backend="auto"):
        """Parallel form: ``q, k [B, T, H, D]``, ``v [B, T, H, D]``, ``gates [B, T, H, G]`` of the
        written tokens, ``mask [B, T]`` (False: an inert write) -> ``(o [B, T, H, D], state)``."""
        raise NotImplementedError

    def step(self, q, k, v, gates, mask, state):
        """Decode form, one token: ``q [B, H, D]``; ``k, v [B, Hkv, D]`` the token leaving the window
        (None: nothing to write), ``gates [B, H, G]``, ``mask [B]`` or None (write in every row),
        ``state [B, H, D, D]`` or None -> ``(o [B, H, D], state)``."""
        raise NotImplementedError

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [..., H, D]`` (``[B, T, H, D]``, or ``[B, H, D]`` for one token), ``x [..., hidden]``
        (the current tokens) -> ``[..., H, D]``."""
        return self.read_out(o, self.g_proj(x).float())

    def read_out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The read-out from the output gate's pre-activation ``z [..., H]``: per-head RMSNorm, SiLU gate,
        per-head projection."""
        return self.project_out(rms_norm(o, self.o_norm.weight) * F.silu(z).unsqueeze(-1))

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """``o_proj``; for one token (``[B, H, D]``, the decode step) its weight is applied directly,
        sparing a module call per layer per token (see :meth:`decode` on parameter access)."""
        return group_linear(y, self.o_proj.weight) if y.dim() == 3 else self.o_proj(y)

    def decode(self, x, q, k, v, gates, mask, state):
        """One generated token: the current token's gates, then the eviction write and the read.

        ``x [B, hidden]`` the current token's normed hidden state, ``q [B, H, D]``; ``k, v
        [B, Hkv, D]``, ``gates [B, H, G]`` and ``mask`` as in :meth:`step` (the token leaving the
        window). Returns ``(out [B, H, D] or None, new_gates [B, H, G], state)``: ``out`` is
        ``output(step(...))``, None while the memory is empty (nothing written, nothing to
        read), and ``new_gates`` are ``write_gates(x)``, kept in the cache until this token leaves.

        A generated token pays per-op and Python overhead, not arithmetic, so this path is
        flat: the gate projections and ``g_proj`` run as one matmul over their weights,
        concatenated on every call (a kept copy could go stale: writes through ``.data`` bump
        no version counter), and ``o_proj``'s weight is applied without a module call. It
        reads parameters directly, so under ZeRO-3 gather the memory's parameters before
        generating. Rules with ``fused_cpu_decode`` (GatedDeltaNet, DeltaNet) run all of it as one
        compiled C++ call for float32 CPU tensors without autograd (``ahn._cpu_decode``).
        """
        if not self.gate_projections:  # a rule with its own write_gates: the composition
            new_gates = self.write_gates(x)
            if k is None and state is None:
                return None, new_gates, None
            o, state = self.step(q, k, v, gates, mask, state)
            return self.output(o, x), new_gates, state
        if self.fused_cpu_decode and _cpu_decode.usable(x, q, k, v, state, self.g_proj.weight):
            fused = _cpu_decode.fused_delta_decode()
            if fused is not None:
                return self._fused_decode(fused, x, q, k, v, gates, mask, state)
        layers = [getattr(self, name) for name in self.gate_projections]
        layers.append(self.g_proj)
        weight, bias = _concat_linears(layers)
        *projections, z = F.linear(x, weight, bias).float().view(x.shape[0], len(layers), self.num_heads).unbind(1)
        new_gates = self.gates_from(*projections)
        if k is None and state is None:
            return None, new_gates, None
        o, state = self.step(q, k, v, gates, mask, state)
        return self.read_out(o, z), new_gates, state

    def _fused_decode(self, fused, x, q, k, v, gates, mask, state):
        """:meth:`decode` of the (gated) delta rules in one compiled CPU call (``ahn._cpu_decode``)."""
        none = _cpu_decode.EMPTY
        gated = hasattr(self, "a_proj")
        g_bias = self.g_proj.bias
        return tuple(fused(
            x, self.a_proj.weight if gated else none, self.b_proj.weight, self.g_proj.weight,
            none if g_bias is None else g_bias, self.dt_bias if gated else none, self.A_log if gated else none, q,
            none if k is None else k, none if v is None else v, none if gates is None else gates,
            none if mask is None else mask, none if state is None else state, self.o_norm.weight, self.o_proj.weight,
            self.use_qk_l2norm, L2NORM_EPS, NORM_EPS, self.head_dim**-0.5,
        ))

    @staticmethod
    def masked(k: torch.Tensor, decay, mask: Optional[torch.Tensor]):
        """Make masked writes inert: k = 0 writes nothing, log decay 0 keeps the state.

        ``k [B, T, H, D]`` with ``mask [B, T]``, or one token ``k [B, H, D]`` with ``mask [B]``;
        ``decay`` has k's shape without D. ``mask=None`` keeps every write.
        """
        if mask is None:
            return k, decay
        m = mask.view(*mask.shape, 1).to(k.dtype)  # [B, T, 1] or [B, 1]
        return k * m[..., None], (decay * m if decay is not None else None)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, qk_l2norm={self.use_qk_l2norm}"


def _concat_linears(layers: list[nn.Linear]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One ``(weight, bias)`` computing every layer's output, concatenated in order."""
    weight = torch.cat([layer.weight for layer in layers])
    if all(layer.bias is None for layer in layers):
        return weight, None
    bias = torch.cat([layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias
                      for layer in layers])
    return weight, bias
