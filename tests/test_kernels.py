"""ahn.kernels: chunkwise torch vs the recurrent reference, varlen, state carry, errors.

Tolerances are fixed per dtype in kernel_cases.TOL (float64: the maths agrees to rounding; float32 and
bfloat16: the torch paths accumulate in float32, compared against float64 references).
"""

from __future__ import annotations

import pytest
import torch

from ahn.kernels import gated_delta_rule
from kernel_cases import GATES, RULES, STEPS, TOL, TOL_BF16_GRAD, assert_close, call, make_inputs, outputs_and_grads


def compare(rule, x, tol, ref_kw=None, **kw):
    o1, s1, g1 = outputs_and_grads(rule, x, backend="recurrent", **(ref_kw or {}))
    o2, s2, g2 = outputs_and_grads(rule, x, backend="torch", **kw)
    assert_close(o2, o1, tol, "output")
    assert_close(s2, s1, tol, "final state")
    for n in g1:
        assert_close(g2[n], g1[n], tol, f"grad of {n}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_recurrent(rule, T, initial_state):
    # B > 1, head sizes not powers of two, K != V.
    x = make_inputs(rule, B=2, T=T, H=3, K=5, V=7, initial_state=initial_state)
    compare(rule, x, TOL[torch.float64])


@pytest.mark.parametrize("rule", RULES)
def test_long_sequence_float32(rule):
    x = make_inputs(rule, B=1, T=1000, H=2, K=16, V=16, dtype=torch.float32)
    compare(rule, x, TOL[torch.float32])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size", [1, 16, 50])
def test_chunk_size_is_a_free_parameter(rule, chunk_size):
    x = make_inputs(rule, B=1, T=77, H=2, K=4, V=6)
    compare(rule, x, TOL[torch.float64], chunk_size=chunk_size)


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_accumulates_in_float32(rule):
    x64 = make_inputs(rule, B=2, T=100, H=2, K=8, V=8)
    o_ref, s_ref = call(rule, x64, backend="recurrent")
    xb = {n: t.to(torch.bfloat16) for n, t in x64.items()}
    o, s = call(rule, xb, backend="torch")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # Reference on the same bf16-rounded inputs, computed in float64.
    o_ref, s_ref = call(rule, {n: t.double() for n, t in xb.items()}, backend="recurrent")
    assert_close(o, o_ref, TOL[torch.bfloat16], "bf16 output")
    assert_close(s, s_ref, 1e-4, "bf16 final state")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_varlen_equals_loop_over_sequences(rule, backend):
    lengths = [1, 64, 65, 30, 0, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = int(cu[-1])
    x = make_inputs(rule, B=1, T=T, H=2, K=5, V=3, n_states=len(lengths))
    o, s, grads = outputs_and_grads(rule, x, backend=backend, cu_seqlens=cu)
    # Same seeds and cotangents, one sequence at a time, with the recurrent reference.
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss, outs, states = 0.0, [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seq = {n: (t[i : i + 1] if n == "initial_state" else t[:, a:b]) for n, t in leaves.items()}
        oi, si = call(rule, seq, backend="recurrent")
        outs.append(oi)
        states.append(si)
        loss = loss + (oi * do[:, a:b]).sum() + (si * ds[i : i + 1]).sum()
    loss.backward()
    assert_close(o, torch.cat(outs, 1), TOL[torch.float64], "varlen output")
    assert_close(s, torch.cat(states, 0), TOL[torch.float64], "varlen states")
    for n, t in leaves.items():
        assert_close(grads[n], t.grad, TOL[torch.float64], f"varlen grad of {n}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("split", [1, 40, 64, 99])
def test_split_and_carry_state_equals_one_pass(rule, split):
    x = make_inputs(rule, B=2, T=100, H=2, K=6, V=5)
    o, s = call(rule, x, backend="torch")
    first = {n: (t if n == "initial_state" else t[:, :split]) for n, t in x.items()}
    o1, s1 = call(rule, first, backend="torch")
    second = {n: t[:, split:] for n, t in x.items() if n != "initial_state"}
    second["initial_state"] = s1
    o2, s2 = call(rule, second, backend="torch")
    assert_close(torch.cat([o1, o2], 1), o, TOL[torch.float64], "split output")
    assert_close(s2, s, TOL[torch.float64], "split state")


@pytest.mark.parametrize("rule", RULES)
def test_l2norm_and_scale_options(rule):
    x = make_inputs(rule, B=1, T=20, H=2, K=4, V=4, initial_state=False)
    x["k"] = x["k"] * 3.0
    o, s = call(rule, x, backend="torch", use_qk_l2norm=True, scale=0.3)
    normed = dict(x, q=x["q"] / torch.sqrt((x["q"] ** 2).sum(-1, keepdim=True) + 1e-6),
                  k=x["k"] / torch.sqrt((x["k"] ** 2).sum(-1, keepdim=True) + 1e-6))
    o_ref, s_ref = call(rule, normed, backend="recurrent", scale=0.3)
    assert_close(o, o_ref, TOL[torch.float64], "l2norm output")
    # Default scale is K ** -0.5.
    o_default, _ = call(rule, x, backend="torch")
    o_explicit, _ = call(rule, x, backend="torch", scale=4 ** -0.5)
    torch.testing.assert_close(o_default, o_explicit)


def test_output_final_state_flag_and_no_state():
    x = make_inputs("gated_delta_rule", B=1, T=10, H=1, K=4, V=4, initial_state=False)
    o, s = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="torch")
    assert s is None and o.shape == (1, 10, 1, 4)


def test_auto_backend_is_torch_on_cpu():
    x = make_inputs("ssd", B=1, T=70, H=2, K=4, V=4)
    o_auto, s_auto = call("ssd", x)
    o_torch, s_torch = call("ssd", x, backend="torch")
    torch.testing.assert_close(o_auto, o_torch, rtol=0, atol=0)
    torch.testing.assert_close(s_auto, s_torch, rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors
def _gdr_args(**over):
    x = make_inputs("gated_delta_rule", B=2, T=8, H=2, K=4, V=3, initial_state=False)
    x.update(over)
    return x


@pytest.mark.parametrize(
    "over, match",
    [
        ({"k": torch.randn(2, 8, 2, 5, dtype=torch.float64)}, r"k must be \[B, T, H, K\]"),
        ({"v": torch.randn(2, 7, 2, 3, dtype=torch.float64)}, r"v must be \[B, T, H, V\]"),
        ({"g": torch.zeros(2, 8, 3, dtype=torch.float64)}, r"g must be \[B, T, H\]"),
        ({"beta": torch.zeros(2, 8, dtype=torch.float64)}, "beta must have 3 dimensions"),
        ({"g": torch.full((2, 8, 2), 0.5, dtype=torch.float64)}, "g is a log decay and must be <= 0"),
        ({"q": torch.zeros(2, 8, 2, 4, dtype=torch.int64)}, "q has dtype torch.int64"),
        ({"initial_state": torch.zeros(2, 2, 3, 4, dtype=torch.float64)}, r"initial_state must be \[N, H, K, V\]"),
    ],
)
def test_bad_inputs_name_the_argument(over, match):
    x = _gdr_args(**over)
    with pytest.raises(ValueError, match=match):
        call("gated_delta_rule", x, backend="torch")


def test_bad_backend_and_cu_seqlens():
    x = _gdr_args()
    with pytest.raises(ValueError, match="backend='nope' is not one of"):
        call("gated_delta_rule", x, backend="nope")
    with pytest.raises(ValueError, match="backend='triton' computes in float32"):
        call("gated_delta_rule", x, backend="triton")  # x is float64
    with pytest.raises(ValueError, match="needs B == 1"):
        call("gated_delta_rule", x, cu_seqlens=torch.tensor([0, 4, 8]))
    one = {n: t[:1] for n, t in x.items()}
    with pytest.raises(ValueError, match="end at T = 8"):
        call("gated_delta_rule", one, cu_seqlens=torch.tensor([0, 4, 7]))
    with pytest.raises(ValueError, match="1-D int32/int64"):
        call("gated_delta_rule", one, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call("gated_delta_rule", one, chunk_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='fla' needs CUDA"):
            call("gated_delta_rule", one, backend="fla")


# ----------------------------------------------------------------------------- the shared formulas
def test_inert_writes_and_log_decay():
    """A masked write (``inert_writes``) is k = 0 and log decay 0 whatever the gate's trailing axes; the log
    decay is -exp(A_log) * gate, per head or broadcast over the key channels."""
    from ahn.kernels import inert_writes, log_decay

    k, g, mask = torch.randn(2, 3, 4, 5), -torch.rand(2, 3, 4, 5), torch.tensor([[True, False, True], [False] * 3])
    k_m, g_m = inert_writes(mask, k, g)
    assert torch.equal(k_m[mask], k[mask]) and torch.equal(g_m[mask], g[mask])
    assert not k_m[~mask].any() and not g_m[~mask].any()
    assert inert_writes(None, k, g) == (k, g) and inert_writes(mask, k, None)[1] is None
    A_log, gate = torch.randn(4), torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(log_decay(A_log, gate[..., 0]), -A_log.exp() * gate[..., 0])
    torch.testing.assert_close(log_decay(A_log, gate, per_channel=True), -A_log.exp()[:, None] * gate)


# ----------------------------------------------------------------------------- decode step
# Argument checks and dtypes here; every backend against the reference: tests/test_decode_step.py.
def step_call(rule, q, k, v, x, state, **kw):
    gates = [x.get(n) for n in GATES[rule]]  # None for a read-only step
    return STEPS[rule](q, k, v, *gates, state=state, **kw)


@pytest.mark.parametrize("rule", RULES)
def test_step_read_only_and_dtypes(rule):
    B, H, K, V = 2, 3, 4, 4
    x = make_inputs(rule, B, 1, H, K, V, dtype=torch.float32)
    h0 = x["initial_state"]
    o, s = step_call(rule, x["q"][:, 0], None, None, {}, h0, scale=1.0)
    torch.testing.assert_close(o, torch.einsum("bhk,bhkv->bhv", x["q"][:, 0], h0))
    assert torch.equal(s, h0)
    gates = {n: x[n][:, 0].bfloat16() for n in ("g", "beta") if n in x}
    q, k, v = (x[n][:, 0].bfloat16() for n in ("q", "k", "v"))
    o, s = step_call(rule, q, k, v, gates, None)  # auto: bf16 is neither C++ (float32) nor CUDA: torch ops
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    with pytest.raises(ValueError, match="needs a state"):
        step_call(rule, q, None, None, {}, None)
    with pytest.raises(ValueError, match="k must be"):
        step_call(rule, q, k[:, :2], v, gates, None)  # 3 query heads are not a multiple of 2
    with pytest.raises(ValueError, match="state must be"):
        step_call(rule, q, k, v, gates, h0[:, :, :2])
    with pytest.raises(ValueError, match=r"mask must be a bool \[B\]"):
        step_call(rule, q, k, v, gates, None, mask=torch.ones(B))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_fla_matches_torch_on_cuda(rule):
    pytest.importorskip("fla")
    x = make_inputs(rule, B=2, T=300, H=4, K=64, V=64, dtype=torch.bfloat16)
    x = {n: t.cuda() for n, t in x.items()}
    x["initial_state"] = x["initial_state"].float()
    o1, s1, g1 = outputs_and_grads(rule, x, backend="fla")
    o2, s2, g2 = outputs_and_grads(rule, x, backend="torch")
    assert_close(o1, o2, TOL[torch.bfloat16], "fla output")
    assert_close(s1, s2, TOL[torch.bfloat16], "fla state")
    for n in g1:
        assert_close(g1[n], g2[n], TOL_BF16_GRAD, f"fla grad of {n}")


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_fla_varlen_on_cuda_with_boundaries_on_the_cpu(rule):
    # Boundaries built on the CPU (as the varlen tests above build them) with CUDA inputs: fla's kernels
    # read them on the GPU, so the glue moves them there. An empty and a one-token sequence included.
    pytest.importorskip("fla")
    lengths = [1, 300, 64, 0, 77]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(rule, B=1, T=int(cu[-1]), H=4, K=64, V=64, dtype=torch.bfloat16, n_states=len(lengths))
    x = {n: t.cuda() for n, t in x.items()}
    x["initial_state"] = x["initial_state"].float()
    o1, s1, g1 = outputs_and_grads(rule, x, backend="fla", cu_seqlens=cu)
    o2, s2, g2 = outputs_and_grads(rule, x, backend="torch", cu_seqlens=cu)
    assert_close(o1, o2, TOL[torch.bfloat16], "fla varlen output")
    assert_close(s1, s2, TOL[torch.bfloat16], "fla varlen states")
    for n in g1:
        assert_close(g1[n], g2[n], TOL_BF16_GRAD, f"fla varlen grad of {n}")
