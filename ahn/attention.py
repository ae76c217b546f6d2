"""The one attention pipeline of every model family: sinks + sliding window (+ priority buffer) + memory.

A decoder layer's attention, in "window" or "ahn" mode, computes for the query at slot t:

* softmax attention over the sinks (the first ``S`` real tokens of its row) and the window
  (slots t-W+1 .. t), with the frozen q/k/v after RoPE;
* in "ahn" mode, plus the memory read-out: the memory state after writing every real,
  non-sink token of slot <= t-W, read with q_t, then normed, gated and projected per head.

Slots are positions in the (possibly left-padded) batch. Row r has ``P_r`` left pads; its
sinks are slots ``P_r .. P_r+S-1``. Pads and sinks are never written into the memory and
pads are never attended, so a padded row computes exactly what it would alone.

One prefill function (:func:`prefill`, any number of new tokens) and one decode function
(:func:`decode`, one token with a filled cache) per layer. The options of :mod:`ahn.salience` are
optional parts they call (:class:`LayerParts`): a **scorer** (salience at eviction, and with it
salience-gated writes), the **priority buffer** (attended in the same softmax), a **read-out
policy** (the paper's "add", or "defer", which needs the attention's log-sum-exp) and the teacher's
**probe** of received attention. Without any of them the attention is SDPA (the paper's mechanism,
bit for bit); with any of them the same blocks run :func:`attend`, attention that also returns its
log-sum-exp (torch's CPU flash kernel; compiled flex_attention on CUDA; an explicit softmax as the fallback), and
a scorer that reads each key's received mass gets it from one more pass ``exp(logit - lse)`` (a Triton kernel on
CUDA; :mod:`ahn.kernels.attention_lse`). The cache (:mod:`ahn.cache`) owns every slot and ring
index: this module asks it for the window, the leaving tokens and the decode view, and hands it
what to store.

:func:`ahn_attention` is registered in transformers' attention registry under the name
:data:`ATTENTION`; the family's own forward calls it with q / k / v after RoPE, and the
settings of the call arrive as the keyword ``ahn_context`` (an :class:`AHNContext`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

from ahn.cache import AHNCache, AHNCacheLayer, Buffer, DecodeView
from ahn.config import MODES  # noqa: F401 (re-exported: the attention modes)
from ahn.kernels.attention_lse import EXP_FLOOR, flex_attention_with_lse, lse_backend_setting, received_mass, \
    received_mass_in_bands, use_flex, use_triton_mass
from ahn.memory import Memory
from ahn.salience import SalienceRecord, SalienceScorer, gate_one, gate_writes

# The name of ahn's function in transformers' attention registry (``AttentionInterface``).
ATTENTION = "ahn"
# Keywords of other attention features that sinks + window attention does not implement: a
# model that passes them (Gemma 2's logit soft-capping, gpt-oss's learned sinks) is refused.
UNSUPPORTED_FEATURES = ("softcap", "s_aux")


@dataclass
class AHNContext:
    """Per-forward settings handed to every hybrid attention layer.

    Attributes:
        mode: ``"window"`` (sinks + window only) or ``"ahn"`` (window + memory).
        window, sinks: W and S of this forward.
        pad_offsets: ``[B]`` left pads per row (slot of the first real token).
        start: slot of the first new token (tokens already seen through the cache).
        cache: the :class:`ahn.cache.AHNCache` being filled, or None (training / no cache).
        attention_block: query block length of the blocked sliding-window attention.
        backend: ``ahn.kernels`` backend of the memory.
        buffer_slots: M of the priority buffer on memory layers in "ahn" mode (0: none).
        record: a :class:`ahn.salience.SalienceRecord` to fill, or None.
        mass_stride: the received mass counts the queries at slots divisible by this, each this many
            times (``AHNConfig.mass_stride_for``).
    """

    mode: str
    window: int
    sinks: int
    pad_offsets: torch.Tensor
    start: int
    cache: Optional[AHNCache]
    attention_block: int
    backend: str
    buffer_slots: int = 0
    record: Optional[SalienceRecord] = None
    mass_stride: int = 1


@dataclass(frozen=True)
class LayerParts:
    """What one layer's pipeline runs in this forward besides sinks + window attention.

    Attributes:
        memory: the layer's memory in "ahn" mode, else None.
        scorer: its salience scorer (a buffer or salience-gated writes need one), or None.
        buffer_slots: M exact slots of the priority buffer (0: none).
        gate_writes: scale each evicted token's write strength by sigmoid(its salience).
        defer: the read-out policy: None adds the memory's read-out (the paper's); the deferring
            read-out's logit projection weights it by its softmax share.
        probe_window: record each token's received attention from queries this far ahead (the teacher).
    """

    memory: Optional[Memory] = None
    scorer: Optional[SalienceScorer] = None
    buffer_slots: int = 0
    gate_writes: bool = False
    defer: Optional[nn.Module] = None
    probe_window: Optional[int] = None

    @classmethod
    def of(cls, memory: Optional[Memory], ctx: AHNContext) -> "LayerParts":
        probe = ctx.record.probe_window if ctx.record is not None else None
        if ctx.mode != "ahn" or memory is None:
            return cls(probe_window=probe)
        return cls(memory, memory.salience, ctx.buffer_slots if memory.salience is not None else 0,
                   memory.salience is not None and memory.salience_gates_writes, memory.defer, probe)

    @property
    def needs_lse(self) -> bool:
        return self.defer is not None

    @property
    def plain(self) -> bool:
        """Nothing but the attention output is needed: SDPA serves it."""
        return self.scorer is None and not self.buffer_slots and self.defer is None and self.probe_window is None


# ----------------------------------------------------------------------------- helpers
def repeat_heads(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Repeat kv heads ``n_rep`` times along ``dim`` (GQA), head h -> heads h*n_rep .. h*n_rep+n_rep-1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def gather_sinks(x: torch.Tensor, pad_offsets: torch.Tensor, sinks: int) -> torch.Tensor:
    """Sinks of each row from a full sequence: ``x [B, H, T, D]`` -> ``[B, H, min(S, T), D]``.

    Entries past a row's end are clamped copies; the attention mask never shows them
    (their slot is beyond every query).
    """
    B, H, T, D = x.shape
    n = min(sinks, T)
    idx = (pad_offsets.view(B, 1) + torch.arange(n, device=x.device)).clamp(max=T - 1)  # [B, n]
    return x.gather(2, idx.view(B, 1, n, 1).expand(B, H, n, D))


def window_block_mask(t0: int, bq: int, lo: int, hi: int, window: int, sinks: int, P: torch.Tensor,
                      sink_slot: torch.Tensor) -> torch.Tensor:
    """``[B, bq, S' + hi - lo]`` bool: which sinks (``sink_slot [B, 1, S']``) and context slots lo .. hi-1 the
    queries at slots t0 .. t0+bq-1 see under sinks + window attention (``P [B, 1, 1]`` left pads)."""
    t = (t0 + torch.arange(bq, device=P.device)).view(1, bq, 1)  # query slots
    j = torch.arange(lo, hi, device=P.device).view(1, 1, -1)  # key slots
    in_window = (j <= t) & (j > t - window)
    real_non_sink = j >= P + sinks
    pad_query_self = (t < P) & (j == t)  # a pad query attends to itself only: finite, ignored
    return torch.cat([sink_slot <= t, (in_window & real_non_sink) | pad_query_self], dim=-1)


def _grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, R, n, a] @ y [B, Hkv, a, b]`` -> ``[B, Hkv, R, n, b]``, the R query heads of a kv head stacked
    into one matmul (broadcasting y over R would copy it R times)."""
    B, H, R, n, a = x.shape
    return torch.matmul(x.reshape(B, H, R * n, a), y).view(B, H, R, n, -1)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive form of a bool mask (True: visible): 0 where visible, ``-inf`` elsewhere, at the mask's size.
    Added to scores it costs a fraction of ``masked_fill_`` with the same mask broadcast over query heads on CPU
    (torch 2.13: 0.5 ms against 3.5 ms for [2, 7, 64, 2200])."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _block_logits(qb, keys, block_mask, scale: float) -> torch.Tensor:
    """Scaled logits of a query block, ``-inf`` where not visible (``block_mask`` None: all visible):
    ``[B, Hkv, R, bq, N]`` float32."""
    logits = _grouped_matmul(qb * scale, keys.transpose(-1, -2)).float()  # the scale on q: [bq, D], not [bq, N]
    return logits if block_mask is None else logits.add_(mask_bias(block_mask))


