"""The one-token step, one call with three backends (torch ops, compiled C++, Triton), against one reference.

The reference is the recurrent reference of each rule (``backend="recurrent"``) in float64 on
the same float32-rounded inputs: for the bare step (``ahn.kernels.*_step``) one token of the
rule; for a memory's decode (``Memory.decode``) the parallel form in float64 (``write_gates``,
``scan`` through the recurrent reference, ``output``). A masked row and a read-only step are
inert writes (k = 0, log decay 0), as the mask is specified. Every backend runs the same cases:
B > 1, grouped k / v heads (Hk < H), head sizes not powers of two, a masked row, no state, read
only. Triton runs in its interpreter without CUDA (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import ahn.memory
from ahn.kernels import cpu_step
from ahn.kernels.dispatch import STEP_BACKENDS, resolve_step_backend
from kernel_cases import FUNCS, GATES, RULES, STEPS, TOL, assert_close, make_inputs

# float32 backends against the float64 reference: TOL[torch.float32] (relative max error, kernel_cases.assert_close).
MEMORIES = list(ahn.available_memories())
B, H, HK, K, V, HIDDEN = 3, 6, 2, 12, 20, 16  # GQA: 3 query heads per k / v head; D not a power of two
MASK = torch.tensor([True, False, True])


def backends():
    """Every backend that can run here (the C++ one needs a toolchain, Triton the package)."""
    out = [pytest.param("torch")]
    out.append(pytest.param("cpp", marks=pytest.mark.skipif(cpu_step.compiled() is None, reason="no C++ toolchain")))
    out.append(pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                               reason="triton is not installed")))
    return out


# ----------------------------------------------------------------------------- the bare step
def reference_step(rule, q, k, v, gates, state, mask, **kw):
    """One token of the rule through its recurrent reference in float64; a masked row (or k None) writes nothing."""
    keep = torch.ones(B, dtype=torch.float64) if mask is None else mask.double()
    if k is None:
        keep, k, v = torch.zeros(B, dtype=torch.float64), torch.zeros(B, HK, K), torch.zeros(B, HK, state.shape[-1])
        gates = {n: torch.zeros(B, H) for n in GATES[rule]}
    rep = H // k.shape[1]
    x = {"q": q.double()[:, None], "k": (k.double() * keep[:, None, None]).repeat_interleave(rep, 1)[:, None],
         "v": v.double().repeat_interleave(rep, 1)[:, None]}
    for n in GATES[rule]:
        x[n] = (gates[n].double() * (keep[:, None] if n == "g" else 1))[:, None]
    args = [x["q"], x["k"], x["v"]] + [x[n] for n in GATES[rule]]
    o, s = FUNCS[rule](*args, initial_state=None if state is None else state.double(), output_final_state=True,
                       backend="recurrent", **kw)
    return o[:, 0], s


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("l2", [False, True])
def test_step_backends_match_the_recurrent_reference(rule, backend, l2):
    x = make_inputs(rule, B, 1, H, K, V, dtype=torch.float32)
    q, k, v = x["q"][:, 0], x["k"][:, 0, :HK] * 2.0, x["v"][:, 0, :HK]  # |k| = 2: l2norm matters
    gates = {n: x[n][:, 0] for n in GATES[rule]}
    cases = [(k, v, x["initial_state"], None), (k, v, None, MASK), (k, v, x["initial_state"], MASK),
             (None, None, x["initial_state"], None)]
    with torch.no_grad():
        for kk, vv, state, mask in cases:
            g = [gates[n] if kk is not None else None for n in GATES[rule]]
            o, s = STEPS[rule](q, kk, vv, *g, state, scale=0.7, use_qk_l2norm=l2, mask=mask, backend=backend)
            o_ref, s_ref = reference_step(rule, q, kk, vv, gates, state, mask, scale=0.7, use_qk_l2norm=l2)
            what = f"{'read-only' if kk is None else 'write'}, state={state is not None}, mask={mask is not None}"
            assert o.dtype == torch.float32 and s.dtype == torch.float32 and s.shape == (B, H, K, V)
            assert_close(o, o_ref, TOL[torch.float32], f"output ({what})")
            assert_close(s, s_ref, TOL[torch.float32], f"state ({what})")


# ----------------------------------------------------------------------------- a memory's decode
def build(memory):
    torch.manual_seed(0)
    m = ahn.memory.build_memory(memory, hidden_size=HIDDEN, num_heads=H, head_dim=K)
    with torch.no_grad():
        for p in m.parameters():  # o_proj starts at zero: make every parameter count
            p.add_(torch.randn_like(p) * 0.3)
    return m


def reference_decode(m, x, q, k, v, gates, mask, state):
    """``Memory.decode`` from the parallel form in float64: write_gates, read (recurrent reference), output."""
    m64 = copy.deepcopy(m).double()
    x, q = x.double(), q.double()
    new_gates = m64.write_gates(x)
    if k is None and state is None:
        return None, new_gates, None
    if k is None:  # read only: an inert write in every row
        k, v, mask = torch.zeros(B, HK, K), torch.zeros(B, HK, K), torch.zeros(B, dtype=torch.bool)
        gates = torch.zeros(B, H, m.gate_channels)
    rep = H // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, 1)[:, None] for t in (k, v))  # [B, 1, H, D]
    o, s = m64.scan(q[:, None], k, v, gates.double()[:, None], None if mask is None else mask[:, None],
                    initial_state=None if state is None else state.double(), backend="recurrent")
    return m64.output(o[:, 0], x), new_gates, s


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_decode_backends_match_the_parallel_reference(memory, backend):
    m = build(memory)
    gen = torch.Generator().manual_seed(1)
    x, q = torch.randn(B, HIDDEN, generator=gen), torch.randn(B, H, K, generator=gen)
    ring = torch.randn(B, HK, 5, K, generator=gen)  # like the cache's ring: the evicted k / v are strided views
    k, v = ring[:, :, 1], ring[:, :, 3] * 2
    state = torch.randn(B, H, K, K, generator=gen) * 0.5
    with torch.no_grad():
        gates = m.write_gates(torch.randn(B, HIDDEN, generator=gen))
        if not m.fused and backend != "torch":  # KDA, GDN-2, Gated DeltaProduct: torch ops only
            with pytest.raises(ValueError, match=f"memory '{memory}' decodes with torch ops only"):
                m.decode(x, q, k, v, gates, None, state, backend=backend)
            return
        cases = [(k, v, gates, None, state), (k, v, gates, MASK, None), (k, v, gates, MASK, state),
                 (None, None, None, None, state), (None, None, None, None, None)]
        for case in cases:
            got = m.decode(x, q, *case, backend=backend)
            ref = reference_decode(m, x, q, *case)
            what = f"write={case[0] is not None}, mask={case[3] is not None}, state={case[4] is not None}"
            for name, a, b in zip(("output", "new gates", "state"), got, ref):
                assert (a is None) == (b is None), f"{name} ({what})"
                if a is not None:
                    assert a.dtype == torch.float32
                    assert_close(a, b, TOL[torch.float32], f"{name} ({what})")


def test_memory_decode_backward_through_the_torch_backend():
    m = build("gated_deltanet")
    x, q, k, v = torch.randn(B, HIDDEN), torch.randn(B, H, K), torch.randn(B, HK, K), torch.randn(B, HK, K)
    out, _, state = m.decode(x, q, k, v, m.write_gates(torch.randn(B, HIDDEN)).detach(), MASK, None)  # auto: torch
    (out.sum() + state.sum()).backward()
    assert m.o_proj.weight.grad is not None and m.a_proj.weight.grad is not None
    with pytest.raises(ValueError, match="inference-only"):
        m.decode(x, q, k, v, None, None, None, backend="cpp")


@pytest.mark.skipif(cpu_step.compiled() is None, reason="no C++ toolchain")
@pytest.mark.parametrize("activation", list(cpu_step.GATE_ACTIVATIONS))
def test_gate_activations_agree_in_torch_and_cpp(activation):
    # Pre-activations through the bias of a zero projection, across softplus' threshold (20).
    pre = torch.cat([torch.linspace(-30, 30, 61), torch.tensor([19.99, 20.0, 20.01])])
    n, empty = pre.numel(), cpu_step.EMPTY
    _, new_gates, _ = cpu_step.compiled()(
        torch.ones(1, 1), [torch.zeros(n, 1)], [pre], [empty], [cpu_step.ACTIVATION_CODES[activation]],
        torch.zeros(n, 1), empty, torch.zeros(1, n, 4), empty, empty, empty, -1, empty, -1, False, empty, empty,
        empty, False, empty, False, 0.0, 0.0, 1.0,
    )
    torch_form = cpu_step.GATE_ACTIVATIONS[activation]
    torch.testing.assert_close(new_gates[0, :, 0], torch_form(pre), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the dispatcher
def test_dispatcher_choices(monkeypatch):
    q = torch.randn(2, 4, 8)
    cpp = "cpp" if cpu_step.compiled() is not None else "torch"
    with torch.no_grad():
        assert resolve_step_backend("auto", q, None, head_dim=8) == cpp  # float32 CPU, no autograd
        assert resolve_step_backend("fla", q, None, head_dim=8) == cpp  # fla has no step: auto's choice
        assert resolve_step_backend("auto", q.double(), None, head_dim=8) == "torch"
        assert resolve_step_backend("recurrent", q, None, head_dim=8) == "torch"  # the reference is the torch step
        assert resolve_step_backend("triton", q, None, head_dim=8) == "triton"  # the interpreter (conftest)
        with pytest.raises(ValueError, match="float32 CPU tensors"):
            resolve_step_backend("cpp", q, q.double(), head_dim=8)
        with pytest.raises(ValueError, match="head sizes up to 256"):
            resolve_step_backend("triton", q, None, head_dim=300)
    w = torch.zeros(1, requires_grad=True)
    assert resolve_step_backend("auto", q, w, head_dim=8) == "torch"  # autograd: the torch ops
    for b in ("cpp", "triton"):
        with pytest.raises(ValueError, match="inference-only"):
            resolve_step_backend(b, q, w, head_dim=8)
    with pytest.raises(ValueError, match="backend='gpu' is not one of"):
        resolve_step_backend("gpu", q, head_dim=8)
    assert set(STEP_BACKENDS) == {"auto", "torch", "cpp", "triton"}
    # AHN_CPU_DECODE=0: auto falls back to the torch ops, an explicit "cpp" says why it cannot run.
    monkeypatch.setenv("AHN_CPU_DECODE", "0")
    cpu_step.compiled.cache_clear()
    try:
        with torch.no_grad():
            assert resolve_step_backend("auto", q, None, head_dim=8) == "torch"
            with pytest.raises(ValueError, match="AHN_CPU_DECODE=0"):
                resolve_step_backend("cpp", q, None, head_dim=8)
    finally:
        monkeypatch.undo()
        cpu_step.compiled.cache_clear()


def test_build_name_follows_the_source():
    import hashlib
    import re

    source = cpu_step.SOURCE_PATH.read_text()
    assert cpu_step.build_name() == "ahn_cpu_step_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    cases = dict(re.findall(r"case (\d+): return .*;  // (\w+)", source))  # the C++ switch: code -> name
    assert {name: str(code) for name, code in cpu_step.ACTIVATION_CODES.items()} == {n: c for c, n in cases.items()}


def test_each_ninja_version_builds_in_its_own_folder(monkeypatch, tmp_path):
    """Two ninjas sharing one build folder rebuild each other's output silently (~25 s each switch)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folders = set()
    for version in ("1.11.1", "1.13.2"):
        monkeypatch.setattr(cpu_step, "_ninja_version", lambda v=version: v)
        folder = cpu_step.build_directory()
        assert folder.startswith(str(tmp_path)) and cpu_step.build_name() in folder and version in folder
        folders.add(folder)
    assert len(folders) == 2
