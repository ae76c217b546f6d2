"""Shared inputs and comparisons of the kernel tests (test_kernels.py, test_triton_kernels.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ahn.kernels import delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step, ssd, ssd_step

RULES = ["gated_delta_rule", "delta_rule", "ssd"]
FUNCS = {"gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "ssd": ssd}
GATES = {"gated_delta_rule": ("g", "beta"), "delta_rule": ("beta",), "ssd": ("g",)}
STEPS = {"gated_delta_rule": gated_delta_rule_step, "delta_rule": delta_rule_step, "ssd": ssd_step}


def make_inputs(rule, B, T, H, K, V, dtype=torch.float64, initial_state=True, n_states=None, seed=0):
    """Seeded inputs of ``rule`` drawn in float64, then cast to ``dtype``: q, k (unit norm: delta
    rules are stable for |k| <= 1), v, its gates, and optionally an initial state."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, H, V)}
    if "g" in GATES[rule]:
        x["g"] = F.logsigmoid(rnd(B, T, H) + 2.0)
    if "beta" in GATES[rule]:
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if initial_state:
        x["initial_state"] = rnd(n_states or B, H, K, V) * 0.5
    return {n: t.to(dtype) for n, t in x.items()}


def assert_close(a, b, tol, what):
    """Relative max error (against max(1, |b|max)) at most ``tol``."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"{what}: relative max error {err:.3g} > {tol:.3g}"
