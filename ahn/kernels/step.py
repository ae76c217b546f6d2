"""The one-token step of every rule (the decode step): its reference and its backends, one call.

:func:`step_ref` is the specification: decay, write the evicted token, read with q. The
recurrent references of the rules are it in a loop. :func:`step_unchecked` runs it with one of
three backends sharing its arguments:

* ``"torch"``: :func:`step_ref` as a few batched tensor ops (any device and dtype, autograd);
* ``"cpp"``: one compiled C++ call (``cpu_step.cpp``, loaded by :mod:`.cpu_step`; float32 CPU tensors, no autograd);
* ``"triton"``: one fused launch (``_triton/step.py``; CUDA, or the Triton interpreter; no autograd).

:func:`resolve_step_backend` is the dispatcher (``"auto"`` picks C++ for float32 CPU tensors,
Triton on CUDA, torch ops otherwise and whenever autograd needs a backward). The memory
modules' decode (``ahn.memory``) goes through the same dispatcher; its C++ form also computes
the token's write gates and the read-out in the same call.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from . import cpu_step
from ._common import BACKENDS, L2NORM_EPS, Rule, compute_dtype, l2norm
from ._triton import MAX_STEP_HEAD_DIM, require_triton

STEP_BACKENDS = ("auto", "torch", "cpp", "triton")
# The model hands its prefill backend (``AHNConfig.backend``, one of BACKENDS) to the decode step
# too: "recurrent" is the reference, i.e. the torch ops; fla has no step of ours, "auto" chooses.
PREFILL_TO_STEP = {"recurrent": "torch", "fla": "auto"}


def step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H] log decay, or None (no decay)
    beta: Optional[torch.Tensor],  # [B, H] write strength, or None (1)
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
    *,
    delta: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``S <- exp(g) S``; ``u = beta (v - S^T k)`` (delta rules) or ``beta v`` (SSD);
    ``S <- S + k u^T``; ``o = scale S^T q``. Returns ``(o [B, H, V], state [B, H, K, V])``.

    Each k / v head serves H / Hk consecutive query heads (GQA). Written as batched matrix
    products over the B * H states with as few tensor ops as the maths allows: the torch
    backend of the decode step is this function, run once per layer per generated token.
    """
    B, H, K = q.shape
    V = state.shape[-1]
    S = state.reshape(B * H, K, V)
    if k is not None:
        if g is not None:
            S = S * g.reshape(B * H, 1, 1).exp()
        k_t = expand_heads(k, H).reshape(B * H, 1, K)
        u = expand_heads(v, H).reshape(B * H, 1, V)
        if delta:
            u = u - torch.bmm(k_t, S)  # v - S^T k
        if beta is not None:
            u = u * beta.reshape(B * H, 1, 1)
        S = torch.addcmul(S, k_t.transpose(1, 2), u)  # S + k u^T
    o = torch.bmm(q.reshape(B * H, 1, K), S).view(B, H, V) * scale
    return o, S.view(B, H, K, V)


