"""Delta rule (DeltaNet): the gated delta rule without decay (g = 0).

Its reference and chunkwise implementation are the gated delta rule's with ``g = None``,
which skips every decay factor rather than multiplying by exp(0).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import run_rule, run_step
from ..gated_delta_rule.chunk import chunk_gated_delta_rule
from ..gated_delta_rule.recurrent import recurrent_gated_delta_rule
from ..rule import DEFAULT_CHUNK_SIZE, GateInput, Rule
from ..step import step_ref


# fla's chunk_delta_rule asserts that q, k and v share one dtype and that it is not float32.
FLA_DTYPES = (torch.bfloat16, torch.float16)


def recurrent_delta_rule(q, k, v, beta, scale, initial_state):
    return recurrent_gated_delta_rule(q, k, v, None, beta, scale, initial_state)


def chunk_delta_rule(q, k, v, beta, scale, initial_state, chunk_size=DEFAULT_CHUNK_SIZE):
    return chunk_gated_delta_rule(q, k, v, None, beta, scale, initial_state, chunk_size=chunk_size)


def _step(q, k, v, beta, scale, state):
    return step_ref(q, k, v, None, beta, scale, state, delta=True)


def _fla(q, k, v, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.delta_rule import chunk_delta_rule as fla_chunk_delta_rule

    if q.dtype not in FLA_DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"backend='fla' runs the delta rule on bfloat16 or float16 q, k, v of one dtype (fla's "
                         f"chunk_delta_rule), got {q.dtype}, {k.dtype}, {v.dtype}; cast them, or use "
                         "backend='triton' / 'torch'")
    return fla_chunk_delta_rule(
        q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm,
    )


RULE = Rule(
    name="delta_rule", gates=(GateInput("beta"),), delta=True,
    recurrent=recurrent_delta_rule, chunk=chunk_delta_rule, step=_step, fla=_fla, fused=True,
)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Delta rule: ``h_t = h_{t-1} + beta_t k_t (v_t - h_{t-1}^T k_t)^T``, ``o_t = h_t^T (scale q_t)``.

    Shapes, arguments and return value as :func:`ahn.kernels.gated_delta_rule` without ``g``.
    """
    return run_rule(
        RULE, q, k, v, (beta,), scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size,
    )


def delta_rule_step(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`delta_rule`; shapes as :func:`ahn.kernels.gated_delta_rule_step` without ``g``."""
    return run_step(RULE, q, k, v, (beta,), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)


__all__ = ["delta_rule", "delta_rule_step", "chunk_delta_rule", "recurrent_delta_rule", "RULE"]
