"""The attention with its log-sum-exp (ahn.attention.attend): torch's CPU flash kernel against the explicit softmax,
outputs, log-sum-exp and every gradient (the log-sum-exp's included), with GQA and window masks."""

from __future__ import annotations

import pytest
import torch

from ahn import attention
from ahn.attention import attend, window_block_mask
from ahn.kernels.attention_lse import received_mass_in_bands

# The explicit form's softmax is float32 whatever the inputs (as in the model), so float64 inputs agree to float32's
# rounding; float32 inputs also differ by flash's blocked online softmax.
TOLERANCE = {torch.float64: 2e-6, torch.float32: 2e-5}


def inputs(dtype, B=2, Hq=4, Hkv=2, T=37, N=70, D=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=gen, dtype=dtype) for h, n in ((Hq, T), (Hkv, N), (Hkv, N)))
    # A sliding-window mask with sinks and a left-padded row, as the prefill blocks build it.
    P = torch.tensor([0, 5]).view(B, 1, 1)
    mask = window_block_mask(N - T, T, 2, N, 16, 2, P, P + torch.arange(2).view(1, 1, -1))
    keys = torch.cat([k[:, :, :2], k[:, :, 2:]], 2)
    return q, keys, torch.cat([v[:, :, :2], v[:, :, 2:]], 2), mask


@pytest.mark.skipif(attention._CPU_FLASH is None, reason="this torch has no CPU flash kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_with_lse_equals_the_explicit_softmax_with_gradients(dtype, monkeypatch):
    q, k, v, mask = inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(q.shape, generator=gen, dtype=dtype)
    g_lse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float32)
    results = {}
    for form in ("auto", "explicit"):
        monkeypatch.setenv("AHN_ATTENTION_LSE", form)
        assert attention._cpu_flash_with_lse(q) == (form == "auto")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = attend(*leaves, mask, 0.3)
        assert lse.dtype == torch.float32 and out.dtype == dtype
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        results[form] = (out.detach(), lse.detach(), *(x.grad for x in leaves))
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results["auto"], results["explicit"]):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=name)


@pytest.mark.skipif(attention._CPU_FLASH is None, reason="this torch has no CPU flash kernel")
def test_flash_with_lse_in_bfloat16(monkeypatch):
    q, k, v, mask = inputs(torch.bfloat16)
    out, lse = attend(q, k, v, mask, 0.3)
    monkeypatch.setenv("AHN_ATTENTION_LSE", "explicit")
    ref_out, ref_lse = attend(q.double(), k.double(), v.double(), mask, 0.3)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=3e-2)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=0, atol=3e-2)


