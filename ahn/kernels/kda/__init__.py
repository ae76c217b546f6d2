"""KDA (Kimi Delta Attention): the gated delta rule with a decay per key channel.

    h_t = (I - beta_t k_t k_t^T) Diag(exp g_t) h_{t-1} + beta_t k_t v_t^T,    o_t = h_t^T (scale q_t)    (h: the state)

KDA is GDN-2 with ``b = beta 1_K`` and ``w = beta 1_V``: its recurrent reference and chunkwise torch
form are :mod:`ahn.kernels.gdn2`'s, fed beta as a broadcast view (``[B, T, H, 1]``, no copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import run_rule, run_step
from ..gdn2.chunk import CHANNEL_CHUNK_SIZE, chunk_gdn2
from ..gdn2.recurrent import recurrent_gdn2
from ..rule import GateInput, Rule
from ..step import channel_step_ref


def recurrent_kda(q, k, v, g, beta, scale, initial_state):
    """The reference loop: :func:`ahn.kernels.gdn2.recurrent_gdn2` with ``b = w = beta``; ``beta [B, T, H]``."""
    return recurrent_gdn2(q, k, v, g, beta[..., None], beta[..., None], scale, initial_state)


def chunk_kda(q, k, v, g, beta, scale, initial_state, chunk_size=CHANNEL_CHUNK_SIZE):
    """Chunkwise torch form: :func:`ahn.kernels.gdn2.chunk_gdn2` with ``b = w = beta``; ``beta [B, T, H]``."""
    return chunk_gdn2(q, k, v, g, beta[..., None], beta[..., None], scale, initial_state, chunk_size=chunk_size)


def step_kda(q, k, v, g, beta, scale, state):
    """One token: :func:`ahn.kernels.step.channel_step_ref` with ``b = w = beta``; ``beta [B, H]`` (None: read only)."""
    return channel_step_ref(q, k, v, g, None if beta is None else beta[..., None],
                            None if beta is None else beta[..., None], scale, state)


def _fla(q, k, v, g, beta, *, use_qk_l2norm, **kwargs):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.kda import chunk_kda as fla_chunk_kda

    return fla_chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm, **kwargs)


RULE = Rule(
    name="KDA", gates=(GateInput("g", "key"), GateInput("beta")), delta=True, recurrent=recurrent_kda, chunk=chunk_kda,
    step=step_kda, fla=_fla, chunk_size=CHANNEL_CHUNK_SIZE,
)


def kda(
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
    chunk_size: int = CHANNEL_CHUNK_SIZE,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA: ``D = Diag(exp g_t) h_{t-1}``, ``h_t = D + beta_t k_t (v_t - D^T k_t)^T``, ``o_t = h_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]``; L2-normalised first when ``use_qk_l2norm``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` log decay per key channel (<= 0).
        beta: ``[B, T, H]`` write strength.
        scale, initial_state, output_final_state, cu_seqlens: as :func:`ahn.kernels.gated_delta_rule`.
        backend: ``"auto"``, ``"torch"``, ``"recurrent"`` or ``"fla"`` (fla's ``chunk_kda``; CUDA).
        chunk_size: chunk length of the torch backend.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    return run_rule(RULE, q, k, v, (g, beta), scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                    backend=backend, chunk_size=chunk_size)

def kda_step(
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
    """One token of :func:`kda`: ``g [B, H, K]``, ``beta [B, H]``; the rest as :func:`ahn.kernels.gdn2_step`."""
    return run_step(RULE, q, k, v, (g, beta), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)

__all__ = ["kda", "kda_step", "chunk_kda", "recurrent_kda", "RULE"]
