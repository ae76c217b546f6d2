"""ahn's Triton kernels (backend="triton") against the recurrent reference.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): tiny shapes, float32, chunk 16, so the whole
file stays within a few minutes on two CPU cores. The reference runs in float64 on the same
(float32-rounded) inputs; tolerances are fixed per dtype (kernel_cases.TOL). The `cuda` tests repeat the
comparison in bfloat16 at real sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernel_cases  # noqa: E402
from ahn.kernels import gated_delta_rule, ssd, ssd_step  # noqa: E402
from kernel_cases import FUNCS, GATES, RULES, STEPS, TOL, TOL_BF16_GRAD, assert_close  # noqa: E402

# TOL (kernel_cases): float32 kernels vs a float64 reference (relative max error); bf16: inputs rounded, fp32
# accumulation; TOL_BF16_GRAD for bf16 gradients.
CHUNK = 16  # the smallest chunk the kernels take; T = 1, 20, 33 then cover one, two and three chunks


def make_inputs(*args, dtype=torch.float32, **kw):
    """float32 by default here: the interpreted kernels run in float32."""
    return kernel_cases.make_inputs(*args, dtype=dtype, **kw)


def run(rule, x, backend, **kw):
    """Output, final state and the gradient of every input under fixed random cotangents."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    args = [leaves["q"], leaves["k"], leaves["v"]] + [leaves[n] for n in GATES[rule]]
    o, s = FUNCS[rule](*args, initial_state=leaves.get("initial_state"), output_final_state=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)  # o's device and dtype
    ds = torch.randn(s.shape, generator=gen).to(s)
    ((o.float() * do.float()).sum() + (s * ds).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


def compare(rule, x, tol, grad_tol=None, chunk_size=CHUNK, **kw):
    o, s, grads = run(rule, x, "triton", chunk_size=chunk_size, **kw)
    o_ref, s_ref, grads_ref = run(rule, {n: t.double() for n, t in x.items()}, "recurrent", **kw)
    assert o.dtype == x["v"].dtype and s.dtype == torch.float32
    assert_close(o, o_ref, tol, "output")
    assert_close(s, s_ref, tol, "final state")
    assert set(grads) == set(x)  # q, k, v, the rule's gates and initial_state when given
    for n, gr in grads.items():
        assert gr.dtype == x[n].dtype, f"grad of {n} has dtype {gr.dtype}"
        assert_close(gr, grads_ref[n], grad_tol or tol, f"grad of {n}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "B, T, K, V, initial_state",
    [
        (1, 1, 12, 20, False),  # one token: a single, mostly padded chunk
        (2, 20, 12, 20, True),  # T not a multiple of the chunk, head sizes not powers of two
        (2, 33, 8, 16, True),  # three chunks
    ],
)
def test_triton_matches_recurrent(rule, B, T, K, V, initial_state):
    x = make_inputs(rule, B, T, H=2, K=K, V=V, initial_state=initial_state)
    compare(rule, x, TOL[torch.float32])


@pytest.mark.parametrize("rule", ["gated_delta_rule", "ssd"])
def test_triton_default_chunk_size(rule):
    # The GPU default chunk (64): two chunks, the second one partial.
    x = make_inputs(rule, B=1, T=70, H=1, K=12, V=20)
    compare(rule, x, TOL[torch.float32], chunk_size=64)


@pytest.mark.parametrize("K, V", [(12, 70), (128, 40)])
def test_triton_several_value_blocks(K, V):
    # The state's columns are split over programs: V = 70 > 64 columns per block at small K;
    # K = 128 (a real head size) takes 32 columns per block.
    x = make_inputs("gated_delta_rule", B=1, T=20, H=1, K=K, V=V)
    compare("gated_delta_rule", x, TOL[torch.float32])


@pytest.mark.parametrize("rule", RULES)
def test_triton_varlen(rule):
    lengths = [1, 16, 20, 0, 5]  # a one-token, an exact-chunk, a two-chunk and an empty sequence
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(rule, B=1, T=int(cu[-1]), H=2, K=12, V=20, n_states=len(lengths))
    compare(rule, x, TOL[torch.float32], cu_seqlens=cu)


def test_triton_l2norm_scale_and_bfloat16():
    # bf16 inputs: loaded as bf16, accumulated in float32 (no bf16 tl.dot, so the interpreter is exact here).
    x = make_inputs("gated_delta_rule", B=1, T=20, H=2, K=12, V=20, dtype=torch.bfloat16)
    x["k"] = x["k"] * 3.0
    compare("gated_delta_rule", x, TOL[torch.bfloat16], TOL_BF16_GRAD, use_qk_l2norm=True, scale=0.3)


def test_triton_without_final_state_and_input_errors():
    x = make_inputs("gated_delta_rule", B=1, T=5, H=1, K=4, V=4, initial_state=False)
    o, s = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton", chunk_size=CHUNK)
    assert s is None and o.shape == (1, 5, 1, 4)
    with pytest.raises(ValueError, match="power of two >= 16"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton", chunk_size=24)
    wide = torch.zeros(1, 5, 1, 130)
    with pytest.raises(ValueError, match="head sizes up to 128"):
        gated_delta_rule(wide, wide, x["v"], x["g"], x["beta"], backend="triton", chunk_size=CHUNK)
    x64 = {n: t.double() for n, t in x.items()}
    with pytest.raises(ValueError, match="float64"):
        gated_delta_rule(x64["q"], x64["k"], x64["v"], x64["g"], x64["beta"], backend="triton")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs("ssd", B=1, T=5, H=1, K=4, V=4, initial_state=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ssd(x["q"].cpu(), x["k"].cpu(), x["v"].cpu(), x["g"].cpu(), backend="triton")


# ----------------------------------------------------------------------------- decode step
# Against the reference with the other backends: tests/test_decode_step.py.
def step(rule, q, k, v, gates, state, **kw):
    return STEPS[rule](q, k, v, *(gates.get(n) for n in GATES[rule]), state, **kw)


def test_fused_step_errors():
    x = make_inputs("ssd", 1, 1, 2, 4, 4)
    q, k, v, g, h0 = x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["initial_state"]
    with pytest.raises(ValueError, match="not one of"):
        ssd_step(q, k, v, g, h0, backend="nope")
    with pytest.raises(ValueError, match="inference-only"):
        ssd_step(q.requires_grad_(True), k, v, g, h0, backend="triton")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_triton_bfloat16_at_real_sizes_on_cuda(rule):
    x = make_inputs(rule, B=2, T=1000, H=4, K=128, V=128, dtype=torch.bfloat16)
    x = {n: t.cuda() for n, t in x.items()}
    x["initial_state"] = x["initial_state"].float()
    o, s, grads = run(rule, x, "triton")
    o_ref, s_ref, grads_ref = run(rule, {n: t.float() for n, t in x.items()}, "torch")
    assert_close(o, o_ref, TOL[torch.bfloat16], "output")
    assert_close(s, s_ref, TOL[torch.bfloat16], "final state")
    for n in grads:
        assert_close(grads[n], grads_ref[n], TOL_BF16_GRAD, f"grad of {n}")


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_fused_step_bfloat16_on_cuda(rule):
    B, H, Hk, K, V = 4, 16, 4, 128, 128
    x = {n: t.cuda() for n, t in make_inputs(rule, B, 1, H, K, V, dtype=torch.bfloat16).items()}
    q, k, v = x["q"][:, 0], x["k"][:, 0, :Hk], x["v"][:, 0, :Hk]
    gates = {n: x[n][:, 0] for n in GATES[rule]}
    state = x["initial_state"].float()
    o, s = step(rule, q, k, v, gates, state, backend="triton")
    o_ref, s_ref = step(rule, q, k, v, gates, state, backend="torch")
    assert_close(o, o_ref, TOL[torch.bfloat16], "step output")
    assert_close(s, s_ref, 1e-5, "step state")
