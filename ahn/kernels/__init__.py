"""Memory kernels (``ahn.kernels``): the recurrences that write evicted tokens into a fixed-size state.

Each rule has a pure-torch recurrent reference (the specification), a chunkwise torch
implementation (the CPU path) and, on CUDA, flash-linear-attention's kernels. All share
fla's argument names and order; ``backend`` picks the implementation. ``*_step`` is one
token of a rule (the decode step), with grouped k / v heads broadcast over the query heads:
one call (:mod:`.step`) whose backends (torch ops, compiled C++, Triton; ``STEP_BACKENDS``)
share its arguments and are tested against the recurrent reference.

The channel-wise rules (KDA, GDN-2) and Gated DeltaProduct have the recurrent reference, the
chunkwise torch form, the fla backend and a torch step; ahn's own Triton kernels and the compiled
steps cover the three scalar-gated rules.
"""

from ._common import BACKENDS, l2norm
from .step import STEP_BACKENDS
from .delta_rule import delta_rule, delta_rule_step
from .gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from .ssd import ssd, ssd_step
from .kda import kda, kda_step
from .gdn2 import gdn2, gdn2_step
from .gated_delta_product import gated_delta_product, gated_delta_product_step

__all__ = [
    "BACKENDS", "STEP_BACKENDS", "delta_rule", "delta_rule_step", "gated_delta_product", "gated_delta_product_step",
    "gated_delta_rule", "gated_delta_rule_step", "gdn2", "gdn2_step", "kda", "kda_step", "l2norm", "ssd", "ssd_step",
]
