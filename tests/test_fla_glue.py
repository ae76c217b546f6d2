"""The fla backend's glue against backend="torch" on CPU, with flash-linear-attention's real kernels.

``backend="fla"`` hands ahn's arguments to fla's public chunk functions (``_fla`` in
ahn/kernels/gated_delta_rule, ahn/kernels/delta_rule, ahn/kernels/ssd): argument order, [B, T, H, D]
layouts, the scale, the q / k L2 normalisation, cu_seqlens and the initial state. Here fla's
own Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
where there is no GPU) through that glue (:func:`ahn.kernels.dispatch.run_rule_unchecked`:
``run_rule`` after the check that keeps users' fla calls on CUDA), and every output, final
state and gradient is compared with the torch chunkwise path on the same inputs in float64.

fla 0.6's kernels do not run in the interpreter as shipped. Two shims, active only while this
module runs (the ``fla_in_interpreter`` fixture), make them:

1. ``Autotuner.prune_configs`` keeps only the first config: the interpreter has no GPU
   benchmarker to choose between configs ("0 active drivers"), and any one config computes
   the same result.
2. In fla's kernels, the index of a ``range`` / ``tl.range`` loop becomes an interpreter
   tensor at the top of the loop body, as it is a tensor (an ``scf.for`` induction variable)
   in compiled Triton. The interpreter runs the loop with Python ints, and fla calls
   ``i_t.to(tl.int64)`` on them (fla/ops/common/chunk_delta_h.py).

All three rules run the real kernels this way (gated delta rule: ``chunk_gated_delta_rule``;
delta rule: ``chunk_delta_rule``; SSD: ``chunk_simple_gla``). ``chunk_delta_rule`` refuses
float32 inputs, so the delta rule is checked with float16 q / k / v (the interpreter computes a
float16 ``tl.dot`` right, a bfloat16 one wrong) and float32 gates, as the model passes them.
The newer rules run fla's ``chunk_kda``, ``chunk_gdn2`` and ``chunk_gated_delta_product`` the same
way (the last with float16 q / k / v: it refuses float32).
"""

from __future__ import annotations

import ast

import pytest
import torch

pytest.importorskip("fla")
triton_interpreter = pytest.importorskip("triton.runtime.interpreter")

from triton.runtime.autotuner import Autotuner  # noqa: E402

from ahn.kernels.delta_rule import RULE as DELTA_RULE  # noqa: E402
from ahn.kernels.gated_delta_rule import RULE as GATED_DELTA_RULE  # noqa: E402
from ahn.kernels.ssd import RULE as SSD  # noqa: E402
from ahn.kernels.dispatch import run_rule_unchecked  # noqa: E402
from ahn.kernels._triton import interpreting  # noqa: E402
from kernel_cases import FUNCS, GATES, RULES, TOL, assert_close, call, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreting(), reason="runs fla's kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set by "
                               "conftest.py without CUDA); on CUDA, test_kernels.py's `cuda` tests run backend='fla'")

# Relative max error against the float64 torch path (kernel_cases.assert_close): outputs and states TOL
# (kernel_cases; float32: fla's kernels accumulate in float32 as ahn's do; float16: fla keeps its WY /
# pseudo-value tiles in the input dtype), gradients TOL_GRAD.
TOL_GRAD = {torch.float32: 2e-4, torch.float16: 5e-2}
# The dtypes fla is run with per rule: chunk_delta_rule refuses float32.
DTYPES = {"gated_delta_rule": [torch.float32, torch.float16], "delta_rule": [torch.float16],
          "ssd": [torch.float32, torch.float16]}
CASES = [(rule, dtype) for rule in RULES for dtype in DTYPES[rule]]
RULE_OBJECTS = {"gated_delta_rule": GATED_DELTA_RULE, "delta_rule": DELTA_RULE, "ssd": SSD}


