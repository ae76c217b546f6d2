"""Could a linear memory carry what the window drops? A training-free probe of a teacher's own keys.

ahn's memories read with the attention's own queries and write the attention's own keys and values (l2-normed,
after RoPE, as :mod:`ahn.memory` reads them): training teaches only their gates and read-out. So whether a memory
*can* return a word pair's value once the pair has left the window is decided, before any training, by the
geometry of the teacher's keys. This probe measures it on word-pair recall examples:

1. One full-attention forward records every layer's queries, keys and values (through transformers' public
   ``AttentionInterface``: a recording wrapper around SDPA, so the model computes exactly what it always does).
2. For each query whose pair lies beyond the window and each query head: the teacher's attention probability on
   the pair's value token (the heads that retrieve put nearly all of it there), and what a delta-rule memory
   (``S <- S + (v - S k) k^T``, write strength 1, no decay: the best case of DeltaNet / GatedDeltaNet's rule) holds
   after the evicted tokens are written, read with the query: the read counts as right when it is closer (cosine)
   to the pair's value than to any other pair's value written. Two write policies: ``every`` evicted token (the
   paper's memory writes all of them) and the pairs' ``values`` only (a perfect salience gate).

``python -m ahn.demo.text.probe`` runs it on the shipped text teacher and the held-out essays; the retrieving
heads' rows are the ones to read (docs/demo.md has a run). Chance is one over the pairs written.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ahn._cli_args import int_at_least
from ahn._shipped import load_text_teacher

from . import tasks
from .corpus import clean, essays
from .teacher import WEIGHTS_DIR, teacher_task_words

RECORDING = "ahn_probe_recording"
_records: Optional[dict] = None  # layer -> (q, k, v) while a recording forward runs


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    if _records is not None:
        _records[module.layer_idx] = (query.detach(), key.detach(), value.detach())
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def record_qkv(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer's ``(q [B, Hq, T, D], k, v [B, Hkv, T, D])`` after the family's projections and RoPE, from one
    full-attention forward of the plain (memory-less) ``model``; its attention implementation is restored."""
    global _records
    AttentionInterface.register(RECORDING, _recording_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(RECORDING)
    _records = {}
    try:
        model(input_ids=input_ids, use_cache=False)
        return _records
    finally:
        _records = None
        model.set_attn_implementation(before)


def delta_reads(keys: torch.Tensor, values: torch.Tensor, written: Sequence[int],
                queries: torch.Tensor) -> torch.Tensor:
    """Reads of a delta-rule memory written with ``keys, values [n, D]`` in order (write strength 1, no decay): read
    ``i`` uses ``queries[i]`` after the first ``written[i]`` rows are written (``written`` non-decreasing). Keys and
    queries are used as given (normalise them first). Returns ``[m, D_v]``."""
    state = keys.new_zeros(keys.shape[-1], values.shape[-1])  # [D_k, D_v]: read = query @ state
    reads, done = [], 0
    for i, n in enumerate(written):
        if n < done:
            raise ValueError(f"written={list(written)!r} must be non-decreasing: a memory cannot unwrite")
        for k, v in zip(keys[done:n], values[done:n]):
            state = state + torch.outer(k, v - k @ state)
        done = n
        reads.append(queries[i] @ state)
    return torch.stack(reads) if reads else values.new_zeros(0, values.shape[-1])


def beyond_window_queries(example: tasks.TextExample, window: int, sinks: int) -> list[tuple[int, int]]:
    """``(query, value)`` positions of ``example``'s asked pairs whose value has left the window (and is not a sink)
    at the query that predicts its answer, in order: what a memory or the buffer must carry."""
    return sorted((a - 1, lo) for (a, _), (lo, _) in zip(example.answer_spans, example.value_spans)
                  if a - 1 - lo >= window and lo >= sinks)


@dataclass
class HeadRow:
    layer: int
    head: int
    queries: int
    attention_on_value: float  # the teacher's mean attention probability on the pair's value token
    every: float  # share of queries the memory written with every evicted token answers
    values: float  # ... written with the pairs' values only


def probe(model, examples: Sequence[tasks.TextExample], window: int, sinks: int) -> list[HeadRow]:
    """The probe (module docstring) over recall ``examples`` (:func:`tasks.recall_example`) for sinks + ``window``
    attention: one row per layer and query head, over the queries whose pair's value lies beyond the window."""
    sums: dict = {}
    for ex in examples:
        records = record_qkv(model, torch.tensor([ex.input_ids]))
        pair_values = sorted(lo for lo, _ in ex.value_spans + ex.distractor_spans if lo >= sinks)
        asked = beyond_window_queries(ex, window, sinks)
        if not asked:
            continue
        t = torch.tensor([q for q, _ in asked])
        right_value = torch.tensor([lo for _, lo in asked])
        every = torch.arange(sinks, int(t.max()) - window + 1)  # what has left the window by the last query
        values_pos = torch.tensor(pair_values)
        stored = [values_pos[values_pos <= x - window] for x in t.tolist()]  # the values each query could get back
        policies = [(slot, rows, [int((rows <= x - window).sum()) for x in t.tolist()])  # rows written by each query
                    for slot, rows in ((2, every), (3, values_pos))]
        for layer, (q, k, v) in records.items():
            q, k, v = q[0].float(), k[0].float(), v[0].float()
            Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
            for h in range(Hq):
                g = h // (Hq // Hkv)
                logits = (q[h, t] @ k[g].T) * D ** -0.5  # [m, T]
                logits = logits.masked_fill(torch.arange(k.shape[1]) > t[:, None], float("-inf"))
                p = logits.softmax(-1).gather(1, right_value[:, None])[:, 0]
                kn, qn = F.normalize(k[g], dim=-1), F.normalize(q[h, t], dim=-1)
                s = sums.setdefault((layer, h), [0, 0.0, 0.0, 0.0])
                s[0] += len(asked)
                s[1] += p.sum().item()
                for slot, rows, n in policies:
                    reads = delta_reads(kn[rows], v[g, rows], n, qn)  # [m, D]
                    for i, there in enumerate(stored):
                        closest = F.cosine_similarity(reads[i][None], v[g, there], dim=-1).argmax()
                        s[slot] += float(there[closest].item() == right_value[i].item())
    return [HeadRow(layer, h, n, p / n, e / n, w / n) for (layer, h), (n, p, e, w) in sorted(sums.items())]


def format_rows(rows: Sequence[HeadRow], pairs: int) -> str:
    """A markdown table of ``rows`` under a title naming the pair count."""
    lines = [f"{pairs} pairs, queries whose pair lies beyond the window:", "",
             "| layer | head | queries | teacher's attention on the value | memory right, every token written | "
             "values only |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.layer} | {r.head} | {r.queries} | {r.attention_on_value:.3f} | {r.every:.0%} | {r.values:.0%} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    """The options the text teacher's offline analyses share: ``--teacher --length --window --sinks --seed
    --threads``, with the text demo's defaults (:func:`load_for_cli` reads them)."""
    p.add_argument("--teacher", default=str(WEIGHTS_DIR), help="model folder with its tokenizer (default: the shipped "
                   "text teacher)")
    p.add_argument("--length", type=int_at_least(2), default=1024, help="tokens per example (default: 1024, the "
                   "shipped teacher's context)")
    p.add_argument("--window", type=int_at_least(1), default=256, help="the window W (default: the text demo's 256)")
    p.add_argument("--sinks", type=int_at_least(0), default=16, help="attention sinks S (default: the text demo's 16)")
    p.add_argument("--seed", type=int, default=5, help="the examples' draw (default: 5)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")


def load_for_cli(p: argparse.ArgumentParser, args: argparse.Namespace):
    """``(model, tokenizer, words)`` of ``args.teacher`` (its key / value pool), after :func:`add_teacher_arguments`'
    options are checked (``p.error`` naming the fix: nothing beyond the window, a length past the teacher's
    context, a teacher folder that lacks a file); sets the threads."""
    if args.window + args.sinks >= args.length:
        p.error(f"--window {args.window} + --sinks {args.sinks} leave no token of --length {args.length} beyond the "
                "window: give a longer length or a shorter window")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_text_teacher(args.teacher)
    except FileNotFoundError as e:
        p.error(str(e))
    if args.length > model.config.max_position_embeddings:
        p.error(f"--length {args.length} is beyond the teacher's context of {model.config.max_position_embeddings}")
    return model, tokenizer, teacher_task_words(Path(args.teacher))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ahn.demo.text.probe", description=__doc__.split("\n\n")[0])
    add_teacher_arguments(p)
    p.add_argument("--pairs", type=int_at_least(1), nargs="+", default=[8, 16, 32, 64],
                   help="pair counts (default: the text demo's)")
    p.add_argument("--examples", type=int_at_least(1), default=6, help="recall examples per pair count")
    p.add_argument("--min-attention", type=float, default=0.5,
                   help="show only heads whose attention on the value averages at least this (0: every head)")
    args = p.parse_args(argv)
    model, tokenizer, words = load_for_cli(p, args)
    haystack = tasks.token_stream(tokenizer, [clean(t) for t in essays("heldout").values()])
    for n in args.pairs:
        rng = random.Random(args.seed * 1000 + n)  # each pair count's examples, whichever others are asked
        try:
            examples = [tasks.recall_example(tokenizer, words, n, args.length, rng, haystack)
                        for _ in range(args.examples)]
        except ValueError as e:
            p.error(f"--pairs {n} --length {args.length}: {e}")
        rows = [r for r in probe(model, examples, args.window, args.sinks)
                if r.attention_on_value >= args.min_attention]
        print(format_rows(rows, n), flush=True)


if __name__ == "__main__":
    main()
