"""GDN-2 (Gated DeltaNet 2): channel-wise decay, erase gate on the key axis, write gate on the value axis.

    h_t = (I - k_t (b_t * k_t)^T) Diag(exp g_t) h_{t-1} + k_t (w_t * v_t)^T,    o_t = h_t^T (scale q_t)    (h: the state)

KDA (``b = w = beta``, :mod:`ahn.kernels.kda`) and Gated DeltaNet (also a scalar g) are special
cases; the chunkwise torch form and the recurrent reference here serve KDA as well.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import run_rule, run_step
from ..rule import GateInput, Rule
from ..step import channel_step_ref
from .chunk import CHANNEL_CHUNK_SIZE, chunk_gdn2
from .recurrent import recurrent_gdn2


def _fla(q, k, v, g, b, w, *, use_qk_l2norm, **kwargs):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2

    return fla_chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=use_qk_l2norm, **kwargs)


RULE = Rule(
    name="GDN-2", gates=(GateInput("g", "key"), GateInput("b", "key"), GateInput("w", "value")), delta=True,
    recurrent=recurrent_gdn2, chunk=chunk_gdn2, step=channel_step_ref, fla=_fla, chunk_size=CHANNEL_CHUNK_SIZE,
)


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
    """GDN-2: ``D = Diag(exp g_t) h_{t-1}``, ``h_t = D + k_t (w_t * v_t - D^T (b_t * k_t))^T``, ``o_t = h_t^T (scale q_t)``.

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
    return run_rule(RULE, q, k, v, (g, b, w), scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                    backend=backend, chunk_size=chunk_size)

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
    return run_step(RULE, q, k, v, (g, b, w), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)

__all__ = ["gdn2", "gdn2_step", "chunk_gdn2", "recurrent_gdn2", "CHANNEL_CHUNK_SIZE", "RULE"]
