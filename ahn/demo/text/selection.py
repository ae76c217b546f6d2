"""Which inputs let the salience scorer pick a word pair's value on prose? An offline ablation on a teacher's own
activations.

The priority buffer keeps, per layer and kv head, the M evicted tokens of highest salience; a pair whose value is
not among them at its query is lost to the buffer. The scorer is linear in what it reads, and distillation fits it
to the teacher's attention mass from queries at least a window later (:func:`ahn.distill.losses.salience_loss`).
This ablation fits the same linear score to the same target from the teacher's activations, for several input
sets, and counts on held-out examples how many of the queried values (beyond the window at their query) are among
the M best-scored tokens evicted by then:

- ``token``: the token's normed hidden state x (``salience_mass=False``);
- ``token+mass``: and ``log1p`` of the attention it received while in the window (the default scorer);
- ``token+mass+key norm``, ``token+key norm``: and the log of its key's norm (a feature one-shot KV-compression
  methods rank keys by; RoPE keeps it);
- ``target``: the teacher's far mass itself (what the scorer is fitted to; it sees the queries to come).

No memory is trained: the scores are fitted in seconds per input set (Adam on the listwise loss), so the
question "is it the inputs or the training" has an answer before any distillation. ``python -m
ahn.demo.text.selection`` runs it on the shipped text teacher (training essays to fit, held-out essays to count);
docs/salience.md has a run.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ahn._cli_args import int_at_least
from ahn.distill.losses import evictable_positions, salience_loss

from . import tasks
from .corpus import clean, essays
from .probe import add_teacher_arguments, beyond_window_queries, load_for_cli, record_qkv

INPUTS = {  # name -> (received mass, key norm) beside the token's hidden state
    "token": (False, False),
    "token+mass": (True, False),
    "token+mass+key norm": (True, True),
    "token+key norm": (False, True),
}
TARGET = "target"  # the teacher's far mass as the score (an upper reference)


@dataclass
class Activations:
    """One example's per-layer inputs and target: ``x [L][T, hidden]`` (each layer's normed input), ``mass, key_norm,
    far [L][Hkv, T]`` (window mass received, key norm, the teacher's mass from queries a window or more later)."""

    x: list
    mass: list
    key_norm: list
    far: list


@torch.no_grad()
def activations(model, input_ids: Sequence[int], window: int, sinks: int) -> Activations:
    """:class:`Activations` of one sequence, from one full-attention forward of the plain ``model`` (q, k through
    :func:`ahn.demo.text.probe.record_qkv`; each layer's normed input from a forward pre-hook on its q_proj).
    The window mass is under sinks + window attention, as ahn's scorer reads it (each query head's softmax over
    the first ``sinks`` tokens and the last ``window``, summed over queries, averaged over the kv head's group)."""
    layers = model.model.layers
    hidden: dict = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args, i=i: hidden.__setitem__(i, args[0][0].float())) for i, layer in enumerate(layers)]
    try:
        records = record_qkv(model, torch.tensor([list(input_ids)]))
    finally:
        for h in hooks:
            h.remove()
    T = len(input_ids)
    t, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    in_window = (j <= t) & ((j > t - window) | (j < sinks))
    causal, far = j <= t, t - j >= window
    out = Activations([], [], [], [])
    for i in range(len(layers)):
        q, k, _ = records[i]
        q, k = q[0].float(), k[0].float()  # [Hq, T, D], [Hkv, T, D]
        Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
        logits = q @ k.repeat_interleave(Hq // Hkv, 0).transpose(-1, -2) * D ** -0.5  # [Hq, T, T]

        def received(visible, counted=None):
            p = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            p = p if counted is None else p * counted
            return p.sum(1).view(Hkv, Hq // Hkv, T).mean(1)  # [Hkv, T]

        out.x.append(hidden[i])
        out.mass.append(received(in_window))
        out.key_norm.append(k.norm(dim=-1))
        out.far.append(received(causal, far))
    return out


def _inputs(a: Activations, layer: int, head: int, use_mass: bool, use_norm: bool) -> torch.Tensor:
    cols = [a.x[layer]]
    if use_mass:
        cols.append(torch.log1p(a.mass[layer][head]).unsqueeze(-1))
    if use_norm:
        cols.append(torch.log(a.key_norm[layer][head]).unsqueeze(-1))
    return torch.cat(cols, dim=-1)  # [T, F]


def fit_scorer(train: Sequence[Activations], candidates: torch.Tensor, layer: int, head: int, use_mass: bool,
               use_norm: bool, steps: int = 300, lr: float = 3e-2):
    """A linear score (on standardised inputs) fitted by :func:`salience_loss` to the far mass of
    ``train`` (all of one length; ``candidates [T]`` the evictable positions). Returns ``(score_fn, first loss,
    last loss)``; ``score_fn(activations) -> [T]``."""
    X = torch.stack([_inputs(a, layer, head, use_mass, use_norm) for a in train])  # [N, T, F]
    target = torch.stack([a.far[layer][head] for a in train]).unsqueeze(1)  # [N, 1, T]
    cand = candidates.expand(len(train), -1)
    rows = X[cand]
    mu, sd = rows.mean(0), rows.std(0) + 1e-6
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[-1], requires_grad=True)  # (no bias: a shift changes no ranking and no softmax)
    opt = torch.optim.Adam([w], lr=lr)
    losses = []
    for _ in range(steps):
        loss = salience_loss((Z @ w).unsqueeze(1), target, cand)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    w = w.detach()
    return (lambda a: ((_inputs(a, layer, head, use_mass, use_norm) - mu) / sd) @ w), losses[0], losses[-1]


def kept_values(example: tasks.TextExample, score: torch.Tensor, window: int, sinks: int,
                slots: int) -> tuple[int, int]:
    """``(kept, asked)``: of the queried values that lie beyond the window at their query, how many are among the
    ``slots`` best-scored tokens evicted by then (the buffer's content: the top M of what has left the window)."""
    asked = beyond_window_queries(example, window, sinks)
    kept = 0
    for query, value in asked:
        evicted = torch.arange(sinks, query - window + 1)
        top = evicted[score[evicted].topk(min(slots, len(evicted))).indices]
        kept += int(value in top.tolist())
    return kept, len(asked)


@dataclass
class SelectionRow:
    layer: int
    head: int
    kept: dict  # input set (or TARGET) -> {pairs: share of asked values kept}
    asked: dict  # pairs -> values asked


def ablation(model, train: Sequence[tasks.TextExample], test: dict, window: int, sinks: int, slots: int,
             progress=None) -> list[SelectionRow]:
    """One :class:`SelectionRow` per layer and kv head: each input set of :data:`INPUTS` fitted on ``train`` (recall
    examples of one length), counted on ``test`` (pairs -> examples), beside the :data:`TARGET` reference."""
    lengths = {len(ex.input_ids) for ex in train}
    if len(lengths) != 1:
        raise ValueError(f"the training examples must share one length, got {sorted(lengths)}")
    T = lengths.pop()
    candidates = evictable_positions(torch.ones(1, T), window, sinks)[0]
    fit_acts = [activations(model, ex.input_ids, window, sinks) for ex in train]
    test_acts = {n: [(ex, activations(model, ex.input_ids, window, sinks)) for ex in exs] for n, exs in test.items()}
    Hkv = fit_acts[0].mass[0].shape[0]
    rows = []
    for layer in range(len(fit_acts[0].x)):
        for head in range(Hkv):
            scorers = {name: fit_scorer(fit_acts, candidates, layer, head, *use)[0] for name, use in INPUTS.items()}
            scorers[TARGET] = lambda a, layer=layer, head=head: a.far[layer][head]
            kept = {name: {} for name in scorers}
            asked = {n: sum(len(beyond_window_queries(ex, window, sinks)) for ex, _ in pairs)
                     for n, pairs in test_acts.items()}
            for n, pairs in test_acts.items():
                for name, score in scorers.items():
                    hits = sum(kept_values(ex, score(a), window, sinks, slots)[0] for ex, a in pairs)
                    kept[name][n] = hits / asked[n] if asked[n] else None
            rows.append(SelectionRow(layer, head, kept, asked))
            if progress:
                progress(rows[-1])
    return rows


def format_row(row: SelectionRow) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    cells = [" / ".join(pct(row.kept[name][n]) for n in row.asked) for name in (*INPUTS, TARGET)]
    return f"| {row.layer} | {row.head} | " + " | ".join(cells) + " |"


def header(pairs: Sequence[int], slots: int) -> str:
    names = " | ".join((*INPUTS, f"{TARGET} (teacher's far mass)"))
    return (f"Queried values beyond the window kept in the top {slots} of the evicted tokens, "
            f"{' / '.join(map(str, pairs))} pairs:\n\n| layer | kv head | {names} |\n"
            "| ---: | ---: |" + " ---: |" * (len(INPUTS) + 1))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ahn.demo.text.selection", description=__doc__.split("\n\n")[0])
    add_teacher_arguments(p)
    p.add_argument("--pairs", type=int_at_least(1), nargs="+", default=[8, 16], help="held-out pair counts")
    p.add_argument("--examples", type=int_at_least(1), default=12, help="held-out examples per pair count")
    p.add_argument("--train-pairs", type=int_at_least(1), nargs="+", default=[8, 16, 32, 64],
                   help="pair counts of the fitting examples (training essays)")
    p.add_argument("--train-examples", type=int_at_least(1), default=8, help="fitting examples per pair count")
    p.add_argument("--slots", type=int_at_least(1), default=16, help="buffer slots M (the text demo's: 16)")
    args = p.parse_args(argv)
    model, tokenizer, words = load_for_cli(p, args)
    torch.manual_seed(args.seed)

    def draw(split: str, counts: Sequence[int], per_count: int, seed: int) -> dict:
        haystack = tasks.token_stream(tokenizer, [clean(t) for t in essays(split).values()])
        rng = random.Random(seed)
        try:
            return {n: [tasks.recall_example(tokenizer, words, n, args.length, rng, haystack)
                        for _ in range(per_count)] for n in counts}
        except ValueError as e:
            p.error(f"--length {args.length}: {e}")

    train = [ex for exs in draw("train", args.train_pairs, args.train_examples, args.seed).values() for ex in exs]
    test = draw("heldout", args.pairs, args.examples, args.seed + 1)
    print(header(args.pairs, args.slots), flush=True)
    ablation(model, train, test, args.window, args.sinks, args.slots,
             progress=lambda r: print(format_row(r), flush=True))


if __name__ == "__main__":
    main()
