"""Analytic FLOPs and cache bytes of full attention, sinks + window, and window + memory.

Counts matmul FLOPs (2 * m * n * k) of processing N tokens in one prefill, per component:

* ``projections_mlp``: q/k/v/o projections and the gated MLP of every layer;
* ``attention``: scores and weighted values, query t attending min(t + 1, keys) keys
  (causal: the lower triangle only; window: at most sinks + window keys);
* ``memory`` (ahn only): the memory's gate / output-gate projections for every token, the
  recurrent state update of every token that left the window, the read of every query that
  has a non-empty state, and the per-head output projection of those reads; with the options
  of :mod:`ahn.salience`, the salience scorer's and the deferring logit's projections of every
  token, and the attention to the priority buffer (query t attends min(M, tokens evicted by t)
  buffer entries);
* ``lm_head``: logits for every position.

Cache bytes are those an :class:`ahn.AHNCache` (window / ahn) or a transformers DynamicCache
(full) holds after the N tokens: KV at ``dtype``; for ahn, also the per-token write gates of
the window and the memory state, which ahn keeps in float32; with a priority buffer, its M KV
entries per memory layer and kv head at ``dtype``, their slots (int64) and scores, and the
salience (token part and attention received) of each window entry in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ahn.config import MODES, READOUTS
from ahn.memory import memory_class
from ahn.plotting import line_panels

FLOAT32_BYTES = 4  # AHNCache keeps memory gates and states in float32
INT64_BYTES = 8  # the priority buffer's slot indices
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only model that set its cost."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config (Qwen2 / Qwen3 / Llama-like: gated MLP of ``intermediate_size``)."""
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [name for name in needed if getattr(config, name, None) is None]
        if missing:
            raise ValueError(f"a {getattr(config, 'model_type', '?')!r} config lacks {', '.join(missing)}: the FLOPs "
                             "model covers Qwen2 / Qwen3 / Llama-like decoders (gated MLP); pass such a config")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        )


def attended_keys(n: int, limit: Optional[int]) -> int:
    """Sum over queries t = 0 .. n-1 of the keys attended: min(t + 1, limit) (limit None: causal)."""
    if limit is None or limit >= n:
        return n * (n + 1) // 2
    return limit * (limit + 1) // 2 + (n - limit) * limit


