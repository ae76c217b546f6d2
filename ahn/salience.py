"""Salience at eviction, the exact priority buffer and the read-out that defers to the window.

Options of :class:`ahn.AHNConfig` (all off by default: the paper's mechanism, unchanged):

* **Salience at eviction.** Token s leaves the window at query slot s + W, when its W
  successors have been seen. Its salience, per kv head h, is
  ``score_h(s) = proj(x_s)_h + mass_weight_h * log1p(mass_h(s))``, where x_s is the layer's
  normed hidden state of token s and ``mass_h(s)`` the attention it received while in the
  window: the sum over queries s .. s+W-1 of their probability on s under sinks + window
  attention (the window's own softmax, so it does not depend on the buffer), averaged over the
  query heads of kv head h. Everything in it is causally available at eviction.
* **Salience-gated writes** (``salience_writes``): the token's memory write strength (beta of the
  delta rules, Mamba2's dt) is multiplied by ``sigmoid(score)``.
* **The priority buffer** (``buffer_slots = M``): per sequence, layer and kv head, M exact KV
  slots hold the most salient evicted tokens, ordered by (score, slot): the higher score wins,
  a tie goes to the newer token. The buffer at query t is exactly the top M of the tokens
  evicted by t (non-sink, real), so the least salient entry is the one replaced. Buffer
  entries are attended in the same softmax as the sinks and the window.

  Inside a parallel block of queries the buffer evolves token by token without a loop: the
  candidates are the M entries at the block's start plus the tokens the block evicts; sorted by
  priority, a candidate is visible to query i iff it has been evicted by i and fewer than M
  candidates before it in that order have been. One exclusive cumulative sum gives that count
  for every (query, candidate), so a block costs O(bq * (M + bq)) beside its attention, the
  whole prefill O(T * (W + M)). A decode step evicts one token: it replaces the entry of lowest
  priority if it ranks above it (:func:`offer_to_buffer`), which is the same top-M rule; parallel
  forward, chunked prefill and token-by-token decode compute the same buffer (tested).
* **The deferring read-out** (``readout="defer"``): the memory is one more entry in the
  attention softmax with a learned logit ``l_t = defer(x_t)`` per query head, and its read-out
  is weighted by that entry's share ``sigmoid(l_t - lse_t)``, where ``lse_t`` is the
  log-sum-exp of the attention logits over sinks, buffer and window. A strong match in the
  window makes ``lse_t`` large and the memory stand back. The attention output itself is kept
  (not shrunk by ``1 - share``), so a zero-initialised memory still changes nothing.

Training: the scorer is taught by the teacher (``distill``'s ``salience_weight``): for each
evictable token, the attention mass that the full-attention teacher puts on it from queries
at least W later is the target of a listwise cross-entropy over the sequence's scores
(:func:`ahn.distill.losses.salience_loss`); :class:`SalienceRecord` carries both from the
forward passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ahn.attention import window_block_mask
from ahn.memory.base import linear  # normal(INIT_STD) weights, zero bias


class SalienceScorer(nn.Module):
    """Per-kv-head salience of a token at eviction: ``proj(x) + mass_weight * log1p(mass)``."""

    def __init__(self, hidden_size: int, num_kv_heads: int):
        super().__init__()
        self.proj = linear(hidden_size, num_kv_heads, bias=True)
        self.mass_weight = nn.Parameter(torch.zeros(num_kv_heads))

    def token_part(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the score known when the token enters: ``x [B, T, hidden]`` -> ``[B, Hkv, T]`` float32."""
        return self.proj(x).float().transpose(1, 2)

    def score(self, token_part: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Scores at eviction: ``token_part, mass [B, Hkv, n]`` -> ``[B, Hkv, n]``."""
        return token_part + self.mass_weight.float().view(-1, 1) * torch.log1p(mass)


@dataclass
class Buffer:
    """The priority buffer of one layer: ``k, v [B, Hkv, M, D]``, ``slot [B, Hkv, M]`` (-1: empty),
    ``score [B, Hkv, M]`` (float32, -inf where empty)."""

    k: torch.Tensor
    v: torch.Tensor
    slot: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, like_k: torch.Tensor, like_v: torch.Tensor, slots: int) -> "Buffer":
        B, H, _, D = like_k.shape
        return cls(like_k.new_zeros(B, H, slots, D), like_v.new_zeros(B, H, slots, like_v.shape[-1]),
                   *cls.empty_entries(B, H, slots, like_k.device))

    @staticmethod
    def empty_entries(batch: int, heads: int, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot, score)`` of a buffer with no entry: slot -1 and score -inf, which sort below every token."""
        return (torch.full((batch, heads, slots), -1, dtype=torch.long, device=device),
                torch.full((batch, heads, slots), float("-inf"), dtype=torch.float32, device=device))

    @property
    def slots(self) -> int:
        return self.slot.shape[-1]


@dataclass
class SalienceRecord:
    """What a forward records for training and analysis; pass one as ``model(..., salience_record=rec)``.

    Attributes:
        probe_window: in a "window"-mode forward whose window spans the whole sequence (the
            teacher), record for each token the attention mass it receives from queries at least
            ``probe_window`` later (the student's window): ``teacher_mass``.
        scores: layer -> ``[B, Hkv, T]`` salience of each token at its eviction (set by an "ahn"
            forward without cache, for slots evicted inside the sequence; -inf elsewhere).
        teacher_mass: layer -> ``[B, Hkv, T]`` (see ``probe_window``).
    """

    probe_window: Optional[int] = None
    scores: dict = field(default_factory=dict)
    teacher_mass: dict = field(default_factory=dict)


def _grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, R, n, a] @ y [B, Hkv, a, b]`` -> ``[B, Hkv, R, n, b]``, the R query heads of a kv head stacked
    into one matmul (broadcasting y over R would copy it R times)."""
    B, H, R, n, a = x.shape
    return torch.matmul(x.reshape(B, H, R * n, a), y).view(B, H, R, n, -1)


def _priority_order(score: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Indices sorting candidates by priority, best first: higher score, then newer slot (empty ones last)."""
    by_slot = torch.sort(slot, dim=-1, descending=True, stable=True).indices
    by_score = torch.sort(score.gather(-1, by_slot), dim=-1, descending=True, stable=True).indices
    return by_slot.gather(-1, by_score)


