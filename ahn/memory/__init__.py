"""Memory modules: a registry of rules (one file each) sharing one read-out path.

A memory module turns the frozen attention's q/k/v into a memory read-out:

* ``rule``: the ``ahn.kernels`` :class:`~ahn.kernels.Rule` of the state update (its gates, delta rule
  or not, writes per token, which backends cover it), and ``step_spec``: the memory's :class:`StepSpec`,
  declared once: its gate channels (projection, activation, bias), which channel is the log decay and
  which the write strength, the read-out's norm and the query scale. Every method below reads them;
  ``rule_gates(gates)`` turns the kept gates into the rule's gate arguments (KDA and GDN-2 expand
  theirs from a low-rank code) and ``writes(k, v)`` gives a multi-write rule's writes.
* ``write_gates(x)``: per-token, per-head write gates from the layer's normed hidden state
  ``x [B, T, hidden]`` -> ``[B, T, H, G]`` (float32). They are computed when a token enters
  and kept in the cache until the token leaves the window and is written.
* ``read(q, k, v, gates, mask, initial_state, backend)``: writes the (k, v, gates) stream
  (``mask`` False = inert write: a pad, a sink or a slot before the sequence) and reads with
  q, through ``ahn.kernels``; returns ``(o [B, T, H, D] float32, state [B, H, D, D])``.
* ``output(o, x)`` = ``read_out(o, g_proj(x))``: per-head RMSNorm, output gate from the
  current token, per-head output projection (initialised to zero, so a fresh memory changes
  nothing) -> ``[B, T, H, D]``.
* ``step(...)`` and ``decode(..., backend)``: the same for one generated token. ``decode`` is the
  token's gates, the recurrent step (the evicted token's write and the read) and the read-out,
  with one of the step's backends (``ahn.kernels.dispatch``): torch ops, one compiled C++ call
  (float32 CPU, no autograd; ``ahn.kernels.cpu_step``) or the Triton step (CUDA).

A new memory is one file: subclass :class:`Memory`, declare its ``rule`` and ``step_spec``, decorate it
with ``@register_memory``; a new kernel rule is one ``ahn.kernels.Rule``.
"""

from __future__ import annotations

from .base import Gate, Memory, MemoryCost, StepSpec, available_memories, build_memory, memory_class, register_memory
from . import deltanet, gated_deltanet, gated_deltaproduct, gdn2, kda, mamba2  # noqa: E402,F401  (registration)

__all__ = ["Gate", "Memory", "MemoryCost", "StepSpec", "available_memories", "build_memory", "memory_class", "register_memory"]
