"""Shared plumbing of the memory rules: argument checks, backend choice, varlen packing.

Every rule in this package has one public function (``gated_delta_rule``, ``delta_rule``,
``ssd``) with flash-linear-attention's argument names and order. They all go through
:func:`run_rule`, which validates the inputs once, picks the backend and hands float32
(float64 for float64 inputs) tensors to the rule's implementations.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

BACKENDS = ("auto", "recurrent", "torch", "fla", "triton")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# fla's l2norm epsilon (fla/modules/l2norm.py): x / sqrt(sum(x^2) + eps).
L2NORM_EPS = 1e-6
# Chunk length of the torch chunkwise path; 64 is fla's default as well.
DEFAULT_CHUNK_SIZE = 64


@dataclass(frozen=True)
class Rule:
    """One memory rule: its name, which gate tensors it takes and its implementations.

    ``recurrent`` and ``chunk`` take ``(q, k, v, g, beta, scale, initial_state)`` in the
    compute dtype with shapes ``[B, T, H, K]`` / ``[B, T, H, V]`` / ``[B, T, H]`` (``g`` or
    ``beta`` may be None when the rule has no such gate; ``chunk`` also takes
    ``chunk_size``) and return ``(o [B, T, H, V], final_state [B, H, K, V])``.
    ``fla`` calls flash-linear-attention with the public arguments. The one-token step of every
    rule is :func:`ahn.kernels.step.step_ref`; ``has_beta`` makes it a delta rule.
    """

    name: str
    has_g: bool
    has_beta: bool
    recurrent: Callable
    chunk: Callable
    fla: Callable


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rule: str = "") -> str:
    """Map ``backend`` to a concrete one; ``auto`` is fla on CUDA (half precision) else torch.

    ``rule``: the name of a rule that has no Triton kernel of ahn's own (``backend="triton"`` is
    refused for it), empty for the rules that have one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" and rule:
        raise ValueError(f"backend='triton': ahn has no Triton kernel for {rule} (only for the gated delta rule, the "
                         "delta rule and SSD); use backend='fla' on CUDA or 'torch'")
    if backend == "auto":
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and fla_available():
            return "fla"
        return "torch"
    if backend == "triton":
        from ._triton import require_triton

        require_triton(device, dtype)
    if backend == "fla":
        if device.type != "cuda":
            raise ValueError(f"backend='fla' needs CUDA tensors, got device {device}; use backend='torch' on {device.type}")
        if not fla_available():
            raise ValueError("backend='fla' needs flash-linear-attention: pip install 'ahn[gpu]'")
    return backend


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension as fla does: ``x / sqrt(sum(x^2) + eps)``.

    Written as ``x / hypot(|x|, sqrt(eps))``: three tensor ops, which matters in the decode
    step, where per-op overhead is the cost (``F.rms_norm`` is several times slower on CPU).
    The gradient at x = 0 is fla's too (1 / sqrt(eps)).
    """
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), constant(L2NORM_EPS**0.5))


@functools.lru_cache(maxsize=None)
def constant(value: float) -> torch.Tensor:
    """A 0-dim float32 CPU tensor, made once; it combines with tensors of any device and dtype
    as a Python number would (for ops such as ``torch.hypot`` that only take tensors)."""
    return torch.tensor(value, dtype=torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; supported: float64, float32, bfloat16, float16")


def check_inputs(rule: Rule, q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    """Validate shapes, dtypes and values; raise ValueError/TypeError naming the argument."""
    check_qk(q, k)
    B, T, H, _ = q.shape
    check_gate("g", g, (B, T, H), "[B, T, H]", log_decay=True, needed=rule.has_g)
    check_gate("beta", beta, (B, T, H), "[B, T, H]", needed=rule.has_beta)
    check_common(q, v, initial_state, cu_seqlens, k=k, g=g, beta=beta)


def check_qk(q, k, steps: int = 1) -> None:
    """q ``[B, T, H, K]`` and k of its shape (``[B, T * steps, H, K]`` with ``steps`` writes per token)."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T * steps, H, K):
        time = "T" if steps == 1 else f"T * {steps}"
        raise ValueError(f"k must be [B, {time}, H, K] = [{B}, {T * steps}, {H}, {K}] (q is {list(q.shape)}), "
                         f"got {tuple(k.shape)}")