def window_softmax(logits: torch.Tensor):
    """The softmax of ``logits [..., N]`` (float32, -inf where not visible, at least one visible entry per row) in
    parts: ``(e, m, lse)`` with ``e = exp(logits - m)`` (m the row max, without gradient: it cancels),
    ``lse [...]`` the log-sum-exp. ``logits`` is overwritten by ``e`` (one pass over the block, no copy)."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    e = logits.sub_(m).exp_()
    return e, m, m.squeeze(-1) + torch.log(e.sum(dim=-1))


def buffered_block_attention(
    q: torch.Tensor,  # [B, Hkv, R, bq, D], a block of bq queries (R query heads per kv head)
    window: tuple,  # window_softmax of the scaled logits over sinks + window [B, Hkv, R, bq, N]
    values: torch.Tensor,  # [B, Hkv, N, Dv]
    scale: float,
    buffer: Optional[Buffer],
    evicted: Optional[tuple],  # (k [B,Hkv,bq,D], v, slot [B,Hkv,bq] (-1: none), score [B,Hkv,bq]): the token query i evicts
):
    """Softmax attention of a block of queries over sinks + window and the priority buffer as it evolves.

    Returns ``(out [B, Hkv, R, bq, Dv], lse [B, Hkv, R, bq] over every attended entry, the buffer
    after the block or None)``. The window's weights are scaled per row after the matmul
    (``(e @ v) * exp(m - lse)``), so the [bq, N] block is read once more, by the matmul only.
    """
    e, m, lse = window
    window_out = _grouped_matmul(e.to(values.dtype), values).float()  # [B, Hkv, R, bq, Dv], unnormalised
    if buffer is None:
        return (window_out * torch.exp(m - lse.unsqueeze(-1))).to(values.dtype), lse, None
    bq = q.shape[3]
    M = buffer.slots
    ek, ev, eslot, escore = evicted
    ck = torch.cat([buffer.k, ek.to(buffer.k.dtype)], dim=2)  # [B, Hkv, M + bq, D]: the candidates
    cv = torch.cat([buffer.v, ev.to(buffer.v.dtype)], dim=2)
    cslot = torch.cat([buffer.slot, eslot], dim=2)
    cscore = torch.cat([buffer.score, escore], dim=2)
    # Query i sees candidate c once c is evicted: buffer entries from the start, the token query j evicts from j on.
    evict_at = torch.cat([torch.full((M,), -1, device=q.device), torch.arange(bq, device=q.device)])
    order = _priority_order(cscore, cslot)  # [B, Hkv, M + bq]
    ck = ck.gather(2, order.unsqueeze(-1).expand_as(ck))
    cv = cv.gather(2, order.unsqueeze(-1).expand_as(cv))
    cslot, cscore = cslot.gather(2, order), cscore.gather(2, order)
    query = torch.arange(bq, device=q.device).view(1, 1, bq, 1)
    evicted_by = (cslot >= 0).unsqueeze(2) & (evict_at[order].unsqueeze(2) <= query)  # [B, Hkv, bq, M + bq]
    better = torch.cumsum(evicted_by.int(), dim=-1) - evicted_by.int()  # better candidates evicted by query i
    visible = evicted_by & (better < M)
    blogits = _grouped_matmul(q * scale, ck.transpose(-1, -2)).float()  # [B, Hkv, R, bq, M + bq]
    blogits = blogits.masked_fill_(~visible.unsqueeze(2), float("-inf"))
    lse = torch.logaddexp(lse, torch.logsumexp(blogits, dim=-1))
    out = (window_out * torch.exp(m - lse.unsqueeze(-1))
           + _grouped_matmul(torch.exp(blogits - lse.unsqueeze(-1)).to(cv.dtype), cv).float())
    # Every candidate is evicted by the block's end: the new buffer is the best M (empty ones sort last).
    return out.to(values.dtype), lse, Buffer(ck[:, :, :M], cv[:, :, :M], cslot[:, :, :M], cscore[:, :, :M])


def _block_logits(qb, keys, block_mask, scale: float) -> torch.Tensor:
    """Scaled logits of a query block over sinks + window, ``-inf`` where not visible: ``[B, Hkv, R, bq, N]`` float32."""
    logits = _grouped_matmul(qb * scale, keys.transpose(-1, -2)).float()  # the scale on q: [bq, D], not [bq, N]
    return logits.masked_fill_(~block_mask, float("-inf"))


def _attend_block(qb, keys, values, block_mask, scale, buffer, evicted, window=None):
    """One block of :func:`salient_window_attention` (``window``: its window_softmax, already computed)."""
    if window is None:
        window = window_softmax(_block_logits(qb, keys, block_mask, scale))
    return buffered_block_attention(qb, window, values, scale, buffer, evicted)


def received_attention(e: torch.Tensor, lse: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each key's attention mass from a block's queries, averaged over the group's heads: ``[B, Hkv, N]``.

    ``sum_q e[q, j] exp(m_q - lse_q)``, as one matmul over the queries."""
    weight = torch.exp(m.squeeze(-1) - lse).unsqueeze(-2)  # [B, Hkv, R, 1, bq]
    return torch.matmul(weight, e).squeeze(-2).mean(2)


