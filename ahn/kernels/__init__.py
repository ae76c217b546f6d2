"""Memory kernels (``ahn.kernels``): the recurrences that write evicted tokens into a fixed-size state.

Every rule is one declaration, a :class:`Rule` (:mod:`.rule`: its gates per head or per key / value
channel, delta rule or not, writes per token, its implementations), run by one dispatcher
(:mod:`.dispatch`) that checks the arguments, picks the backend and handles dtypes and masks. Each
rule has a pure-torch recurrent reference (the specification), a chunkwise torch implementation
(the CPU path) and, on CUDA, flash-linear-attention's kernels. All share fla's argument names and
order; ``backend`` picks the implementation. ``*_step`` is one token of a rule (the decode step),
with grouped k / v heads broadcast over the query heads: one call whose backends (torch ops,
compiled C++, Triton; ``STEP_BACKENDS``) share its arguments and are tested against the recurrent
reference.

The channel-wise rules (KDA, GDN-2) and Gated DeltaProduct have the recurrent reference, the
chunkwise torch form, the fla backend and a torch step; ahn's own Triton kernels and the compiled
steps cover the three scalar-gated rules.
"""

from .dispatch import BACKENDS, STEP_BACKENDS
from .rule import GateInput, Rule, inert_writes, l2norm, log_decay
from .delta_rule import delta_rule, delta_rule_step
from .gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from .ssd import ssd, ssd_step
from .kda import kda, kda_step
from .gdn2 import gdn2, gdn2_step
from .gated_delta_product import gated_delta_product, gated_delta_product_step

__all__ = [
    "BACKENDS", "GateInput", "Rule", "STEP_BACKENDS", "delta_rule", "delta_rule_step", "gated_delta_product", "gated_delta_product_step",
    "gated_delta_rule", "gated_delta_rule_step", "gdn2", "gdn2_step", "inert_writes", "kda", "kda_step", "l2norm",
    "log_decay", "ssd", "ssd_step",
]
