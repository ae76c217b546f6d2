"""Hybrid attention shared by every model family: sinks + sliding window + compressed memory.

A decoder layer's attention, in "window" or "ahn" mode, computes for the query at slot t:

* softmax attention over the sinks (the first ``S`` real tokens of its row) and the window
  (slots t-W+1 .. t), with the frozen q/k/v after RoPE;
* in "ahn" mode, plus the memory read-out: the memory state after writing every real,
  non-sink token of slot <= t-W, read with q_t, then normed, gated and projected per head.

Slots are positions in the (possibly left-padded) batch. Row r has ``P_r`` left pads; its
sinks are slots ``P_r .. P_r+S-1``. Pads and sinks are never written into the memory and
pads are never attended, so a padded row computes exactly what it would alone.

:func:`ahn_attention` is registered in transformers' attention registry under the name
:data:`ATTENTION`; the family's own forward calls it with q / k / v after RoPE, and the
settings of the call arrive as the keyword ``ahn_context`` (an :class:`AHNContext`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MODES = ("full", "window", "ahn")
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
        record: an :class:`ahn.salience.SalienceRecord` to fill, or None.
    """

    mode: str
    window: int
    sinks: int
    pad_offsets: torch.Tensor
    start: int
    cache: Optional[object]
    attention_block: int
    backend: str
    buffer_slots: int = 0
    record: Optional[object] = None


def repeat_heads(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Repeat kv heads ``n_rep`` times along ``dim`` (GQA), head h -> heads h*n_rep .. h*n_rep+n_rep-1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


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


def sink_window_attention(
    q: torch.Tensor,  # [B, Hq, T, D], slots start .. start+T-1
    ctx_k: torch.Tensor,  # [B, Hkv, L, D], slots ctx_start .. ctx_start+L-1 (window context, new tokens last)
    ctx_v: torch.Tensor,  # [B, Hkv, L, D]
    ctx_start: int,
    sink_k: torch.Tensor,  # [B, Hkv, S, D], sink i of row r is slot P_r + i
    sink_v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    start: int,
    window: int,
    sinks: int,
    pad_offsets: torch.Tensor,  # [B]
    scale: float,
    block: int,
) -> torch.Tensor:
    """Blocked sinks + sliding-window attention; returns ``[B, T, Hq, D]``.

    Query block [a, a+bq) needs only context slots [a-W+1, a+bq): cost O(T * (S + W + bq)),
    peak memory O(bq * (S + W + bq)) whatever T is.
    """
    B, Hq, T, D = q.shape
    dev = q.device
    P = pad_offsets.view(B, 1, 1)  # [B, 1, 1]
    n_sinks = sink_k.shape[2]
    sink_slot = P + torch.arange(n_sinks, device=dev).view(1, 1, -1)  # [B, 1, S']
    first_plain = int(pad_offsets.max()) + sinks  # from this slot on every key is a real non-sink token
    steady_mask = None  # the mask of a full block whose keys are all real non-sink tokens: the same for all
    outs = []
    for a in range(0, T, block):
        bq = min(block, T - a)
        lo = max(ctx_start, start + a - window + 1)
        hi = start + a + bq
        k = ctx_k[:, :, lo - ctx_start : hi - ctx_start]
        v = ctx_v[:, :, lo - ctx_start : hi - ctx_start]
        steady = bq == block and lo == start + a - window + 1 and lo >= first_plain
        if steady and steady_mask is not None:
            mask = steady_mask
        else:
            mask = window_block_mask(start + a, bq, lo, hi, window, sinks, P, sink_slot)
            if steady:
                steady_mask = mask
        o = F.scaled_dot_product_attention(
            q[:, :, a : a + bq],
            torch.cat([sink_k, k], dim=2),
            torch.cat([sink_v, v], dim=2),
            attn_mask=mask.unsqueeze(1),
            scale=scale,
            enable_gqa=True,
        )
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, Hq, D]


def gather_sinks(x: torch.Tensor, pad_offsets: torch.Tensor, sinks: int) -> torch.Tensor:
    """Sinks of each row from a full sequence: ``x [B, H, T, D]`` -> ``[B, H, min(S, T), D]``.

    Entries past a row's end are clamped copies; the attention mask never shows them
    (their slot is beyond every query).
    """
    B, H, T, D = x.shape
    n = min(sinks, T)
    idx = (pad_offsets.view(B, 1) + torch.arange(n, device=x.device)).clamp(max=T - 1)  # [B, n]
    return x.gather(2, idx.view(B, 1, n, 1).expand(B, H, n, D))