def check_gate(name: str, x, shape: tuple, layout: str, *, log_decay: bool = False, needed: bool = True) -> None:
    """Check one gate tensor of a rule against its expected ``shape`` (named ``layout``, e.g. ``[B, T, H, K]``);
    a log decay must be <= 0. Nothing is checked when the rule takes no such gate (``needed`` False)."""
    if not needed:
        return
    _check_tensor(name, x, len(shape))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be {layout} = {list(shape)}, got {tuple(x.shape)}")
    if log_decay and bool((x > 0).any()):
        raise ValueError(f"{name} is a log decay and must be <= 0; got max {x.max().item():.4g} "
                         "(pass e.g. -softplus(x) or logsigmoid(x))")


def check_common(q, v, initial_state, cu_seqlens, steps: int = 1, **tensors) -> None:
    """The checks every rule shares: q ``[B, T, H, K]``, v ``[B, T * steps, H, V]`` (``steps`` writes per
    token: Gated DeltaProduct's Householder steps), the devices of ``tensors`` (name -> tensor or None),
    ``cu_seqlens`` and the initial state ``[N, H, K, V]``."""
    _check_tensor("q", q, 4)
    _check_tensor("v", v, 4)
    B, T, H, _ = q.shape
    if v.shape[:3] != (B, T * steps, H):
        time = "T" if steps == 1 else f"T * {steps}"
        raise ValueError(f"v must be [B, {time}, H, V] = [{B}, {T * steps}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("v", v), *tensors.items()):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of sequence boundaries [0, ..., T]")
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {B}")
        cs = cu_seqlens.tolist()
        if len(cs) < 2 or cs[0] != 0 or cs[-1] != T or any(b < a for a, b in zip(cs, cs[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T = {T}; got {cs}")
    n_states = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        expect = (n_states, H, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(expect)}, got {tuple(initial_state.shape)}")


def pad_sequences(x: Optional[torch.Tensor], cu_seqlens: list[int]) -> Optional[torch.Tensor]:
    """[1, T, ...] packed -> [N, T_max, ...] zero-padded at the end of each sequence."""
    if x is None:
        return None
    lengths = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    t_max = max(lengths)
    rows = []
    for a, n in zip(cu_seqlens, lengths):
        seq = x[0, a : a + n]
        pad = [0, 0] * (seq.dim() - 1) + [0, t_max - n]
        rows.append(F.pad(seq, pad))
    return torch.stack(rows)


def unpad_sequences(x: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """[N, T_max, ...] -> [1, T, ...] packed (inverse of :func:`pad_sequences`)."""
    return torch.cat([x[i, : b - a] for i, (a, b) in enumerate(zip(cu_seqlens, cu_seqlens[1:]))]).unsqueeze(0)


def run_rule(
    rule: Rule,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    backend: str,
    chunk_size: int,
):
    """Validate, dispatch and run ``rule``; returns ``(o [B, T, H, V], final_state or None)``.

    The output has v's dtype; the final state is float32 (float64 for float64 inputs), as in fla.
    """
    check_inputs(rule, q, k, v, g, beta, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return run_rule_unchecked(
        rule, q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=resolve_backend(backend, q.device, q.dtype),
        chunk_size=chunk_size,
    )


def run_rule_unchecked(
    rule: Rule,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    backend: str,
    chunk_size: int,
):
    """:func:`run_rule` after its checks, on a resolved ``backend`` (``"recurrent"``, ``"torch"``,
    ``"fla"`` or ``"triton"``): fills in the default scale and hands the arguments to the backend.

    It does not check where the backend can run: tests/test_fla_glue.py calls it with ``"fla"`` on
    CPU tensors to run flash-linear-attention's kernels, through this glue, in Triton's interpreter.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "fla":
        # fla's kernels read the boundaries on q's device (a CPU tensor there is an invalid pointer to
        # Triton) and document them as a LongTensor; ahn takes int32 / int64 on any device.
        return rule.fla(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device, torch.long), use_qk_l2norm=use_qk_l2norm,
        )
    if backend == "triton":
        from ._triton.chunk import chunk_rule

        if use_qk_l2norm:
            q, k = l2norm(q.float()), l2norm(k.float())
        # The kernels load every input in its own dtype and accumulate in float32.
        return chunk_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    return run_torch(
        rule.recurrent, rule.chunk, q, k, v, (g, beta), scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend,
        chunk_size=chunk_size,
    )


def run_with_backend(name: str, recurrent: Callable, chunk: Callable, fla: Callable, q, k, v, gates: tuple, *,
                     scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, backend, chunk_size):
    """Run a rule that has no Triton kernel of ahn's own (``name`` is its name in errors), checked inputs:
    pick the backend, fill in the default scale, then ``fla(scale=..., initial_state=..., output_final_state=...,
    cu_seqlens=..., use_qk_l2norm=...)`` (the public arguments bound by the caller) or :func:`run_torch`."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    backend = resolve_backend(backend, q.device, q.dtype, rule=name)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "fla":
        return fla(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device, torch.long),
                   use_qk_l2norm=use_qk_l2norm)
    return run_torch(recurrent, chunk, q, k, v, gates, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                     backend=backend, chunk_size=chunk_size)


def run_torch(
    recurrent: Callable,
    chunk: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: tuple,
    *,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    backend: str,
    chunk_size: int,
):
    """The torch backends (``"recurrent"`` or ``"torch"``, the chunkwise form) of any rule, checked inputs:
    computes in float32 (float64 for float64 inputs), L2-normalises q and k when asked, and runs
    ``cu_seqlens`` as zero-padded rows. ``recurrent`` / ``chunk`` take ``(q, k, v, *gates, scale,
    initial_state)`` (``chunk`` also ``chunk_size``); ``gates`` are ``[B, T, ...]`` tensors or None."""
    dt, out_dtype = compute_dtype(q.dtype), v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    gates = tuple(x.to(dt) if x is not None else None for x in gates)
    h0 = initial_state.to(dt) if initial_state is not None else None
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if backend == "recurrent" or (q.shape[1] == 1 and cu_seqlens is None):
        impl = recurrent  # one token (a decode step): the chunkwise form would only add padding
    else:
        impl = lambda *a: chunk(*a, chunk_size=chunk_size)  # noqa: E731
    if cu_seqlens is None:
        o, ht = impl(q, k, v, *gates, scale, h0)
    else:
        cs = cu_seqlens.tolist()
        # Zero padding is inert for every rule here: k = 0 and beta = 0 write nothing, g = 0
        # does not decay, so each padded row's final state is its sequence's final state.
        o, ht = impl(*(pad_sequences(x, cs) for x in (q, k, v, *gates)), scale, h0)
        o = unpad_sequences(o, cs)
    return o.to(out_dtype), (ht if output_final_state else None)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C."""
    T = x.shape[1]
    pad = (-T) % chunk_size
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
    if x.dim() == 3:
        return rearrange(x, "b (n c) h -> b h n c", c=chunk_size)
    return rearrange(x, "b (n c) h d -> b h n c d", c=chunk_size)


def chunk_decay(g: Optional[torch.Tensor], shape, chunk_size: int, ref: torch.Tensor):
    """Cumulative in-chunk log decay G [B, H, N, C] and the causal decay matrix [B, H, N, C, C].

    ``decay[..., i, j] = exp(G_i - G_j)`` for j <= i and 0 above the diagonal
    (exactly the causal mask when ``g`` is None).
    """
    C = chunk_size
    causal = torch.ones(C, C, dtype=torch.bool, device=ref.device).tril()
    if g is None:
        G = ref.new_zeros(shape)
        return G, causal.to(ref.dtype).expand(*shape, C)
    G = to_chunks(g, C).cumsum(-1)  # [B, H, N, C]
    diff = G[..., :, None] - G[..., None, :]  # [B, H, N, C, C]
    # Mask before exp: above the diagonal G_i - G_j >= 0 could overflow.
    return G, diff.masked_fill(~causal, float("-inf")).exp()
