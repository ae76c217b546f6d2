"""The GPU forms of what the salience options need from attention (ahn.kernels.attention_lse), run on CPU:
flex_attention with its log-sum-exp against the explicit softmax, and the Triton received-mass kernel (in Triton's
interpreter, tests/conftest.py) against its torch reference; then both inside the blocked window attention.

torch has no flex_attention backward on CPU (it refuses inputs that require grad) and no compiled CPU flex with the
log-sum-exp: here flex runs uncompiled, and its gradients are checked through flex's own dense backward with that
refusal lifted (the compiled CUDA backward is the gpu-check's, ``make gpu-check``)."""

from __future__ import annotations

import pytest
import torch

import ahn
from ahn import AHNConfig, attention
from ahn.attention import attend, gather_sinks, window_attention, window_block_mask
from ahn.cache import Buffer
from ahn.kernels import attention_lse
from ahn.kernels.attention_lse import received_mass, received_mass_reference, use_flex, use_triton_mass
from ahn.salience import SalienceScorer
from helpers import ATOL, ids, load_base, logits, randomize_memory, randomize_salience, run_incremental

pytestmark = [
    pytest.mark.skipif(not attention_lse.flex_available(), reason="this torch has no flex_attention"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),  # uncompiled on CPU, as meant
]

# flex (blocked online softmax, float32) against the explicit float32 softmax, as for the CPU flash kernel in
# test_attention.py; bf16 inputs against a float64 reference: bf16's rounding of the inputs and the output.
TOLERANCE = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2}
# The received mass, relative to max(1, |reference|): float32 (the kernel's ieee dot vs torch's matmul); bf16 inputs
# (the reference rounds its logits to bf16, the kernel accumulates them in float32).
MASS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The mass kernel's tile here: the smallest tl.dot takes, so that the shapes below span several query and key tiles.
TILE = 16