def window_softmax(logits: torch.Tensor):
    """The softmax of ``logits [..., N]`` (float32, -inf where not visible, at least one visible entry per row) in
    parts: ``(e, m, lse)`` with ``e = exp(logits - m)`` (m the row max, without gradient: it cancels),
    ``lse [...]`` the log-sum-exp. ``logits`` is overwritten by ``e`` (one pass over the block, no copy)."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    e = logits.sub_(m).clamp_(min=EXP_FLOOR).exp_()  # -inf (not visible) -> e^-87, no slow path; see EXP_FLOOR
    return e, m, m.squeeze(-1) + torch.log(e.sum(dim=-1))


# torch's CPU flash-attention kernel returns the log-sum-exp beside the output (an underscore op of aten: used behind
# the capability check of `_cpu_flash_with_lse`, with the explicit softmax as the public fallback).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _FlashWithLSE(torch.autograd.Function):
    """Attention and its log-sum-exp from torch's CPU flash kernel, both differentiable.

    The kernel's backward takes the gradient of the output only; the log-sum-exp's gradient ``g`` adds ``g_i p_ij``
    to the logits' gradient, i.e. it lowers the kernel's row term ``D_i = dO_i . O_i`` by ``g_i``. One extra zero
    channel on q, k and v (logits unchanged) carries it: ``dO' = [dO, 1]``, ``O' = [O, -g]``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal=False):
        out, lse = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out.contiguous()
        if g_lse is None:
            dq, dk, dv = _CPU_FLASH_BACKWARD(g_out, q, k, v, out, lse, 0.0, ctx.causal, attn_mask=mask,
                                             scale=ctx.scale)
            return dq, dk, dv, None, None, None

        def widen(x, value):
            return F.pad(x, (0, 1), value=value)

        carried = torch.cat([out, -g_lse.unsqueeze(-1).to(out.dtype)], dim=-1)
        dq, dk, dv = _CPU_FLASH_BACKWARD(widen(g_out, 1.0), widen(q, 0.0), widen(k, 0.0), widen(v, 0.0), carried, lse,
                                         0.0, ctx.causal, attn_mask=mask, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def _cpu_flash_with_lse(q: torch.Tensor) -> bool:
    return _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None and q.device.type == "cpu" \
        and q.dtype in _CPU_FLASH_DTYPES and lse_backend_setting() == "auto"


def _explicit_attention(q, keys, values, mask, scale):
    """:func:`attend` with an explicit float32 softmax (the fallback, and the reference the tests hold it to)."""
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    block_mask = None if mask is None else mask.view(B, -1, 1, T, N)  # [B, 1 or Hkv, 1, T, N]
    e, m, lse = window_softmax(_block_logits(q.view(B, Hkv, Hq // Hkv, T, D), keys, block_mask, scale))
    out = (_grouped_matmul(e.to(values.dtype), values).float() * torch.exp(m - lse.unsqueeze(-1))).to(values.dtype)
    return out.reshape(B, Hq, T, -1), lse.reshape(B, Hq, T)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           memo: Optional[dict] = None, causal: bool = False):
    """Softmax attention and its log-sum-exp, both differentiable: ``q [B, Hq, T, D]``, ``keys, values
    [B, Hkv, N, D]`` (GQA: query head h reads kv head h // (Hq / Hkv)), ``mask [B, T, N]`` or per kv head
    ``[B, Hkv, T, N]`` bool (True: visible; every row sees at least one key), or None (all visible); ``causal``
    (with ``mask`` None and T == N): query i sees keys 0 .. i, and the CPU flash kernel skips the tiles above the
    diagonal (half the work of the same mask given explicitly). Returns ``(out [B, Hq, T, D], lse [B, Hq, T]
    float32)``.

    On CPU this is torch's flash kernel (SDPA's speed, no [T, N] matrix kept); on CUDA torch's compiled
    flex_attention (:mod:`ahn.kernels.attention_lse`; also with ``AHN_ATTENTION_LSE=flex``); without either, or
    with ``AHN_ATTENTION_LSE=explicit``, an explicit float32 softmax (under activation checkpointing with autograd).
    ``memo``: a dict kept by a caller that passes the same mask again (a sliding window's steady blocks); what is
    derived from the mask (the flash kernel's additive form) is kept in it and reused."""
    if causal:
        if mask is not None or q.shape[2] != keys.shape[2]:
            raise ValueError("attend(causal=True) takes no mask and as many queries as keys")
        if _cpu_flash_with_lse(q):
            out, lse = _FlashWithLSE.apply(q, keys, values, None, scale, True)
            return out, lse.float()
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(q.shape[0], T, T)
    if use_flex(q.device):
        return flex_attention_with_lse(q, keys, values, mask, scale)
    if _cpu_flash_with_lse(q):
        bias = None if memo is None else memo.get("bias")
        if mask is not None and bias is None:
            bias = mask_bias(mask, q.dtype)
            bias = bias.unsqueeze(1) if mask.dim() == 3 else repeat_heads(bias, q.shape[1] // keys.shape[1], 1)
            if memo is not None:
                memo["bias"] = bias
        out, lse = _FlashWithLSE.apply(q, keys, values, bias, scale)
        return out, lse.float()
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, keys, values)):
        return checkpoint(_explicit_attention, q, keys, values, mask, scale, use_reentrant=False)
    return _explicit_attention(q, keys, values, mask, scale)


def _priority_order(score: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Indices sorting candidates by priority, best first: higher score, then newer slot (empty ones last)."""
    by_slot = torch.sort(slot, dim=-1, descending=True, stable=True).indices
    by_score = torch.sort(score.gather(-1, by_slot), dim=-1, descending=True, stable=True).indices
    return by_slot.gather(-1, by_score)


# ----------------------------------------------------------------------------- one block
# Queries per step of the buffer's evolution inside an attention block: the candidates of a step are the M entries
# at its start plus the tokens its queries evict, so its cost is O(sub * (M + sub)) and a whole prefill's
# O(T * (M + BUFFER_STEP)), a few percent of the window's O(T * W); fewer would cost Python overhead per step.
BUFFER_STEP = 64


def buffered_block_attention(
    q: torch.Tensor,  # [B, Hkv, R, bq, D], a block of bq queries (R query heads per kv head)
    window_out: torch.Tensor,  # [B, Hkv, R, bq, Dv] attention over sinks + window (:func:`attend`)
    window_lse: torch.Tensor,  # [B, Hkv, R, bq] its log-sum-exp (float32)
    scale: float,
    buffer: Buffer,
    evicted: tuple,  # (k [B,Hkv,bq,D], v, slot [B,Hkv,bq] (-1: none), score [B,Hkv,bq]): the token query i evicts
):
    """Softmax attention of a block of queries over sinks + window and the priority buffer as it evolves, in one
    softmax: the window's part enters through its log-sum-exp (``out = window_out * exp(window_lse - lse) + ...``).

    Returns ``(out [B, Hkv, R, bq, Dv], lse [B, Hkv, R, bq] over every attended entry, the buffer after the block)``.
    The buffer evolves in steps of :data:`BUFFER_STEP` queries (:func:`_buffer_step`); any split gives the same
    buffer, since each step applies the same top-M rule token by token.
    """
    outs, lses = [], []
    for a in range(0, q.shape[3], BUFFER_STEP):
        part = slice(a, a + BUFFER_STEP)
        out, lse, buffer = _buffer_step(q[:, :, :, part], window_out[:, :, :, part], window_lse[:, :, :, part], scale,
                                        buffer, tuple(x[:, :, part] for x in evicted))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3), buffer


def _buffer_step(q, window_out, window_lse, scale: float, buffer: Buffer, evicted: tuple):
    """:func:`buffered_block_attention` of a few queries at once (shapes as there, bq of them).

    Inside the block the buffer evolves token by token without a loop: the candidates are the M entries at
    the block's start plus the tokens the block evicts; sorted by priority, a candidate is visible to query i
    iff it has been evicted by i and fewer than M candidates before it in that order have been. Which candidates
    a query sees depends on slots and scores only (no gradient); the attention over them is :class:`_BufferMerge`.
    """
    B, Hkv, bq = q.shape[0], q.shape[1], q.shape[3]
    M = buffer.slots
    ek, ev, eslot, escore = evicted
    with torch.no_grad():
        cslot = torch.cat([buffer.slot, eslot], dim=2)  # [B, Hkv, M + bq]: the candidates
        cscore = torch.cat([buffer.score, escore.to(buffer.score.dtype)], dim=2)  # ranks them only: no gradient
        order = _priority_order(cscore, cslot)  # [B, Hkv, M + bq]
        cslot, cscore = cslot.gather(2, order), cscore.gather(2, order)
        # Query i sees candidate c once c is evicted: buffer entries from the start, the token query j evicts from j on.
        evict_at = torch.cat([torch.full((M,), -1, device=q.device), torch.arange(bq, device=q.device)])
        query = torch.arange(bq, device=q.device).view(1, 1, bq, 1)
        evicted_by = (cslot >= 0).unsqueeze(2) & (evict_at[order].unsqueeze(2) <= query)  # [B, Hkv, bq, M + bq]
        # visible: evicted by query i and fewer than M better candidates are (the running count includes itself)
        visible = evicted_by & (torch.cumsum(evicted_by, dim=-1, dtype=torch.int32) <= M)
        # One gather per candidate tensor: rows of the flattened [B * Hkv * (M + bq)] candidates.
        rows = (order + (torch.arange(B * Hkv, device=q.device) * (M + bq)).view(B, Hkv, 1)).view(-1)
    ck = torch.cat([buffer.k, ek.to(buffer.k.dtype)], dim=2).flatten(0, 2).index_select(0, rows).view(B, Hkv, M + bq, -1)
    cv = torch.cat([buffer.v, ev.to(buffer.v.dtype)], dim=2).flatten(0, 2).index_select(0, rows).view(B, Hkv, M + bq, -1)
    out, lse = _BufferMerge.apply(q, ck, cv, visible, window_out, window_lse, scale)
    # Every candidate is evicted by the block's end: the new buffer is the best M (empty ones sort last).
    return out, lse, Buffer(ck[:, :, :M], cv[:, :, :M], cslot[:, :, :M], cscore[:, :, :M])


def buffer_merge_reference(q, ck, cv, visible, window_out, window_lse, scale: float):
    """:class:`_BufferMerge` in plain autograd (the reference the tests hold it to): ``q [B, Hkv, R, bq, D]``, the
    candidates ``ck, cv [B, Hkv, C, D]``, ``visible [B, Hkv, bq, C]`` bool, the window's attention ``window_out
    [B, Hkv, R, bq, Dv]`` and log-sum-exp ``window_lse [B, Hkv, R, bq]``. Returns ``(out, lse)`` of one softmax
    over the window (through its lse) and the visible candidates."""
    blogits = _grouped_matmul(q * scale, ck.transpose(-1, -2)).float()  # [B, Hkv, R, bq, C]
    visible = visible.unsqueeze(2)
    shown = torch.where(visible, blogits.detach(), float("-inf"))
    m = torch.maximum(window_lse.detach(), shown.amax(dim=-1)).unsqueeze(-1)  # no gradient: it cancels
    e = (blogits - m).clamp(min=EXP_FLOOR).exp() * visible
    w = torch.exp(window_lse.unsqueeze(-1) - m)  # the window's share, unnormalised
    total = w + e.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)
    out = (window_out.float() * w + _grouped_matmul(e.to(cv.dtype), cv).float()) / total
    return out.to(window_out.dtype), lse


class _BufferMerge(torch.autograd.Function):
    """One softmax over the window (its output and log-sum-exp) and the visible buffer candidates, with a backward
    written out: it keeps the inputs, the output and the lse, and recomputes the [bq, C] probabilities from them
    (one small matmul), instead of autograd's dozen saved [bq, C] tensors or a recomputation of the whole step.

    With p_c = exp(s_c - lse) (s_c = scale q . k_c, the visible candidates) and the window's share
    p_w = exp(window_lse - lse): ``out = p_w window_out + sum_c p_c v_c``, ``lse = log(exp(window_lse) + sum_c
    exp(s_c))``. Backward, with D = g_out . out - g_lse: ``g_s_c = p_c (g_out . v_c - D)``, ``g_window_lse =
    p_w (g_out . window_out - D)``, ``g_window_out = p_w g_out``, ``g_v = sum_i p_ic g_out_i``, and q, k from g_s."""

    @staticmethod
    def forward(ctx, q, ck, cv, visible, window_out, window_lse, scale):
        # buffer_merge_reference's arithmetic, in place (no graph to keep): a third fewer passes over [bq, C].
        seen = visible.unsqueeze(2)  # [B, Hkv, 1, bq, C]
        s = _grouped_matmul(q * scale, ck.transpose(-1, -2)).float()  # [B, Hkv, R, bq, C]
        m = torch.maximum(window_lse, torch.where(seen, s, float("-inf")).amax(dim=-1))  # [B, Hkv, R, bq]
        e = s.sub_(m.unsqueeze(-1)).clamp_(min=EXP_FLOOR).exp_().mul_(seen)
        w = torch.exp(window_lse - m).unsqueeze(-1)
        total = e.sum(dim=-1, keepdim=True).add_(w)
        lse = m.add_(torch.log(total).squeeze(-1))
        out = _grouped_matmul(e.to(cv.dtype), cv).float().addcmul_(window_out.float(), w).div_(total)
        out = out.to(window_out.dtype)
        ctx.save_for_backward(q, ck, cv, visible, window_out, window_lse, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, ck, cv, visible, window_out, window_lse, out, lse = ctx.saved_tensors
        scale = ctx.scale
        g_out = torch.zeros_like(out, dtype=torch.float32) if g_out is None else g_out.float()
        D = (g_out * out.float()).sum(-1)  # [B, Hkv, R, bq]
        if g_lse is not None:
            D = D - g_lse.float()
        s = _grouped_matmul(q.float() * scale, ck.float().transpose(-1, -2))  # [B, Hkv, R, bq, C]
        p = (s - lse.unsqueeze(-1)).clamp_(min=EXP_FLOOR).exp_().mul_(visible.unsqueeze(2))
        pw = torch.exp(window_lse.float() - lse)  # [B, Hkv, R, bq]
        B, Hkv, R, bq, C = p.shape
        g_v = None
        if ctx.needs_input_grad[2]:  # sum over the R query heads and bq queries: [B, Hkv, C, Dv]
            g_v = torch.matmul(p.reshape(B, Hkv, R * bq, C).transpose(-1, -2),
                               g_out.reshape(B, Hkv, R * bq, -1)).to(cv.dtype)
        g_pv = _grouped_matmul(g_out, cv.float().transpose(-1, -2))  # [B, Hkv, R, bq, C]: g_out . v_c
        g_s = p.mul_(g_pv.sub_(D.unsqueeze(-1)))  # p is not needed past here
        g_q = _grouped_matmul(g_s, ck.float()).mul_(scale).to(q.dtype) if ctx.needs_input_grad[0] else None
        g_k = None
        if ctx.needs_input_grad[1]:
            g_k = torch.matmul(g_s.reshape(B, Hkv, R * bq, C).transpose(-1, -2),
                               q.float().reshape(B, Hkv, R * bq, -1)).mul_(scale).to(ck.dtype)
        g_wo = (g_out * pw.unsqueeze(-1)).to(window_out.dtype) if ctx.needs_input_grad[4] else None
        g_wlse = pw * ((g_out * window_out.float()).sum(-1) - D) if ctx.needs_input_grad[5] else None
        return g_q, g_k, g_v, None, g_wo, g_wlse, None


# ----------------------------------------------------------------------------- prefill attention
def window_attention(
    q: torch.Tensor,  # [B, Hq, T, D], slots start .. start+T-1
    ctx_k: torch.Tensor,  # [B, Hkv, L, D], slots ctx_start .. ctx_start+L-1 (window context, new tokens last)
    ctx_v: torch.Tensor,  # [B, Hkv, L, D]
    ctx_start: int,
    sink_k: torch.Tensor,  # [B, Hkv, S', D], sink i of row r is slot P_r + i
    sink_v: torch.Tensor,  # [B, Hkv, S', D]
    *,
    start: int,
    window: int,
    sinks: int,
    pad_offsets: torch.Tensor,  # [B]
    scale: float,
    block: int,
    need_lse: bool = False,
    scorer: Optional[SalienceScorer] = None,
    token_part: Optional[torch.Tensor] = None,  # [B, Hkv, L] scorer.token_part of the context slots
    mass: Optional[torch.Tensor] = None,  # [B, Hkv, L] float32 window attention received so far; updated in place
    buffer: Optional[Buffer] = None,
    probe_window: Optional[int] = None,
    mass_stride: int = 1,
):
    """Blocked sinks + window attention (+ the priority buffer), with the parts the options need.

    Query block [a, a+bq) needs only context slots [a-W+1, a+bq): cost O(T * (S + W + bq)), peak
    memory O(bq * (S + W + bq)) whatever T is. Without options (``need_lse`` False, no scorer, buffer
    or probe) each block is one SDPA call; otherwise one :func:`attend` call, which also gives the
    log-sum-exp; where every query sees every earlier token (the teacher's forward, CPU flash) one causal
    call. With a ``scorer`` the token each query evicts (slot t - W) is scored, and with a scorer that
    reads the received attention (``scorer.uses_mass``) the window attention each context slot receives is
    accumulated into ``mass`` (from every ``mass_stride``-th query: those at slots divisible by it, each
    counted ``mass_stride`` times; without autograd); with a ``buffer`` the evicted tokens compete for it;
    ``probe_window``: also return, per context slot, the attention mass received from queries at least that far
    ahead.

    Returns ``(out [B, T, Hq, D], lse [B, Hq, T] or None, evict_scores [B, Hkv, T] (score of the token
    query i evicts; -inf where none) or None, buffer or None, probe [B, Hkv, L] or None)``.
    """
    B, Hq, T, D = q.shape
    Hkv = ctx_k.shape[1]
    R = Hq // Hkv
    dev = q.device
    plain = not need_lse and scorer is None and buffer is None and probe_window is None
    qg = q.view(B, Hkv, R, T, D)
    P = pad_offsets.view(B, 1, 1)  # [B, 1, 1]
    n_sinks = sink_k.shape[2]
    sink_slot = P + torch.arange(n_sinks, device=dev).view(1, 1, -1)  # [B, 1, S']
    first_plain = int(pad_offsets.max()) + sinks  # from this slot on every key is a real non-sink token
    steady_mask = None  # the mask of a full block whose keys are all real non-sink tokens: the same for all
    steady_memo: dict = {}  # what attend derives from it (the flash kernel's additive mask), kept for the next blocks
    if not plain and scorer is None and buffer is None and first_plain == 0 and start == ctx_start == 0 \
            and ctx_k.shape[2] == T and window >= T and (probe_window is None or probe_window >= 1) \
            and _cpu_flash_with_lse(q):
        # Every query sees every earlier token (no pads, no sinks, a window spanning the sequence, no cache: the
        # teacher under the probe): one causal call, and the probe in one pass whose only mask is its gap. (Only
        # for the CPU flash kernel, which computes every tile of a mask it is given; flex skips the empty blocks of
        # the per-block masks already, and the explicit softmax keeps its memory bounded by the blocks.)
        out, lse = attend(q, ctx_k, ctx_v, None, scale, causal=True)  # [B, Hq, T, D], [B, Hq, T]
        probe = None
        if probe_window is not None:
            with torch.no_grad():
                unmasked = torch.ones((), dtype=torch.bool, device=dev).expand(1, T, T)  # the gap keeps j <= i - W
                probe = received_mass_in_bands(qg, ctx_k, unmasked, lse.detach().view(B, Hkv, R, T), scale, own=0,
                                               window=T, gap=probe_window)
        return out.transpose(1, 2), lse, None, None, probe
    outs, lses, scores = [], [], []
    probe = torch.zeros(B, Hkv, ctx_k.shape[2], device=dev) if probe_window is not None else None
    for a in range(0, T, block):
        bq = min(block, T - a)
        lo = max(ctx_start, start + a - window + 1)
        hi = start + a + bq
        steady = bq == block and lo == start + a - window + 1 and lo >= first_plain
        if steady and steady_mask is not None:
            mask = steady_mask
        else:
            mask = window_block_mask(start + a, bq, lo, hi, window, sinks, P, sink_slot)  # [B, bq, S' + L']
            if steady:
                steady_mask = mask
        keys, values = ctx_k[:, :, lo - ctx_start: hi - ctx_start], ctx_v[:, :, lo - ctx_start: hi - ctx_start]
        if n_sinks:  # (without sinks, the teacher's probe: the slices as they are, no copy)
            keys, values = torch.cat([sink_k, keys], dim=2), torch.cat([sink_v, values], dim=2)
        if plain:
            outs.append(F.scaled_dot_product_attention(q[:, :, a: a + bq], keys, values, attn_mask=mask.unsqueeze(1),
                                                       scale=scale, enable_gqa=True))  # [B, Hq, bq, D]
            continue
        qb = qg[:, :, :, a: a + bq]
        out, lse = attend(q[:, :, a: a + bq], keys, values, mask, scale,
                          memo=steady_memo if steady else None)  # [B, Hq, bq, D], [B, Hq, bq]
        if scorer is not None and scorer.uses_mass or probe is not None:
            # Each key's received mass (summed over queries, averaged over heads) from the attention's lse: for the
            # scorer, and for the teacher's probe from queries at least probe_window ahead only.
            with torch.no_grad():
                bands = (qb, keys[:, :, n_sinks:], mask[:, :, n_sinks:], lse.detach().view(B, Hkv, R, bq), scale)
                first = -(start + a) % mass_stride  # the block's first query at a slot divisible by the stride
                if scorer is not None and scorer.uses_mass and first < bq:
                    if use_triton_mass(dev):
                        rows = slice(first, bq, mass_stride)
                        got = received_mass(q[:, :, a: a + bq][:, :, rows], keys, mask[:, rows], lse[:, :, rows],
                                            scale, n_sinks).mul_(mass_stride)
                    else:
                        got = received_mass_in_bands(*bands, own=start + a - lo, window=window, stride=mass_stride,
                                                     first=first)
                    mass[:, :, lo - ctx_start: hi - ctx_start] += got
                if probe is not None:
                    probe[:, :, lo - ctx_start: hi - ctx_start] += received_mass_in_bands(
                        *bands, own=start + a - lo, window=window, gap=probe_window)
        evicted = None
        if scorer is not None:
            e = start + a - window + torch.arange(bq, device=dev)  # [bq] the slot each query evicts
            valid = (e.view(1, bq) >= pad_offsets.view(B, 1) + sinks).view(B, 1, bq)  # real, non-sink (so >= 0)
            idx = (e - ctx_start).clamp(0, ctx_k.shape[2] - 1)
            escore = scorer.score(token_part.index_select(2, idx), mass.index_select(2, idx))  # [B, Hkv, bq]
            escore = escore.masked_fill(~valid, float("-inf"))
            scores.append(escore)
            if buffer is not None:
                eslot = torch.where(valid, e.view(1, 1, bq), -1).expand(B, Hkv, bq)
                evicted = (ctx_k.index_select(2, idx), ctx_v.index_select(2, idx), eslot, escore)
        if buffer is not None:
            # (Its backward keeps the candidates' k, v, not their [bq, M + bq] probabilities: _BufferMerge.)
            out, lse, buffer = buffered_block_attention(qb, out.view(B, Hkv, R, bq, -1), lse.view(B, Hkv, R, bq),
                                                        scale, buffer, evicted)
        outs.append(out.reshape(B, Hq, bq, -1))
        lses.append(lse.reshape(B, Hq, bq))
    out = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, Hq, D]
    lse = torch.cat(lses, dim=2) if lses else None
    return out, lse, (torch.cat(scores, dim=2) if scores else None), buffer, probe


# ----------------------------------------------------------------------------- the memory's part
def write_stream(layer: Optional[AHNCacheLayer], k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, start: int,
                 window: int) -> list:
    """The (k, v, gates) written into the memory while processing the new slots, time-major and aligned with the
    queries: the query at slot t reads the state after writing slot t-W, so for new slots start .. start+T-1 the
    stream is slots start-W .. start+T-1-W: the cached entries that leave the window during these T tokens (read
    before they are overwritten), then the new tokens, with zeros (inert writes) for negative slots.
    ``k, v [B, Hkv, T, D]``, ``gates [B, T, Hq, G]``; returns ``[k, v, gates]``, each ``[B, T, ...]``."""
    T = k.shape[2]
    new = (k.transpose(1, 2), v.transpose(1, 2), gates)  # time-major [B, T, ...]
    old = layer.leaving(start, T) if layer is not None else (None, None, None)
    n_neg = max(0, window - start)  # slots start-W .. -1 do not exist
    stream = []
    for n, o in zip(new, old):
        parts = [n.new_zeros(n.shape[0], min(n_neg, T), *n.shape[2:])] if n_neg else []
        if o is not None and o.shape[1]:
            parts.append(o)
        stream.append(torch.cat([*parts, n], dim=1)[:, :T])
    return stream


def write_mask(start: int, T: int, window: int, sinks: int, pad_offsets: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: whether the write-stream slot (start+i-W) is a real, non-sink token."""
    slots = start - window + torch.arange(T, device=pad_offsets.device)
    return slots.view(1, T) >= pad_offsets.view(-1, 1) + sinks


def _state_for_autograd(layer: Optional[AHNCacheLayer]) -> Optional[torch.Tensor]:
    """The cached memory state; a copy when it was made in inference mode (by no-grad decoding)
    and autograd is on now, since autograd cannot save inference tensors."""
    state = layer.memory_state if layer is not None else None
    if state is not None and torch.is_grad_enabled() and state.is_inference():
        state = state.clone()
    return state


def scan_memory(memory: Memory, q: torch.Tensor, stream: list, hidden_states: torch.Tensor, ctx: AHNContext,
                layer: Optional[AHNCacheLayer]) -> torch.Tensor:
    """Write ``stream`` (:func:`write_stream`) into the memory and read it with ``q [B, Hq, T, D]``, through the
    read-out: ``[B, T, Hq, D]``; the final state goes to the cache ``layer`` (if any)."""
    wk, wv, wg = stream  # [B, T, Hkv, D], [B, T, Hkv, D], [B, T, Hq, G]
    Hq, T = q.shape[1], q.shape[2]
    n_rep = Hq // wk.shape[2]
    read, state = memory.scan(
        q.transpose(1, 2), repeat_heads(wk, n_rep, 2), repeat_heads(wv, n_rep, 2), wg,
        write_mask(ctx.start, T, ctx.window, ctx.sinks, ctx.pad_offsets), initial_state=_state_for_autograd(layer),
        backend=ctx.backend,
    )
    if layer is not None:
        layer.set_memory_state(state)
    return memory.output(read, hidden_states)


def decode_memory(memory: Memory, hidden_states: torch.Tensor, q: torch.Tensor, ctx: AHNContext,
                  layer: AHNCacheLayer, gate_evicted=None):
    """The memory's part of a decode step, before the new token enters the ring: the token leaving the window
    (slot t - W) is written into the state with one recurrent step (k / v heads broadcast over the query heads,
    no repeat), and the step's read with q_t goes through the read-out.

    ``gate_evicted``: a function of the evicted token's gates ``[B, Hq, G]`` returning the gates to write
    with (salience-gated writes), or None. Returns ``(out [B, Hq, D] or None, the new token's gates
    [B, Hq, G])``; the state goes to ``layer``.
    """
    leaving = layer.leaving_one(ctx.start, ctx.pad_offsets)
    k_e = v_e = g_e = mask = None
    if leaving is not None:
        k_e, v_e, g_e, mask = leaving
        if gate_evicted is not None:
            g_e = gate_evicted(g_e)
    # Without autograd (generation), the memory's ~50 small ops run in inference mode, which
    # skips version counting and view tracking: about a fifth of their cost on CPU. Its
    # outputs are only read afterwards (the state is replaced, never updated in place).
    with torch.inference_mode(not torch.is_grad_enabled()):
        mem_out, gates, state = memory.decode(
            hidden_states[:, 0], q[:, :, 0], k_e, v_e, g_e, mask, _state_for_autograd(layer), backend=ctx.backend
        )  # [B, Hq, D] or None, [B, Hq, G]
    layer.set_memory_state(state)
    return mem_out, gates


def read_out(parts: LayerParts, attn: torch.Tensor, mem_out: torch.Tensor, hidden_states: torch.Tensor,
             lse: Optional[torch.Tensor]) -> torch.Tensor:
    """The read-out policy: the attention output plus the memory's read-out, added as it is ("add", the paper's),
    or weighted by its softmax share ``sigmoid(defer(x) - lse)`` ("defer"). ``attn, mem_out [B, T, Hq, D]``,
    ``hidden_states [B, T, hidden]``, ``lse [B, T, Hq]`` the attention's log-sum-exp (None for "add")."""
    if parts.defer is None:
        return attn + mem_out.to(attn.dtype)
    share = torch.sigmoid(parts.defer(hidden_states).float() - lse).unsqueeze(-1)
    if attn.dtype == torch.float32:
        return torch.addcmul(attn, share, mem_out.float())  # one pass (a decoding step runs this per layer)
    return attn + (share * mem_out.float()).to(attn.dtype)


# ----------------------------------------------------------------------------- the pipeline
def prefill(parts: LayerParts, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            ctx: AHNContext, layer: Optional[AHNCacheLayer], scale: float, layer_idx: int) -> torch.Tensor:
    """T new tokens (a training forward, a prompt, a chunk of a long read): ``hidden_states [B, T, hidden]`` (the
    layer's normed input), ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` after RoPE; ``layer`` the cache layer or
    None; ``layer_idx`` the decoder layer (for ``ctx.record``). Returns ``[B, T, Hq * D]``."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    W, S, start, P = ctx.window, ctx.sinks, ctx.start, ctx.pad_offsets
    memory, scorer = parts.memory, parts.scorer
    gates = memory.write_gates(hidden_states) if memory is not None else None  # [B, T, Hq, G]
    token_part = scorer.token_part(hidden_states) if scorer is not None else None  # [B, Hkv, T]
    if layer is not None and not layer.is_initialized:
        layer.lazy_initialization(k, v, gates, salience=scorer is not None)
    stream = write_stream(layer, k, v, gates, start, W) if memory is not None else None

    context_part = mass = None  # [B, Hkv, L] for the context slots (cached window, then the new tokens)
    if layer is None:
        ctx_k, ctx_v, ctx_start = k, v, start
        sink_k, sink_v = gather_sinks(k, P, S), gather_sinks(v, P, S)
        buffer = Buffer.empty(k, v, parts.buffer_slots) if parts.buffer_slots else None
        if scorer is not None:
            context_part, mass = token_part, torch.zeros(B, Hkv, T, device=q.device)
    else:
        layer.write_sinks(k, v, P, start)  # the new tokens see the sinks among them
        old_k, old_v, ctx_start = layer.context(start)
        ctx_k, ctx_v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        sink_k, sink_v = layer.sink_k, layer.sink_v
        buffer = layer.buffer
        if scorer is not None:
            old_part, old_mass = layer.salience_context(start)
            context_part = torch.cat([old_part, token_part], dim=2)
            mass = torch.cat([old_mass, torch.zeros(B, Hkv, T, device=q.device)], dim=2)
    attn, lse, scores, buffer, probe = window_attention(
        q, ctx_k, ctx_v, ctx_start, sink_k, sink_v, start=start, window=W, sinks=S, pad_offsets=P, scale=scale,
        block=ctx.attention_block, need_lse=parts.needs_lse, scorer=scorer, token_part=context_part, mass=mass,
        buffer=buffer, probe_window=parts.probe_window, mass_stride=ctx.mass_stride,
    )  # [B, T, Hq, D], [B, Hq, T] or None, [B, Hkv, T] or None
    if layer is not None:
        layer.append(k, v, gates, start, token_part, mass, ctx_start)
        if buffer is not None:
            layer.store_buffer(buffer)
    if ctx.record is not None and layer is None:
        if probe is not None:
            ctx.record.teacher_mass[layer_idx] = probe
        if scores is not None:  # query i evicts slot i - W: the score of slot s is that of query s + W
            ctx.record.scores[layer_idx] = torch.cat(
                [scores[:, :, W:], scores.new_full((B, Hkv, min(W, T)), float("-inf"))], dim=2)
    if memory is None:
        return attn.reshape(B, T, Hq * D)
    if scores is not None and parts.gate_writes:
        stream[2] = gate_writes(stream[2], scores, memory.step_spec.strength_channels)
    mem_out = scan_memory(memory, q, stream, hidden_states, ctx, layer)  # [B, T, Hq, D]
    return read_out(parts, attn, mem_out, hidden_states, None if lse is None else lse.transpose(1, 2)) \
        .reshape(B, T, Hq * D)


def decode_attention(q: torch.Tensor, view: DecodeView, scale: float, parts: LayerParts, mass_weight: int = 0):
    """One query (slot t, already appended) over sinks, buffer and ring in place, in one softmax.

    ``q [B, Hq, 1, D]``. Returns ``(out [B, 1, Hq, D], lse [B, 1, Hq] or None, received [B, Hkv, C] or None)``:
    ``received`` (with a scorer that reads the mass, when ``mass_weight`` > 0) is the ring entries' share of the
    window's own softmax (the buffer left out), averaged over the group's heads, times ``mass_weight``; with 0
    (this query is not counted: its slot is not divisible by the stride) it is None. ``lse`` is None for a plain
    layer (no options), which needs none."""
    B, Hq, _, D = q.shape
    counted = parts.scorer is not None and parts.scorer.uses_mass and bool(mass_weight)
    if q.device.type != "cpu" and not counted:  # SDPA's / flex's single-query kernels
        if parts.plain:
            mask = view.mask.unsqueeze(2) if view.mask is not None else None  # [B, 1, 1, N]
            out = F.scaled_dot_product_attention(q, view.keys, view.values, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
            return out.transpose(1, 2), None, None
        mask = view.mask  # [B, 1 or Hkv, N] or None
        if mask is not None:  # one query: [B, T = 1, N], or per kv head [B, Hkv, 1, N]
            mask = mask.view(B, 1, -1) if mask.shape[1] == 1 else mask.unsqueeze(2)
        out, lse = attend(q, view.keys, view.values, mask, scale)
        return out.transpose(1, 2), lse.reshape(B, 1, Hq), None
    # On CPU one query's softmax in two grouped matmuls: 0.35 ms against 0.52 for SDPA and 0.56 for the flash
    # kernel with its log-sum-exp ([1, 14, 1, 64] over 2,144 keys, 2 kv heads, one thread, torch 2.13).
    Hkv, N = view.keys.shape[1], view.keys.shape[2]
    qg = q.view(B, Hkv, Hq // Hkv, 1, D)
    block_mask = view.mask.view(B, -1, 1, 1, N) if view.mask is not None else None
    e, m, lse = window_softmax(_block_logits(qg, view.keys, block_mask, scale))
    out = _grouped_matmul(e.to(view.values.dtype), view.values).float() * torch.exp(m - lse.unsqueeze(-1))
    received = None
    if counted:
        ring = e.detach()[..., view.ring_start:]  # [B, Hkv, R, 1, C]
        window_sum = e.detach()[..., : view.sinks].sum(-1, keepdim=True) + ring.sum(-1, keepdim=True)
        received = (ring / window_sum).squeeze(3).mean(2).mul_(mass_weight)
    out = out.to(view.values.dtype).reshape(B, Hq, 1, -1).transpose(1, 2)  # [B, 1, Hq, D]
    return out, None if parts.plain else lse.reshape(B, 1, Hq), received


def decode(parts: LayerParts, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           ctx: AHNContext, layer: AHNCacheLayer, scale: float) -> torch.Tensor:
    """One new token (slot t) with a filled cache: the decode form of :func:`prefill`. Returns ``[B, 1, Hq * D]``.

    The token at slot t - W leaves the window: it is scored and offered to the buffer (with a scorer),
    and written into the memory state with one recurrent step (its write strength gated by the score
    when asked), before the new token overwrites its ring entry; the step's read with q_t is the
    memory's output. The new token enters the cache, the query attends over sinks, buffer and ring
    in place, and the ring's received attention grows.
    """
    B, Hq, _, D = q.shape
    t, P = ctx.start, ctx.pad_offsets
    memory, scorer = parts.memory, parts.scorer
    score = None
    if scorer is not None:
        evicted = layer.evicted_salience(t, P)
        if evicted is not None:
            token_part, mass, valid = evicted
            score = scorer.score(token_part, mass)  # [B, Hkv, 1]
            if valid is not None:
                score = score.masked_fill(~valid, float("-inf"))
            if layer.buffer_slots:
                layer.offer_to_buffer(t, score, valid)
    mem_out = gates = None
    if memory is not None:
        gated = score is not None and parts.gate_writes
        gate = functools.partial(gate_one, score=score, strength=memory.step_spec.strength_channels) if gated else None
        mem_out, gates = decode_memory(memory, hidden_states, q, ctx, layer, gate)
    layer.write_sinks(k, v, P, t)
    layer.append_one(k, v, gates, t, scorer.token_part(hidden_states) if scorer is not None else None)
    counted = ctx.mass_stride if t % ctx.mass_stride == 0 else 0  # this query's weight in the received mass
    attn, lse, received = decode_attention(q, layer.decode_view(t, P), scale, parts, counted)
    if received is not None:
        layer.add_received(received)
    if mem_out is not None:
        attn = read_out(parts, attn, mem_out.unsqueeze(1), hidden_states, lse)
    return attn.reshape(B, 1, Hq * D)


def ahn_attention(module, query, key, value, attention_mask, scaling=None, ahn_context=None, **kwargs):
    """The attention function ahn registers with transformers (``AttentionInterface``).

    ``query [B, Hq, T, D]``, ``key`` / ``value [B, Hkv, T, D]``: the new tokens after the
    family's projections and RoPE (:class:`ahn.cache.AHNCache` hands them back unchanged);
    ``attention_mask`` is unused (the padding is in the context); ``ahn_context``: the
    :class:`AHNContext` of this forward. Returns ``([B, T, Hq, D], None)``.
    """
    if not isinstance(ahn_context, AHNContext):
        raise RuntimeError(
            "ahn's attention ran without an AHN context: run the model through ahn.add_memory(...), whose "
            "decoder hook supplies it, not with attn_implementation='ahn' alone"
        )
    for name in UNSUPPORTED_FEATURES:
        if kwargs.get(name) is not None:
            raise ValueError(f"this model's attention uses {name}=, which ahn's sinks + window attention does not "
                             "implement; this architecture is not supported")
    hidden = module.__dict__.pop("_ahn_hidden", None)  # the layer's normed input, kept by the q_proj hook
    if hidden is None:
        raise RuntimeError(f"{type(module).__name__}.q_proj did not run before the attention: ahn needs its input")
    B, Hq, T, D = query.shape
    if scaling is None:
        scaling = D**-0.5
    parts = LayerParts.of(getattr(module, "ahn", None), ahn_context)
    layer = ahn_context.cache.layers[module.layer_idx] if ahn_context.cache is not None else None
    if layer is not None and T == 1 and layer.is_initialized:
        out = decode(parts, hidden, query, key, value, ahn_context, layer, scaling)
    else:
        out = prefill(parts, hidden, query, key, value, ahn_context, layer, scaling, module.layer_idx)
    return out.view(B, T, Hq, D), None


def register_attention() -> None:
    """Register :func:`ahn_attention` as :data:`ATTENTION` (idempotent; done by ``add_memory``, not at import)."""
    AttentionInterface.register(ATTENTION, ahn_attention)