def salient_window_attention(
    q: torch.Tensor,  # [B, Hq, T, D], slots start .. start+T-1
    ctx_k: torch.Tensor,  # [B, Hkv, L, D], slots ctx_start .. ctx_start+L-1 (window context, new tokens last)
    ctx_v: torch.Tensor,
    ctx_start: int,
    sink_k: torch.Tensor,  # [B, Hkv, S', D]
    sink_v: torch.Tensor,
    *,
    start: int,
    window: int,
    sinks: int,
    pad_offsets: torch.Tensor,  # [B]
    scale: float,
    block: int,
    scorer: Optional[SalienceScorer] = None,
    token_part: Optional[torch.Tensor] = None,  # [B, Hkv, L] scorer.token_part of the context slots
    mass: Optional[torch.Tensor] = None,  # [B, Hkv, L] float32 window attention received so far; updated in place
    buffer: Optional[Buffer] = None,
    probe_window: Optional[int] = None,
):
    """Blocked sinks + window attention with explicit softmax, salience and the priority buffer.

    The same blocks and masks as :func:`ahn.attention.sink_window_attention`. With a ``scorer``
    the window attention each context slot receives is accumulated into ``mass``, and the token
    each query evicts (slot t - W) is scored; with a ``buffer`` those tokens compete for it.
    ``probe_window``: also return, per context slot, the attention mass received from queries
    at least that far ahead (the teacher's target for the scorer).

    Returns ``(out [B, T, Hq, D], lse [B, Hq, T], evict_scores [B, Hkv, T] (score of the token
    query i evicts; -inf where none) or None, buffer or None, probe [B, Hkv, L] or None)``.
    """
    B, Hq, T, D = q.shape
    Hkv = ctx_k.shape[1]
    R = Hq // Hkv
    dev = q.device
    qg = q.view(B, Hkv, R, T, D)
    P = pad_offsets.view(B, 1, 1)
    n_sinks = sink_k.shape[2]
    sink_slot = P + torch.arange(n_sinks, device=dev).view(1, 1, -1)  # [B, 1, S']
    outs, lses, scores = [], [], []
    probe = torch.zeros(B, Hkv, ctx_k.shape[2], device=dev) if probe_window is not None else None
    for a in range(0, T, block):
        bq = min(block, T - a)
        lo = max(ctx_start, start + a - window + 1)
        hi = start + a + bq
        mask = window_block_mask(start + a, bq, lo, hi, window, sinks, P, sink_slot)  # [B, bq, S'+L']
        keys = torch.cat([sink_k, ctx_k[:, :, lo - ctx_start: hi - ctx_start]], dim=2)
        values = torch.cat([sink_v, ctx_v[:, :, lo - ctx_start: hi - ctx_start]], dim=2)
        qb = qg[:, :, :, a: a + bq]
        block_mask = mask.view(B, 1, 1, bq, -1)
        # With autograd the block runs under activation checkpointing: its [bq, S' + L'] probabilities are
        # recomputed in the backward instead of kept for every block (SDPA keeps none either).
        checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (qb, keys, values))
        softmax_parts = None
        if scorer is not None or probe is not None:
            # The window's own softmax gives each key's received mass (summed over queries, averaged over heads).
            with torch.no_grad():
                softmax_parts = window_softmax(_block_logits(qb, keys, block_mask, scale))
                e_w, m_w, lse_w = softmax_parts
                if scorer is not None:
                    mass[:, :, lo - ctx_start: hi - ctx_start] += received_attention(e_w, lse_w, m_w)[..., n_sinks:]
                if probe is not None:
                    t = (start + a + torch.arange(bq, device=dev)).view(1, bq, 1)  # query slots
                    j = torch.arange(lo, hi, device=dev).view(1, 1, -1)  # key slots
                    far = ((t - j >= probe_window) & (j >= P + sinks)).view(B, 1, 1, bq, -1)
                    p_far = e_w[..., n_sinks:] * torch.exp(m_w - lse_w.unsqueeze(-1)) * far
                    probe[:, :, lo - ctx_start: hi - ctx_start] += p_far.sum(3).mean(2)
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
        args = (qb, keys, values, block_mask, scale, buffer, evicted)
        if checkpointed:  # the no-grad window softmax above cannot serve the autograd pass: recomputed inside
            out, lse, new_buffer = checkpoint(_attend_block, *args, None, use_reentrant=False)
        else:
            out, lse, new_buffer = _attend_block(*args, softmax_parts)
        if new_buffer is not None:
            buffer = new_buffer
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, -1).transpose(1, 2)  # [B, T, Hq, D]
    lse = torch.cat(lses, dim=3).reshape(B, Hq, T)
    return out, lse, (torch.cat(scores, dim=2) if scores else None), buffer, probe


