"""SSD (Mamba2's state-space duality form): a decayed outer-product write, read with q."""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import run_rule, run_step
from ..rule import DEFAULT_CHUNK_SIZE, GateInput, Rule, l2norm
from ..step import step_ref
from .chunk import chunk_ssd
from .recurrent import recurrent_ssd


def _step(q, k, v, g, scale, state):
    return step_ref(q, k, v, g, None, scale, state, delta=False)


def _fla(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.simple_gla import chunk_simple_gla

    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return chunk_simple_gla(
        q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


RULE = Rule(name="ssd", gates=(GateInput("g"),), delta=False, recurrent=recurrent_ssd, chunk=chunk_ssd, step=_step,
            fla=_fla, fused=True)


def ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mamba2's SSD: ``h_t = exp(g_t) h_{t-1} + k_t v_t^T``, ``o_t = h_t^T (scale q_t)``.

    The caller folds Mamba2's dt into v (or k). Shapes, arguments and return value as
    :func:`ahn.kernels.gated_delta_rule` without ``beta``; the fla backend is fla's
    ``chunk_simple_gla`` (the same recurrence with a scalar per-head gate).
    """
    return run_rule(
        RULE, q, k, v, (g,), scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size,
    )


def ssd_step(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`ssd`; shapes as :func:`ahn.kernels.gated_delta_rule_step` without ``beta``."""
    return run_step(RULE, q, k, v, (g,), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)


__all__ = ["ssd", "ssd_step", "chunk_ssd", "recurrent_ssd", "RULE"]
