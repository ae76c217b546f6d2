"""ahn's own Triton kernels (``backend="triton"``): chunkwise forward / backward and a fused decode step.

Nothing here imports triton at ``import ahn.kernels`` time: the rules import
:mod:`.chunk` / :mod:`.step` only when ``backend="triton"`` is asked for, after
:func:`require_triton` has checked that the kernels can run. The derivation and the
kernel layout are in ``ahn/kernels/README.md``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# The decode step holds one [BK, BV] state tile in registers and no shared-memory tiles, so it takes
# larger heads than the chunkwise kernels (here, not in step.py: the dispatcher reads it without triton).
MAX_STEP_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless ahn's Triton kernels can run on ``device`` for ``dtype`` inputs."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package: pip install triton (or 'ahn[dev]')")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got device {device}; use backend='torch' on {device.type} "
            "(or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's slow CPU interpreter)"
        )
    if dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32 and takes float32/bfloat16/float16 inputs, got float64; "
                         "use backend='torch' for float64")
