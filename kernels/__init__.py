"""Memory kernels (``ahn.kernels``): the recurrences that write evicted tokens into a fixed-size state.

Each rule has a pure-torch recurrent reference (the specification), a chunkwise torch
implementation (the CPU path) and, on CUDA, flash-linear-attention's kernels. All share
fla's argument names and order; ``backend`` picks the implementation.
"""

from ._common import BACKENDS, l2norm
from .delta_rule import delta_rule
from .gated_delta_rule import gated_delta_rule
from .ssd import ssd

__all__ = ["BACKENDS", "delta_rule", "gated_delta_rule", "l2norm", "ssd"]