def memory_write_stream(new: torch.Tensor, old: Optional[torch.Tensor], start: int, window: int) -> torch.Tensor:
    """Tokens written into the memory while processing the new slots, aligned with the queries.

    The query at slot t reads the state after writing slot t-W; so for new slots
    start .. start+T-1 the write stream is slots start-W .. start+T-1-W: the cached window
    ``old`` (slots max(0, start-W) .. start-1, time on dim 1) then the new tokens, with zeros
    (inert writes) for negative slots. ``new``: ``[B, T, ...]``; returns ``[B, T, ...]``.
    """
    T = new.shape[1]
    parts = []
    n_neg = max(0, window - start)  # slots start-W .. -1 do not exist
    if n_neg:
        parts.append(new.new_zeros(new.shape[0], min(n_neg, T), *new.shape[2:]))
    if old is not None and old.shape[1]:
        parts.append(old)
    parts.append(new)
    return torch.cat(parts, dim=1)[:, :T]


def memory_write_mask(start: int, T: int, window: int, sinks: int, pad_offsets: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: whether the write-stream slot (start+i-W) is a real, non-sink token."""
    slots = start - window + torch.arange(T, device=pad_offsets.device)
    return slots.view(1, T) >= pad_offsets.view(-1, 1) + sinks


def hybrid_attention(
    memory,  # ahn.memory.Memory or None
    hidden_states: torch.Tensor,  # [B, T, hidden], the layer's normed input
    q: torch.Tensor,  # [B, Hq, T, D] after RoPE
    k: torch.Tensor,  # [B, Hkv, T, D] after RoPE
    v: torch.Tensor,  # [B, Hkv, T, D]
    ctx: AHNContext,
    layer_idx: int,
    scale: float,
) -> torch.Tensor:
    """Sinks + window attention (+ memory in "ahn" mode) for T new tokens; returns ``[B, T, Hq * D]``."""
    B, Hq, T, D = q.shape
    W, S, start, P = ctx.window, ctx.sinks, ctx.start, ctx.pad_offsets
    use_memory = ctx.mode == "ahn" and memory is not None
    layer = ctx.cache.layers[layer_idx] if ctx.cache is not None else None
    old_lo = max(0, start - W)  # first slot still in the cached window
    probe = ctx.record.probe_window if ctx.record is not None else None
    if (use_memory and (memory.salience is not None or memory.defer is not None)) or probe is not None:
        from ahn.salience import salient_hybrid_attention

        return salient_hybrid_attention(memory if use_memory else None, hidden_states, q, k, v, ctx, layer_idx, scale)

    if layer is not None and T == 1 and layer.is_initialized:
        return _decode_step(memory if use_memory else None, hidden_states, q, k, v, ctx, layer, scale)
    gates = memory.write_gates(hidden_states) if use_memory else None  # [B, T, Hq, G]
    if layer is not None and not layer.is_initialized:
        layer.lazy_initialization(k, v, gates)
    stream = memory_stream(layer, k, v, gates, start, W) if use_memory else None

    if layer is None:
        attn = sink_window_attention(
            q, k, v, start, gather_sinks(k, P, S), gather_sinks(v, P, S), start=start, window=W, sinks=S,
            pad_offsets=P, scale=scale, block=ctx.attention_block,
        )
    else:
        layer.write_sinks(k, v, P, start)
        old_k, old_v, _ = layer.read_slots(old_lo, start)  # [B, L, Hkv, D]
        attn = sink_window_attention(
            q, torch.cat([old_k.transpose(1, 2), k], 2), torch.cat([old_v.transpose(1, 2), v], 2), old_lo,
            layer.sink_k, layer.sink_v, start=start, window=W, sinks=S, pad_offsets=P, scale=scale,
            block=ctx.attention_block,
        )
        layer.append(k, v, gates, start)

    if not use_memory:
        return attn.reshape(B, T, Hq * D)
    mem_out = read_memory(memory, q, stream, hidden_states, ctx, layer)  # [B, T, Hq, D]
    return (attn + mem_out.to(attn.dtype)).reshape(B, T, Hq * D)


def memory_stream(layer, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, start: int, window: int) -> list:
    """The (k, v, gates) written into the memory while processing the new slots, time-major and aligned with
    the queries (:func:`memory_write_stream`): cached slots that leave the window during these T tokens
    (read before ``append`` overwrites them), then the new ones. ``k, v [B, Hkv, T, D]``, ``gates [B, T, Hq, G]``."""
    T = k.shape[2]
    old_lo = max(0, start - window)
    new = (k.transpose(1, 2), v.transpose(1, 2), gates)  # time-major [B, T, ...]
    mem_hi = max(old_lo, min(start, start + T - window))
    old = layer.read_slots(old_lo, mem_hi) if layer is not None else (None, None, None)
    return [memory_write_stream(n, o, start, window) for n, o in zip(new, old)]


def read_memory(memory, q: torch.Tensor, stream: list, hidden_states: torch.Tensor, ctx: AHNContext, layer):
    """Write ``stream`` (:func:`memory_stream`) and read with ``q [B, Hq, T, D]``, through the read-out:
    ``[B, T, Hq, D]``; the final state goes to the cache ``layer`` (if any)."""
    wk, wv, wg = stream  # [B, T, Hkv, D], [B, T, Hkv, D], [B, T, Hq, G]
    Hq, T = q.shape[1], q.shape[2]
    n_rep = Hq // wk.shape[2]
    read, state = memory.read(
        q.transpose(1, 2), repeat_heads(wk, n_rep, 2), repeat_heads(wv, n_rep, 2), wg,
        memory_write_mask(ctx.start, T, ctx.window, ctx.sinks, ctx.pad_offsets), initial_state=_state_for_autograd(layer),
        backend=ctx.backend,
    )
    if layer is not None:
        layer.memory_state = state
    return memory.output(read, hidden_states)


def _decode_step(memory, hidden_states, q, k, v, ctx: AHNContext, layer, scale: float) -> torch.Tensor:
    """One new token (slot t) with a filled cache: the decode form of :func:`hybrid_attention`.

    The token at slot t - W leaves the window: it is written into the memory state
    (:func:`decode_memory`) before the new token's k / v overwrite its ring entry; the step's read
    with q_t is the memory output. Attention then reads the sinks and the ring buffer in place.
    Returns ``[B, 1, Hq * D]``.
    """
    B, Hq, _, D = q.shape
    t, P = ctx.start, ctx.pad_offsets
    mem_out, gates = decode_memory(memory, hidden_states, q, ctx, layer) if memory is not None else (None, None)
    layer.write_sinks(k, v, P, t)
    layer.append_one(k, v, gates, t)
    attn = layer.decode_attention(q, t, P, scale)  # [B, 1, Hq, D]
    if mem_out is not None:
        attn = attn + mem_out.unsqueeze(1).to(attn.dtype)
    return attn.reshape(B, 1, Hq * D)


def decode_memory(memory, hidden_states: torch.Tensor, q: torch.Tensor, ctx: AHNContext, layer, gate_evicted=None):
    """The memory's part of a decode step, before the new token enters the ring: the token at slot t - W
    (leaving the window) is written into the state with one recurrent step (k / v heads broadcast over the
    query heads, no repeat), and the step's read with q_t goes through the read-out.

    ``gate_evicted``: a function of the evicted token's gates ``[B, Hq, G]`` returning the gates to write
    with (salience-gated writes), or None. Returns ``(out [B, Hq, D] or None, the new token's gates
    [B, Hq, G])``; the state goes to ``layer``.
    """
    P, S = ctx.pad_offsets, ctx.sinks
    e = ctx.start - ctx.window  # the slot leaving the window
    first, last = layer.sink_ends(P)  # rows write slot e iff e >= P_r + S
    k_e = v_e = g_e = mask = None
    if e >= first:
        k_e, v_e, g_e = layer.read_slot(e)
        mask = None if e >= last else e >= P + S  # [B]
        if gate_evicted is not None:
            g_e = gate_evicted(g_e)
    # Without autograd (generation), the memory's ~50 small ops run in inference mode, which
    # skips version counting and view tracking: about a fifth of their cost on CPU. Its
    # outputs are only read afterwards (the state is replaced, never updated in place).
    with torch.inference_mode(not torch.is_grad_enabled()):
        mem_out, gates, layer.memory_state = memory.decode(
            hidden_states[:, 0], q[:, :, 0], k_e, v_e, g_e, mask, _state_for_autograd(layer), backend=ctx.backend
        )  # [B, Hq, D] or None, [B, Hq, G]
    return mem_out, gates


def _state_for_autograd(layer) -> Optional[torch.Tensor]:
    """The cached memory state; a copy when it was made in inference mode (by no-grad decoding)
    and autograd is on now, since autograd cannot save inference tensors."""
    state = layer.memory_state if layer is not None else None
    if state is not None and torch.is_grad_enabled() and state.is_inference():
        state = state.clone()
    return state


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
    memory = getattr(module, "ahn", None)
    out = hybrid_attention(memory, hidden, query, key, value, ahn_context, module.layer_idx, scaling)
    return out.view(B, T, Hq, D), None


def register_attention() -> None:
    """Register :func:`ahn_attention` as :data:`ATTENTION` (idempotent; done by ``add_memory``, not at import)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, ahn_attention)
