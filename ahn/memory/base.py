"""The memory base class and registry (see the package docstring).

Parameter names, shapes and initialisations follow the official AHN release
(ByteDance-Seed/AHN, ``src/ahn/rnn/*``), so its checkpoints load by renaming only
(see :mod:`ahn.adapters`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from einops import rearrange

from ahn.kernels import cpu_step
from ahn.kernels.dispatch import resolve_step_backend, run_rule, step_unchecked
from ahn.kernels.rule import L2NORM_EPS, Rule, compute_dtype, constant, inert_writes, log_decay
from ahn.kernels.step import expand_heads

_REGISTRY: dict[str, type["Memory"]] = {}
# Decode backends that mean "whatever runs" for a rule with no compiled step (``Memory.fused`` False).
_UNFUSED_STEP = ("auto", "recurrent", "fla")

# Output RMSNorm epsilon of the official release (fla's FusedRMSNormSwishGate / RMSNormGated, eps=1e-5).
NORM_EPS = 1e-5
# GatedDeltaNet's dt initialisation (fla / mamba_ssm defaults): dt = exp(U(log DT_MIN, log DT_MAX)),
# clamped below by DT_INIT_FLOOR; dt_bias = softplus^{-1}(dt).
DT_MIN, DT_MAX, DT_INIT_FLOOR = 0.001, 0.1, 1e-4
# GatedDeltaNet's A = U(A_INIT_RANGE), stored as A_log = log(A) (fla's GatedDeltaNet).
A_INIT_RANGE = (0.0, 16.0)
# Std of the normal initialisation of projection weights (transformers' initializer_range default).
INIT_STD = 0.02


@dataclass(frozen=True)
class Gate:
    """One channel of a rule's write gates: ``activation(projection(x) + bias)`` per head, float32.

    ``projection``: the ``nn.Linear`` attribute (hidden -> H * channels) that reads the token;
    ``activation``: a key of ``ahn.kernels.cpu_step.GATE_ACTIVATIONS`` (its torch form there, its C++
    form in ``cpu_step.cpp``); ``bias``: a parameter attribute ``[H * channels]`` added before the activation, or None;
    ``channels``: values per head (the compiled decode steps take one).
    """

    projection: str
    activation: str
    bias: Optional[str] = None
    channels: int = 1


@dataclass(frozen=True)
class StepSpec:
    """How a memory computes and keeps the write gates of its rule (:attr:`Memory.rule`) and reads out,
    declared once: every form of it (the parallel :meth:`Memory.scan`, and the torch, C++ and Triton
    backends of :meth:`Memory.decode`) reads this declaration.

    Attributes:
        gates: the write gates kept per token, ``[..., H, G]`` with G the sum of their ``channels``.
        decay: the gate whose channel is the log decay ``g = -exp(A_log) * gate``
            (:func:`ahn.kernels.log_decay`, with the module's ``A_log [H]``), or None (no decay, or the
            memory's :meth:`Memory.rule_gates` computes it: KDA, GDN-2).
        strength: the gate of the write strength (delta rules: ``beta (v - state^T k)``; SSD: ``beta v``,
            Mamba2's dt; Gated DeltaProduct: one per write), or None (1). Salience-gated writes scale it.
        norm: attribute of the read-out's RMSNorm weight.
        joint_norm: False: RMSNorm per head over D, then the SiLU output gate; True: the gate, then
            RMSNorm over all H * D channels of the token (Mamba2).
        scale: query scale, None for ``D ** -0.5``.
    """

    gates: tuple[Gate, ...]
    decay: Optional[int]
    strength: Optional[int]
    norm: str
    joint_norm: bool = False
    scale: Optional[float] = None

    def __post_init__(self):
        unknown = [gate.activation for gate in self.gates if gate.activation not in cpu_step.GATE_ACTIVATIONS]
        if unknown:
            raise ValueError(f"gate activations {unknown} are unknown; "
                             f"choose from {list(cpu_step.GATE_ACTIVATIONS)}")

    def check(self, rule: Rule) -> None:
        """Whether the declaration fits ``rule``; a fused rule's is read by the compiled decode steps too."""
        if rule.delta and self.strength is None:
            raise ValueError(f"rule {rule.name!r} is a delta rule and needs a strength channel")
        if not rule.fused:
            return
        if any(gate.channels != 1 for gate in self.gates):
            raise ValueError("the compiled decode steps take one channel per gate")
        if (self.decay is not None) != (rule.decay is not None):
            raise ValueError(f"rule {rule.name!r} {'needs' if rule.decay else 'takes no'} a decay channel, "
                             f"got decay={self.decay!r}")

    @functools.cached_property
    def strength_channels(self) -> tuple[int, ...]:
        """The channels of ``gates [..., H, G]`` holding the write strength (none without a strength gate)."""
        if self.strength is None:
            return ()
        start = sum(gate.channels for gate in self.gates[: self.strength])
        return tuple(range(start, start + self.gates[self.strength].channels))

    @functools.cached_property
    def cpp_constants(self) -> tuple[list[int], int, int]:
        """The compiled step's view of the declaration: activation codes, decay and strength channels (-1: none)."""
        return ([cpu_step.ACTIVATION_CODES[gate.activation] for gate in self.gates],
                -1 if self.decay is None else self.decay, -1 if self.strength is None else self.strength)


@dataclass(frozen=True)
class MemoryCost:
    """What one memory head costs, for :mod:`ahn.flops` (declared by each rule, :meth:`Memory.cost`).

    Attributes:
        channels: write-gate values cached (float32) per window token and head, until the token is written.
        update: state-update FLOPs per written token, in units of D^2 (delta rule: ``k^T S`` and the
            rank-1 update, 2 + 2; SSD: the rank-1 update, 2).
        expansion: FLOPs per written token, in units of D, to expand the cached gates into the write
            (KDA / GDN-2: a rank-r code through r x D maps, 2 r each).
    """

    channels: int
    update: int
    expansion: int = 0


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


def memory_class(name: str) -> type["Memory"]:
    if name not in _REGISTRY:
        raise ValueError(f"memory={name!r} is unknown; choose one of {available_memories()}")
    return _REGISTRY[name]


def build_memory(name: str, **kwargs) -> "Memory":
    return memory_class(name)(**kwargs)


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
    """Shared parts of every memory; a memory declares its ``ahn.kernels`` :class:`~ahn.kernels.Rule` as ``rule``
    and its :class:`StepSpec` as ``step_spec`` (on the class, or in ``__init__`` when options shape its gates).

    Args:
        hidden_size: the model's hidden size (gates read the layer's normed hidden state).
        num_heads: query heads H (k and v are repeated to H heads, as GQA does): H states of D x D.
        head_dim: D.
        use_qk_l2norm: L2-normalise q and k before the memory.
        options: rule-specific options (``AHNConfig.memory_kwargs``), checked against
            ``allowed_options``.

    The read-out is ``o_proj(rmsnorm(o_h) * silu(g_h))`` per head h (``joint_norm``: the gate
    first, then one RMSNorm over all heads), with ``g = g_proj(x)`` one scalar per head from the
    current token.
    """

    name: str = ""
    rule: Rule
    step_spec: StepSpec
    # Whether ahn's Triton prefill kernels and its compiled C++ / Triton decode steps cover the rule: ``rule.fused``,
    # set for each memory class when it is defined; False: torch ops (and fla on CUDA) only.
    fused: bool
    output_gate_bias: bool = False
    allowed_options: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.fused = cls.rule.fused
        if "step_spec" in cls.__dict__:  # declared on the class (otherwise by __init__, checked there)
            cls.step_spec.check(cls.rule)

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
        # Set by ahn.add_memory when AHNConfig asks for them (ahn.salience): the salience scorer and the
        # deferring read-out's logit projection (hidden -> H).
        self.salience: Optional[nn.Module] = None
        self.defer: Optional[nn.Linear] = None
        self.salience_gates_writes = False

    @property
    def gate_channels(self) -> int:
        """G: the write-gate values kept per token and head."""
        return sum(gate.channels for gate in self.step_spec.gates)

    @classmethod
    def cost(cls, options: Optional[dict] = None) -> MemoryCost:
        """The rule's :class:`MemoryCost` with ``options`` (``AHNConfig.memory_kwargs``); from its ``step_spec``
        (one gate channel each; delta rules 4 D^2 per write, SSD 2 D^2)."""
        return MemoryCost(channels=sum(gate.channels for gate in cls.step_spec.gates), update=4 if cls.rule.delta else 2)

    def write_gates(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., H, G] float32
        return self.gates_from(*(getattr(self, gate.projection)(x).float() for gate in self.step_spec.gates))

    def gates_from(self, *projections: torch.Tensor) -> torch.Tensor:
        """The write gates ``[..., H, G]`` from the gate projections' outputs (``[..., H * channels]`` float32 each)."""
        channels = []
        for gate, p in zip(self.step_spec.gates, projections):  # p [..., H * channels]
            if gate.bias is not None:
                p = p + getattr(self, gate.bias).float()
            channels.append(cpu_step.GATE_ACTIVATIONS[gate.activation](p).unflatten(-1, (self.num_heads, -1)))
        return torch.cat(channels, dim=-1)

    def rule_gates(self, gates: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """The rule's gate arguments (``rule.gates``, in order) from the kept write gates ``gates [..., H, G]``:
        the log decay ``g`` from the ``decay`` channel (:func:`ahn.kernels.log_decay`), ``beta`` from the
        ``strength`` channels (``[..., H]``; a multi-write rule ``[..., H, n]``). A memory whose gates expand
        from a code (KDA, GDN-2) computes its own."""
        spec = self.step_spec
        g = None if spec.decay is None else log_decay(self.A_log, gates[..., spec.decay])
        beta = None
        if spec.strength is not None:
            first, *rest = spec.strength_channels
            beta = gates[..., first : first + 1 + len(rest)] if self.rule.multi_write else gates[..., first]
        named = {"g": g, "beta": beta}
        return tuple(named[x.name] for x in self.rule.gates)

    def writes(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The n writes of each token of a multi-write rule (``rule.multi_write``): ``k, v [..., H, D]`` ->
        ``[..., n, H, D]``; declared by such a memory (Gated DeltaProduct)."""
        raise NotImplementedError(f"memory {self.name!r}: a multi-write rule declares its writes")

    def _plain_write_strength(self, gates: torch.Tensor) -> Optional[torch.Tensor]:
        """The strength of a rule that is not a delta rule (SSD: Mamba2's dt), which scales v: ``[..., H]``."""
        spec = self.step_spec
        return gates[..., spec.strength] if spec.strength is not None and not self.rule.delta else None

    def scan(self, q, k, v, gates, mask, initial_state=None, backend="auto"):
        """Parallel form: write token t's ``k, v`` and read with query t, for every t in order (the chunkwise
        kernels). ``q, k [B, T, H, D]``, ``v [B, T, H, D]``, ``gates [B, T, H, G]`` of the written tokens,
        ``mask [B, T]`` (False: an inert write) -> ``(o [B, T, H, D], final state)``."""
        rule = self.rule
        args, i = list(self.rule_gates(gates)), rule.decay_index
        k, g = inert_writes(mask, k, None if i is None else args[i])
        if i is not None:
            args[i] = g
        dt = self._plain_write_strength(gates)
        if dt is not None:
            v = v * dt[..., None].to(v.dtype)
        writes = 1
        if rule.multi_write:  # [B, T, H, D] -> the n writes of each token in order, [B, T n, H, D]
            k, v = self.writes(k, v)
            writes = k.shape[2]
            k, v = (rearrange(x, "b t n h d -> b (t n) h d") for x in (k, v))
            args = [rearrange(x, "b t h n -> b (t n) h") if spec.per_write else x for spec, x in zip(rule.gates, args)]
        return run_rule(
            rule, q, k, v, tuple(args), scale=self.step_spec.scale, initial_state=initial_state,
            output_final_state=True, cu_seqlens=None, use_qk_l2norm=self.use_qk_l2norm, backend=backend,
            chunk_size=rule.chunk_size, writes=writes,
        )

    def step(self, q, k, v, gates, mask, state, backend="torch"):
        """Decode form, one token: ``q [B, H, D]``; ``k, v [B, Hkv, D]`` the token leaving the window
        (None: nothing to write), ``gates [B, H, G]``, ``mask [B]`` or None (write in every row),
        ``state [B, H, D, D]`` or None -> ``(o [B, H, D], state)``; ``backend`` a resolved step
        backend (``"torch"``, ``"cpp"``, ``"triton"``)."""
        rule = self.rule
        args = (None,) * len(rule.gates)
        if k is not None:
            args = self.rule_gates(gates)
            H = q.shape[1]
            dt = self._plain_write_strength(gates)
            if dt is not None:  # v [B, H, D] per query head (k too: one head count), in the step's compute dtype
                ct = compute_dtype(q.dtype)
                k, v = expand_heads(k, H), expand_heads(v, H).to(ct) * dt.to(ct)[..., None]
            if rule.multi_write:
                k, v = self.writes(expand_heads(k, H), expand_heads(v, H))  # [B, n, H, D]
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, n, D]
        return step_unchecked(rule, q, k, v, args, state, scale=self.step_spec.scale,
                              use_qk_l2norm=self.use_qk_l2norm, mask=mask, backend=backend)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [..., H, D]`` (``[B, T, H, D]``, or ``[B, H, D]`` for one token), ``x [..., hidden]``
        (the current tokens) -> ``[..., H, D]``."""
        return self.read_out(o, self.g_proj(x).float())

    def read_out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The read-out from the output gate's pre-activation ``z [..., H]``: RMSNorm and SiLU gate (per head,
        or ``joint_norm``: gate, then norm over all heads), per-head projection."""
        weight = getattr(self, self.step_spec.norm).weight
        if not self.step_spec.joint_norm:
            return self.project_out(rms_norm(o, weight) * F.silu(z).unsqueeze(-1))
        *lead, H, D = o.shape
        y = rms_norm((o.float() * F.silu(z).unsqueeze(-1)).reshape(*lead, H * D), weight)
        return self.project_out(y.view(*lead, H, D))

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """``o_proj``; for one token (``[B, H, D]``, the decode step) its weight is applied directly,
        sparing a module call per layer per token (see :meth:`decode` on parameter access)."""
        return group_linear(y, self.o_proj.weight) if y.dim() == 3 else self.o_proj(y)

    def decode(self, x, q, k, v, gates, mask, state, backend="auto"):
        """One generated token: the current token's gates, then the eviction write and the read.

        ``x [B, hidden]`` the current token's normed hidden state, ``q [B, H, D]``; ``k, v
        [B, Hkv, D]``, ``gates [B, H, G]`` and ``mask`` as in :meth:`step` (the token leaving the
        window). Returns ``(out [B, H, D] or None, new_gates [B, H, G], state)``: ``out`` is
        ``output(step(...))``, None while the memory is empty (nothing written, nothing to
        read), and ``new_gates`` are ``write_gates(x)``, kept in the cache until this token leaves.

        ``backend`` (``ahn.kernels.STEP_BACKENDS``, or a prefill backend of ``AHNConfig``) is
        resolved by :func:`ahn.kernels.dispatch.resolve_step_backend`: ``"auto"`` is one compiled C++
        call for float32 CPU tensors without autograd (gates, step and read-out), the Triton step
        on CUDA, torch ops otherwise. Every backend reads the rule's ``step_spec``.

        A generated token pays per-op and Python overhead, not arithmetic, so this path is
        flat: the gate projections and ``g_proj`` run as one matmul over their weights,
        concatenated on every call (a kept copy could go stale: writes through ``.data`` bump
        no version counter), and ``o_proj``'s weight is applied without a module call. It
        reads parameters directly, so under ZeRO-3 gather the memory's parameters before
        generating.
        """
        spec = self.step_spec
        layers = [getattr(self, gate.projection) for gate in spec.gates]
        g_proj = self.g_proj
        # The parameters share a device and dtype (module.to moves them together) and so do the cached k / v
        # with q, and gates are float32: q, x, state and g_proj's weight stand for every tensor here.
        if not self.fused:  # torch ops: the compiled C++ and Triton steps cover the scalar-gated rules
            if backend not in (*_UNFUSED_STEP, "torch"):
                raise ValueError(f"backend={backend!r}: memory {self.name!r} decodes with torch ops only (the compiled "
                                 "C++ and Triton steps cover gated_deltanet, deltanet and mamba2); use 'auto' or 'torch'")
            backend = "torch"
        backend = resolve_step_backend(backend, q, x, state, g_proj.weight, head_dim=self.head_dim)
        if backend == "cpp":
            none = cpu_step.EMPTY
            codes, decay, strength = spec.cpp_constants
            return cpu_step.compiled()(
                x, [layer.weight for layer in layers], [none if layer.bias is None else layer.bias for layer in layers],
                [none if gate.bias is None else getattr(self, gate.bias) for gate in spec.gates], codes, g_proj.weight,
                none if g_proj.bias is None else g_proj.bias, q, none if k is None else k, none if v is None else v,
                none if gates is None else gates, decay, none if spec.decay is None else self.A_log, strength,
                self.rule.delta, none if mask is None else mask, none if state is None else state,
                getattr(self, spec.norm).weight, spec.joint_norm, self.o_proj.weight, self.use_qk_l2norm, L2NORM_EPS,
                NORM_EPS, self.head_dim**-0.5 if spec.scale is None else spec.scale,
            )  # (out or None, new_gates, state or None): an undefined C++ tensor arrives as None
        if k is not None and torch.is_grad_enabled():
            # The evicted token's k / v / gates are views of the cache's ring, which the caller overwrites
            # with the new token right after this call: what autograd saves must be copies.
            k, v, gates = k.clone(), v.clone(), gates.clone()
        layers.append(g_proj)
        weight, bias = _concat_linears(layers)
        sizes = [self.num_heads * gate.channels for gate in spec.gates] + [self.num_heads]
        *projections, z = F.linear(x, weight, bias).float().split(sizes, dim=-1)
        new_gates = self.gates_from(*projections)
        if k is None and state is None:
            return None, new_gates, None
        o, state = self.step(q, k, v, gates, mask, state, backend=backend)
        return self.read_out(o, z), new_gates, state

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