def channel_step_ref(
    q: torch.Tensor,  # [B, H, K]
    k: Optional[torch.Tensor],  # [B, Hk, K], H a multiple of Hk; None: read only
    v: Optional[torch.Tensor],  # [B, Hk, V]
    g: Optional[torch.Tensor],  # [B, H, K] log decay per key channel
    b: Optional[torch.Tensor],  # [B, H, K] erase gate (or [B, H, 1])
    w: Optional[torch.Tensor],  # [B, H, V] write gate (or [B, H, 1])
    scale: float,
    state: torch.Tensor,  # [B, H, K, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of GDN-2 (KDA: ``b = w = beta``): ``S <- Diag(exp g) S``; ``u = w * v - S^T (b * k)``;
    ``S <- S + k u^T``; ``o = scale S^T q``. Returns ``(o [B, H, V], state [B, H, K, V])``.

    The channel-wise counterpart of :func:`step_ref` (whose decay and strength are one scalar per
    head); each k / v head serves H / Hk consecutive query heads (GQA).
    """
    B, H, K = q.shape
    S = state
    if k is not None:
        k_t, v_t = expand_heads(k, H), expand_heads(v, H)  # [B, H, K], [B, H, V]
        S = S * g.exp().unsqueeze(-1)
        u = v_t * w - torch.einsum("bhk,bhkv->bhv", k_t * b, S)
        S = S + k_t.unsqueeze(-1) * u.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q, S) * scale
    return o, S


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hk, D]`` -> ``[B, heads, D]``: k / v head j serves query heads j*R .. j*R+R-1 (GQA, R = heads / Hk)."""
    Hk = x.shape[1]
    return x if Hk == heads else x.index_select(1, _head_index(Hk, heads, x.device))


@functools.lru_cache(maxsize=None)
def _head_index(kv_heads: int, heads: int, device: torch.device) -> torch.Tensor:
    return torch.arange(heads, device=device) // (heads // kv_heads)


def needs_backward(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would differentiate through a step on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_step_backend(backend: str, q: torch.Tensor, *tensors: Optional[torch.Tensor], head_dim: int) -> str:
    """The dispatcher: map ``backend`` to ``"torch"``, ``"cpp"`` or ``"triton"`` for a step on ``q`` and
    ``tensors`` (every other tensor the call reads, parameters included; None where absent).

    ``"auto"``: torch ops when autograd needs a backward; the C++ step for float32 CPU tensors
    (unless it cannot be built or ``AHN_CPU_DECODE=0``); the Triton step on CUDA for heads up to
    ``MAX_STEP_HEAD_DIM`` when triton is installed; torch ops otherwise. A backend named
    explicitly that cannot run raises ValueError saying why and what to use instead.
    """
    if backend not in STEP_BACKENDS and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {STEP_BACKENDS} for a decode step "
                         f"(nor a prefill backend {BACKENDS})")
    backend = PREFILL_TO_STEP.get(backend, backend)
    everything = (q, *tensors)
    if backend == "torch":
        return backend
    if backend == "auto":  # kept cheap: the model's decode resolves once per layer per generated token
        if needs_backward(*everything):
            return "torch"
        if q.is_cpu:
            return "cpp" if _cpp_takes(everything) and cpu_step.compiled() is not None else "torch"
        if (q.is_cuda and q.dtype != torch.float64 and head_dim <= MAX_STEP_HEAD_DIM
                and importlib.util.find_spec("triton") is not None):
            return "triton"
        return "torch"
    if needs_backward(*everything):
        raise ValueError(f"backend={backend!r} decode step is inference-only (no backward); run it under "
                         "torch.no_grad() / torch.inference_mode() or use backend='torch' to differentiate through it")
    if backend == "cpp":
        if not _cpp_takes(everything):
            found = sorted({f"{t.dtype} on {t.device}" for t in everything if t is not None})
            raise ValueError(f"backend='cpp' takes float32 CPU tensors, got {found}; use backend='torch'")
        if cpu_step.compiled() is None:
            raise ValueError("backend='cpp': the compiled CPU step is unavailable (AHN_CPU_DECODE=0, or it could "
                             "not be built: see the warning above); use backend='torch'")
        return backend
    require_triton(q.device, q.dtype)
    if head_dim > MAX_STEP_HEAD_DIM:
        raise ValueError(f"backend='triton' decode step supports head sizes up to {MAX_STEP_HEAD_DIM}, got "
                         f"{head_dim}; use backend='torch'")
    return backend


def _cpp_takes(tensors) -> bool:
    # is_cpu / dtype, not device.type: this runs once per layer per generated token.
    return all(t is None or (t.is_cpu and t.dtype == torch.float32) for t in tensors)


def run_step(
    rule: Rule,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    *,
    scale: Optional[float],
    use_qk_l2norm: bool,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of ``rule``: write one token per row (unless ``k`` is None), read with ``q``.

    Shapes: ``q [B, H, K]``, ``k [B, Hk, K]`` and ``v [B, Hk, V]`` with H a multiple of Hk
    (grouped keys / values, as GQA: k / v head j serves query heads j*H/Hk .. (j+1)*H/Hk-1),
    ``g`` / ``beta`` ``[B, H]`` (SSD: ``beta`` None, or a strength multiplying v), ``mask [B]``
    bool (False: that row writes nothing) or None, ``state [B, H, K, V]`` (None: zeros). Returns
    ``(o [B, H, V]`` in v's dtype (q's when read only), ``state [B, H, K, V]`` float32 (float64
    for float64 q)). Checks the arguments, picks the backend (:func:`resolve_step_backend`), then
    runs :func:`step_unchecked`.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, K] (one token), got shape {tuple(q.shape)}")
    B, H, K = q.shape
    if k is not None:
        if k.dim() != 3 or k.shape[0] != B or k.shape[2] != K or H % k.shape[1]:
            raise ValueError(f"k must be [B, Hk, K] with H = {H} a multiple of Hk, got shape {tuple(k.shape)}")
        if v is None or v.shape[:2] != k.shape[:2]:
            raise ValueError(f"v must be [B, Hk, V] = [{B}, {k.shape[1]}, V], "
                             f"got {None if v is None else tuple(v.shape)}")
        for name, x, needed in (("g", g, rule.has_g), ("beta", beta, rule.has_beta)):
            if (needed and x is None) or (x is not None and tuple(x.shape) != (B, H)):
                raise ValueError(f"{name} must be [B, H] = [{B}, {H}], got {None if x is None else tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B,)):
            raise ValueError(f"mask must be a bool [B] = [{B}] tensor, got {mask.dtype} {tuple(mask.shape)}")
    if state is not None and (state.dim() != 4 or state.shape[:3] != (B, H, K)):
        raise ValueError(f"state must be [B, H, K, V] = [{B}, {H}, {K}, V], got shape {tuple(state.shape)}")
    if state is None and k is None:
        raise ValueError("a read-only step (k=None) needs a state")
    V = v.shape[-1] if k is not None else state.shape[-1]
    backend = resolve_step_backend(backend, q, k, v, g, beta, state, head_dim=max(K, V))
    return step_unchecked(rule, q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                          backend=backend)


def step_unchecked(
    rule: Rule,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool,
    mask: Optional[torch.Tensor] = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run_step` without its checks, on a resolved ``backend`` (``"torch"``, ``"cpp"`` or
    ``"triton"``), for callers that built the inputs themselves: the model's decode loop runs
    this once per layer per generated token, where Python overhead is a good part of the cost."""
    B, H, K = q.shape
    if scale is None:
        scale = K ** -0.5
    if backend == "cpp":
        return cpu_step.step(q, k, v, g, beta, state, mask, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                l2_eps=L2NORM_EPS, delta=rule.has_beta)
    if backend == "triton":
        from ._triton.step import fused_step

        return fused_step(q, k, v, g, beta, state, mask, scale=scale, use_qk_l2norm=use_qk_l2norm,
                          delta=rule.has_beta)
    dt = compute_dtype(q.dtype)
    out_dtype = v.dtype if v is not None else q.dtype
    if q.dtype != dt:
        q = q.to(dt)
    if use_qk_l2norm:
        q = l2norm(q)
    if k is not None:
        if k.dtype != dt or v.dtype != dt:
            k, v = k.to(dt), v.to(dt)
        if g is not None and g.dtype != dt:
            g = g.to(dt)
        if beta is not None and beta.dtype != dt:
            beta = beta.to(dt)
        if use_qk_l2norm:
            k = l2norm(k)
        if mask is not None:  # k = 0 writes nothing, log decay 0 keeps the state
            m = mask.to(dt)
            k = k * m.view(B, 1, 1)
            g = g * m.view(B, 1) if g is not None else None
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    elif state.dtype != dt:
        state = state.to(dt)
    o, state = step_ref(q, k, v, g, beta, scale, state, delta=rule.has_beta)
    return (o if o.dtype == out_dtype else o.to(out_dtype)), state


def run_channel_step(
    name: str,
    ref,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    gates: tuple,
    state: Optional[torch.Tensor],
    *,
    scale: Optional[float],
    use_qk_l2norm: bool,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One checked decode step of a rule whose step exists as torch ops only (KDA, GDN-2, Gated DeltaProduct;
    ``name`` names it in errors): ``ref(q, k, v, *gates, scale, state)`` with ``gates[0]`` the log decay
    (or None). ``k [B, Hk, ..., K]`` and ``v [B, Hk, ..., V]`` (the middle axes: several writes per token),
    each k / v head serving H / Hk query heads; the gates' shapes are the caller's to check. A masked row
    (``mask [B]`` False) writes nothing: its k and log decay are zeroed. Computes in float32 (float64 for
    float64 q); returns ``(o [B, H, V]`` in v's dtype (q's when read only), ``state [B, H, K, V])``."""
    if backend not in STEP_BACKENDS and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {STEP_BACKENDS} for a decode step "
                         f"(nor a prefill backend {BACKENDS})")
    if backend in ("cpp", "triton"):
        raise ValueError(f"backend={backend!r}: {name}'s decode step has no compiled C++ or Triton form (those cover "
                         "the scalar-gated rules); use backend='torch' or 'auto'")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, K] (one token), got shape {tuple(q.shape)}")
    B, H, K = q.shape
    if k is not None:
        if k.dim() < 3 or k.shape[0] != B or k.shape[-1] != K or H % k.shape[1]:
            raise ValueError(f"k must be [B, Hk, K] with H = {H} a multiple of Hk, got shape {tuple(k.shape)}")
        if v is None or v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"v must be [B, Hk, V] with k's leading axes {list(k.shape[:-1])}, "
                             f"got {None if v is None else tuple(v.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B,)):
            raise ValueError(f"mask must be a bool [B] = [{B}] tensor, got {mask.dtype} {tuple(mask.shape)}")
    if state is not None and (state.dim() != 4 or state.shape[:3] != (B, H, K)):
        raise ValueError(f"state must be [B, H, K, V] = [{B}, {H}, {K}, V], got shape {tuple(state.shape)}")
    if state is None and k is None:
        raise ValueError("a read-only step (k=None) needs a state")
    if scale is None:
        scale = K ** -0.5
    dt = compute_dtype(q.dtype)
    out_dtype = v.dtype if v is not None else q.dtype
    q = l2norm(q.to(dt)) if use_qk_l2norm else q.to(dt)
    if k is not None:
        k, v = k.to(dt), v.to(dt)
        gates = tuple(x.to(dt) if x is not None else None for x in gates)
        if use_qk_l2norm:
            k = l2norm(k)
        if mask is not None:  # k = 0 writes nothing, log decay 0 keeps the state
            m = mask.to(dt)
            k = k * m.view(B, *[1] * (k.dim() - 1))
            if gates[0] is not None:
                gates = (gates[0] * m.view(B, *[1] * (gates[0].dim() - 1)), *gates[1:])
    state = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(dt)
    o, state = ref(q, k, v, *gates, scale, state)
    return o.to(out_dtype), state
