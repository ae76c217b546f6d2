"""GDN-2 (Gated DeltaNet 2): channel-wise decay, erase gate on the key axis, write gate on the value axis.

    S_t = (I - k_t (b_t * k_t)^T) Diag(exp g_t) S_{t-1} + k_t (w_t * v_t)^T,    o_t = S_t^T (scale q_t)

KDA (``b = w = beta``, :mod:`ahn.kernels.kda`) and Gated DeltaNet (also a scalar g) are special
cases; the chunkwise torch form and the recurrent reference here serve KDA as well.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import check_common, check_gate, check_qk, run_with_backend
from ..step import channel_step_ref, run_channel_step
from .chunk import chunk_gdn2
from .recurrent import recurrent_gdn2

# Chunk length of the channel-wise rules' torch path: each chunk builds a [C, C, K] decay tensor
# (a per-channel decay does not factor out of the key products), so a shorter chunk than the
# scalar rules' 64 keeps that tensor, and the work spent on it (C K per token), small.
CHANNEL_CHUNK_SIZE = 16


def gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
    chunk_size: int = CHANNEL_CHUNK_SIZE,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """GDN-2: ``D = Diag(exp g_t) S_{t-1}``, ``S_t = D + k_t (w_t * v_t - D^T (b_t * k_t))^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]``; L2-normalised first when ``use_qk_l2norm``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` log decay per key channel (<= 0).
        b: ``[B, T, H, K]`` erase gate on the key axis (usually in (0, 1)).
        w: ``[B, T, H, V]`` write gate on the value axis (usually in (0, 1)).
        scale, initial_state, output_final_state, cu_seqlens: as :func:`ahn.kernels.gated_delta_rule`.
        backend: ``"auto"`` (fla on CUDA in half precision, else torch), ``"torch"`` (chunkwise),
            ``"recurrent"`` (the reference loop) or ``"fla"`` (fla's ``chunk_gdn2``; CUDA). ahn has no
            Triton kernel of its own for this rule.
        chunk_size: chunk length of the torch backend.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    check_qk(q, k)
    B, T, H, K = q.shape
    check_gate("g", g, (B, T, H, K), "[B, T, H, K]", log_decay=True)
    check_gate("b", b, (B, T, H, K), "[B, T, H, K]")
    check_common(q, v, initial_state, cu_seqlens, k=k, g=g, b=b, w=w)
    check_gate("w", w, (*v.shape[:3], v.shape[-1]), "[B, T, H, V]")

    def fla(**kwargs):
        from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2

        return fla_chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=kwargs.pop("use_qk_l2norm"), **kwargs)

    return run_with_backend("GDN-2", recurrent_gdn2, chunk_gdn2, fla, q, k, v, (g, b, w), scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                            use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size)


def gdn2_step(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    w: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`gdn2` (the decode step): write ``(k, v)``, then read with ``q``.

    ``q [B, H, K]``; ``k, v [B, Hk, K], [B, Hk, V]`` (GQA as :func:`ahn.kernels.gated_delta_rule_step`;
    ``k=None`` reads only); ``g, b [B, H, K]``, ``w [B, H, V]``; ``state [B, H, K, V]`` or None;
    ``mask [B]`` bool (False: the row writes nothing). ``backend``: ``"torch"`` or ``"auto"`` (torch:
    the compiled C++ and Triton steps cover the scalar-gated rules only).
    Returns ``(o [B, H, V], state [B, H, K, V] float32)``.
    """
    if k is not None:
        B, H, K = q.shape
        V = v.shape[-1] if isinstance(v, torch.Tensor) else 0
        for name, x, shape in (("g", g, (B, H, K)), ("b", b, (B, H, K)), ("w", w, (B, H, V))):
            check_gate(name, x, shape, "[B, H, V]" if name == "w" else "[B, H, K]", log_decay=name == "g")
    return run_channel_step("GDN-2", channel_step_ref, q, k, v, (g, b, w), state, scale=scale,
                            use_qk_l2norm=use_qk_l2norm, mask=mask, backend=backend)


__all__ = ["gdn2", "gdn2_step", "chunk_gdn2", "recurrent_gdn2", "CHANNEL_CHUNK_SIZE"]
