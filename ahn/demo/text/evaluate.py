"""Scoring of the text demo (`ahn demo --task text`): needles, perplexity by position, recall, cache bytes.

Everything runs through an :class:`ahn.AHNModel` in one of its attention modes (``full``, ``window``,
``ahn``); nothing here computes attention itself.

* **Greedy match** (:func:`span_matches`): an answer counts as found when greedy decoding after the
  text before it produces exactly its tokens. One teacher-forced forward over the whole example decides
  it: greedy decoding emits answer token i iff the argmax after ``prefix + answer[:i]`` is answer[i], for
  every i, which is what the argmaxes of that one forward are (a parallel forward equals prefill +
  decode, the model's invariant 3). Rows of a batch are right-padded: a causal model's positions never
  see what follows them, so padding changes nothing that is scored. :func:`answer_token_shares` gives the
  share of an answer's tokens that the same forward predicts right: partial credit, for a teacher that
  gets all of a number but its last digit.
* **Where a needle is** (:func:`needle_region`): the query q is the position that predicts the answer's
  first token. A token at position p is visible to it through sinks + window iff p < sinks
  or q - p < window. A needle is *beyond* the window when none of its tokens is (so only full attention
  or the memory can answer), *within* when all of them are, and *straddles* otherwise (counted apart).
* **Perplexity by position** (:func:`position_nll`): NLL of every token of a held-out sequence given its
  prefix (as ``ahn eval perplexity`` scores it), bucketed by the predicting position: the first
  sinks + window positions (all modes see the whole prefix there), then every ``bucket`` tokens.
  :func:`repeat_mask` picks the tokens that end a span of ``span`` tokens whose latest earlier
  occurrence lies wholly beyond the window: text the window has forgotten and the prefix repeats.
* **Cache bytes** (:func:`cache_bytes`, :func:`equal_bytes_slots`): read off a real cache after a
  sequence longer than sinks + window, so that the count is the cache's own.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ahn.config import MODES, AHNConfig
from ahn.model import AHNModel, add_memory, cache_kwargs
from ahn.plotting import line_panels, pyplot

EVAL_BATCH = 8  # sequences per forward pass: bounds peak memory, not results
LOGITS_CHUNK = 1024  # positions per LM-head call: the [positions, vocab] logits of a long sequence stay small
REGIONS = ("beyond", "within", "straddle")
# Tensors of a cache layer that only a memory needs: its state and the write gates of the window's tokens.
MEMORY_TENSORS = ("memory_state", "gates")


def _check_mode(model, mode: str) -> None:
    if not isinstance(model, AHNModel):
        raise TypeError(f"model must be an ahn.AHNModel (ahn.add_memory(base, config)), got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")


def _check_spans(sequences, spans) -> list[tuple[list[int], list[tuple[int, int]]]]:
    if len(sequences) != len(spans):
        raise ValueError(f"{len(sequences)} sequences but {len(spans)} span lists: give one list of answer spans per "
                         "sequence")
    out = []
    for i, (seq, row) in enumerate(zip(sequences, spans)):
        seq = [int(t) for t in seq]
        row = [(int(a), int(b)) for a, b in row]
        bad = [(a, b) for a, b in row if not 1 <= a < b <= len(seq)]
        if bad:
            raise ValueError(f"sequence {i} ({len(seq)} tokens): answer spans {bad} must satisfy 1 <= start < end <= "
                             "its length (the token before an answer predicts it)")
        out.append((seq, row))
    return out


def span_matches(model, mode: str, sequences: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]],
                 batch_size: int = EVAL_BATCH, progress: bool = False, desc: str = "") -> list[list[bool]]:
    """For each sequence and each of its answer ``spans`` ([start, end) token positions): whether ``model`` in
    ``mode`` predicts every token of the span by argmax from the sequence before it, which is whether greedy
    decoding after ``sequence[:start]`` produces exactly ``sequence[start:end]`` (module docstring)."""
    shares = answer_token_shares(model, mode, sequences, spans, batch_size, progress, desc)
    return [[s == 1.0 for s in row] for row in shares]


@torch.no_grad()
def answer_token_shares(model, mode: str, sequences: Sequence[Sequence[int]],
                        spans: Sequence[Sequence[tuple[int, int]]], batch_size: int = EVAL_BATCH,
                        progress: bool = False, desc: str = "") -> list[list[float]]:
    """For each sequence and each of its answer ``spans``: the share of the span's tokens that ``model`` in
    ``mode`` predicts by argmax from the true text before each of them (teacher forcing). 1.0 is a greedy match
    (:func:`span_matches`); below it, how much of the answer the model still carries (a seven-digit number
    whose last digit alone is wrong scores 6/7)."""
    _check_mode(model, mode)
    rows_in = _check_spans(sequences, spans)
    base = model.base_model
    device = model.device
    order = sorted(range(len(rows_in)), key=lambda i: -len(rows_in[i][0]))  # similar lengths batch together
    found: list[list[float]] = [[] for _ in rows_in]
    bar = tqdm(total=len(rows_in), desc=desc or f"{mode}: answers", disable=not progress, leave=False)
    with model.attention_mode(mode):
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            T = max(len(rows_in[i][0]) for i in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: no scored position sees it
            for r, i in enumerate(rows):
                x[r, :len(rows_in[i][0])] = torch.tensor(rows_in[i][0])
            hidden = base.model(input_ids=x.to(device), use_cache=False).last_hidden_state  # [b, T, hidden]
            for r, i in enumerate(rows):
                seq, row = rows_in[i]
                for a, b in row:
                    pred = base.lm_head(hidden[r, a - 1:b - 1]).argmax(-1).cpu()  # [b - a] predictions of a .. b-1
                    found[i].append((pred == torch.tensor(seq[a:b])).float().mean().item())
            bar.update(len(rows))
    bar.close()
    return found


def needle_region(query: int, positions: Sequence[int], window: int, sinks: int) -> str:
    """``"beyond"``, ``"within"`` or ``"straddle"``: where the needle tokens at ``positions`` lie for the query at
    position ``query`` (the one that predicts the answer's first token; module docstring)."""
    positions = list(positions)
    if not positions:
        raise ValueError("positions is empty: a needle has at least one token")
    bad = [p for p in positions if not 0 <= p <= query]
    if bad:
        raise ValueError(f"needle positions {bad} must lie in 0 .. query={query} (before the answer)")
    visible = [p < sinks or query - p < window for p in positions]
    return "within" if all(visible) else "beyond" if not any(visible) else "straddle"


def accuracy(flags: Sequence[float]) -> Optional[float]:
    """Mean of ``flags``: the share of True in found / not found flags, the mean share of per-answer token shares
    (:func:`answer_token_shares`); None when there are none."""
    return sum(flags) / len(flags) if len(flags) else None


# ---------------------------------------------------------------------------- perplexity
def position_edges(length: int, window: int, sinks: int, bucket: int = 256) -> list[int]:
    """Edges of the predicting-position buckets of a ``length``-token sequence: the first sinks + window
    positions, then every ``bucket`` positions (the last bucket may be shorter), up to ``length - 1``."""
    if bucket < 1:
        raise ValueError(f"bucket={bucket!r} must be an int >= 1")
    span, last = sinks + window, length - 1
    edges = [0, min(span, last)] + list(range(span + bucket, last, bucket))
    if edges[-1] < last:
        edges.append(last)
    return edges


def repeat_mask(ids: Sequence[int], span: int, window: int, sinks: int) -> torch.Tensor:
    """bool ``[len(ids) - 1]``: entry p marks the prediction of token p + 1 when tokens ``p + 2 - span .. p + 1``
    repeat a span whose latest earlier occurrence lies wholly beyond the window of the query at p (none of its
    tokens is a sink or among the last ``window`` positions up to p)."""
    if span < 1:
        raise ValueError(f"span={span!r} must be an int >= 1")
    ids = [int(t) for t in ids]
    mask = torch.zeros(max(len(ids) - 1, 0), dtype=torch.bool)
    last: dict[tuple, int] = {}  # span -> position of its last token, latest occurrence so far
    for end in range(span - 1, len(ids)):
        key = tuple(ids[end - span + 1:end + 1])
        prev = last.get(key)
        if prev is not None and end >= 1:
            p = end - 1  # the query predicting ids[end]
            first = prev - span + 1
            mask[p] = first >= sinks and p - prev >= window
        last[key] = end
    return mask


@torch.no_grad()
def position_nll(model, mode: str, sequences: Sequence[Sequence[int]], progress: bool = False) -> torch.Tensor:
    """NLL of tokens 1..L-1 of each sequence given its prefix, in ``mode``: float64 ``[N, L - 1]`` (equal
    lengths L). One decoder pass per sequence; the LM head in chunks of :data:`LOGITS_CHUNK` positions."""
    _check_mode(model, mode)
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"sequences must share one length of at least 2 tokens, got lengths {sorted(lengths)}")
    base = model.base_model
    rows = []
    with model.attention_mode(mode):
        for s in tqdm(sequences, desc=f"{mode}: perplexity", disable=not progress, leave=False):
            x = torch.tensor([list(s)], device=model.device)
            hidden = base.model(input_ids=x, use_cache=False).last_hidden_state[0, :-1]  # [L-1, hidden]
            target = x[0, 1:]
            rows.append(torch.cat([F.cross_entropy(base.lm_head(hidden[i:i + LOGITS_CHUNK]).float(),
                                                   target[i:i + LOGITS_CHUNK], reduction="none")
                                   for i in range(0, hidden.shape[0], LOGITS_CHUNK)]).double().cpu())
    return torch.stack(rows)


