"""The one dispatcher of every rule (:class:`ahn.kernels.rule.Rule`): checks, backend choice, dtypes, masks.

:func:`run_rule` is the parallel form (prefill / training): it validates the inputs against the
rule's declaration, picks the backend (``"recurrent"``, ``"torch"`` chunkwise, ``"triton"``,
``"fla"``) and hands float32 (float64 for float64 inputs) tensors to the torch implementations.
:func:`run_step` is one token (the decode step) with the backends ``"torch"``, ``"cpp"`` (one
compiled call, :mod:`.cpu_step`) and ``"triton"`` (one fused launch, ``_triton/step.py``); the
compiled backends cover the rules declared ``fused``. Masked writes of a step are made inert by
:func:`ahn.kernels.rule.inert_writes`, whatever the rule.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from . import cpu_step
from ._triton import MAX_STEP_HEAD_DIM, require_triton
from .rule import GATE_AXES, L2NORM_EPS, Rule, compute_dtype, inert_writes, l2norm

BACKENDS = ("auto", "recurrent", "torch", "fla", "triton")
STEP_BACKENDS = ("auto", "torch", "cpp", "triton")
# The model hands its prefill backend (``AHNConfig.backend``, one of BACKENDS) to the decode step
# too: "recurrent" is the reference, i.e. the torch ops; fla has no step of ours, "auto" chooses.
PREFILL_TO_STEP = {"recurrent": "torch", "fla": "auto"}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- checks
def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; supported: float64, float32, bfloat16, float16")


def check_gate(name: str, x, shape: tuple, layout: str, *, log_decay: bool = False) -> None:
    """Check one gate tensor against its expected ``shape`` (named ``layout``, e.g. ``[B, T, H, K]``);
    a log decay must be <= 0."""
    _check_tensor(name, x, len(shape))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be {layout} = {list(shape)}, got {tuple(x.shape)}")
    if log_decay and bool((x > 0).any()):
        raise ValueError(f"{name} is a log decay and must be <= 0; got max {x.max().item():.4g} "
                         "(pass e.g. -softplus(x) or logsigmoid(x))")


def _check_gates(rule: Rule, gates: tuple, lead: tuple, lead_names: str, K: int, V: int, writes: int,
                 device: torch.device) -> None:
    """The rule's gate arguments: ``lead`` the leading axes (``(B, T, H)``, or ``(B, H)`` for one token)."""
    if len(gates) != len(rule.gates):
        raise TypeError(f"rule {rule.name!r} takes the gates {[x.name for x in rule.gates]}, got {len(gates)}")
    for spec, x in zip(rule.gates, gates):
        if x is None and spec.optional:
            continue
        trailing = {"head": (), "key": (K,), "value": (V,)}[spec.axes]
        shape, layout = (*lead, *trailing), f"[{lead_names}{GATE_AXES[spec.axes]}]"
        if spec.per_write:
            if len(lead) == 3:  # [B, T n, H]
                shape, layout = (lead[0], lead[1] * writes, *lead[2:]), layout.replace(", T,", f", T * {writes},")
            else:  # one token: [B, H, n]
                shape, layout = (*lead, writes), layout.replace("]", ", n]")
        check_gate(spec.name, x, shape, layout, log_decay=spec.log_decay)
        if x.device != device:
            raise ValueError(f"{spec.name} is on {x.device} but q is on {device}")


