"""What the memory kept, and whether it leaves the window's answers alone (``ahn demo``'s analysis).

* **Salience by token kind**: the mean salience score at eviction of keys, values, filler and
  the other tokens, per layer (averaged over kv heads), from one forward over the held-out
  sequences (:class:`ahn.salience.SalienceRecord`).
* **The buffer at the query**: the sequences are prefilled up to the QUERY token through an
  :class:`ahn.AHNCache`; the priority buffer then holds M tokens per layer and kv head. Reported:
  the share of those entries by token kind, and the share of the asked pairs' values (the
  tokens the answers copy) that are in some head's buffer.
* **Drift** (HippoFormer's "drift calibration", measured directly): at the query positions
  of answers whose source is inside the window, where the memory should change nothing, the
  relative distance ``||h - h_full|| / ||h_full||`` of each layer's output hidden state from
  full attention's, for sinks + window and for window + memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ahn.distill.synthetic import NUM_SPECIAL, RecallTask
from ahn.model import cache_kwargs
from ahn.salience import SalienceRecord

KINDS = ("key", "value", "filler", "other")


def token_kinds(ids: torch.Tensor, task: RecallTask) -> torch.Tensor:
    """``[B, T]`` index into :data:`KINDS` of each context token (the query section counts as "other")."""
    kind = torch.full_like(ids, KINDS.index("other"))
    kind[(ids >= NUM_SPECIAL) & (ids < task.first_key)] = KINDS.index("filler")
    kind[(ids >= task.first_key) & (ids < task.first_value)] = KINDS.index("key")
    kind[ids >= task.first_value] = KINDS.index("value")
    kind[:, task.query_start:] = KINDS.index("other")
    kind[:, 0] = KINDS.index("other")
    return kind


@torch.no_grad()
def salience_by_kind(model, batch: dict, task: RecallTask) -> tuple[dict, Optional[dict]]:
    """``({layer: {kind: mean score}}, {layer: [B, Hkv, T] scores})``; ``({}, None)`` without a scorer."""
    if not model.ahn_config.uses_salience:
        return {}, None
    record = SalienceRecord()
    with model.attention_mode("ahn"):
        model(input_ids=batch["input_ids"], use_cache=False, salience_record=record)
    kind = token_kinds(batch["input_ids"], task).unsqueeze(1)  # [B, 1, T]
    out = {}
    for layer, scores in sorted(record.scores.items()):
        evicted = torch.isfinite(scores)
        out[layer] = {}
        for i, name in enumerate(KINDS):
            sel = evicted & (kind == i)
            out[layer][name] = scores[sel].mean().item() if sel.any() else None
    return out, record.scores


@torch.no_grad()
def buffer_at_query(model, batch: dict, task: RecallTask) -> dict:
    """Share of buffer entries by kind, and of the asked values held, after a prefill up to the QUERY token."""
    if not model.ahn_config.buffer_slots:
        return {}
    ids = batch["input_ids"][:, : task.query_start + 1]
    with model.attention_mode("ahn"):
        cache = model.new_cache()
        model(input_ids=ids, **cache_kwargs(model, cache))
    kind = token_kinds(batch["input_ids"], task)
    asked = batch["source_positions"]  # [B, A] the asked values' slots
    out = {}
    for layer, cache_layer in enumerate(cache.layers):
        if not cache_layer.buffer_slots:
            continue
        slots = cache_layer.buffer_slot  # [B, Hkv, M]
        held = slots >= 0
        kinds = kind.gather(1, slots.clamp(min=0).flatten(1)).view_as(slots)
        shares = {name: ((kinds == i) & held).sum().item() / max(1, held.sum().item()) for i, name in enumerate(KINDS)}
        in_buffer = (slots.flatten(1).unsqueeze(1) == asked.unsqueeze(-1)).any(-1)  # [B, A]
        out[layer] = {"entries": shares, "asked_values_held": in_buffer.float().mean().item(),
                      "filled": held.float().mean().item()}
    return out


@torch.no_grad()
def drift(model, batch: dict, window: int) -> dict:
    """Per layer, mean ``||h_mode - h_full|| / ||h_full||`` at the query positions of answers inside the window,
    for "window" and "ahn" (``{mode: [layer 1 .. L]}``; the last entry is after the final norm)."""
    ids = batch["input_ids"]
    within = batch["distance"] < window  # [B, A]
    b, a = within.nonzero(as_tuple=True)
    if not b.numel():
        return {}
    t = batch["answer_positions"][b, a] - 1
    hidden = {}
    for mode in ("full", "window", "ahn"):
        with model.attention_mode(mode):
            states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]
        hidden[mode] = [h[b, t].float() for h in states]
    return {mode: [((h - f).norm(dim=-1) / f.norm(dim=-1)).mean().item() for h, f in zip(hidden[mode], hidden["full"])]
            for mode in ("window", "ahn")}


def plot_salience(path, ids: torch.Tensor, scores: dict, task: RecallTask, window: int) -> None:
    """PNG of one sequence's salience at eviction along its positions, per layer (kv head 0), one series per kind."""
    from ahn.plotting import scatter_panels

    kind = token_kinds(ids[None], task)[0]
    panels = []
    for layer, s in sorted(scores.items()):
        row = s[0, 0]  # [T] of the first sequence, kv head 0
        series = {}
        for i, name in enumerate(KINDS):
            pos = (torch.isfinite(row) & (kind == i)).nonzero().flatten()
            if pos.numel():
                series[name] = (pos.tolist(), row[pos].tolist())
        panels.append(("position (token leaves the window at position + %d)" % window, f"layer {layer} salience",
                       series))
    scatter_panels(path, "salience at eviction along one held-out sequence", panels)


def format_analysis(analysis: dict) -> str:
    """Console lines: salience by token kind, the buffer's contents at the query, the drift per layer."""
    lines = []
    for layer, kinds in analysis.get("salience_by_kind", {}).items():
        lines.append(f"layer {layer} mean salience at eviction: "
                     + ", ".join(f"{name} {x:+.2f}" for name, x in kinds.items() if x is not None))
    for layer, r in analysis.get("buffer_at_query", {}).items():
        entries = ", ".join(f"{name} {100 * share:.0f}%" for name, share in r["entries"].items())
        lines.append(f"layer {layer} buffer at the query: {entries}; asked values held {100 * r['asked_values_held']:.0f}%")
    d = analysis.get("drift")
    if d:
        lines.append("drift from full attention at within-window answers (per layer, relative): "
                     + "; ".join(f"{mode} " + " ".join(f"{x:.3f}" for x in v) for mode, v in d.items()))
    return "\n".join(lines)
