"""Seeded synthetic long-context data: multi-query associative recall (and a passkey variant).

A sequence is a long context of random filler tokens with ``num_pairs`` key-value pairs
scattered through it, followed by a query section that asks for ``num_queries`` of the keys:

    BOS  f f f  k1 v1  f f ... f  k2 v2  f ...  QUERY  k2 v2  k1 v1 ...
         |------------------- context -------|  |---- query section ---|

In the query section each key is followed by its value; predicting that value needs the
token right after the key's occurrence in the context, however far back it lies. The ids
of filler, keys and values are disjoint ranges, so an answer can only come from its pair.
Keys are distinct within a sequence; values are drawn with replacement. With
``value_len > 1`` a value is several tokens (a "passkey"); :func:`passkey_task` is one pair,
asked once, deep in filler.

Everything is a pure function of a :class:`RecallTask` and a ``torch.Generator``: the same
seed gives the same tensors on every machine (only ``torch.rand``/``torch.randint`` on CPU).

Terms used in the returned tensors (``A = num_queries * value_len`` answers per sequence):

- answer position ``a``: the position of an answer token in the query section; the model
  predicts it from the logits at ``a - 1`` (the query position);
- source position ``s``: the position of the same token in the context;
- distance ``(a - 1) - s``: how far back the query must look. With a sliding window of W
  tokens (position t sees t-W+1 .. t) the source is inside the window iff distance < W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .losses import IGNORE_INDEX  # the label transformers' causal-LM loss ignores

BOS = 0  # first token of every sequence (attention sinks see it)
QUERY = 1  # separates the context from the query section
NUM_SPECIAL = 2


@dataclass(frozen=True)
class RecallTask:
    """Sizes of a multi-query associative recall task.

    Args:
        seq_len: tokens per sequence (BOS + context + QUERY + query section).
        num_pairs: key-value pairs hidden in the context.
        num_queries: keys asked in the query section (``None``: all pairs), <= num_pairs.
        num_keys / num_values / num_filler: sizes of the three disjoint token-id ranges.
        value_len: tokens per value (1 for recall; several for a passkey).
        prefix_len: leading tokens (BOS + filler) that never hold a pair. Keep it >= the
            number of attention sinks you evaluate with, or the sinks would see pairs.
    """

    seq_len: int = 256
    num_pairs: int = 16
    num_queries: Optional[int] = None
    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 64
    value_len: int = 1
    prefix_len: int = 4

    def __post_init__(self):
        for name, lo in (("seq_len", 2), ("num_pairs", 1), ("num_keys", 1), ("num_values", 1),
                         ("num_filler", 1), ("value_len", 1), ("prefix_len", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{name}={value!r} must be an int >= {lo}")
        q = self.num_queries
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= self.num_pairs):
            raise ValueError(f"num_queries={q!r} must be None or an int in 1 .. num_pairs={self.num_pairs}")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} needs as many distinct keys, but num_keys={self.num_keys}: "
                "raise num_keys or lower num_pairs"
            )
        if self.context_len < self.num_pairs * self.pair_len:
            raise ValueError(
                f"seq_len={self.seq_len} leaves {self.context_len} context tokens after the prefix and the query "
                f"section, fewer than the {self.num_pairs * self.pair_len} that {self.num_pairs} pairs need: "
                f"raise seq_len to at least {self.seq_len - self.context_len + self.num_pairs * self.pair_len}"
            )

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def pair_len(self) -> int:
        return 1 + self.value_len

    @property
    def query_start(self) -> int:
        """Position of the QUERY token; the query section follows it."""
        return self.seq_len - self.queries * self.pair_len - 1

    @property
    def context_len(self) -> int:
        """Tokens between the prefix and the QUERY token, where pairs may sit."""
        return self.query_start - self.prefix_len

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.num_filler + self.num_keys + self.num_values

    @property
    def first_key(self) -> int:
        return NUM_SPECIAL + self.num_filler

    @property
    def first_value(self) -> int:
        return self.first_key + self.num_keys


def passkey_task(seq_len: int = 256, value_len: int = 5, **sizes) -> RecallTask:
    """A needle in a haystack: one key with a ``value_len``-token value, asked once at the end."""
    return RecallTask(seq_len=seq_len, num_pairs=1, num_queries=1, value_len=value_len, **sizes)


def sample_recall(task: RecallTask, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw ``batch_size`` sequences of ``task``.

    Returns (B = batch_size, T = task.seq_len, A = task.queries * task.value_len):
        input_ids [B, T] long
        labels [B, T] long: the answer tokens at their positions, ``IGNORE_INDEX`` elsewhere
            (transformers shifts them: logits at a - 1 predict labels at a)
        answer_mask [B, T] bool: True at answer positions
        answer_positions [B, A] long, ascending per row
        source_positions [B, A] long: where each answer token sits in the context
        distance [B, A] long: ``answer_positions - 1 - source_positions``
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got {generator!r}")
    B, T, N, Q, L, P = batch_size, task.seq_len, task.num_pairs, task.queries, task.value_len, task.pair_len
    g = generator

    ids = torch.randint(NUM_SPECIAL, NUM_SPECIAL + task.num_filler, (B, T), generator=g)
    ids[:, 0] = BOS
    # Pair starts: N distinct sorted slots among context_len - N * (P - 1), spread by P - 1 per
    # earlier pair, so that pairs never overlap and every placement is equally likely.
    slots = torch.rand(B, task.context_len - N * (P - 1), generator=g).argsort(dim=1)[:, :N].sort(dim=1).values
    starts = task.prefix_len + slots + torch.arange(N) * (P - 1)  # [B, N]
    keys = task.first_key + torch.rand(B, task.num_keys, generator=g).argsort(dim=1)[:, :N]  # [B, N], distinct
    values = torch.randint(task.first_value, task.first_value + task.num_values, (B, N, L), generator=g)
    pair_tokens = torch.cat([keys.unsqueeze(-1), values], dim=-1)  # [B, N, P]
    offsets = torch.arange(P)
    ids.scatter_(1, (starts.unsqueeze(-1) + offsets).view(B, N * P), pair_tokens.view(B, N * P))

    asked = torch.rand(B, N, generator=g).argsort(dim=1)[:, :Q]  # [B, Q]: which pairs, in asking order
    ids[:, task.query_start] = QUERY
    query_tokens = pair_tokens.gather(1, asked.unsqueeze(-1).expand(B, Q, P))  # [B, Q, P]
    ids[:, task.query_start + 1:] = query_tokens.reshape(B, Q * P)

    # Answer tokens are the value tokens of each query: offsets 1 .. L within its block.
    block = task.query_start + 1 + torch.arange(Q).view(Q, 1) * P  # [Q, 1]
    answer_positions = (block + offsets[1:]).view(1, Q * L).expand(B, Q * L)
    source_positions = (starts.gather(1, asked).unsqueeze(-1) + offsets[1:]).view(B, Q * L)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels.scatter_(1, answer_positions, ids.gather(1, answer_positions))
    answer_mask = labels != IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "answer_mask": answer_mask,
        "answer_positions": answer_positions.contiguous(),
        "source_positions": source_positions,
        "distance": answer_positions - 1 - source_positions,
    }


def recall_records(task: RecallTask, num_examples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``num_examples`` sequences as per-example records (the tensors of :func:`sample_recall`
    without the batch dimension), e.g. a training set for a trainer or ``datasets.Dataset.from_list``.
    """
    batch = sample_recall(task, num_examples, torch.Generator().manual_seed(seed))
    return [{name: t[i] for name, t in batch.items()} for i in range(num_examples)]
