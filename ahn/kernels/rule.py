"""The one specification of a memory rule, and the formulas every rule and backend shares, defined once.

A rule is a :class:`Rule`: its gate arguments (:class:`GateInput`: one per head, per key channel or
per value channel; per token or per write), whether it is a delta rule, how many writes a token
makes, its implementations (recurrent reference, chunkwise torch form, one-token torch step, fla)
and whether ahn's own Triton kernels and compiled steps cover it. :mod:`.dispatch` reads this
declaration to check the arguments, pick the backend and hand it the arguments, for every rule.

The formulas here are the Python home of what the Triton and C++ sources restate in their own
language (they cite these functions): :func:`log_decay` and :func:`inert_writes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# fla's l2norm epsilon (fla/modules/l2norm.py): x / sqrt(sum(x^2) + eps).
L2NORM_EPS = 1e-6
# Chunk length of the torch chunkwise path; 64 is fla's default as well.
DEFAULT_CHUNK_SIZE = 64
# The trailing axes of a gate argument after the head axis, by its kind.
GATE_AXES = {"head": "", "key": ", K", "value": ", V"}


@dataclass(frozen=True)
class GateInput:
    """One gate argument of a rule, after ``q, k, v`` in its public order.

    ``name``: the argument's name; ``"g"`` is always the log decay (<= 0). ``axes``: ``"head"`` (one
    value per head, ``[B, T, H]``), ``"key"`` (per key channel, ``[B, T, H, K]``) or ``"value"`` (per
    value channel, ``[B, T, H, V]``). ``per_write``: one per write (``[B, T n, H]``) rather than per
    token. ``optional``: may be None (Gated DeltaProduct's ``g``: no decay).
    """

    name: str
    axes: str = "head"
    per_write: bool = False
    optional: bool = False

    @property
    def log_decay(self) -> bool:
        return self.name == "g"


@dataclass(frozen=True)
class Rule:
    """One memory rule, declared once; every backend and check reads this declaration.

    Attributes:
        name: how errors name the rule.
        gates: its gate arguments after ``q, k, v``, in the public order.
        delta: a delta rule (``u = beta (v - state^T k)``) rather than a plain write (``u = v``, SSD).
        recurrent: the specification, ``(q, k, v, *gates, scale, initial_state) -> (o, final_state)`` on
            ``[B, T, H, *]`` tensors in the compute dtype (token-major ``[B, T, n, H, *]`` for the per-write
            tensors of a multi-write rule).
        chunk: the chunkwise torch form, the same arguments plus ``chunk_size=``.
        step: one token in torch ops, ``(q, k, v, *gates, scale, state) -> (o, state)``, ``q [B, H, K]``,
            ``k / v [B, Hk, (n,) D]`` (grouped heads, each serving H / Hk query heads) or None (read only).
        fla: flash-linear-attention's kernel, ``(q, k, v, *gates, *, scale, initial_state, output_final_state,
            cu_seqlens, use_qk_l2norm)`` with the public tensors.
        chunk_size: the default chunk length of the torch backend.
        multi_write: a token makes n writes (``n`` an argument of the call; Gated DeltaProduct).
        fused: ahn's own Triton kernels and its compiled C++ / Triton decode steps cover the rule (one write
            per token, gates ``g`` and ``beta`` one per head); otherwise torch ops (and fla on CUDA) only.
    """

    name: str
    gates: tuple[GateInput, ...]
    delta: bool
    recurrent: Callable
    chunk: Callable
    step: Callable
    fla: Callable
    chunk_size: int = DEFAULT_CHUNK_SIZE
    multi_write: bool = False
    fused: bool = False

    def __post_init__(self):
        if self.fused and (self.multi_write or any(x.axes != "head" or x.name not in ("g", "beta")
                                                   for x in self.gates)):
            raise ValueError(f"rule {self.name!r}: the fused backends take one write per token and the gates g and "
                             "beta, one per head")

    @functools.cached_property
    def decay_index(self) -> Optional[int]:
        """Where the log decay ``g`` is among the gates, None without one."""
        return next((i for i, x in enumerate(self.gates) if x.log_decay), None)

    @property
    def decay(self) -> Optional[str]:
        """``"head"`` (one log decay per head), ``"key"`` (per key channel) or None (no decay)."""
        return None if self.decay_index is None else self.gates[self.decay_index].axes

    def scalar_gates(self, gates: tuple) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(g, beta)`` of a fused rule's ``gates`` (None where the rule has no such gate): the fused backends'
        arguments."""
        named = dict(zip((x.name for x in self.gates), gates))
        return named.get("g"), named.get("beta")


def log_decay(A_log: torch.Tensor, gate: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """The log decay of every memory: ``g = -exp(A_log) * gate`` (<= 0 for a gate >= 0), float32.

    ``A_log [H]`` the per-head rate; ``gate [..., H]`` (one per head) or ``[..., H, K]`` (``per_channel``,
    the rate broadcast over the key channels). The C++ decode step restates it (``cpu_step.cpp``).
    """
    rate = A_log.float().exp()
    return -(rate[:, None] if per_channel else rate) * gate


def inert_writes(mask: Optional[torch.Tensor], k: torch.Tensor, g: Optional[torch.Tensor]):
    """Make masked writes inert: ``k = 0`` writes nothing and log decay 0 keeps the state.

    ``mask``: bool over the leading axes of ``k`` and ``g`` (``[B, T]`` in the parallel form, ``[B]`` for one
    token), False where nothing is written (a pad, a sink, a slot before the sequence); None keeps every
    write. ``k [*mask.shape, ..., K]``; ``g [*mask.shape, ...]`` or None. Returns ``(k, g)``. The Triton step
    restates it (``_triton/step.py``: k and g times the mask), the C++ step skips a masked row's write.
    """
    if mask is None:
        return k, g
    m = mask.to(k.dtype)
    k = k * m.view(*mask.shape, *[1] * (k.dim() - mask.dim()))
    return k, (g * m.view(*mask.shape, *[1] * (g.dim() - mask.dim())) if g is not None else None)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension as fla does: ``x / sqrt(sum(x^2) + eps)``.

    Written as ``x / hypot(|x|, sqrt(eps))``: three tensor ops, which matters in the decode
    step, where per-op overhead is the cost (``F.rms_norm`` is several times slower on CPU).
    The gradient at x = 0 is fla's too (1 / sqrt(eps)).
    """
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), constant(L2NORM_EPS**0.5))


@functools.lru_cache(maxsize=None)
def constant(value: float) -> torch.Tensor:
    """A 0-dim float32 CPU tensor, made once; it combines with tensors of any device and dtype
    as a Python number would (for ops such as ``torch.hypot`` that only take tensors)."""
    return torch.tensor(value, dtype=torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
