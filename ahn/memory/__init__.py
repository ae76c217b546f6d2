"""Memory modules: a registry of rules (one file each) sharing one read-out path.

A memory module turns the frozen attention's q/k/v into a memory read-out:

* ``write_gates(x)``: per-token, per-head write gates from the layer's normed hidden state
  ``x [B, T, hidden]`` -> ``[B, T, H, G]`` (float32): ``gates_from`` applied to the outputs of
  the Linear layers named in ``gate_projections``. They are computed when a token enters
  and kept in the cache until the token leaves the window and is written.
* ``read(q, k, v, gates, mask, initial_state, backend)``: writes the (k, v, gates) stream
  (``mask`` False = inert write: a pad, a sink or a slot before the sequence) and reads with
  q, through ``ahn.kernels``; returns ``(o [B, T, H, D] float32, state [B, H, D, D])``.
* ``output(o, x)`` = ``read_out(o, g_proj(x))``: per-head RMSNorm, output gate from the
  current token, per-head output projection (initialised to zero, so a fresh memory changes
  nothing) -> ``[B, T, H, D]``.
* ``step(...)`` and ``decode(...)``: the same for one generated token. ``decode`` runs the
  token's gate projections and ``g_proj`` as one matmul, then the recurrent ``step`` (the
  evicted token's write and the read) and ``read_out``: a generated token pays per-op
  overhead, not arithmetic, so the decode path keeps the op count low; for GatedDeltaNet and
  DeltaNet on CPU (float32, no autograd) it is one compiled C++ call (``ahn._cpu_decode``).

A new rule is one file: subclass :class:`Memory`, decorate it with ``@register_memory``.
"""

from __future__ import annotations

from .base import Memory, available_memories, build_memory, register_memory
from . import deltanet, gated_deltanet, mamba2  # noqa: E402,F401  (registration)

__all__ = ["Memory", "available_memories", "build_memory", "register_memory"]
