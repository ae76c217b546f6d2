"""Perplexity by position: mean NLL inside the sinks + window span vs beyond it, per attention mode.

The text (``--data``: a ``.txt`` file, a ``.jsonl`` file of records with ``--text-field``, or
a Hub dataset id read with ``--split`` / ``--text-field``) is tokenized once and cut into
consecutive sequences of each ``--lengths`` value. Each sequence is scored in one forward
pass per mode; the NLL of the token at position ``p + 1`` (predicted by position ``p``) goes
to the bucket "inside" when ``p < sinks + window`` (the query still sees its whole context,
so all modes agree there) and "beyond" otherwise (where "window" drops context and "ahn"
reads it from memory). Per mode and length, ``OUT/<mode>/ppl_<length>.jsonl`` holds one line
per sequence (per-bucket NLL sums and token counts), so runs resume like the generation
benchmarks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ahn._jsonl import append_line, read_appended, read_jsonl
from ahn.benchmarks.evaluate import parse_token_counts, predictions_path

METRIC = "mean NLL (nats/token)"
DEFAULT_LENGTHS = (8192,)
# lm_head is applied to this many positions at a time (full-vocabulary logits of a long sequence do not fit).
LOGITS_CHUNK = 1024
BUCKETS = ("inside", "beyond")


def parse_lengths(value) -> list[int]:
    """``--lengths`` as token counts (default 8192); a sequence needs 2 tokens: one predicts the other."""
    return parse_token_counts(value, minimum=2) if value else list(DEFAULT_LENGTHS)


def read_text(data, text_field: str, split: str) -> str:
    """The evaluation text: a ``.txt`` file, the ``text_field`` of a ``.jsonl`` file's records, or of a Hub split."""
    if not data:
        raise ValueError("ahn eval perplexity needs --data: a .txt file, a .jsonl file with a "
                         f"{text_field!r} field, or a Hub dataset id")
    path = Path(data)
    if path.is_file() and path.suffix == ".jsonl":
        parts = []
        for line, record in read_jsonl(path):
            if not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}, line {line}: field {text_field!r} must be a string "
                                 f"(choose the field with --text-field)")
            parts.append(record[text_field])
        return "\n\n".join(parts)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from datasets import load_dataset  # optional dependency: slow to import (seconds), only a Hub dataset needs it

    rows = load_dataset(data, split=split)
    if text_field not in rows.column_names:
        raise ValueError(f"{data} ({split}) has no column {text_field!r}; columns: {rows.column_names}")
    return "\n\n".join(rows[text_field])


def token_nll(model, ids) -> torch.Tensor:
    """NLL of tokens 1..T-1 given their prefix, in the current attention mode: ``[T - 1]`` float32.

    ``ids``: ``[1, T]``. The decoder runs once; ``lm_head`` in chunks of ``LOGITS_CHUNK`` positions.
    """
    base = model.base_model
    with torch.no_grad():
        hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # [T-1, hidden]
        targets = ids[0, 1:]
        out = [F.cross_entropy(base.lm_head(hidden[i:i + LOGITS_CHUNK]).float(), targets[i:i + LOGITS_CHUNK],
                               reduction="none") for i in range(0, hidden.shape[0], LOGITS_CHUNK)]
    return torch.cat(out)


def run(model, tokenizer, args, modes, out: Path, lengths: list[int], shard=None,
        skip: Optional[dict] = None) -> tuple[dict, dict]:
    """Score every sequence in every mode; ({row: {mode: mean NLL}}, {row: {mode: tokens}}), rows per length x bucket.

    ``shard`` (an :class:`~ahn.benchmarks.evaluate.Shard`): score only its sequences, numbered over the
    lengths in order; ``skip[(f"ppl_{length}", mode)]``: ids done by another rank.
    """
    ids = tokenizer(read_text(args.data, args.text_field, args.split), add_special_tokens=False)["input_ids"]
    span = model.ahn_config.sinks + model.ahn_config.window
    plans = {}
    for length in lengths:
        n = len(ids) // length
        if n == 0:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than --lengths {length}; give a longer text")
        plans[length] = min(n, args.limit) if args.limit else n
    first = {L: sum(plans[x] for x in lengths[:i]) for i, L in enumerate(lengths)}  # sequence numbers over lengths
    skip = skip or {}
    done = {(L, m): read_appended(predictions_path(out, m, f"ppl_{L}")) for L in lengths for m in modes}
    finished = {(L, m): {r["id"] for r in done[L, m]} | skip.get((f"ppl_{L}", m), set()) for L in lengths for m in modes}
    todo = {(L, m): [k for k in range(plans[L]) if (shard is None or shard.owns(first[L] + k))
                     and str(k) not in finished[L, m]]
            for L in lengths for m in modes}
    pending = sum(len(v) for v in todo.values())
    bar = tqdm(total=pending, unit="seq", desc="ahn eval perplexity", dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    for L in lengths:
        for m in modes:
            path = predictions_path(out, m, f"ppl_{L}")
            path.parent.mkdir(parents=True, exist_ok=True)
            for k in todo[L, m]:
                x = torch.tensor([ids[k * L:(k + 1) * L]], device=model.device)
                t0 = time.perf_counter()
                with model.attention_mode(m):
                    nll = token_nll(model, x).double().cpu()
                seconds += time.perf_counter() - t0
                tokens += L
                inside, beyond = nll[:span], nll[span:]
                record = {"id": str(k), "nll_sum": {"inside": float(inside.sum()), "beyond": float(beyond.sum())},
                          "tokens": {"inside": int(inside.numel()), "beyond": int(beyond.numel())}}
                append_line(path, record)
                done[L, m].append(record)
                bar.update(1)
                bar.set_postfix_str(f"{L} {m} {tokens / max(seconds, 1e-9):.0f} tok/s")
    bar.close()
    scores, counts = {}, {}
    for L in lengths:
        for b in BUCKETS:
            row = f"{L} tokens, {'p < ' if b == 'inside' else 'p >= '}{span}"
            scores[row], counts[row] = {}, {}
            for m in modes:
                recs = [r for r in done[L, m] if int(r["id"]) < plans[L]]
                n_tok = sum(r["tokens"][b] for r in recs)
                scores[row][m] = round(sum(r["nll_sum"][b] for r in recs) / n_tok, 4) if n_tok else None
                counts[row][m] = n_tok
    return scores, counts