def gate_writes(gates: torch.Tensor, scores: torch.Tensor, strength: tuple[int, ...]) -> torch.Tensor:
    """Salience-gated writes: ``gates [B, T, Hq, G]`` with the ``strength`` channels times sigmoid(``scores [B, Hkv, T]``)."""
    Hq, Hkv = gates.shape[2], scores.shape[1]
    factor = torch.sigmoid(scores).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=2)  # [B, T, Hq]
    channels = list(gates.unbind(-1))
    for c in strength:
        channels[c] = channels[c] * factor
    return torch.stack(channels, dim=-1)


def _gate_one(gates: torch.Tensor, score: torch.Tensor, strength: tuple[int, ...]) -> torch.Tensor:
    """:func:`gate_writes` of one token: ``gates [B, Hq, G]``, ``score [B, Hkv, 1]``."""
    return gate_writes(gates.unsqueeze(1), score, strength).squeeze(1)


def add_read_out(memory, attn: torch.Tensor, mem_out: torch.Tensor, hidden_states: torch.Tensor,
                 lse: torch.Tensor) -> torch.Tensor:
    """The attention output plus the memory's read-out: added as it is (the paper's read-out), or, with the
    deferring read-out, weighted by its softmax share ``sigmoid(defer(x) - lse)``. ``attn, mem_out
    [B, T, Hq, D]``, ``hidden_states [B, T, hidden]``, ``lse [B, T, Hq]`` the attention's log-sum-exp."""
    if memory.defer is None:
        return attn + mem_out.to(attn.dtype)
    share = torch.sigmoid(memory.defer(hidden_states).float() - lse)
    return attn + (share.unsqueeze(-1) * mem_out.float()).to(attn.dtype)


