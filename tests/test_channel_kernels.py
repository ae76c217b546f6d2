"""ahn.kernels' newer rules (KDA, GDN-2, Gated DeltaProduct): chunkwise torch vs the recurrent
reference in float64 (outputs, final state, every gradient), vs flash-linear-attention's own
naive references, varlen, state carry, the one-token step and errors.

Tolerances are fixed per dtype in kernel_cases.TOL, as for test_kernels.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ahn.kernels import gated_delta_product, gated_delta_product_step, gdn2, gdn2_step, kda, kda_step
from kernel_cases import N_HOUSEHOLDER, TOL, assert_close, call, make_inputs, outputs_and_grads, writes

RULES = ["kda", "gdn2", "gated_delta_product"]
HAS_FLA = importlib.util.find_spec("fla") is not None


def time_slice(rule, x, a, b, rows=None):
    """Tokens a..b of every per-token tensor (k, v and the product's beta hold ``writes`` rows per token)."""
    n = writes(rule)
    out = {}
    for name, t in x.items():
        if name == "initial_state":
            out[name] = t if rows is None else t[rows]
        elif name in ("k", "v") or (rule == "gated_delta_product" and name == "beta"):
            out[name] = t[:, a * n : b * n]
        else:
            out[name] = t[:, a:b]
    return out


def compare(rule, x, tol, **kw):
    o1, s1, g1 = outputs_and_grads(rule, x, backend="recurrent")
    o2, s2, g2 = outputs_and_grads(rule, x, backend="torch", **kw)
    assert_close(o2, o1, tol, "output")
    assert_close(s2, s1, tol, "final state")
    assert set(g1) == set(g2)
    for name in g1:
        assert g1[name] is not None, f"no gradient reaches {name}"
        assert_close(g2[name], g1[name], tol, f"grad of {name}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 100])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_recurrent(rule, T, initial_state):
    # B > 1, head sizes not powers of two, K != V.
    compare(rule, make_inputs(rule, B=2, T=T, H=3, K=5, V=7, initial_state=initial_state), TOL[torch.float64])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunk_size_is_a_free_parameter(rule, chunk_size):
    compare(rule, make_inputs(rule, B=1, T=45, H=2, K=4, V=6), TOL[torch.float64], chunk_size=chunk_size)


@pytest.mark.parametrize("rule", ["kda", "gdn2"])
def test_fast_channel_decay_stays_finite(rule):
    # Log decays around -60 per channel and token: a chunk's cumulative decay is far past float32's exp range,
    # which a factored exp(G_i) exp(-G_j) would overflow; the masked [C, C, K] form stays exact.
    x = make_inputs(rule, B=1, T=40, H=2, K=4, V=4, dtype=torch.float32, decay=-60.0)
    o, s = call(rule, x, backend="torch")
    o_ref, s_ref = call(rule, {n: t.double() for n, t in x.items()}, backend="recurrent")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref, TOL[torch.float32], "output")
    assert_close(s, s_ref, TOL[torch.float32], "final state")


@pytest.mark.parametrize("rule", RULES)
def test_long_sequence_float32(rule):
    x = make_inputs(rule, B=1, T=400, H=2, K=16, V=16, dtype=torch.float32)
    o, s = call(rule, x, backend="torch")
    o_ref, s_ref = call(rule, {n: t.double() for n, t in x.items()}, backend="recurrent")
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, o_ref, TOL[torch.float32], "output")
    assert_close(s, s_ref, TOL[torch.float32], "final state")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_varlen_equals_loop_over_sequences(rule, backend):
    lengths = [1, 17, 0, 30, 5]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(rule, B=1, T=int(cu[-1]), H=2, K=5, V=3, n_states=len(lengths))
    o, s, grads = outputs_and_grads(rule, x, backend=backend, cu_seqlens=cu)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss, outs, states = 0.0, [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        oi, si = call(rule, time_slice(rule, leaves, a, b, rows=slice(i, i + 1)), backend="recurrent")
        outs.append(oi)
        states.append(si)
        loss = loss + (oi * do[:, a:b]).sum() + (si * ds[i : i + 1]).sum()
    loss.backward()
    assert_close(o, torch.cat(outs, 1), TOL[torch.float64], "varlen output")
    assert_close(s, torch.cat(states, 0), TOL[torch.float64], "varlen states")
    for n, t in leaves.items():
        assert_close(grads[n], t.grad, TOL[torch.float64], f"varlen grad of {n}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("split", [1, 16, 29])
def test_split_and_carry_state_equals_one_pass(rule, split):
    T = 40
    x = make_inputs(rule, B=2, T=T, H=2, K=6, V=5)
    o, s = call(rule, x, backend="torch")
    o1, s1 = call(rule, time_slice(rule, x, 0, split), backend="torch")
    second = time_slice(rule, x, split, T)
    second["initial_state"] = s1
    o2, s2 = call(rule, second, backend="torch")
    assert_close(torch.cat([o1, o2], 1), o, TOL[torch.float64], "split output")
    assert_close(s2, s, TOL[torch.float64], "split state")


@pytest.mark.parametrize("rule", RULES)
def test_l2norm_and_scale_options(rule):
    x = make_inputs(rule, B=1, T=20, H=2, K=4, V=4, initial_state=False)
    x["k"] = x["k"] * 3.0
    o, _ = call(rule, x, backend="torch", use_qk_l2norm=True, scale=0.3)
    l2 = lambda t: t / torch.sqrt((t**2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731  (fla's l2norm)
    o_ref, _ = call(rule, dict(x, q=l2(x["q"]), k=l2(x["k"])), backend="recurrent", scale=0.3)
    assert_close(o, o_ref, TOL[torch.float64], "l2norm output")
    o_default, _ = call(rule, x, backend="torch")
    o_explicit, _ = call(rule, x, backend="torch", scale=4 ** -0.5)
    torch.testing.assert_close(o_default, o_explicit)


def test_special_cases_agree():
    """KDA is GDN-2 with b = w = beta; the gated delta rule is KDA with one decay per head and Gated
    DeltaProduct with one write per token."""
    from ahn.kernels import gated_delta_rule

    x = make_inputs("kda", B=2, T=33, H=2, K=4, V=5)
    o_kda, s_kda = call("kda", x, backend="torch")
    B, T, H, K = x["q"].shape
    b, w = x["beta"][..., None].expand(B, T, H, K), x["beta"][..., None].expand(B, T, H, 5)
    o, s = gdn2(x["q"], x["k"], x["v"], x["g"], b, w, initial_state=x["initial_state"], output_final_state=True)
    assert_close(o, o_kda, TOL[torch.float64], "gdn2 vs kda output")
    assert_close(s, s_kda, TOL[torch.float64], "gdn2 vs kda state")
    g = x["g"][..., 0]
    o_gdn, s_gdn = gated_delta_rule(x["q"], x["k"], x["v"], g, x["beta"], initial_state=x["initial_state"],
                                    output_final_state=True)
    o, s = kda(x["q"], x["k"], x["v"], g[..., None].expand(B, T, H, K), x["beta"], initial_state=x["initial_state"],
               output_final_state=True)
    assert_close(o, o_gdn, TOL[torch.float64], "kda vs gated delta rule output")
    o, s = gated_delta_product(x["q"], x["k"], x["v"], g, x["beta"], 1, initial_state=x["initial_state"],
                               output_final_state=True)
    assert_close(o, o_gdn, TOL[torch.float64], "delta product (n = 1) vs gated delta rule output")
    assert_close(s, s_gdn, TOL[torch.float64], "delta product (n = 1) vs gated delta rule state")


# ----------------------------------------------------------------------------- fla's definitions
@pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention is not installed")
@pytest.mark.parametrize("rule", RULES)
def test_matches_fla_naive_reference(rule):
    """Our definition of each rule is fla's: its pure-torch naive recurrences (they compute in float32)."""
    x = make_inputs(rule, B=2, T=37, H=3, K=5, V=6)
    o, s = call(rule, x, backend="recurrent")
    q, k, v, h0, scale = x["q"], x["k"], x["v"], x["initial_state"], 5 ** -0.5
    if rule == "kda":
        from fla.ops.kda.naive import naive_recurrent_kda

        o_fla, s_fla = naive_recurrent_kda(q, k, v, x["g"], x["beta"], scale=scale, initial_state=h0,
                                           output_final_state=True)
    elif rule == "gdn2":
        from fla.ops.gdn2.naive import naive_recurrent_gdn2

        o_fla, s_fla = naive_recurrent_gdn2(q, k, v, x["g"], x["b"], x["w"], scale=scale, initial_state=h0,
                                            output_final_state=True)
    else:
        from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product

        o_fla, s_fla = naive_recurrent_gated_delta_product(q, k, v, x["g"], x["beta"], scale, initial_state=h0.clone(),
                                                           output_final_state=True, num_householder=N_HOUSEHOLDER)
    assert_close(o, o_fla, 1e-5, "output vs fla")
    assert_close(s, s_fla, 1e-5, "final state vs fla")


# ----------------------------------------------------------------------------- decode step
def step(rule, q, k, v, gates, state, **kw):
    """One token; ``gates`` as the full rule's at that token (None entries: read only)."""
    if rule == "kda":
        return kda_step(q, k, v, gates.get("g"), gates.get("beta"), state, **kw)
    if rule == "gdn2":
        return gdn2_step(q, k, v, gates.get("g"), gates.get("b"), gates.get("w"), state, **kw)
    return gated_delta_product_step(q, k, v, gates.get("g"), gates.get("beta"), state, **kw)


def token(rule, x, t, Hk=None):
    """Token t's step arguments: k / v ``[B, Hk, (n,) D]`` of kv heads 0, R, 2R .. (GQA), gates ``[B, H, ...]``."""
    n = writes(rule)
    B, _, H, _ = x["q"].shape
    heads = slice(None) if Hk is None else slice(None, None, H // Hk)
    if rule == "gated_delta_product":
        k = x["k"][:, t * n : (t + 1) * n, heads].transpose(1, 2)  # [B, Hk, n, K]
        v = x["v"][:, t * n : (t + 1) * n, heads].transpose(1, 2)
        gates = {"g": x["g"][:, t], "beta": x["beta"][:, t * n : (t + 1) * n].transpose(1, 2)}
    else:
        k, v = x["k"][:, t, heads], x["v"][:, t, heads]
        gates = {name: x[name][:, t] for name in ("g", "beta", "b", "w") if name in x}
    return x["q"][:, t], k, v, gates


@pytest.mark.parametrize("rule", RULES)
def test_step_loop_equals_rule_with_gqa_and_mask(rule):
    B, T, H, Hk = 3, 9, 4, 2
    x = make_inputs(rule, B=B, T=T, H=H, K=5, V=6)
    R = H // Hk
    # The full rule on k / v repeated from Hk heads (what GQA's step reads by index).
    n = writes(rule)
    full = dict(x, k=x["k"][:, :, ::R].repeat_interleave(R, dim=2), v=x["v"][:, :, ::R].repeat_interleave(R, dim=2))
    o_ref, s_ref = call(rule, full, backend="recurrent")
    state, outs = x["initial_state"], []
    for t in range(T):
        q, k, v, gates = token(rule, x, t, Hk=Hk)
        o, state = step(rule, q, k, v, gates, state)
        outs.append(o)
    assert_close(torch.stack(outs, 1), o_ref, TOL[torch.float64], "step loop output")
    assert_close(state, s_ref, TOL[torch.float64], "step loop state")
    # A masked row writes nothing (no decay either) and still reads.
    q, k, v, gates = token(rule, x, 0, Hk=Hk)
    mask = torch.tensor([True, False, True])
    o, s = step(rule, q, k, v, gates, x["initial_state"], mask=mask)
    o_all, s_all = step(rule, q, k, v, gates, x["initial_state"])
    torch.testing.assert_close(s[1], x["initial_state"][1])
    torch.testing.assert_close(s[0], s_all[0])
    o_read, _ = step(rule, q, None, None, {}, x["initial_state"])
    torch.testing.assert_close(o[1], o_read[1])
    assert n >= 1


@pytest.mark.parametrize("rule", RULES)
def test_step_backends_and_errors(rule):
    x = make_inputs(rule, B=2, T=1, H=2, K=4, V=4, dtype=torch.float32)
    q, k, v, gates = token(rule, x, 0)
    o, s = step(rule, q.bfloat16(), k.bfloat16(), v.bfloat16(), gates, None)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    for backend in ("cpp", "triton"):
        with pytest.raises(ValueError, match="has no compiled C\\+\\+ or Triton form"):
            step(rule, q, k, v, gates, None, backend=backend)
    with pytest.raises(ValueError, match="needs a state"):
        step(rule, q, None, None, {}, None)
    with pytest.raises(ValueError, match="state must be"):
        step(rule, q, k, v, gates, x["initial_state"][:, :, :2])
    bad = dict(gates, g=gates["g"][:, :1])
    with pytest.raises(ValueError, match="g must be"):
        step(rule, q, k, v, bad, None)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rule", RULES)
def test_bad_inputs_name_the_argument(rule):
    x = make_inputs(rule, B=2, T=8, H=2, K=4, V=3, initial_state=False)
    with pytest.raises(ValueError, match="g is a log decay and must be <= 0"):
        call(rule, dict(x, g=x["g"].abs() + 0.1))
    with pytest.raises(ValueError, match=r"g must be \[B, T, H"):
        call(rule, dict(x, g=x["g"][:, :, :1]))
    with pytest.raises(ValueError, match="k must be"):
        call(rule, dict(x, k=x["k"][:, :3]))
    with pytest.raises(ValueError, match="v must be"):
        call(rule, dict(x, v=x["v"][:, :3]))
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\]"):
        call(rule, dict(x, initial_state=torch.zeros(2, 2, 3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="ahn has no Triton kernel for"):
        call(rule, x, backend="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(rule, x, chunk_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='fla' needs CUDA"):
            call(rule, x, backend="fla")


def test_bad_householder_count():
    x = make_inputs("gated_delta_product", B=1, T=4, H=1, K=4, V=4, initial_state=False)
    with pytest.raises(ValueError, match="num_householder must be an int >= 1, got 0"):
        gated_delta_product(x["q"], x["k"], x["v"], x["g"], x["beta"], 0)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_fla_matches_torch_on_cuda(rule):
    x = make_inputs(rule, B=2, T=300, H=4, K=64, V=64, dtype=torch.bfloat16)
    x = {n: (t.float() if n == "initial_state" else t).cuda() for n, t in x.items()}
    o_fla, s_fla = call(rule, x, backend="fla")
    o_ref, s_ref = call(rule, {n: t.double().cpu() for n, t in x.items()}, backend="torch")
    assert_close(o_fla.cpu(), o_ref, TOL[torch.bfloat16], "fla output")
    assert_close(s_fla.cpu(), s_ref, TOL[torch.bfloat16], "fla final state")