@pytest.mark.skipif(attention._CPU_FLASH is None, reason="this torch has no CPU flash kernel")
@pytest.mark.parametrize("per_head", [False, True])
def test_per_kv_head_masks_and_no_mask(per_head, monkeypatch):
    """A mask per kv head (the priority buffer's entries differ by head) and no mask at all: flash == explicit."""
    q, k, v, mask = inputs(torch.float32, T=1, N=40)
    if per_head:
        mask = torch.stack([mask, mask.roll(3, dims=-1) | mask[..., :1]], dim=1)  # [B, Hkv, T, N]
    got = attend(q, k, v, mask, 0.3)
    none = attend(q, k, v, None, 0.3)
    monkeypatch.setenv("AHN_ATTENTION_LSE", "explicit")
    for a, b in zip(got + none, attend(q, k, v, mask, 0.3) + attend(q, k, v, None, 0.3)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("gap, stride", [(0, 1), (7, 1), (0, 3), (0, 5)])  # 7: the teacher's probe; 3, 5: estimates
@pytest.mark.parametrize("B, Hkv, R, bq, W, S, D, start, pads", [
    (1, 2, 3, 150, 37, 4, 8, 500, [0]),  # steady blocks: the middle of each band unmasked
    (2, 1, 2, 70, 50, 3, 8, 60, [0, 5]),  # a left-padded row, the band clipped at the context's start
    (2, 2, 2, 130, 200, 2, 16, 10, [3, 0]),  # a window longer than the context so far
    (1, 1, 1, 64, 16, 0, 4, 3000, [0]),  # no sinks, one query head
])
def test_received_mass_equals_the_column_sums_of_the_softmax(B, Hkv, R, bq, W, S, D, start, pads, gap, stride):
    """The salience score's received mass (and the teacher's probe: only queries ``gap`` or more slots after the key),
    computed in bands of queries with the lse folded into the matmul, equals the column sums (over queries, averaged
    over heads) of the explicit softmax of the same block; with a ``stride``, over the queries at slots divisible by
    it only, times the stride."""
    gen = torch.Generator().manual_seed(B * 1000 + bq)
    lo, hi = max(0, start - W + 1), start + bq
    P = torch.tensor(pads).view(B, 1, 1)
    n_sinks = min(S, start + bq)
    mask = window_block_mask(start, bq, lo, hi, W, S, P, P + torch.arange(n_sinks).view(1, 1, -1))
    q = torch.randn(B, Hkv * R, bq, D, generator=gen)
    keys, values = (torch.randn(B, Hkv, n_sinks + hi - lo, D, generator=gen) for _ in range(2))
    scale = D ** -0.5
    _, lse = attend(q, keys, values, mask, scale)
    qb, lse = q.view(B, Hkv, R, bq, D), lse.view(B, Hkv, R, bq)
    p = torch.softmax(attention._block_logits(qb, keys, mask.view(B, 1, 1, bq, -1), scale), dim=-1)
    far = (start + torch.arange(bq)).view(-1, 1) - torch.arange(lo, hi) >= gap  # [bq, n]: query slot - key slot
    counted = ((start + torch.arange(bq)) % stride == 0).view(-1, 1)  # [bq, 1]
    expected = (p[..., n_sinks:] * (far & counted)).sum(dim=3).mean(dim=2) * stride
    got = received_mass_in_bands(qb, keys[:, :, n_sinks:], mask[:, :, n_sinks:], lse, scale, own=start - lo, window=W,
                                  gap=gap, stride=stride, first=-start % stride)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.sum() > 0.1 * bq  # the window holds most of the attention: the test compares real mass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_buffer_merge_backward_equals_autograd_through_the_reference(dtype):
    """The priority buffer's softmax merge (window output and lse + visible candidates): the written-out backward of
    attention._BufferMerge against autograd through buffer_merge_reference, every input's gradient and the lse's,
    with rows that see no candidate, a candidate no row sees, and GQA (R = 3 query heads per kv head)."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, R, bq, C, D = 2, 2, 3, 9, 11, 5
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=gen, dtype=dt)
    q, ck, cv = rand(B, Hkv, R, bq, D), rand(B, Hkv, C, D), rand(B, Hkv, C, D)
    wo, wlse = rand(B, Hkv, R, bq, D), rand(B, Hkv, R, bq, dt=torch.float32)
    visible = torch.rand(B, Hkv, bq, C, generator=gen) < 0.5
    visible[:, :, 0] = False  # a query that sees no candidate (only the window)
    visible[..., 3] = False  # a candidate that no query sees
    g_out, g_lse = rand(B, Hkv, R, bq, D), rand(B, Hkv, R, bq, dt=torch.float32)
    results = []
    for merge in (attention._BufferMerge.apply, attention.buffer_merge_reference):
        leaves = [x.clone().requires_grad_() for x in (q, ck, cv, wo, wlse)]
        out, lse = merge(leaves[0], leaves[1], leaves[2], visible, leaves[3], leaves[4], 0.7)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        results.append((out.detach(), lse.detach(), *(x.grad for x in leaves)))
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dwindow_out", "dwindow_lse"), *results):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=name)
    assert results[0][4][..., 3, :].abs().max() == 0  # the unseen candidate's value gets no gradient


@pytest.mark.parametrize("form", ["auto", "explicit"])
def test_causal_attention_equals_the_same_mask_given_explicitly(form, monkeypatch):
    """``attend(causal=True)`` (the CPU flash kernel's causal flag, or a lower-triangular mask where it is not used):
    outputs, log-sum-exp and every gradient equal those of the mask written out, with GQA."""
    monkeypatch.setenv("AHN_ATTENTION_LSE", form)
    q, k, v, _ = inputs(torch.float64, T=29, N=29)
    tril = torch.ones(29, 29, dtype=torch.bool).tril().expand(2, 29, 29)
    gen = torch.Generator().manual_seed(2)
    g_out, g_lse = torch.randn(q.shape, generator=gen, dtype=q.dtype), torch.randn(q.shape[:3], generator=gen)
    results = []
    for mask, causal in ((None, True), (tril, False)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = attend(*leaves, mask, 0.3, causal=causal)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        results.append((out.detach(), lse.detach(), *(x.grad for x in leaves)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=name)
    with pytest.raises(ValueError, match="causal=True"):
        attend(q, k, v, tril, 0.3, causal=True)


@pytest.mark.parametrize("pads, form", [([0, 0], "auto"), ([0, 4], "auto"), ([0, 0], "explicit")])
def test_the_teachers_probe_equals_the_full_softmax(pads, form, monkeypatch):
    """The teacher's forward (a window spanning the sequence, no sinks, the probe on): output, log-sum-exp and each
    token's mass from queries at least ``gap`` later equal the explicit causal softmax's. Without pads, on the CPU
    flash kernel, the attention is one causal call; with a left-padded row (each pad query sees itself only) or the
    explicit softmax it goes block by block."""
    monkeypatch.setenv("AHN_ATTENTION_LSE", form)
    B, Hq, Hkv, T, D, gap = 2, 4, 2, 30, 8, 6
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = (torch.randn(B, Hkv, T, D, generator=gen) for _ in range(2))
    P = torch.tensor(pads)
    causal_calls = []
    real_attend = attention.attend
    monkeypatch.setattr(attention, "attend",
                        lambda *a, **kw: causal_calls.append(kw.get("causal")) or real_attend(*a, **kw))
    empty = k[:, :, :0]
    out, lse, _, _, probe = attention.window_attention(
        q, k, v, 0, empty, empty, start=0, window=T, sinks=0, pad_offsets=P, scale=0.4, block=8, probe_window=gap)
    one_call = max(pads) == 0 and form == "auto" and attention._CPU_FLASH is not None
    assert causal_calls == ([True] if one_call else [None] * 4)
    slot = torch.arange(T)
    visible = (slot.view(-1, 1) >= slot) & (slot >= P.view(B, 1, 1))  # [B, T, T]: causal over the real tokens
    visible |= (slot.view(-1, 1) < P.view(B, 1, 1)) & (slot.view(-1, 1) == slot)  # a pad query sees itself
    logits = (q.view(B, Hkv, Hq // Hkv, T, D) * 0.4) @ k.unsqueeze(2).transpose(-1, -2)
    logits = logits.masked_fill(~visible.view(B, 1, 1, T, T), float("-inf"))
    p = logits.softmax(-1)
    torch.testing.assert_close(out, (p @ v.unsqueeze(2)).view(B, Hq, T, D).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, logits.logsumexp(-1).view(B, Hq, T), rtol=1e-5, atol=1e-5)
    far = slot.view(-1, 1) - slot >= gap  # [T, T]: query slot - key slot
    torch.testing.assert_close(probe, (p * far).sum(dim=3).mean(dim=2), rtol=1e-5, atol=1e-5)
    assert (probe[..., -gap:] == 0).all() and probe[:, :, :T - gap].sum() > 1
