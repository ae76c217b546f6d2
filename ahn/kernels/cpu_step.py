"""The compiled CPU form of the one-token memory step (``backend="cpp"``): the loader of ``cpu_step.cpp``.

In eager PyTorch one generated token costs the memory ~50 small tensor ops per layer, and on
CPU each costs microseconds of dispatch and Python overhead while the arithmetic (H states of
D x D) takes well under one. ``cpu_step.cpp`` (beside this file, shipped as package data) is one
C++ function that runs the step of :func:`ahn.kernels.step.step_ref` (decay, write the evicted
token, read with q) in plain loops, with the same arguments as the torch and Triton backends
(:func:`step`). Given the new token's hidden state it also computes, in the same call, the token's
write gates and the memory's read-out (RMSNorm, output gate, per-head output projection): that is
the memory decode of ``ahn.memory`` (``Memory.decode`` calls :func:`compiled` with its rule's
``StepSpec``). The gate activations are :data:`GATE_ACTIVATIONS`: their torch forms here, their C++
forms in the source's ``activate`` switch, whose case numbers are their codes here.

It is built once per machine with torch's ``cpp_extension.load`` under a name made from a hash of
the source, so a changed source builds anew. ``AHN_CPU_DECODE=0`` (or a missing toolchain) leaves
only the torch and Triton backends.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

# The gate activations' torch forms (the torch backend of the memory decode and the parallel form), in the
# order of their codes: code i is ``case i`` of ``activate`` in cpu_step.cpp (softplus: torch's threshold 20).
GATE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "identity": torch.nn.Identity(),  # a low-rank code the rule expands itself (KDA, GDN-2)
}
ACTIVATION_CODES = {name: code for code, name in enumerate(GATE_ACTIVATIONS)}
SOURCE_PATH = Path(__file__).with_name("cpu_step.cpp")
# Stands for an absent tensor argument of the compiled step (it reads only its size).
EMPTY = torch.empty(0)


@functools.lru_cache(maxsize=None)
def build_name() -> str:
    """The build cache key: a hash of the source, so a changed source builds anew under a new name."""
    return "ahn_cpu_step_" + hashlib.sha256(SOURCE_PATH.read_bytes()).hexdigest()[:12]


def _ninja_version() -> str:
    """The version of the ``ninja`` on PATH (what torch builds with); "none" without one."""
    try:
        return subprocess.run(["ninja", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"


def build_directory() -> str:
    """Where the step is built: one folder per source and ninja version. ninja records each compile
    command in its folder, and two ninja versions record them differently, so sharing one folder
    would rebuild (silently, ~25 s) every time the other ninja comes first on PATH."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(root, "ahn", f"{build_name()}-ninja{_ninja_version()}")


@functools.lru_cache(maxsize=None)
def compiled():
    """The compiled ``decode_step``, or None (disabled with ``AHN_CPU_DECODE=0``, or no toolchain)."""
    if os.environ.get("AHN_CPU_DECODE", "1") == "0":
        return None
    try:
        # torch's cpp_extension is imported here, on first use, for start-up time (it is slow to import).
        from torch.utils import cpp_extension

        name, folder = build_name(), build_directory()
        if not os.path.exists(os.path.join(folder, name + ".so")):
            print(f"ahn: building the compiled CPU decode step in {folder} (once per machine and ninja version, "
                  "about 30 s; AHN_CPU_DECODE=0 skips it)", file=sys.stderr, flush=True)
        os.makedirs(folder, exist_ok=True)
        module = cpp_extension.load(name, sources=[str(SOURCE_PATH)], extra_cflags=["-O3"], build_directory=folder,
                                    verbose=False)
        return module.decode_step
    except Exception as e:  # no compiler / ninja / headers: the torch ops do the same, slower
        warnings.warn(f"ahn: the compiled CPU decode step could not be built ({type(e).__name__}: {e}); "
                      "decoding uses torch ops (set AHN_CPU_DECODE=0 to skip the attempt)")
        return None


def _opt(t: Optional[torch.Tensor]) -> torch.Tensor:
    return EMPTY if t is None else t


def step(q, k, v, g, beta, state, mask, *, scale: float, use_qk_l2norm: bool, l2_eps: float, delta: bool):
    """The ``"cpp"`` backend of :func:`ahn.kernels.dispatch.step_unchecked` (same arguments): the bare step,
    no gates or read-out. Returns ``(o [B, H, V], state [B, H, K, V])`` float32."""
    gates = EMPTY
    decay_ch = strength_ch = -1
    if k is not None:
        channels = [t for t in (g, beta) if t is not None]
        decay_ch, strength_ch = (0 if g is not None else -1), (len(channels) - 1 if beta is not None else -1)
        gates = torch.stack(channels, -1) if channels else EMPTY  # [B, H, G]
    o, _, state = compiled()(
        EMPTY, [], [], [], [], EMPTY, EMPTY, q, _opt(k), _opt(v), gates, decay_ch, EMPTY, strength_ch, delta,
        _opt(mask), _opt(state), EMPTY, False, EMPTY, use_qk_l2norm, l2_eps, 0.0, scale,
    )
    return o, state
