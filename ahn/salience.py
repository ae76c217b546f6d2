"""Salience at eviction: the scorer, salience-gated writes and what a forward records for training.

Options of :class:`ahn.AHNConfig` (all off by default: the paper's mechanism, unchanged). They are
optional parts of the one attention pipeline (:mod:`ahn.attention`): the scorer and the gated writes
live here, the buffer's storage and its one-token rule in the cache (:mod:`ahn.cache`), the block
rule and the read-out policy in the attention.

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
  priority if it ranks above it (:meth:`ahn.cache.AHNCacheLayer.offer_to_buffer`), which is the same top-M rule; parallel
  forward, chunked prefill and token-by-token decode compute the same buffer (tested).
* **The deferring read-out** (``readout="defer"``; ``"add"`` is the paper's): the memory is one more entry in the
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

from ahn.memory.base import linear  # normal(INIT_STD) weights, zero bias


class SalienceScorer(nn.Module):
    """Per-kv-head salience of a token at eviction: ``proj(x) + mass_weight * log1p(mass)``, or ``proj(x)`` alone
    with ``mass=False`` (``AHNConfig.salience_mass``): then the score is known when the token enters, and attention
    needs no explicit softmax for it."""

    def __init__(self, hidden_size: int, num_kv_heads: int, mass: bool = True):
        super().__init__()
        self.proj = linear(hidden_size, num_kv_heads, bias=True)
        self.mass_weight = nn.Parameter(torch.zeros(num_kv_heads)) if mass else None

    @property
    def uses_mass(self) -> bool:
        return self.mass_weight is not None

    def token_part(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the score known when the token enters: ``x [B, T, hidden]`` -> ``[B, Hkv, T]`` float32."""
        return self.proj(x).float().transpose(1, 2)

    def score(self, token_part: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Scores at eviction: ``token_part, mass [B, Hkv, n]`` -> ``[B, Hkv, n]``."""
        if self.mass_weight is None:
            return token_part
        return token_part + self.mass_weight.float().view(-1, 1) * torch.log1p(mass)


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


def gate_writes(gates: torch.Tensor, scores: torch.Tensor, strength: tuple[int, ...]) -> torch.Tensor:
    """Salience-gated writes: ``gates [B, T, Hq, G]`` with the ``strength`` channels times sigmoid(``scores [B, Hkv, T]``)."""
    B, T, Hq, G = gates.shape
    Hkv = scores.shape[1]
    factor = torch.sigmoid(scores).transpose(1, 2)[..., None, None]  # [B, T, Hkv, 1, 1]
    factor = factor.expand(B, T, Hkv, Hq // Hkv, 1).reshape(B, T, Hq, 1)  # each kv head's query heads
    return gates * torch.where(_channels(strength, G, gates.device), factor, 1.0)


@functools.lru_cache(maxsize=64)
def _channels(strength: tuple[int, ...], channels: int, device: torch.device) -> torch.Tensor:
    """``[channels]`` bool, True on the ``strength`` channels (built once per rule and device: a decoding step
    gates one token per layer, where building it would cost as much as the product)."""
    return torch.tensor([c in strength for c in range(channels)], device=device)


def gate_one(gates: torch.Tensor, score: torch.Tensor, strength: tuple[int, ...]) -> torch.Tensor:
    """:func:`gate_writes` of one token: ``gates [B, Hq, G]``, ``score [B, Hkv, 1]``."""
    return gate_writes(gates.unsqueeze(1), score, strength).squeeze(1)
