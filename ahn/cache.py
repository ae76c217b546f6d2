"""`AHNCache`: a bounded KV cache (sinks + priority buffer + sliding window) plus the memory state, per layer.

The cache owns the slot geometry, and nothing else writes its tensors. Per layer one tensor
``[B, Hkv, S + M + C, D]`` holds the sinks in its first S entries, the priority buffer's M entries
next (``AHNConfig.buffer_slots``; 0 without one) and a ring of the window in the remaining C
entries (C grows geometrically up to W, then the ring wraps): slot j of the sequence lives at ring
index ``j % W``. The attention (:mod:`ahn.attention`) asks the cache what it needs in the words of
the mechanism, never in ring indices:

* :meth:`AHNCacheLayer.context`: the cached window a prefill chunk attends to;
* :meth:`AHNCacheLayer.leaving` / :meth:`AHNCacheLayer.leaving_one`: the entries that leave the window
  while new tokens arrive (the memory's writes; read before the new tokens overwrite them);
* :meth:`AHNCacheLayer.evicted_salience` and :meth:`AHNCacheLayer.offer_to_buffer`: the salience of the
  token leaving the window at a decode step and the buffer rule for it;
* :meth:`AHNCacheLayer.decode_view`: every entry one decoding query sees, in place, with its mask;
* :meth:`AHNCacheLayer.append` / :meth:`AHNCacheLayer.append_one`: store new tokens (sinks included).

A decode step writes one ring entry and reads the tensors in place: it costs O(S + M + W) and
copies nothing of size W. ``get_seq_length()`` counts every token seen (RoPE positions stay correct
after eviction); ``kv_length`` is the number of KV entries held per layer (never above S + M + W).

``cache.save(path)`` writes the cache to a file and ``AHNCache.load(path, model)`` reads it back
into the model it belongs to: reading a text once and continuing from it later computes exactly
what one continuous read computes. The file's fields are :meth:`AHNCacheLayer.state_fields` (an
explicit, versioned schema: renaming an attribute here does not change the format); the file
format, its integrity check and the model's fingerprint are :mod:`ahn.state`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ahn import state as state_file


@dataclass
class Buffer:
    """The priority buffer of one layer: ``k, v [B, Hkv, M, D]``, ``slot [B, Hkv, M]`` (-1: empty),
    ``score [B, Hkv, M]`` (float32, -inf where empty). Entries rank by (score, slot): the higher score
    first, a tie to the newer token; an empty entry ranks below every token."""

    k: torch.Tensor
    v: torch.Tensor
    slot: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, like_k: torch.Tensor, like_v: torch.Tensor, slots: int) -> "Buffer":
        B, H, _, D = like_k.shape
        return cls(like_k.new_zeros(B, H, slots, D), like_v.new_zeros(B, H, slots, like_v.shape[-1]),
                   *cls.empty_entries(B, H, slots, like_k.device))

    @staticmethod
    def empty_entries(batch: int, heads: int, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot, score)`` of a buffer with no entry: slot -1 and score -inf, which sort below every token."""
        return (torch.full((batch, heads, slots), -1, dtype=torch.long, device=device),
                torch.full((batch, heads, slots), float("-inf"), dtype=torch.float32, device=device))

    @property
    def slots(self) -> int:
        return self.slot.shape[-1]


class Leaving(NamedTuple):
    """The token leaving the window at a decode step: its cached ``k, v [B, Hkv, D]`` and write gates ``[B, Hq, G]``
    (views into the ring: use them before the new token is appended), and ``mask [B]`` (rows where it is a real,
    non-sink token) or None when it is one in every row."""

    k: torch.Tensor
    v: torch.Tensor
    gates: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


