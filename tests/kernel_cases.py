"""Shared inputs, calls, comparisons and tolerances of the kernel tests (test_kernels.py, test_channel_kernels.py,
test_triton_kernels.py, test_decode_step.py, test_fla_glue.py): every rule, scalar gates (gated delta rule, delta
rule, SSD) and channel gates (KDA, GDN-2, Gated DeltaProduct) alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ahn.kernels import (
    delta_rule, delta_rule_step, gated_delta_product, gated_delta_rule, gated_delta_rule_step, gdn2, kda, ssd, ssd_step,
)

RULES = ["gated_delta_rule", "delta_rule", "ssd"]
FUNCS = {"gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "ssd": ssd}
GATES = {"gated_delta_rule": ("g", "beta"), "delta_rule": ("beta",), "ssd": ("g",)}
STEPS = {"gated_delta_rule": gated_delta_rule_step, "delta_rule": delta_rule_step, "ssd": ssd_step}
N_HOUSEHOLDER = 3  # writes per token in the Gated DeltaProduct cases

# Relative max error (``assert_close``) of a kernel's output, final state and gradients against a float64
# reference on the same (rounded) inputs, per input dtype. float64: the same maths in another order agrees to
# rounding; float32: the kernels accumulate in float32; float16: fla keeps its WY / pseudo-value tiles in the
# input dtype (test_fla_glue.py, the only float16 inputs); bfloat16: inputs rounded to bf16, float32 accumulation.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# bf16 gradients go through a triangular inverse and long sums: looser (ahn's Triton kernels and fla's on CUDA).
TOL_BF16_GRAD = 0.1


def writes(rule: str) -> int:
    """Rows of k / v per token."""
    return N_HOUSEHOLDER if rule == "gated_delta_product" else 1


def make_inputs(rule, B, T, H, K, V, dtype=torch.float64, initial_state=True, n_states=None, seed=0, decay=2.0):
    """Seeded inputs of ``rule`` drawn in float64, then cast to ``dtype``: q, k (unit norm: delta
    rules are stable for |k| <= 1), v, its gates, and optionally an initial state. ``decay`` shifts the
    log decay: logsigmoid(N(0, 1) + decay), lower is faster forgetting. Gated DeltaProduct's k, v and
    beta hold ``writes(rule)`` rows per token."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = writes(rule)
    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T * n, H, K), dim=-1), "v": rnd(B, T * n, H, V)}
    if rule == "kda":
        x["g"], x["beta"] = F.logsigmoid(rnd(B, T, H, K) + decay), uni(B, T, H)
    elif rule == "gdn2":
        x["g"], x["b"], x["w"] = F.logsigmoid(rnd(B, T, H, K) + decay), uni(B, T, H, K), uni(B, T, H, V)
    elif rule == "gated_delta_product":
        x["g"], x["beta"] = F.logsigmoid(rnd(B, T, H) + decay), uni(B, T * n, H)
    else:
        if "g" in GATES[rule]:
            x["g"] = F.logsigmoid(rnd(B, T, H) + decay)
        if "beta" in GATES[rule]:
            x["beta"] = uni(B, T, H)
    if initial_state:
        x["initial_state"] = rnd(n_states or B, H, K, V) * 0.5
    return {n: t.to(dtype) for n, t in x.items()}


def call(rule, x, **kw):
    """``rule``'s public function on the inputs ``x`` (as make_inputs builds them): (output, final state)."""
    kw = dict(initial_state=x.get("initial_state"), output_final_state=True, **kw)
    if rule == "kda":
        return kda(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    if rule == "gdn2":
        return gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], **kw)
    if rule == "gated_delta_product":
        return gated_delta_product(x["q"], x["k"], x["v"], x["g"], x["beta"], N_HOUSEHOLDER, **kw)
    return FUNCS[rule](x["q"], x["k"], x["v"], *[x[n] for n in ("g", "beta") if n in x], **kw)


def outputs_and_grads(rule, x, **kw):
    """Run with grad on every input; return output, final state and every input's grad under fixed random
    cotangents."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, s = call(rule, leaves, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)  # o's device and dtype
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)
    ((o * do).sum() + (s * ds).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


def assert_close(a, b, tol, what):
    """Relative max error (against max(1, |b|max)) at most ``tol``."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"{what}: relative max error {err:.3g} > {tol:.3g}"
