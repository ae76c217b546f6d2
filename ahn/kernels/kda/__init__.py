"""KDA (Kimi Delta Attention): the gated delta rule with a decay per key channel.

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

KDA is GDN-2 with ``b = beta 1_K`` and ``w = beta 1_V``: its recurrent reference and chunkwise torch
form are :mod:`ahn.kernels.gdn2`'s, fed beta as a broadcast view (``[B, T, H, 1]``, no copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import check_common, check_gate, check_qk, run_with_backend
from ..gdn2 import CHANNEL_CHUNK_SIZE
from ..gdn2.chunk import chunk_gdn2
from ..gdn2.recurrent import recurrent_gdn2
from ..step import channel_step_ref, run_channel_step


def recurrent_kda(q, k, v, g, beta, scale, initial_state):
    """The reference loop: :func:`ahn.kernels.gdn2.recurrent_gdn2` with ``b = w = beta``; ``beta [B, T, H]``."""
    return recurrent_gdn2(q, k, v, g, beta[..., None], beta[..., None], scale, initial_state)


def chunk_kda(q, k, v, g, beta, scale, initial_state, chunk_size=CHANNEL_CHUNK_SIZE):
    """Chunkwise torch form: :func:`ahn.kernels.gdn2.chunk_gdn2` with ``b = w = beta``; ``beta [B, T, H]``."""
    return chunk_gdn2(q, k, v, g, beta[..., None], beta[..., None], scale, initial_state, chunk_size=chunk_size)


def _kda_step_ref(q, k, v, g, beta, scale, state):
    return channel_step_ref(q, k, v, g, None if beta is None else beta[..., None],
                            None if beta is None else beta[..., None], scale, state)


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
    """KDA: ``D = Diag(exp g_t) S_{t-1}``, ``S_t = D + beta_t k_t (v_t - D^T k_t)^T``, ``o_t = S_t^T (scale q_t)``.

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
    check_qk(q, k)
    B, T, H, K = q.shape
    check_gate("g", g, (B, T, H, K), "[B, T, H, K]", log_decay=True)
    check_gate("beta", beta, (B, T, H), "[B, T, H]")
    check_common(q, v, initial_state, cu_seqlens, k=k, g=g, beta=beta)

    def fla(**kwargs):
        from fla.ops.kda import chunk_kda as fla_chunk_kda

        return fla_chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=kwargs.pop("use_qk_l2norm"), **kwargs)

    return run_with_backend("KDA", recurrent_kda, chunk_kda, fla, q, k, v, (g, beta), scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                            use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size)


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
    if k is not None:
        B, H, K = q.shape
        check_gate("g", g, (B, H, K), "[B, H, K]", log_decay=True)
        check_gate("beta", beta, (B, H), "[B, H]")
    return run_channel_step("KDA", _kda_step_ref, q, k, v, (g, beta), state, scale=scale,
                            use_qk_l2norm=use_qk_l2norm, mask=mask, backend=backend)


__all__ = ["kda", "kda_step", "chunk_kda", "recurrent_kda"]