class DecodeView(NamedTuple):
    """Every entry one decoding query attends to, in place: ``keys, values [B, Hkv, N, D]`` with entries
    ``0 .. sinks-1`` the sinks, ``sinks .. ring_start-1`` the priority buffer and ``ring_start ..`` the window's
    ring; ``mask [B, 1 or Hkv, N]`` bool (True: visible), or None when every entry is visible."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: Optional[torch.Tensor]
    sinks: int
    ring_start: int


class AHNCacheLayer(CacheLayerMixin):
    """One decoder layer's sinks, priority buffer, window ring (KV, the memory's write gates and the salience of
    each window token) and memory state."""

    is_sliding = True

    def __init__(self, window: int, sinks: int, buffer_slots: int = 0):
        super().__init__()
        self.window, self.sinks, self.buffer_slots = window, sinks, buffer_slots
        self.ring_start = sinks + buffer_slots  # index of ring entry 0 in keys / values
        self.seen = 0
        self.gates: Optional[torch.Tensor] = None  # [B, C, Hq, G] write gates of the ring's tokens
        self.memory_state: Optional[torch.Tensor] = None  # [B, Hq, K, V]
        # Salience (ahn.salience): per ring entry the scorer's token part and the window attention received,
        # [B, Hkv, C] float32 each; the buffer's slots [B, Hkv, M] (-1: empty) and scores (-inf: empty).
        self.salience_token: Optional[torch.Tensor] = None
        self.salience_mass: Optional[torch.Tensor] = None
        self.buffer_slot: Optional[torch.Tensor] = None
        self.buffer_score: Optional[torch.Tensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, gates=None,
                            salience: bool = False) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, self.ring_start, D)
        self.values = value_states.new_zeros(B, H, self.ring_start, value_states.shape[-1])
        if gates is not None:
            self.gates = gates.new_zeros(B, 0, *gates.shape[2:])
        if salience:
            self.salience_token = torch.zeros(B, H, 0, device=self.device)
            self.salience_mass = torch.zeros(B, H, 0, device=self.device)
        if self.buffer_slots:
            self.buffer_slot, self.buffer_score = Buffer.empty_entries(B, H, self.buffer_slots, self.device)
        self.is_initialized = True

    # --------------------------------------------------------------------- geometry
    @property
    def sink_k(self) -> torch.Tensor:
        return self.keys[:, :, : self.sinks]

    @property
    def sink_v(self) -> torch.Tensor:
        return self.values[:, :, : self.sinks]

    @property
    def capacity(self) -> int:
        """C: ring entries allocated (grows up to W)."""
        return self.keys.shape[2] - self.ring_start

    def first_cached(self, start: int) -> int:
        """The first slot still in the window when the token at slot ``start`` arrives."""
        return max(0, start - self.window)

    def _ring(self, lo: int, hi: int) -> torch.Tensor:
        """Ring indices (into the ring's C entries) of window slots [lo, hi), all still cached."""
        assert self.seen - self.window <= lo <= hi <= self.seen, (lo, hi, self.seen)
        return torch.arange(lo, hi, device=self.device) % self.window

    def sink_ends(self, pad_offsets: torch.Tensor) -> tuple[int, int]:
        """Min and max over rows of P_r + S (each row's first slot after its sinks), computed once per batch."""
        if getattr(self, "_sink_end_for", None) is not pad_offsets:
            self._sink_end_for = pad_offsets
            self._sink_ends = (int(pad_offsets.min()) + self.sinks, int(pad_offsets.max()) + self.sinks)
        return self._sink_ends

    # --------------------------------------------------------------------- reads
    def context(self, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The cached window that new tokens from slot ``start`` attend to: ``k, v [B, Hkv, L, D]`` of slots
        ``lo .. start-1`` and ``lo`` (the first of them)."""
        lo = self.first_cached(start)
        idx = self.ring_start + self._ring(lo, start)
        return self.keys.index_select(2, idx), self.values.index_select(2, idx), lo

    def salience_context(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scorer's token part and the attention received of the slots of :meth:`context`: ``[B, Hkv, L]`` each."""
        idx = self._ring(self.first_cached(start), start)
        return self.salience_token.index_select(2, idx), self.salience_mass.index_select(2, idx)

    def leaving(self, start: int, T: int):
        """The cached entries that leave the window while the T tokens from slot ``start`` arrive (their memory
        writes), time-major: ``k, v [B, n, Hkv, D]``, ``gates [B, n, Hq, G]`` or None. Read them before
        :meth:`append` overwrites them."""
        lo = self.first_cached(start)
        hi = max(lo, min(start, start + T - self.window))
        idx = self._ring(lo, hi)
        k = self.keys.index_select(2, self.ring_start + idx).transpose(1, 2)
        v = self.values.index_select(2, self.ring_start + idx).transpose(1, 2)
        g = self.gates.index_select(1, idx) if self.gates is not None else None
        return k, v, g

    def leaving_one(self, t: int, pad_offsets: torch.Tensor) -> Optional[Leaving]:
        """The token that leaves the window when slot ``t`` arrives (slot t - W), or None when no row has a real,
        non-sink token there."""
        e = t - self.window
        first, last = self.sink_ends(pad_offsets)  # rows write slot e iff e >= P_r + S
        if e < first:
            return None
        assert self.gates is not None
        i = self.ring_start + e % self.window
        mask = None if e >= last else e >= pad_offsets + self.sinks  # [B]
        return Leaving(self.keys[:, :, i], self.values[:, :, i], self.gates[:, e % self.window], mask)

    def evicted_salience(self, t: int, pad_offsets: torch.Tensor):
        """The salience parts of the token leaving the window when slot ``t`` arrives: ``(token_part, mass
        [B, Hkv, 1], valid [B, 1, 1])`` (``valid``: a real, non-sink token in that row; None when it is one in
        every row, the steady state), or None before slot W."""
        e = t - self.window
        if e < 0:
            return None
        i = e % self.window
        valid = None if e >= self.sink_ends(pad_offsets)[1] else (e >= pad_offsets + self.sinks).view(-1, 1, 1)
        return self.salience_token[:, :, i: i + 1], self.salience_mass[:, :, i: i + 1], valid

    @property
    def buffer(self) -> Optional[Buffer]:
        """The priority buffer (k / v are views into the cache), or None."""
        if not self.buffer_slots:
            return None
        region = slice(self.sinks, self.ring_start)
        return Buffer(self.keys[:, :, region], self.values[:, :, region], self.buffer_slot, self.buffer_score)

    def decode_view(self, t: int, pad_offsets: torch.Tensor) -> DecodeView:
        """What the query at slot ``t`` (already appended) attends to: sinks, buffer entries that hold a token,
        and the ring entries of its window that hold real, non-sink tokens."""
        if t - self.window + 1 >= self.sink_ends(pad_offsets)[1] + self.buffer_slots and self.capacity == self.window:
            # Every sink is filled, every ring entry holds a real, non-sink token of the window, and every row has
            # evicted at least M real tokens (slots P_r + S .. t - W), so every buffer entry holds one (empty
            # entries rank lowest and are the first replaced): the steady state of a long decode, nothing to mask.
            return DecodeView(self.keys, self.values, None, self.sinks, self.ring_start)
        dev = self.device
        P = pad_offsets.view(-1, 1)  # [B, 1]
        sink_visible = P + torch.arange(self.sinks, device=dev).view(1, -1) <= t  # [B, S]
        i = torch.arange(self.capacity, device=dev)
        slot = t - torch.remainder(t - i, self.window)  # slot held by ring index i (negative: never written)
        ring_visible = (slot >= 0).view(1, -1) & (slot.view(1, -1) >= P + self.sinks)  # [B, C]
        if not self.buffer_slots:
            mask = torch.cat([sink_visible, ring_visible], dim=1).unsqueeze(1)  # [B, 1, N]
        else:
            H = self.keys.shape[1]
            mask = torch.cat([sink_visible.unsqueeze(1).expand(-1, H, -1), self.buffer_slot >= 0,
                              ring_visible.unsqueeze(1).expand(-1, H, -1)], dim=2)  # [B, Hkv, N]
        return DecodeView(self.keys, self.values, mask, self.sinks, self.ring_start)

    # --------------------------------------------------------------------- writes
    def _grow(self, needed: int) -> None:
        """Grow the ring to hold ``needed`` (<= W) entries; before the first wrap slot j sits at index j."""
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = min(self.window, max(needed, 2 * cap))
        pad = new_cap - cap
        self.keys = F.pad(self.keys, (0, 0, 0, pad))
        self.values = F.pad(self.values, (0, 0, 0, pad))
        if self.gates is not None:
            self.gates = F.pad(self.gates, (0, 0, 0, 0, 0, pad))
        if self.salience_token is not None:
            self.salience_token = F.pad(self.salience_token, (0, pad))
            self.salience_mass = F.pad(self.salience_mass, (0, pad))

    def write_sinks(self, k: torch.Tensor, v: torch.Tensor, pad_offsets: torch.Tensor, start: int) -> None:
        """Copy the new tokens that are sinks of their row (slots P_r .. P_r+S-1) into the sink entries; before the
        new tokens attend (they see the sinks among them)."""
        T = k.shape[2]
        if self.sinks == 0 or start >= self.sink_ends(pad_offsets)[1]:
            return
        idx = start + torch.arange(T, device=k.device).view(1, T) - pad_offsets.view(-1, 1)  # [B, T] sink index
        b, t = ((idx >= 0) & (idx < self.sinks)).nonzero(as_tuple=True)
        self.keys[b, :, idx[b, t]] = k[b, :, t]
        self.values[b, :, idx[b, t]] = v[b, :, t]

    def append(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], start: int,
               token_part: Optional[torch.Tensor] = None, mass: Optional[torch.Tensor] = None,
               mass_start: int = 0) -> None:
        """Store new slots start .. start+T-1 (the last min(T, W) of them) in the ring. ``token_part [B, Hkv, T]``:
        their salience token part; ``mass [B, Hkv, n]``: the window attention received by slots ``mass_start ..``
        (the cached window and the new tokens), kept for those still in the window."""
        assert start == self.seen, f"cache holds {self.seen} tokens but the new ones start at slot {start}"
        T = k.shape[2]
        self._grow(min(self.window, start + T))
        m = min(T, self.window)
        idx = torch.arange(start + T - m, start + T, device=self.device) % self.window
        self.keys.index_copy_(2, self.ring_start + idx, k[:, :, T - m:])
        self.values.index_copy_(2, self.ring_start + idx, v[:, :, T - m:])
        if self.gates is not None and gates is not None:
            self.gates.index_copy_(1, idx, gates[:, T - m:].to(self.gates.dtype))
        if self.salience_token is not None:
            self.salience_token.index_copy_(2, idx, token_part[:, :, T - m:])
            self.salience_mass.index_fill_(2, idx, 0.0)
        self.seen = start + T
        if mass is not None:
            first = max(mass_start, self.seen - self.window)
            kept = torch.arange(first, mass_start + mass.shape[2], device=self.device) % self.window
            self.salience_mass.index_copy_(2, kept, mass[:, :, first - mass_start:])

    def append_one(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], t: int,
                   token_part: Optional[torch.Tensor] = None) -> None:
        """:meth:`append` of one token (slot t), with direct writes into its ring entry (the decode hot path)."""
        assert t == self.seen, f"cache holds {self.seen} tokens but the new one is slot {t}"
        self._grow(min(self.window, t + 1))
        i = t % self.window
        self.keys[:, :, self.ring_start + i] = k[:, :, 0]
        self.values[:, :, self.ring_start + i] = v[:, :, 0]
        if self.gates is not None and gates is not None:
            self.gates[:, i] = gates
        if self.salience_token is not None:
            self.salience_token[:, :, i] = token_part[:, :, 0]
            self.salience_mass[:, :, i] = 0.0
        self.seen = t + 1

    def add_received(self, received: torch.Tensor) -> None:
        """A decoding query's attention on the ring entries (``[B, Hkv, C]``, the window's own softmax) adds to
        each entry's received mass."""
        self.salience_mass += received

    def set_memory_state(self, state: Optional[torch.Tensor]) -> None:
        self.memory_state = state

    def store_buffer(self, buffer: Buffer) -> None:
        """Store the buffer after a prefill chunk (its k / v were gathered into new tensors)."""
        self.keys[:, :, self.sinks: self.ring_start] = buffer.k
        self.values[:, :, self.sinks: self.ring_start] = buffer.v
        self.buffer_slot, self.buffer_score = buffer.slot, buffer.score

    def offer_to_buffer(self, t: int, score: torch.Tensor, valid: torch.Tensor) -> None:
        """The buffer rule for the token leaving the window when slot ``t`` arrives (before it is overwritten):
        it replaces the entry of lowest priority (score, then slot; empty entries lowest) when it ranks above it,
        which keeps the buffer the top M of the evicted tokens, as a prefill block does. ``score [B, Hkv, 1]``,
        ``valid [B, 1, 1]`` (rows where it is a real, non-sink token; None: every row). On CPU the same rule runs on the host
        (:meth:`_offer_on_host`: a few list reads instead of ~20 tensor operations per layer and token)."""
        e = t - self.window
        i = self.ring_start + e % self.window
        if self.keys.device.type == "cpu":
            self._offer_on_host(e, i, score, valid)
        else:
            self._offer_with_tensors(e, i, score, valid)

    def _offer_with_tensors(self, e: int, i: int, score: torch.Tensor, valid: torch.Tensor) -> None:
        """:meth:`offer_to_buffer` in tensor operations (no host sync): evicted slot ``e`` at ring index ``i``."""
        ek, ev = self.keys[:, :, i: i + 1], self.values[:, :, i: i + 1]  # [B, Hkv, 1, D]
        eslot = e if valid is None else torch.where(valid, e, -1)  # [B, 1, 1]
        slot, low_score = self.buffer_slot, self.buffer_score.amin(dim=-1, keepdim=True)  # [B, Hkv, M], [B, Hkv, 1]
        oldest = torch.where(self.buffer_score == low_score, slot, torch.iinfo(slot.dtype).max).argmin(-1, keepdim=True)
        low_slot = slot.gather(-1, oldest)
        replace = (eslot >= 0) & ((score > low_score) | ((score == low_score) & (eslot > low_slot)))  # [B, Hkv, 1]
        at = replace & (torch.arange(self.buffer_slots, device=slot.device) == oldest)  # [B, Hkv, M]
        region = slice(self.sinks, self.ring_start)
        self.keys[:, :, region] = torch.where(at.unsqueeze(-1), ek, self.keys[:, :, region])
        self.values[:, :, region] = torch.where(at.unsqueeze(-1), ev, self.values[:, :, region])
        self.buffer_slot = torch.where(at, eslot, slot)
        self.buffer_score = torch.where(at, score, self.buffer_score)

    def _offer_on_host(self, e: int, i: int, score: torch.Tensor, valid: torch.Tensor) -> None:
        """:meth:`offer_to_buffer` on the host, for CPU tensors (reading them costs no device sync): per row and kv
        head, the entry of lowest (score, slot) is found in Python lists and replaced in place when the evicted token
        ranks above it. The same decisions as :meth:`_offer_with_tensors` (first of equal entries, as ``argmin``)."""
        B, H, M = self.buffer_slot.shape
        new_scores, ok = score.reshape(B, H).tolist(), [True] * B if valid is None else valid.reshape(B).tolist()
        scores, slots = self.buffer_score.tolist(), self.buffer_slot.tolist()
        copied = False  # slot and score are replaced, not written in place, as the tensor path does
        for b in range(B):
            if not ok[b]:
                continue
            for h in range(H):
                row_score, row_slot = scores[b][h], slots[b][h]
                j = min(range(M), key=lambda m: (row_score[m], row_slot[m]))
                s = new_scores[b][h]
                if s > row_score[j] or (s == row_score[j] and e > row_slot[j]):
                    if not copied:
                        self.buffer_slot, self.buffer_score, copied = self.buffer_slot.clone(), self.buffer_score.clone(), True
                    self.keys[b, h, self.sinks + j] = self.keys[b, h, i]
                    self.values[b, h, self.sinks + j] = self.values[b, h, i]
                    self.buffer_slot[b, h, j] = e
                    self.buffer_score[b, h, j] = score[b, h, 0]

    # ------------------------------------------------------------- saved states
    def state_fields(self) -> dict[str, Optional[torch.Tensor]]:
        """The layer as the saved-state schema names it (:data:`ahn.state.LAYER_FIELDS`): tensors, or None where the
        layer holds none (no memory on this layer, no salience, no buffer, nothing read yet)."""
        if not self.is_initialized:
            return {name: None for name in state_file.LAYER_FIELDS} | {"seen": torch.tensor(0)}
        return {
            "keys": self.keys, "values": self.values, "gates": self.gates, "memory_state": self.memory_state,
            "salience_token": self.salience_token, "salience_mass": self.salience_mass,
            "buffer_slot": self.buffer_slot, "buffer_score": self.buffer_score,
            "seen": torch.tensor(self.seen, dtype=torch.int64),
        }

    def load_state_fields(self, fields: dict[str, Optional[torch.Tensor]], device) -> None:
        """Restore what :meth:`state_fields` gave (checked by :meth:`AHNCache.load` first)."""
        self.seen = int(fields["seen"])
        if fields["keys"] is None:
            return

        def move(x):
            # A fresh allocation: a tensor read from a file may sit at any 8-byte offset, and CPU kernels vectorise
            # (and so round) differently on a misaligned buffer; bit-exact continuation needs the usual alignment.
            return None if x is None else x.to(device=device, copy=True)

        self.keys, self.values = move(fields["keys"]), move(fields["values"])
        self.dtype, self.device = self.keys.dtype, self.keys.device
        self.gates, self.memory_state = move(fields["gates"]), move(fields["memory_state"])
        self.salience_token, self.salience_mass = move(fields["salience_token"]), move(fields["salience_mass"])
        self.buffer_slot, self.buffer_score = move(fields["buffer_slot"]), move(fields["buffer_score"])
        self.is_initialized = True

    # ------------------------------------------------------------- Cache interface
    def update(self, key_states, value_states, *args, **kwargs):
        """The family's attention calls this before attending: hand the new tokens back unchanged.

        ahn's attention function (:func:`ahn.attention.ahn_attention`) stores them: it first reads the
        window entries that the new tokens evict into the memory, which must happen before
        they are overwritten.
        """
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.kv_length + query_length, 0)

    @property
    def kv_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    _BATCHED = ("keys", "values", "gates", "memory_state", "salience_token", "salience_mass", "buffer_slot",
                "buffer_score")

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (getattr(self, name, None) for name in self._BATCHED) if x is not None]

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._BATCHED:
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices])

    def reset(self) -> None:
        self.__init__(self.window, self.sinks, self.buffer_slots)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AHNCache cannot be cropped: evicted tokens are already folded into the memory")