def perplexity(nll: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[Optional[float], int]:
    """(exp of the mean NLL over the entries of ``mask`` (default: all), token count); None without tokens."""
    values = nll[mask] if mask is not None else nll.flatten()
    n = values.numel()
    return (math.exp(values.mean().item()) if n else None), n


# ---------------------------------------------------------------------------- cache bytes
@torch.no_grad()
def cache_bytes(base, config: AHNConfig, exclude: Sequence[str] = ()) -> int:
    """Bytes of one sequence's :class:`ahn.AHNCache` for ``base`` with ``config``, read off a real cache after
    sinks + buffer + window + 1 tokens (every slot allocated), leaving out the layer tensors named in ``exclude``
    (e.g. :data:`MEMORY_TENSORS`). ``base`` is not changed: the memory is attached and removed again."""
    model = add_memory(base, config)
    try:
        with model.attention_mode("ahn"):
            cache = model.new_cache()
            n = config.sinks + config.buffer_slots + config.window + 1
            model(torch.zeros(1, n, dtype=torch.long, device=model.device), **cache_kwargs(model, cache))
        total = 0
        for layer in cache.layers:
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor) and name not in exclude:
                    total += value.numel() * value.element_size()
        return total
    finally:
        model.remove_memory()


def equal_bytes_slots(base, config: AHNConfig) -> dict:
    """The priority-buffer slots (per layer and kv head) that a cache *without* a memory needs to hold as many
    bytes as ``config``'s cache (memory state, write gates and ``config.buffer_slots`` slots): the buffer alone
    at equal cache bytes. Returns ``{"slots", "reference_bytes", "buffer_bytes", "bytes_per_slot"}`` (the
    buffer-alone cache at ``slots`` holds ``buffer_bytes`` <= ``reference_bytes``, and one more slot would
    exceed it)."""
    reference = cache_bytes(base, config)
    plain = AHNConfig(**{**config.to_dict(), "buffer_slots": max(1, config.buffer_slots), "salience_writes": False,
                         "readout": "add"})
    at = cache_bytes(base, plain, exclude=MEMORY_TENSORS)
    per_slot = cache_bytes(base, AHNConfig(**{**plain.to_dict(), "buffer_slots": plain.buffer_slots + 1}),
                           exclude=MEMORY_TENSORS) - at
    assert per_slot > 0, per_slot
    slots = plain.buffer_slots + (reference - at) // per_slot
    return {"slots": int(slots), "reference_bytes": reference, "buffer_bytes": at + (slots - plain.buffer_slots) * per_slot,
            "bytes_per_slot": per_slot}


# ---------------------------------------------------------------------------- plots
def plot_needle_grid(path, grids: dict, depths: Sequence[float], lengths: Sequence[int], title: str) -> None:
    """One heatmap per mode (``grids[mode][i_depth][i_length]``: accuracy 0-1 or None) side by side in one PNG:
    needle depth (rows, percent of the haystack) against context length (columns)."""
    plt = pyplot()
    n = len(grids)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.2, 2.9 * rows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for k, (ax, (mode, grid)) in enumerate(zip(axes.flat, grids.items())):
        values = [[float("nan") if v is None else v for v in row] for row in grid]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(mode)
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        if k // cols == rows - 1 or k + cols >= n:
            ax.set_xlabel("context length (tokens)")
        if k % cols == 0:
            ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(path, title: str, panels) -> None:
    """Side-by-side line plots (``panels`` as :func:`ahn.plotting.line_panels`); None values are left out."""
    cleaned = []
    for xlabel, ylabel, series, log2_x in panels:
        kept = {}
        for label, (xs, ys) in series.items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            kept[label] = ([x for x, _ in points], [y for _, y in points])
        cleaned.append((xlabel, ylabel, kept, log2_x))
    line_panels(path, title, cleaned, figsize=(6 * len(panels), 4.2))