def check_inputs(rule: Rule, q, k, v, gates: tuple, initial_state, cu_seqlens, writes: int = 1) -> None:
    """Validate the parallel form's shapes, dtypes and values; raise ValueError/TypeError naming the argument."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    B, T, H, K = q.shape
    time = "T" if writes == 1 else f"T * {writes}"
    if tuple(k.shape) != (B, T * writes, H, K):
        raise ValueError(f"k must be [B, {time}, H, K] = [{B}, {T * writes}, {H}, {K}] (q is {list(q.shape)}), "
                         f"got {tuple(k.shape)}")
    _check_tensor("v", v, 4)
    if v.shape[:3] != (B, T * writes, H):
        raise ValueError(f"v must be [B, {time}, H, V] = [{B}, {T * writes}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    _check_gates(rule, gates, (B, T, H), "B, T, H", K, v.shape[-1], writes, q.device)
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
        expect = (n_states, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(expect)}, got {tuple(initial_state.shape)}")


def check_step(rule: Rule, q, k, v, gates: tuple, state, mask, writes: int = 1) -> None:
    """Validate one token's arguments (see :func:`run_step`)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, K] (one token), got shape {tuple(q.shape)}")
    B, H, K = q.shape
    if k is not None:
        shape = "[B, Hk, n, K] (the token's n writes)" if rule.multi_write else "[B, Hk, K]"
        if k.dim() != 3 + rule.multi_write or k.shape[0] != B or k.shape[-1] != K or H % k.shape[1]:
            raise ValueError(f"k must be {shape} with H = {H} a multiple of Hk, got shape {tuple(k.shape)}")
        if v is None or v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"v must be [B, Hk, V] with k's leading axes {list(k.shape[:-1])}, "
                             f"got {None if v is None else tuple(v.shape)}")
        _check_gates(rule, gates, (B, H), "B, H", K, v.shape[-1], k.shape[2] if rule.multi_write else 1, q.device)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B,)):
            raise ValueError(f"mask must be a bool [B] = [{B}] tensor, got {mask.dtype} {tuple(mask.shape)}")
    if state is not None and (state.dim() != 4 or state.shape[:3] != (B, H, K)):
        raise ValueError(f"state must be [B, H, K, V] = [{B}, {H}, {K}, V], got shape {tuple(state.shape)}")
    if state is None and k is None:
        raise ValueError("a read-only step (k=None) needs a state")