class AHNCache(Cache):
    """Bounded cache of an :class:`ahn.AHNModel`: per layer sinks + priority buffer + window KV and the memory state.

    Args:
        num_layers: decoder layers of the model.
        window, sinks: W and S (at most S + M + W KV entries per layer).
        mode: ``"window"`` or ``"ahn"``; a cache is filled in one mode only.
        buffer_slots: priority-buffer slots M per layer (``AHNModel.new_cache`` sets them from the
            config); None: none.
        model: the :class:`ahn.AHNModel` that fills it (``AHNModel.new_cache`` sets it; held by a weak
            reference), which :meth:`save` fingerprints.
    """

    def __init__(self, num_layers: int, window: int, sinks: int, mode: str = "ahn", buffer_slots=None, model=None):
        buffer_slots = tuple(buffer_slots) if buffer_slots is not None else (0,) * num_layers
        if len(buffer_slots) != num_layers:
            raise ValueError(f"buffer_slots={buffer_slots!r} must give one slot count per layer ({num_layers})")
        super().__init__(layers=[AHNCacheLayer(window, sinks, m) for m in buffer_slots])
        self.window, self.sinks, self.mode, self.buffer_slots = window, sinks, mode, buffer_slots
        self.pad_offsets: Optional[torch.Tensor] = None  # [B], set by the first forward
        self._model = weakref.ref(model) if model is not None else None

    def save(self, path, model=None) -> None:
        """Write this cache to ``path`` (safetensors, atomically; :mod:`ahn.state`) with the fingerprint of the
        model that filled it (the one whose ``new_cache()`` made it). ``model``: that model, for a cache that does
        not know it; another model is refused. The file's size does not grow with the tokens read."""
        known = self._model() if self._model is not None else None
        if model is None:
            model = known
            if model is None:
                raise ValueError("this cache does not know its model (it was not made by model.new_cache(), or the "
                                 "model is gone): call cache.save(path, model)")
        elif known is not None and model is not known:
            raise ValueError("cache.save(path, model=...): this cache was filled by another model (the one whose "
                             "new_cache() made it); a state saved under this model's fingerprint would continue a "
                             "read it never did. Call cache.save(path) to save it with its own model")
        if len(self.layers) != model.base_model.config.num_hidden_layers:
            raise ValueError(f"this cache has {len(self.layers)} layers but the model has "
                             f"{model.base_model.config.num_hidden_layers}: it was filled by another model")
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors |= {f"layers.{i}.{name}": x for name, x in layer.state_fields().items() if x is not None}
        if self.pad_offsets is not None:
            tensors["pad_offsets"] = self.pad_offsets
        header = {"window": self.window, "sinks": self.sinks, "mode": self.mode,
                  "buffer_slots": list(self.buffer_slots), "layers": len(self.layers)}
        state_file.write_state(path, tensors, header, state_file.fingerprint(model))

    @classmethod
    def load(cls, path, model) -> "AHNCache":
        """The cache saved at ``path``, on ``model``'s device. ValueError naming the file when it was saved with
        another base model, memory weights, AHN config or attention mode (naming what differs), or is damaged: a
        failed integrity check, or contents that do not fit the model (shapes, dtypes, positions)."""
        path = Path(path)
        meta, tensors = state_file.read_state(path)
        state_file.check_fingerprint(path, meta, model)
        header = meta["cache"]
        geometry = model.cache_geometry()
        if header["layers"] != len(geometry):
            raise ValueError(f"{path} holds {header['layers']} layers but the model has {len(geometry)}; the file is "
                             "damaged")
        cache = model.new_cache(header["window"], header["sinks"])
        if tuple(header["buffer_slots"]) != cache.buffer_slots:
            raise ValueError(f"{path} holds buffer slots {header['buffer_slots']} per layer but the model's "
                             f"configuration gives {list(cache.buffer_slots)}; the file is damaged")
        device = next(model.base_model.parameters()).device
        pads = tensors.get("pad_offsets")
        fields = [{name: tensors.get(f"layers.{i}.{name}") for name in (*state_file.LAYER_FIELDS, "seen")}
                  for i in range(len(geometry))]
        _check_fields(path, fields, pads, geometry, cache)
        for layer, f in zip(cache.layers, fields):
            layer.load_state_fields(f, device)
        if pads is not None:
            cache.pad_offsets = pads.to(device=device, copy=True)
        return cache

    def check_call(self, window: int, sinks: int, mode: str, batch: int, buffer_slots=None) -> None:
        """Refuse a forward that does not match what this cache holds."""
        buffer_slots = tuple(buffer_slots) if buffer_slots is not None else (0,) * len(self.layers)
        if (self.window, self.sinks, self.mode, self.buffer_slots) != (window, sinks, mode, buffer_slots):
            raise ValueError(
                f"this AHNCache was made for window={self.window}, sinks={self.sinks}, mode={self.mode!r}, "
                f"buffer slots per layer {list(self.buffer_slots)}, but the call uses window={window}, sinks={sinks}, "
                f"mode={mode!r}, buffer slots {list(buffer_slots)}; start a new cache (model.new_cache())"
            )
        if self.pad_offsets is not None and self.pad_offsets.shape[0] != batch:
            raise ValueError(
                f"batch size changed: this AHNCache holds {self.pad_offsets.shape[0]} sequences but the call has {batch}; "
                "start a new cache (model.new_cache()) for another batch"
            )

    @property
    def kv_length(self) -> int:
        """KV entries held per layer (max over layers): at most sinks + buffer slots + window."""
        return max((layer.kv_length for layer in self.layers), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (KV and the buffer's, memory gates and salience of the window,
        the buffer's slots and scores, memory states)."""
        return sum(x.numel() * x.element_size() for layer in self.layers for x in layer.tensors())

    def _map_offsets(self, fn) -> None:
        if self.pad_offsets is not None:
            self.pad_offsets = fn(self.pad_offsets)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_offsets(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_offsets(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_offsets(lambda x: x[indices])

    def reset(self):
        super().reset()
        self.pad_offsets = None


class LayerGeometry(NamedTuple):
    """What a model's layer puts in its cache (``AHNModel.cache_geometry``): kv heads, head size, query heads, write-gate
    channels of its memory (None: no memory in the cache's mode), whether it has a salience scorer, and the dtype."""

    kv_heads: int
    head_dim: int
    heads: int
    gate_channels: Optional[int]
    salience: bool
    dtype: torch.dtype


def _check_fields(path, fields: list[dict], pads, geometry: list[LayerGeometry], cache: AHNCache) -> None:
    """Refuse a saved state whose contents do not fit the model: every shape, dtype and position is checked, so a
    state that passed the integrity check but was written by other code fails here, not at the first forward."""

    def refuse(what: str):
        raise ValueError(f"{path}: {what}; the file is damaged or was not written by this version of ahn")

    seen = {int(f["seen"]) if f["seen"] is not None and f["seen"].numel() == 1 else None for f in fields}
    if len(seen) != 1 or None in seen or min(seen) < 0:
        refuse(f"the layers disagree on the tokens read ({sorted(map(str, seen))})")
    (n,) = seen
    batch = None
    if pads is not None:
        if pads.dim() != 1 or pads.dtype != torch.int64 or (pads < 0).any() or (pads > n).any():
            refuse(f"pad_offsets {tuple(pads.shape)} {pads.dtype} is not one offset in [0, {n}] per row")
        batch = pads.shape[0]
    W, S = cache.window, cache.sinks
    for i, (f, g, M) in enumerate(zip(fields, geometry, cache.buffer_slots)):
        keys = f["keys"]
        if keys is None:
            if n or any(f[name] is not None for name in state_file.LAYER_FIELDS):
                refuse(f"layer {i} holds no keys after {n} tokens")
            continue
        B = keys.shape[0] if batch is None else batch
        C = keys.shape[2] - S - M if keys.dim() == 4 else -1
        if keys.dim() != 4 or keys.shape[:2] != (B, g.kv_heads) or keys.shape[3] != g.head_dim \
                or not min(n, W) <= C <= W or keys.dtype != g.dtype:
            refuse(f"layer {i} keys {tuple(keys.shape)} {keys.dtype} do not fit [batch {B}, {g.kv_heads} kv heads, "
                   f"{S} sinks + {M} buffer + ring of {min(n, W)} to {W}, {g.head_dim}] {g.dtype}")
        if f["values"] is None or f["values"].shape != keys.shape or f["values"].dtype != g.dtype:
            refuse(f"layer {i} values do not match its keys {tuple(keys.shape)}")
        expect = {
            "gates": (B, C, g.heads, g.gate_channels) if g.gate_channels is not None else None,
            "salience_token": (B, g.kv_heads, C) if g.salience else None,
            "salience_mass": (B, g.kv_heads, C) if g.salience else None,
            "buffer_slot": (B, g.kv_heads, M) if M else None,
            "buffer_score": (B, g.kv_heads, M) if M else None,
        }
        for name, shape in expect.items():
            x = f[name]
            if (x is None) != (shape is None) or (x is not None and tuple(x.shape) != shape):
                refuse(f"layer {i} {name} is {None if x is None else tuple(x.shape)}, expected {shape}")
        if M and (f["buffer_slot"].dtype != torch.int64 or (f["buffer_slot"] < -1).any()
                  or (f["buffer_slot"] > n - W - 1).any()):
            refuse(f"layer {i} buffer slots are not evicted token positions (-1 .. {n - W - 1})")
        state = f["memory_state"]
        if g.gate_channels is None and state is not None:
            refuse(f"layer {i} holds a memory state but has no memory in mode {cache.mode!r}")
        if state is not None and (state.dim() != 4 or state.shape[:2] != (B, g.heads) or not state.is_floating_point()
                                  or not torch.isfinite(state).all()):
            refuse(f"layer {i} memory state {tuple(state.shape)} {state.dtype} is not a finite [batch {B}, "
                   f"{g.heads} heads, K, V] state")