class _LoopIndexAsTensor(triton_interpreter.ASTTransformer):
    """The interpreter's kernel rewrite, plus: ``for i in range(...)`` / ``tl.range(...)`` starts its
    body with ``i = interpreter_semantic.to_tensor(i, False)`` (``static_range`` indices stay ints)."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        func = node.iter.func if isinstance(node.iter, ast.Call) else None
        name = getattr(func, "id", None) or getattr(func, "attr", None)  # range(...) or tl.range(...)
        if name == "range" and isinstance(node.target, ast.Name):
            to_tensor = ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor",
                                      ctx=ast.Load())
            index = ast.Call(func=to_tensor, args=[ast.Name(id=node.target.id, ctx=ast.Load()),
                                                   ast.Constant(value=False)], keywords=[])
            node.body.insert(0, ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())], value=index))
        return node


@pytest.fixture(scope="module", autouse=True)
def fla_in_interpreter():
    """The two shims of the module docstring, undone when the module ends."""
    prune = Autotuner.prune_configs
    rewrite = triton_interpreter.FunctionRewriter.rewrite_ast
    loops = _LoopIndexAsTensor()

    def rewrite_fla_loops(rewriter):
        if rewriter.fn.__module__.split(".")[0] == "fla":  # ahn's own kernels are rewritten as usual
            rewriter.ast_transformer = loops
        return rewrite(rewriter)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])
        mp.setattr(triton_interpreter.FunctionRewriter, "rewrite_ast", rewrite_fla_loops)
        yield


def inputs(rule, dtype, **kw):
    """``make_inputs`` with q / k / v in ``dtype`` and the gates and initial state in float32 (the
    model's mix: its gate projections and memory states are float32)."""
    x = make_inputs(rule, dtype=torch.float64, **kw)
    return {n: t.to(dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}


def run(rule, x, backend, **kw):
    """Output, final state and every input's gradient under fixed random cotangents. ``"fla"`` goes
    through the glue (``run_rule_unchecked``), anything else through the public function."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    state = leaves.get("initial_state")
    if backend == "fla":
        kw = dict(scale=None, cu_seqlens=None, use_qk_l2norm=False) | kw
        o, s = run_rule_unchecked(RULE_OBJECTS[rule], leaves["q"], leaves["k"], leaves["v"],
                                  tuple(leaves[n] for n in GATES[rule]), initial_state=state, output_final_state=True, backend="fla",
                                  chunk_size=64, **kw)
    else:
        args = [leaves["q"], leaves["k"], leaves["v"]] + [leaves[n] for n in GATES[rule]]
        o, s = FUNCS[rule](*args, initial_state=state, output_final_state=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


def compare(rule, x, **kw):
    """fla through the glue vs the torch chunkwise path in float64 on the same (rounded) inputs."""
    dtype = x["q"].dtype
    o, s, grads = run(rule, x, "fla", **kw)
    o_ref, s_ref, grads_ref = run(rule, {n: t.double() for n, t in x.items()}, "torch", **kw)
    assert o.dtype == x["v"].dtype and s.dtype == torch.float32, (o.dtype, s.dtype)
    assert_close(o, o_ref, TOL[dtype], "output")
    assert_close(s, s_ref, TOL[dtype], "final state")
    assert set(grads) == set(x)
    for n, gr in grads.items():
        assert gr is not None and gr.dtype == x[n].dtype, f"grad of {n}: {None if gr is None else gr.dtype}"
        assert_close(gr, grads_ref[n], TOL_GRAD[dtype], f"grad of {n}")


@pytest.mark.parametrize("rule, dtype", CASES)
@pytest.mark.parametrize("initial_state", [False, True])
def test_fla_glue_matches_torch(rule, dtype, initial_state):
    # B > 1, two chunks of fla's 64 (the second partial), head sizes not powers of two, K != V.
    x = inputs(rule, dtype, B=2, T=70, H=2, K=12, V=20, initial_state=initial_state)
    compare(rule, x)


@pytest.mark.parametrize("rule", RULES)
def test_fla_glue_varlen(rule):
    lengths = [1, 16, 70, 0, 5]  # one token, a two-chunk sequence and an empty one, packed along T
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    dtype = DTYPES[rule][-1]
    x = inputs(rule, dtype, B=1, T=int(cu[-1]), H=2, K=12, V=20, n_states=len(lengths))
    compare(rule, x, cu_seqlens=cu)


def test_fla_glue_varlen_int32_boundaries():
    # ahn takes int32 or int64 boundaries; fla is documented with a LongTensor.
    cu = torch.tensor([0, 20, 21, 40], dtype=torch.int32)
    x = inputs("gated_delta_rule", torch.float32, B=1, T=40, H=1, K=8, V=8, n_states=3)
    compare("gated_delta_rule", x, cu_seqlens=cu)


@pytest.mark.parametrize("rule", RULES)
def test_fla_glue_scale_and_l2norm(rule):
    # q and k far from unit norm, and a scale far from the default K ** -0.5 = 0.29: a dropped
    # normalisation or scale is an O(1) error.
    dtype = DTYPES[rule][0]
    x = inputs(rule, dtype, B=1, T=20, H=2, K=12, V=8, initial_state=True)
    x["q"], x["k"] = x["q"] * 2.0, x["k"] * 3.0
    compare(rule, x, scale=0.5, use_qk_l2norm=True)


def test_fla_delta_rule_refuses_float32_naming_the_fix():
    # fla's chunk_delta_rule would fail on an assert; the glue says what to do instead.
    x = inputs("delta_rule", torch.float32, B=1, T=4, H=1, K=4, V=4, initial_state=False)
    with pytest.raises(ValueError, match=r"bfloat16 or float16 q, k, v of one dtype .* got torch.float32"):
        run(x=x, rule="delta_rule", backend="fla")


# The newer rules (ahn.kernels.kda / gdn2 / gated_delta_product) hand their arguments to fla's chunk_kda,
# chunk_gdn2 and chunk_gated_delta_product through a closure of the public function; resolving
# backend="fla" on CPU is allowed here (it is refused to users: fla's kernels need CUDA), so that closure
# runs fla's real kernels in the interpreter. chunk_gated_delta_product refuses float32 q / k / v.
CHANNEL_DTYPES = {"kda": torch.float32, "gdn2": torch.float32, "gated_delta_product": torch.float16}


@pytest.fixture
def fla_on_cpu(monkeypatch):
    from ahn.kernels import dispatch

    resolve = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend",
                        lambda backend, *a, **kw: "fla" if backend == "fla" else resolve(backend, *a, **kw))


def channel_run(rule, x, backend, **kw):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, s = call(rule, leaves, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("rule", list(CHANNEL_DTYPES))
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_glue_newer_rules_match_torch(rule, varlen, fla_on_cpu):
    dtype = CHANNEL_DTYPES[rule]
    kw = dict(scale=0.5, use_qk_l2norm=True)
    if varlen:  # one token, a two-chunk sequence and a short one, packed along T
        cu = torch.tensor([0, 1, 71, 76])
        x = make_inputs(rule, B=1, T=76, H=2, K=12, V=20, n_states=3)
        kw["cu_seqlens"] = cu
    else:
        x = make_inputs(rule, B=1, T=70, H=2, K=12, V=20)
    x["q"], x["k"] = x["q"] * 2.0, x["k"] * 3.0  # far from unit norm: a dropped L2 normalisation shows
    x = {n: t.to(dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}
    o, s, grads = channel_run(rule, x, "fla", **kw)
    o_ref, s_ref, grads_ref = channel_run(rule, {n: t.double() for n, t in x.items()}, "torch", **kw)
    assert_close(o, o_ref, TOL[dtype], "output")
    assert_close(s, s_ref, TOL[dtype], "final state")
    for n, gr in grads.items():
        assert gr is not None, f"no gradient reaches {n}"
        assert_close(gr, grads_ref[n], TOL_GRAD[dtype], f"grad of {n}")