def inputs(dtype, B=2, Hq=4, Hkv=2, T=37, N=70, D=12, window=16, sinks=2, seed=0):
    """q, keys (sinks first), values and a sliding-window mask with sinks and a left-padded row, as the prefill
    blocks build them."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((Hq, T), (Hkv, N), (Hkv, N)))
    P = torch.tensor([0, 5])[:B].view(B, 1, 1)
    mask = window_block_mask(N - T, T, sinks, N, window, sinks, P, P + torch.arange(sinks).view(1, 1, -1))
    return q, k, v, mask


def attend_with(form, monkeypatch, *args):
    monkeypatch.setenv("AHN_ATTENTION_LSE", form)
    return attend(*args)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("AHN_ATTENTION_LSE", raising=False)
    monkeypatch.delenv("AHN_RECEIVED_MASS", raising=False)
    assert use_flex(cuda) and not use_flex(cpu)  # auto: flex on CUDA, the CPU flash kernel on CPU
    assert use_triton_mass(cuda) and not use_triton_mass(cpu)
    monkeypatch.setenv("AHN_ATTENTION_LSE", "flex")
    assert use_flex(cpu) and not attention._cpu_flash_with_lse(torch.zeros(1, 1, 1, 4))
    monkeypatch.setenv("AHN_ATTENTION_LSE", "explicit")
    assert not use_flex(cuda) and not attention._cpu_flash_with_lse(torch.zeros(1, 1, 1, 4))
    monkeypatch.setenv("AHN_RECEIVED_MASS", "torch")
    assert not use_triton_mass(cuda)
    monkeypatch.setenv("AHN_RECEIVED_MASS", "triton")
    assert use_triton_mass(cpu)
    monkeypatch.setenv("AHN_ATTENTION_LSE", "fast")
    with pytest.raises(ValueError, match="AHN_ATTENTION_LSE='fast'"):
        use_flex(cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_equals_the_explicit_softmax(dtype, monkeypatch):
    q, k, v, mask = inputs(dtype)
    out, lse = attend_with("flex", monkeypatch, q, k, v, mask, 0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype
    ref = attend_with("explicit", monkeypatch, *(x.to(ref_dtype) for x in (q, k, v)), mask, 0.3)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref[0].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref[1].double(), rtol=tol, atol=tol)


def test_flex_block_mask_skips_and_fills_blocks(monkeypatch):
    """Several 128-blocks: a window of 400 over 510 keys leaves blocks empty, full and partial, the last ones
    ragged (N not a multiple of 128); then no mask at all, one query (decode) and a mask per kv head."""
    q, k, v, mask = inputs(torch.float32, B=1, T=256, N=510, D=8, window=400, sinks=3)
    bm = attention_lse._block_mask(mask, 4)
    assert bm.kv_num_blocks.shape == (1, 1, 2) and bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() > 0
    assert bool((bm.kv_num_blocks + bm.full_kv_num_blocks < 4).any())  # a query block skips a key block
    one = mask[:, -1:]
    per_head = torch.stack([mask, mask.roll(7, dims=-1) | mask[..., :1]], dim=1)  # [B, Hkv, T, N]
    for m, qq in ((mask, q), (None, q), (one, q[:, :, -1:]), (per_head, q)):
        got = attend_with("flex", monkeypatch, qq, k, v, m, 0.3)
        ref = attend_with("explicit", monkeypatch, qq, k, v, m, 0.3)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_flex_gradients_with_the_lse_gradient(monkeypatch):
    """out and lse both carry gradients (the deferring read-out trains through the lse), GQA's k / v gradients sum
    over their query heads: flex's backward (its dense form here, the CPU refusal lifted) == the explicit softmax's."""
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda *args: None)
    q, k, v, mask = inputs(torch.float64)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(q.shape, generator=gen, dtype=q.dtype)
    g_lse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float32)
    results = {}
    for form in ("flex", "explicit"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = attend_with(form, monkeypatch, *leaves, mask, 0.3)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        results[form] = (out.detach(), lse.detach(), *(x.grad for x in leaves))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results["flex"], results["explicit"]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=TOLERANCE[torch.float64], atol=TOLERANCE[torch.float64],
                                   msg=name)


# ----------------------------------------------------------------------------- received mass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, Hq, Hkv, T, N, D, sinks", [
    (2, 4, 2, 37, 70, 12, 2),  # two key tiles, a padded row, head size not a power of two
    (1, 2, 2, 1, 20, 16, 0),  # one query (decode-like), no sinks, no GQA
    (1, 6, 2, 45, 90, 20, 4),  # three query heads per kv head, two query tiles, three key tiles
])
def test_triton_mass_equals_the_reference(dtype, B, Hq, Hkv, T, N, D, sinks):
    pytest.importorskip("triton")
    from ahn.kernels._triton.mass import triton_received_mass  # optional dependency: triton

    q, k, v, mask = inputs(dtype, B=B, Hq=Hq, Hkv=Hkv, T=T, N=N, D=D, window=24, sinks=sinks)
    _, lse = attention._explicit_attention(q, k, v, mask, 0.3)
    got = triton_received_mass(q, k, mask, lse, 0.3, sinks, tile=TILE)
    ref = received_mass_reference(q, k, mask, lse, 0.3, sinks)
    assert got.shape == (B, Hkv, N - sinks) and got.dtype == torch.float32
    assert rel_err(got, ref) <= MASS_TOLERANCE[dtype]


@pytest.mark.parametrize("per_head", [False, True])
def test_triton_mass_per_head_mask_and_no_mask(per_head):
    pytest.importorskip("triton")
    from ahn.kernels._triton.mass import triton_received_mass  # optional dependency: triton

    q, k, v, mask = inputs(torch.float32, N=50)
    mask = torch.stack([mask, mask.roll(3, dims=-1) | mask[..., :1]], dim=1) if per_head else None
    _, lse = attention._explicit_attention(q, k, v, mask, 0.3)
    got = triton_received_mass(q, k, mask, lse, 0.3, 2, tile=TILE)
    assert rel_err(got, received_mass_reference(q, k, mask, lse, 0.3, 2)) <= MASS_TOLERANCE[torch.float32]
    if not per_head:  # every query sees every key: the masses of a kv head sum to T minus the sinks' share
        assert got.sum(-1).le(q.shape[2] + 1e-4).all()


@pytest.mark.parametrize("lse_form", ["auto", "flex"])
def test_window_attention_on_the_gpu_path(lse_form, monkeypatch):
    """The blocked window attention with a mass-reading scorer, a priority buffer, sinks and a padded row: with the
    GPU's parts (flex attention, the Triton mass kernel in the interpreter) it equals the CPU path: outputs, lse,
    eviction scores (which read the mass), the final buffer and the accumulated mass."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, hidden, window, sinks = 2, 4, 2, 41, 8, 16, 9, 2
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    scorer = SalienceScorer(hidden, Hkv)
    with torch.no_grad():
        scorer.mass_weight.copy_(torch.tensor([1.5, -2.0]))
    token_part = torch.randn(B, Hkv, T)
    P = torch.tensor([0, 3])

    def run(lse_env, mass_env):
        monkeypatch.setenv("AHN_ATTENTION_LSE", lse_env)
        monkeypatch.setenv("AHN_RECEIVED_MASS", mass_env)
        mass = torch.zeros(B, Hkv, T)
        with torch.no_grad():
            out, lse, scores, buffer, _ = window_attention(
                q, k, v, 0, gather_sinks(k, P, sinks), gather_sinks(v, P, sinks), start=0, window=window,
                sinks=sinks, pad_offsets=P, scale=D**-0.5, block=16, need_lse=True, scorer=scorer,
                token_part=token_part, mass=mass, buffer=Buffer.empty(k, v, 3))
        return out, lse, scores, buffer.slot, mass

    gpu, cpu = run(lse_form, "triton"), run("auto", "torch")
    for name, a, b in zip(("out", "lse", "scores", "buffer", "mass"), gpu, cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert cpu[4].sum() > 0


def test_received_mass_dispatch(monkeypatch):
    """received_mass: the torch reference unless asked (or on CUDA); no gradient either way."""
    q, k, v, mask = inputs(torch.float32)
    q.requires_grad_()
    _, lse = attention._explicit_attention(q, k, v, mask, 0.3)
    monkeypatch.setenv("AHN_RECEIVED_MASS", "torch")
    got = received_mass(q, k, mask, lse, 0.3, 2)
    assert not got.requires_grad
    torch.testing.assert_close(got, received_mass_reference(q.detach(), k, mask, lse.detach(), 0.3, 2))


@pytest.mark.parametrize("stride", [1, 3])  # 3: the received mass from every third query
def test_the_model_on_the_gpu_forms(model_dirs, monkeypatch, stride):
    """docs/design.md's invariant 3 on the GPU's forms (flex uncompiled, the Triton mass kernel interpreted), every
    salience option on: a parallel forward equals chunked prefill + decode, and both equal the CPU path's logits, the
    cache's received mass included."""
    pytest.importorskip("triton")
    x = ids(2, 30, seed=4)
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, attention_block=5, buffer_slots=3,
                                                            salience_writes=True, readout="defer",
                                                            salience_mass_stride=stride))
    randomize_memory(model)
    randomize_salience(model)
    runs = {}
    for form, env in (("cpu", {}), ("gpu", {"AHN_ATTENTION_LSE": "flex", "AHN_RECEIVED_MASS": "triton"})):
        for name in ("AHN_ATTENTION_LSE", "AHN_RECEIVED_MASS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        incremental, cache = run_incremental(model, x, [9, 4])
        runs[form] = logits(model, x), incremental, torch.stack([layer.salience_mass for layer in cache.layers])
    torch.testing.assert_close(runs["gpu"][1], runs["gpu"][0], rtol=0, atol=ATOL)
    for name, a, b in zip(("parallel", "incremental", "mass"), runs["gpu"], runs["cpu"]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=name)
