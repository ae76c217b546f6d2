"""Recall accuracy of a model in each attention mode, beyond vs within the window, by distance.

An answer is correct when the argmax of the logits at its query position (answer position - 1)
is the answer token. "Beyond the window" means the answer's source lies at distance >= window
from the query (see :mod:`ahn.distill.synthetic`): sinks + sliding-window attention cannot see
it, so only the full model or the memory can answer it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ahn.config import MODES
from ahn.plotting import line_panels

EVAL_BATCH = 32  # sequences per forward pass: bounds peak memory, not results


@torch.no_grad()
def answer_correct(model, batch: dict[str, torch.Tensor], mode: str, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Whether each answer of ``batch`` (from :func:`ahn.distill.synthetic.sample_recall`) is
    predicted correctly by the :class:`ahn.AHNModel` ``model`` in ``mode``: bool ``[B, A]``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if not hasattr(model, "attention_mode"):
        raise TypeError(f"model must be an ahn.AHNModel (ahn.add_memory(base, config)), got {type(model).__name__}")
    ids, pos = batch["input_ids"], batch["answer_positions"]
    chunks = []
    with model.attention_mode(mode):
        for i in range(0, ids.shape[0], batch_size):
            x, p = ids[i:i + batch_size], pos[i:i + batch_size]
            logits = model(input_ids=x, use_cache=False).logits  # [b, T, vocab]
            pred = logits.gather(1, (p - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1])).argmax(-1)  # [b, A]
            chunks.append(pred == x.gather(1, p))
    return torch.cat(chunks)


def distance_edges(seq_len: int, window: int) -> list[int]:
    """Bucket edges of width ``window`` covering distances 0 .. seq_len (the first bucket is the window)."""
    return list(range(0, seq_len, window)) + [seq_len]


def _accuracy(correct: torch.Tensor) -> Optional[float]:
    return correct.float().mean().item() if correct.numel() else None


def evaluate_modes(model, batch: dict[str, torch.Tensor], window: int, modes: Sequence[str] = MODES,
                   edges: Optional[Sequence[int]] = None, batch_size: int = EVAL_BATCH) -> dict:
    """Accuracy of ``model`` on ``batch`` in each of ``modes``.

    ``window`` must be the window the model runs with (it splits answers into beyond / within).
    ``edges`` are distance-bucket edges (default :func:`distance_edges`).

    Returns ``{mode: beyond-window accuracy, ..., "gap_closed": (ahn - window) / (full - window)
    when all three modes ran and full > window, "detail": {mode: {"beyond", "within",
    "by_distance": [{"lo", "hi", "count", "accuracy"}]}}, "counts": {"beyond", "within"}}``.
    Accuracies are in [0, 1], or None where a split holds no answers.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an int >= 1")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={list(modes)!r} must be a non-empty list of {MODES}")
    distance = batch["distance"]
    edges = list(edges) if edges is not None else distance_edges(batch["input_ids"].shape[1], window)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges={edges!r} must be at least two increasing distances")
    beyond = distance >= window
    results: dict = {"counts": {"beyond": int(beyond.sum()), "within": int((~beyond).sum())}, "detail": {}}
    for mode in modes:
        correct = answer_correct(model, batch, mode, batch_size)
        buckets = []
        for lo, hi in zip(edges, edges[1:]):
            sel = (distance >= lo) & (distance < hi)
            buckets.append({"lo": lo, "hi": hi, "count": int(sel.sum()), "accuracy": _accuracy(correct[sel])})
        results["detail"][mode] = {"beyond": _accuracy(correct[beyond]), "within": _accuracy(correct[~beyond]),
                                   "by_distance": buckets}
        results[mode] = results["detail"][mode]["beyond"]
    if all(results.get(m) is not None for m in MODES) and results["full"] > results["window"]:
        results["gap_closed"] = (results["ahn"] - results["window"]) / (results["full"] - results["window"])
    return results


def plot_accuracy(results: dict, path, title: str) -> None:
    """PNG of accuracy vs distance of the answer from its query, one line per mode in ``results``
    (as returned by :func:`evaluate_modes`); buckets without answers are left out."""
    series = {}
    for mode, detail in results["detail"].items():
        points = [((b["lo"] + b["hi"]) / 2, b["accuracy"]) for b in detail["by_distance"] if b["accuracy"] is not None]
        series[mode] = ([x for x, _ in points], [y for _, y in points])
    line_panels(path, title, [("distance of the answer from its query (tokens)", "accuracy", series, False)],
                figsize=(6, 4))