def salient_hybrid_attention(memory, hidden_states, q, k, v, ctx, layer_idx: int, scale: float) -> torch.Tensor:
    """:func:`ahn.attention.hybrid_attention` with salience, the priority buffer and the deferring read-out
    (whichever the memory has), or the teacher's probe (``ctx.record.probe_window``). ``[B, T, Hq * D]``."""
    from ahn.attention import gather_sinks, memory_stream, read_memory

    B, Hq, T, D = q.shape
    W, S, start, P = ctx.window, ctx.sinks, ctx.start, ctx.pad_offsets
    layer = ctx.cache.layers[layer_idx] if ctx.cache is not None else None
    scorer = memory.salience if memory is not None else None
    M = ctx.buffer_slots if memory is not None else 0
    if layer is not None and T == 1 and layer.is_initialized:
        return _decode_step(memory, hidden_states, q, k, v, ctx, layer, scale)
    old_lo = max(0, start - W)
    gates = memory.write_gates(hidden_states) if memory is not None else None  # [B, T, Hq, G]
    token_part = scorer.token_part(hidden_states) if scorer is not None else None  # [B, Hkv, T]
    if layer is not None and not layer.is_initialized:
        layer.lazy_initialization(k, v, gates, salience=scorer is not None)
    stream = memory_stream(layer, k, v, gates, start, W) if memory is not None else None

    Hkv = k.shape[1]
    token_part_ctx = mass = None  # [B, Hkv, L] for the context slots (cached window, then the new tokens)
    if layer is None:
        ctx_k, ctx_v, ctx_start = k, v, start
        sink_k, sink_v = gather_sinks(k, P, S), gather_sinks(v, P, S)
        buffer = Buffer.empty(k, v, M) if M else None
        if scorer is not None:
            token_part_ctx, mass = token_part, torch.zeros(B, Hkv, T, device=q.device)
    else:
        layer.write_sinks(k, v, P, start)
        old_k, old_v, _ = layer.read_slots(old_lo, start)  # [B, L, Hkv, D]
        ctx_k, ctx_v, ctx_start = torch.cat([old_k.transpose(1, 2), k], 2), torch.cat([old_v.transpose(1, 2), v], 2), old_lo
        sink_k, sink_v = layer.sink_k, layer.sink_v
        buffer = layer.buffer
        if scorer is not None:
            old_token, old_mass = layer.read_salience(old_lo, start)
            token_part_ctx = torch.cat([old_token, token_part], dim=2)
            mass = torch.cat([old_mass, torch.zeros(B, Hkv, T, device=q.device)], dim=2)
    probe_window = ctx.record.probe_window if ctx.record is not None else None
    attn, lse, scores, buffer, probe = salient_window_attention(
        q, ctx_k, ctx_v, ctx_start, sink_k, sink_v, start=start, window=W, sinks=S, pad_offsets=P, scale=scale,
        block=ctx.attention_block, scorer=scorer, token_part=token_part_ctx, mass=mass,
        buffer=buffer, probe_window=probe_window,
    )  # [B, T, Hq, D], [B, Hq, T], [B, Hkv, T] or None
    if layer is not None:
        layer.append(k, v, gates, start, token_part)
        if scorer is not None:
            layer.write_mass(mass, ctx_start)
        if buffer is not None:
            layer.set_buffer(buffer)
    if ctx.record is not None and layer is None:
        if probe is not None:
            ctx.record.teacher_mass[layer_idx] = probe
        if scores is not None:  # query i evicts slot i - W: the score of slot s is that of query s + W
            ctx.record.scores[layer_idx] = torch.cat(
                [scores[:, :, W:], scores.new_full((B, Hkv, min(W, T)), float("-inf"))], dim=2)
    if memory is None:
        return attn.reshape(B, T, Hq * D)
    if scores is not None and memory.salience_gates_writes:
        stream[2] = gate_writes(stream[2], scores, memory.step_spec.strength_channels)
    mem_out = read_memory(memory, q, stream, hidden_states, ctx, layer)  # [B, T, Hq, D]
    return add_read_out(memory, attn, mem_out, hidden_states, lse.transpose(1, 2)).reshape(B, T, Hq * D)