# ----------------------------------------------------------------------------- the parallel form
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rule: Optional[Rule] = None) -> str:
    """Map ``backend`` to a concrete one; ``auto`` is fla on CUDA (half precision) else torch.
    ``backend="triton"`` is refused for a ``rule`` that ahn's Triton kernels do not cover."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" and rule is not None and not rule.fused:
        raise ValueError(f"backend='triton': ahn has no Triton kernel for {rule.name} (only for the gated delta rule, "
                         "the delta rule and SSD); use backend='fla' on CUDA or 'torch'")
    if backend == "auto":
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and fla_available():
            return "fla"
        return "torch"
    if backend == "triton":
        require_triton(device, dtype)
    if backend == "fla":
        if device.type != "cuda":
            raise ValueError(f"backend='fla' needs CUDA tensors, got device {device}; use backend='torch' on {device.type}")
        if not fla_available():
            raise ValueError("backend='fla' needs flash-linear-attention: pip install 'ahn[gpu]'")
    return backend


def run_rule(rule: Rule, q, k, v, gates: tuple, *, scale: Optional[float], initial_state: Optional[torch.Tensor],
             output_final_state: bool, cu_seqlens: Optional[torch.Tensor], use_qk_l2norm: bool, backend: str,
             chunk_size: int, writes: int = 1):
    """Validate, dispatch and run ``rule`` on ``q [B, T, H, K]``, ``k [B, T n, H, K]``, ``v [B, T n, H, V]``
    (``n = writes`` per token) and its ``gates``; returns ``(o [B, T, H, V], final_state or None)``.

    The output has v's dtype; the final state is float32 (float64 for float64 inputs), as in fla.
    """
    check_inputs(rule, q, k, v, gates, initial_state, cu_seqlens, writes)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return run_rule_unchecked(
        rule, q, k, v, gates, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=resolve_backend(backend, q.device, q.dtype, rule),
        chunk_size=chunk_size, writes=writes,
    )


def run_rule_unchecked(rule: Rule, q, k, v, gates: tuple, *, scale: Optional[float],
                       initial_state: Optional[torch.Tensor], output_final_state: bool,
                       cu_seqlens: Optional[torch.Tensor], use_qk_l2norm: bool, backend: str, chunk_size: int,
                       writes: int = 1):
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
            q, k, v, *gates, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device, torch.long), use_qk_l2norm=use_qk_l2norm,
        )
    if backend == "triton":
        # The Triton kernels are imported on first use: triton is an optional dependency.
        from ._triton.chunk import chunk_rule

        if use_qk_l2norm:
            q, k = l2norm(q.float()), l2norm(k.float())
        # The kernels load every input in its own dtype and accumulate in float32.
        return chunk_rule(
            q, k, v, *rule.scalar_gates(gates), scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    if rule.multi_write:  # the torch forms take the n writes of a token on their own axis: [B, T, n, H, ...]
        by_token = lambda x: rearrange(x, "b (t n) h ... -> b t n h ...", n=writes)  # noqa: E731
        k, v = by_token(k), by_token(v)
        gates = tuple(by_token(x) if spec.per_write else x for spec, x in zip(rule.gates, gates))
    return run_torch(rule, q, k, v, gates, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                     backend=backend, chunk_size=chunk_size)


def run_torch(rule: Rule, q, k, v, gates: tuple, *, scale: float, initial_state: Optional[torch.Tensor],
              output_final_state: bool, cu_seqlens: Optional[torch.Tensor], use_qk_l2norm: bool, backend: str,
              chunk_size: int):
    """The torch backends (``"recurrent"`` or ``"torch"``, the chunkwise form) of any rule, checked inputs:
    computes in float32 (float64 for float64 inputs), L2-normalises q and k when asked, and runs
    ``cu_seqlens`` as zero-padded rows."""
    dt, out_dtype = compute_dtype(q.dtype), v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    gates = tuple(x.to(dt) if x is not None else None for x in gates)
    h0 = initial_state.to(dt) if initial_state is not None else None
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if backend == "recurrent" or (q.shape[1] == 1 and cu_seqlens is None):
        impl = rule.recurrent  # one token (a decode step): the chunkwise form would only add padding
    else:
        impl = lambda *a: rule.chunk(*a, chunk_size=chunk_size)  # noqa: E731
    if cu_seqlens is None:
        o, ht = impl(q, k, v, *gates, scale, h0)
    else:
        cs = cu_seqlens.tolist()
        # Zero padding is inert for every rule here: k = 0 and beta = 0 write nothing, g = 0
        # does not decay, so each padded row's final state is its sequence's final state.
        o, ht = impl(*(pad_sequences(x, cs) for x in (q, k, v, *gates)), scale, h0)
        o = unpad_sequences(o, cs)
    return o.to(out_dtype), (ht if output_final_state else None)


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


# ----------------------------------------------------------------------------- one token
def needs_backward(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would differentiate through a step on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_step_backend(backend: str, q: torch.Tensor, *tensors: Optional[torch.Tensor], head_dim: int,
                         rule: Optional[Rule] = None) -> str:
    """The step's dispatcher: map ``backend`` to ``"torch"``, ``"cpp"`` or ``"triton"`` for a step on ``q`` and
    ``tensors`` (every other tensor the call reads, parameters included; None where absent).

    ``"auto"``: torch ops when autograd needs a backward; the C++ step for float32 CPU tensors
    (unless it cannot be built or ``AHN_CPU_DECODE=0``); the Triton step on CUDA for heads up to
    ``MAX_STEP_HEAD_DIM`` when triton is installed; torch ops otherwise, and always for a ``rule`` that
    the compiled steps do not cover (``Rule.fused`` False). A backend named explicitly that cannot run
    raises ValueError saying why and what to use instead.
    """
    if backend not in STEP_BACKENDS and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {STEP_BACKENDS} for a decode step "
                         f"(nor a prefill backend {BACKENDS})")
    backend = PREFILL_TO_STEP.get(backend, backend)
    if rule is not None and not rule.fused:
        if backend in ("cpp", "triton"):
            raise ValueError(f"backend={backend!r}: {rule.name}'s decode step has no compiled C++ or Triton form "
                             "(those cover the scalar-gated rules); use backend='torch' or 'auto'")
        return "torch"
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


def run_step(rule: Rule, q, k, v, gates: tuple, state: Optional[torch.Tensor], *, scale: Optional[float],
             use_qk_l2norm: bool, mask: Optional[torch.Tensor] = None, backend: str = "auto"):
    """One decode step of ``rule``: write one token per row (unless ``k`` is None), read with ``q``.

    Shapes: ``q [B, H, K]``, ``k [B, Hk, K]`` and ``v [B, Hk, V]`` with H a multiple of Hk (grouped keys /
    values, as GQA: k / v head j serves query heads j*H/Hk .. (j+1)*H/Hk-1; a multi-write rule: ``[B, Hk, n, *]``),
    the gates with the leading axes ``[B, H]``, ``mask [B]`` bool (False: that row writes nothing) or None,
    ``state [B, H, K, V]`` (None: zeros). Returns ``(o [B, H, V]`` in v's dtype (q's when read only),
    ``state [B, H, K, V]`` float32 (float64 for float64 q)). Checks the arguments, picks the backend
    (:func:`resolve_step_backend`), then runs :func:`step_unchecked`.
    """
    check_step(rule, q, k, v, gates, state, mask)
    V = v.shape[-1] if k is not None else state.shape[-1]
    backend = resolve_step_backend(backend, q, k, v, *gates, state, head_dim=max(q.shape[-1], V), rule=rule)
    return step_unchecked(rule, q, k, v, gates, state, scale=scale, use_qk_l2norm=use_qk_l2norm, mask=mask,
                          backend=backend)


def step_unchecked(rule: Rule, q, k, v, gates: tuple, state: Optional[torch.Tensor], *, scale: Optional[float] = None,
                   use_qk_l2norm: bool, mask: Optional[torch.Tensor] = None, backend: str = "torch"):
    """:func:`run_step` without its checks, on a resolved ``backend`` (``"torch"``, ``"cpp"`` or
    ``"triton"``), for callers that built the inputs themselves: the model's decode loop runs
    this once per layer per generated token, where Python overhead is a good part of the cost."""
    B, H, K = q.shape
    if scale is None:
        scale = K ** -0.5
    if backend == "cpp":
        return cpu_step.step(q, k, v, *rule.scalar_gates(gates), state, mask, scale=scale,
                             use_qk_l2norm=use_qk_l2norm, l2_eps=L2NORM_EPS, delta=rule.delta)
    if backend == "triton":
        # The Triton step is imported on first use: triton is an optional dependency.
        from ._triton.step import fused_step

        return fused_step(q, k, v, *rule.scalar_gates(gates), state, mask, scale=scale, use_qk_l2norm=use_qk_l2norm,
                          delta=rule.delta)
    dt = compute_dtype(q.dtype)
    out_dtype = v.dtype if v is not None else q.dtype
    if q.dtype != dt:
        q = q.to(dt)
    if use_qk_l2norm:
        q = l2norm(q)
    if k is not None:
        if k.dtype != dt or v.dtype != dt:
            k, v = k.to(dt), v.to(dt)
        gates = tuple(x if x is None or x.dtype == dt else x.to(dt) for x in gates)
        if use_qk_l2norm:
            k = l2norm(k)
        i = rule.decay_index
        if i is None:
            k, _ = inert_writes(mask, k, None)
        else:
            k, g = inert_writes(mask, k, gates[i])
            gates = (*gates[:i], g, *gates[i + 1:])
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    elif state.dtype != dt:
        state = state.to(dt)
    o, state = rule.step(q, k, v, *gates, scale, state)
    return (o if o.dtype == out_dtype else o.to(out_dtype)), state
