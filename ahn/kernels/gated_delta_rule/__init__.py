"""Gated delta rule (GatedDeltaNet): decay, then a delta-rule write; read with q."""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import run_rule, run_step
from ..rule import DEFAULT_CHUNK_SIZE, GateInput, Rule
from ..step import step_ref
from .chunk import chunk_gated_delta_rule
from .recurrent import recurrent_gated_delta_rule


def _step(q, k, v, g, beta, scale, state):
    return step_ref(q, k, v, g, beta, scale, state, delta=True)


def _fla(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    return fla_chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm,
    )


RULE = Rule(
    name="gated_delta_rule", gates=(GateInput("g"), GateInput("beta")), delta=True,
    recurrent=recurrent_gated_delta_rule, chunk=chunk_gated_delta_rule, step=_step, fla=_fla, fused=True,
)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
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
    """Gated delta rule: ``D = exp(g_t) h_{t-1}``, ``h_t = D + beta_t k_t (v_t - D^T k_t)^T``, ``o_t = h_t^T (scale q_t)`` (``h``: the state).

    Args:
        q, k: ``[B, T, H, K]``; L2-normalised first when ``use_qk_l2norm``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decay (<= 0).
        beta: ``[B, T, H]`` write strength (usually in (0, 1)).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` boundaries of N sequences packed along T (B must be 1).
        backend: ``"auto"`` (fla on CUDA in half precision, else torch), ``"torch"``
            (chunkwise), ``"recurrent"`` (the reference loop), ``"fla"``, ``"triton"`` (ahn's
            own kernels; CUDA, or the Triton interpreter when ``TRITON_INTERPRET=1``).
        chunk_size: chunk length of the torch and triton backends (triton: a power of two >= 16).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    return run_rule(
        RULE, q, k, v, (g, beta), scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size,
    )


def gated_delta_rule_step(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`gated_delta_rule` (the decode step): write ``(k, v)``, then read with ``q``.

    Args:
        q: ``[B, H, K]``.
        k, v: ``[B, Hk, K]``, ``[B, Hk, V]`` with H a multiple of Hk (each k / v head serves
            H / Hk consecutive query heads, as GQA; no repeat needed); ``k=None`` reads only.
        g, beta: ``[B, H]`` log decay and write strength (ignored when ``k`` is None).
        state: ``[B, H, K, V]``, None for zeros.
        mask: ``[B]`` bool, False where a row writes nothing (keeps its state); None: every row writes.
        backend: ``"torch"`` (tensor ops, autograd), ``"cpp"`` (one compiled call; float32 CPU,
            no autograd), ``"triton"`` (one fused launch for the batch; CUDA or the Triton
            interpreter; no autograd) or ``"auto"`` (see :func:`ahn.kernels.dispatch.resolve_step_backend`).

    Returns:
        ``(o [B, H, V], state [B, H, K, V] float32)``; equal to one token of the full rule.
    """
    return run_step(RULE, q, k, v, (g, beta), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)


__all__ = ["gated_delta_rule", "gated_delta_rule_step", "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "RULE"]