def offer_to_buffer(layer, ek: torch.Tensor, ev: torch.Tensor, eslot: torch.Tensor, escore: torch.Tensor) -> None:
    """The buffer rule for one evicted token, in place: it replaces the entry of lowest priority (score, then
    slot; empty entries are lowest) when it ranks above it, which keeps the buffer the top M of the evicted
    tokens, as :func:`buffered_block_attention` does for a block. ``ek, ev [B, Hkv, 1, D]``, ``eslot [B, 1, 1]``
    (-1: nothing evicted), ``escore [B, Hkv, 1]``."""
    slot, score = layer.buf_slot, layer.buf_score  # [B, Hkv, M]
    low = score.amin(dim=-1, keepdim=True)  # [B, Hkv, 1]
    oldest = torch.where(score == low, slot, torch.iinfo(slot.dtype).max).argmin(dim=-1, keepdim=True)
    low_slot = slot.gather(-1, oldest)
    replace = (eslot >= 0) & ((escore > low) | ((escore == low) & (eslot > low_slot)))  # [B, Hkv, 1]
    at = replace & (torch.arange(layer.buffer_slots, device=slot.device) == oldest)  # [B, Hkv, M]
    region = slice(layer.sinks, layer.ring_start)
    layer.keys[:, :, region] = torch.where(at.unsqueeze(-1), ek.to(layer.keys.dtype), layer.keys[:, :, region])
    layer.values[:, :, region] = torch.where(at.unsqueeze(-1), ev.to(layer.values.dtype), layer.values[:, :, region])
    layer.buf_slot = torch.where(at, eslot, slot)
    layer.buf_score = torch.where(at, escore, score)