def count(shape: ModelShape, seq_len: int, mode: str, *, window: int = 32640, sinks: int = 128,
          memory: str = "gated_deltanet", dtype: str = "bfloat16", batch: int = 1,
          memory_layers: Optional[int] = None, buffer_slots: int = 0, salience_writes: bool = False,
          readout: str = "add", memory_kwargs: Optional[dict] = None) -> dict:
    """FLOPs of a prefill of ``seq_len`` tokens and the cache left behind, for one mode.

    Returns ``{"flops": int, "flops_breakdown": {...}, "cache_bytes": int, "cache_breakdown": {...}}``.
    ``memory_layers`` (default all) is the number of layers with a memory; ``buffer_slots``,
    ``salience_writes`` and ``readout`` are the :class:`ahn.AHNConfig` options of :mod:`ahn.salience`;
    ``memory_kwargs`` the rule's options (e.g. ``{"decay_rank": 8}``).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    rule = memory_class(memory)
    unknown = sorted(set(memory_kwargs or {}) - set(rule.allowed_options))
    if unknown:
        raise ValueError(f"memory {memory!r} does not take options {unknown}; allowed: "
                         f"{list(rule.allowed_options) or 'none'}")
    cost = rule.cost(memory_kwargs)  # each rule declares its own (ahn.memory.MemoryCost)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_BYTES)}")
    if buffer_slots < 0 or readout not in READOUTS:
        raise ValueError(f"buffer_slots={buffer_slots!r} must be >= 0 and readout={readout!r} one of {READOUTS}")
    if seq_len < 1 or window < 1 or sinks < 0 or batch < 1:
        raise ValueError(f"need seq_len >= 1, window >= 1, sinks >= 0, batch >= 1; got {seq_len}, {window}, {sinks}, "
                         f"{batch}")
    s, N = shape, seq_len
    L, h, D, Hq, Hkv = s.num_layers, s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads
    mem_layers = L if memory_layers is None else memory_layers
    qkvo = 2 * N * h * D * (2 * Hq + 2 * Hkv)
    mlp = 3 * 2 * N * h * s.intermediate_size
    limit = None if mode == "full" else sinks + window
    attention = 4 * Hq * D * attended_keys(N, limit)  # QK^T and AV, 2 FLOPs per multiply-add each
    mem = 0
    if mode == "ahn":
        evicted = max(0, N - sinks - window)  # tokens written into the memory = queries that read it
        gates = 2 * N * h * Hq * (cost.channels + 1)  # write gates and the output gate
        # per written token: the gates' expansion, the update, the read and the output projection
        mem = mem_layers * (gates + evicted * Hq * D * (cost.expansion + D * (cost.update + 2 + 2)))
        salience = buffer_slots > 0 or salience_writes
        mem += mem_layers * 2 * N * h * (Hkv * salience + Hq * (readout == "defer"))  # scorer, deferring logit
        mem += mem_layers * 4 * Hq * D * attended_keys(evicted, buffer_slots)  # attention to the buffer
    breakdown = {
        "projections_mlp": batch * L * (qkvo + mlp),
        "attention": batch * L * attention,
        "memory": batch * mem,
        "lm_head": batch * 2 * N * h * s.vocab_size,
    }
    kv_bytes = DTYPE_BYTES[dtype]
    if mode == "full":
        kv_entries = N
    else:
        kv_entries = sinks + min(window, N)  # AHNCache: sink entries + ring buffer grown to min(W, N)
    cache = {"kv": batch * L * 2 * Hkv * D * kv_entries * kv_bytes, "memory_gates": 0, "memory_state": 0}
    if mode == "ahn":
        cache["memory_gates"] = batch * mem_layers * min(window, N) * Hq * cost.channels * FLOAT32_BYTES
        cache["memory_state"] = batch * mem_layers * Hq * D * D * FLOAT32_BYTES
        if buffer_slots or salience_writes:
            cache["salience"] = batch * mem_layers * Hkv * (
                2 * min(window, N) * FLOAT32_BYTES  # token part and attention received per window entry
                + buffer_slots * (2 * D * kv_bytes + INT64_BYTES + FLOAT32_BYTES))  # buffer k / v, slot, score
    return {
        "flops": sum(breakdown.values()),
        "flops_breakdown": breakdown,
        "cache_bytes": sum(cache.values()),
        "cache_breakdown": cache,
    }


def compare(shape: ModelShape, seq_len: int, **kwargs) -> dict:
    """:func:`count` for the three modes plus savings of window / ahn against full (percent)."""
    out = {mode: count(shape, seq_len, mode, **kwargs) for mode in MODES}
    for mode in ("window", "ahn"):
        out[mode]["flops_saving_pct"] = 100 * (1 - out[mode]["flops"] / out["full"]["flops"])
        out[mode]["cache_saving_pct"] = 100 * (1 - out[mode]["cache_bytes"] / out["full"]["cache_bytes"])
    return out


def plot(shape: ModelShape, max_len: int, path, title: str = "", points: int = 64, **kwargs) -> None:
    """PNG of FLOPs and cache bytes against sequence length for the three modes."""
    lengths = sorted({max(1, round(max_len * (i + 1) / points)) for i in range(points)})
    rows = {mode: [count(shape, n, mode, **kwargs) for n in lengths] for mode in MODES}
    flops = {m: (lengths, [r["flops"] / 1e12 for r in rs]) for m, rs in rows.items()}
    cache = {m: (lengths, [r["cache_bytes"] / 2**30 for r in rs]) for m, rs in rows.items()}
    try:
        line_panels(path, title, [("sequence length (tokens)", "prefill TFLOPs", flops, False),
                                  ("sequence length (tokens)", "cache GiB", cache, False)])
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        raise ValueError(f"the plot could not be written to {path} ({e}); choose another path") from None


def _attended_pairs(query, key, is_causal: bool, attn_mask) -> int:
    """(batch, head, query, key) pairs an SDPA call really attends."""
    B, H, Tq, _ = query.shape
    Tk = key.shape[-2]
    if attn_mask is not None:  # SDPA hands the kernel boolean masks as additive float masks (-inf = masked)
        visible = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
        return int(visible.expand(B, H, Tq, Tk).sum())
    if is_causal:
        return B * H * sum(min(i + 1, Tk) for i in range(Tq))
    return B * H * Tq * Tk


def measured_flops(fn) -> int:
    """Run ``fn()`` under torch's FlopCounterMode and return the FLOPs it counted.

    FlopCounterMode has no formula for the CPU SDPA kernel (it counts zero); this registers one
    that counts the pairs each call really attends (the boolean mask or the causal triangle),
    so the measurement is comparable with :func:`count`.
    """
    # start-up time: torch.utils.flop_counter takes ~0.6 s to import and `ahn flops` never measures
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_registry:

        @register_flop_formula(op, get_raw=True)
        def _sdpa_cpu_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, attn_mask=None, out_val=None, **kw):
            return 4 * query.shape[-1] * _attended_pairs(query, key, is_causal, attn_mask)  # QK^T and AV

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
