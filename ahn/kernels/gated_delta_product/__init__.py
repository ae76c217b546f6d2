"""Gated DeltaProduct: n Householder (delta-rule) steps per token after one decay, a rank-n write.

    h' = exp(g_t) h_{t-1};   for j = 1..n:  h' <- h' + beta_tj k_tj (v_tj - h'^T k_tj)^T;   h_t = h'
    o_t = h_t^T (scale q_t)    (h: the state)

It is the gated delta rule run over the n T writes in order, with the token's decay on its first
write, no decay on the others, and a read only after the last: the recurrent reference, the
chunkwise torch form and the one-token step here are exactly that, on :mod:`ahn.kernels.gated_delta_rule`'s
implementations. fla's ``chunk_gated_delta_product`` interleaves the same way (writes of token t at
rows ``t n .. t n + n - 1``), which is the layout of k, v and beta here.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..dispatch import run_rule, run_step
from ..gated_delta_rule.chunk import chunk_gated_delta_rule
from ..gated_delta_rule.recurrent import recurrent_gated_delta_rule
from ..rule import DEFAULT_CHUNK_SIZE, GateInput, Rule
from ..step import step_ref


def _interleave(q, k, v, g, beta):
    """Token-major ``k [B, T, n, H, K]``, ``v [B, T, n, H, V]``, ``beta [B, T, n, H]``, ``g [B, T, H]`` or None
    -> the n T writes in order (``[B, T n, H, *]``), with q and g on each token's last / first write."""
    B, T, n, H, _ = k.shape
    q_all = q.new_zeros(B, T, n, H, q.shape[-1])
    q_all[:, :, -1] = q  # read after the token's last write only
    g_all = None
    if g is not None:
        g_all = g.new_zeros(B, T, n, H)
        g_all[:, :, 0] = g  # decay once, before the token's first write
    flat = lambda x: None if x is None else rearrange(x, "b t n h ... -> b (t n) h ...")  # noqa: E731
    return flat(q_all), flat(k), flat(v), flat(g_all), flat(beta), n


def recurrent_gated_delta_product(q, k, v, g, beta, scale, initial_state):
    """The reference loop, on token-major ``k [B, T, n, H, K]``, ``v [B, T, n, H, V]``, ``beta [B, T, n, H]``."""
    *flat, n = _interleave(q, k, v, g, beta)
    o, h = recurrent_gated_delta_rule(*flat, scale, initial_state)
    return o[:, n - 1 :: n], h


def chunk_gated_delta_product(q, k, v, g, beta, scale, initial_state, chunk_size=DEFAULT_CHUNK_SIZE):
    """Chunkwise torch form (the gated delta rule's over the n T writes); inputs as :func:`recurrent_gated_delta_product`."""
    *flat, n = _interleave(q, k, v, g, beta)
    o, h = chunk_gated_delta_rule(*flat, scale, initial_state, chunk_size=chunk_size)
    return o[:, n - 1 :: n], h


def step_gated_delta_product(q, k, v, g, beta, scale, state):
    """One token: ``k [B, Hk, n, K]``, ``v [B, Hk, n, V]``, ``beta [B, H, n]``, ``g [B, H]`` or None."""
    if k is None:
        return step_ref(q, None, None, None, None, scale, state, delta=True)
    for j in range(k.shape[2]):
        o, state = step_ref(q, k[:, :, j], v[:, :, j], g if j == 0 else None, beta[:, :, j], scale, state, delta=True)
    return o, state


def _fla(q, k, v, g, beta, *, use_qk_l2norm, **kwargs):
    # fla is imported on first use: an optional dependency (CUDA).
    from fla.ops.gated_delta_product import chunk_gated_delta_product as fla_chunk

    n = k.shape[1] // q.shape[1]  # k [B, T n, H, K]: the writes per token
    return fla_chunk(q, k, v, g, beta, n, use_qk_l2norm_in_kernel=use_qk_l2norm, **kwargs)


RULE = Rule(
    name="Gated DeltaProduct", gates=(GateInput("g", optional=True), GateInput("beta", per_write=True)), delta=True,
    recurrent=recurrent_gated_delta_product, chunk=chunk_gated_delta_product, step=step_gated_delta_product,
    fla=_fla, multi_write=True,
)


def gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    num_householder: int,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated DeltaProduct with ``n = num_householder`` writes per token (fla's argument order and layout).

    Args:
        q: ``[B, T, H, K]``.
        k: ``[B, T n, H, K]``, the writes of token t at rows ``t n .. t n + n - 1``; v ``[B, T n, H, V]``.
        g: ``[B, T, H]`` log decay of each token (<= 0), or None (no decay: DeltaProduct).
        beta: ``[B, T n, H]`` strength of each write.
        num_householder: n >= 1 (n = 1 is the gated delta rule).
        scale, initial_state, output_final_state, cu_seqlens (boundaries in tokens), use_qk_l2norm:
            as :func:`ahn.kernels.gated_delta_rule`.
        backend: ``"auto"``, ``"torch"``, ``"recurrent"`` or ``"fla"`` (fla's ``chunk_gated_delta_product``; CUDA).
        chunk_size: chunk length of the torch backend, in writes.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    """
    if not isinstance(num_householder, int) or num_householder < 1:
        raise ValueError(f"num_householder must be an int >= 1, got {num_householder!r}")
    return run_rule(RULE, q, k, v, (g, beta), scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                    backend=backend, chunk_size=chunk_size, writes=num_householder)

def gated_delta_product_step(
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
    """One token of :func:`gated_delta_product`: ``k [B, Hk, n, K]``, ``v [B, Hk, n, V]`` (its n writes),
    ``g [B, H]`` or None, ``beta [B, H, n]``; the rest as :func:`ahn.kernels.gated_delta_rule_step`."""
    return run_step(RULE, q, k, v, (g, beta), state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                    backend=backend)

__all__ = ["gated_delta_product", "gated_delta_product_step", "chunk_gated_delta_product",
           "recurrent_gated_delta_product", "RULE"]