def _decode_attention(layer, q: torch.Tensor, t: int, P: torch.Tensor, scale: float, with_mass: bool):
    """One query (slot t, appended) over sinks, buffer and ring in place, one softmax.

    Returns ``(out [B, Hkv, R, 1, D], lse [B, Hkv, R, 1], received [B, Hkv, C] or None)``: ``received``
    is the ring entries' share of the window's own softmax (the buffer left out), averaged over heads.
    """
    B, Hq, _, D = q.shape
    Hkv = layer.keys.shape[1]
    mask = layer.decode_mask(t, P).view(B, 1, -1)  # [B, 1, N]: sinks and ring
    if layer.buffer_slots:
        mask = mask.expand(B, Hkv, -1).clone()
        mask[:, :, layer.sinks: layer.ring_start] = layer.buf_slot >= 0
    qg = q.view(B, Hkv, Hq // Hkv, 1, D)
    e, m, lse = window_softmax(_block_logits(qg, layer.keys, mask.view(B, -1, 1, 1, mask.shape[-1]), scale))
    out = _grouped_matmul(e.to(layer.values.dtype), layer.values).float() * torch.exp(m - lse.unsqueeze(-1))
    received = None
    if with_mass:
        ring = e.detach()[..., layer.ring_start:]  # [B, Hkv, R, 1, C]
        window_sum = e.detach()[..., : layer.sinks].sum(-1, keepdim=True) + ring.sum(-1, keepdim=True)
        received = (ring / window_sum).squeeze(3).mean(2)
    return out.to(layer.values.dtype), lse, received


def _decode_step(memory, hidden_states, q, k, v, ctx, layer, scale: float) -> torch.Tensor:
    """One new token (slot t) with a filled cache: :func:`salient_hybrid_attention`'s decode form.

    The token at slot t - W leaves the window: it is scored, offered to the buffer
    (:func:`offer_to_buffer`, the one-token case of the block rule) and written into the memory (its
    write strength gated by the score); the new token enters the ring; the query attends over
    sinks, buffer and ring in place, in one softmax; the ring's received attention grows.
    """
    from ahn.attention import decode_memory

    B, Hq, _, D = q.shape
    t, W, S, P = ctx.start, ctx.window, ctx.sinks, ctx.pad_offsets
    scorer = memory.salience if memory is not None else None
    e = t - W  # the slot leaving the window
    score = None
    if scorer is not None and e >= 0:  # slot e is still in the ring (the cache holds slots t - W .. t - 1)
        i = e % W
        valid = (e >= P + S).view(B, 1, 1)  # [B, 1, 1] rows evicting a real, non-sink token
        score = scorer.score(layer.sal_token[:, :, i: i + 1], layer.sal_mass[:, :, i: i + 1])  # [B, Hkv, 1]
        score = score.masked_fill(~valid, float("-inf"))
        if layer.buffer_slots:  # before the new token overwrites the evicted one's ring entry
            ek, ev, _ = layer.read_slot(e)
            offer_to_buffer(layer, ek.unsqueeze(2), ev.unsqueeze(2), torch.where(valid, e, -1), score)
    mem_out = gates = None
    if memory is not None:
        gated = score is not None and memory.salience_gates_writes
        gate = functools.partial(_gate_one, score=score, strength=memory.step_spec.strength_channels) if gated else None
        mem_out, gates = decode_memory(memory, hidden_states, q, ctx, layer, gate)
    layer.write_sinks(k, v, P, t)
    layer.append_one(k, v, gates, t, scorer.token_part(hidden_states) if scorer is not None else None)
    attn, lse, received = _decode_attention(layer, q, t, P, scale, with_mass=scorer is not None)
    if received is not None:
        layer.sal_mass += received
    attn = attn.reshape(B, Hq, 1, -1).transpose(1, 2)  # [B, 1, Hq, D]
    if mem_out is not None:
        attn = add_read_out(memory, attn, mem_out.unsqueeze(1), hidden_states, lse.reshape(B, 1, Hq))
    return attn.reshape(B, 1, Hq * D)
