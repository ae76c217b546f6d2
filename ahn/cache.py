"""`AHNCache`: a bounded KV cache (sinks + sliding window) plus the memory state, per layer.

Per layer one buffer ``[B, Hkv, S + M + C, D]`` holds the sinks in its first S entries, the
priority buffer's M entries next (``AHNConfig.buffer_slots``; 0 without one, see
:mod:`ahn.salience`) and a ring buffer of the window in the remaining C entries (C grows
geometrically up to W, then the ring wraps): slot j of the sequence lives at ring index
``j % W``. Decoding a token
writes one ring entry and reads the buffer in place, so a decode step costs O(S + W) and
copies nothing of size W. Tokens leaving the window are written into the memory state
``[B, H, K, V]`` by the attention layer before their ring entry is overwritten.

``get_seq_length()`` counts every token seen (RoPE positions stay correct after
eviction); ``kv_length`` is the number of KV entries held per layer (never above S + M + W).

``cache.save(path)`` writes the whole cache to a file and ``AHNCache.load(path, model)`` reads it
back into the model it belongs to (:mod:`ahn.state`): reading a text once and continuing from it
later computes exactly what one continuous read computes.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin


class AHNCacheLayer(CacheLayerMixin):
    """One decoder layer's sinks, window ring buffer, per-token memory gates and memory state."""

    is_sliding = True

    def __init__(self, window: int, sinks: int, buffer: int = 0):
        super().__init__()
        self.window, self.sinks, self.buffer_slots = window, sinks, buffer
        self.ring_start = sinks + buffer  # index of ring entry 0 in keys / values
        self.seen = 0
        self.gates: Optional[torch.Tensor] = None  # [B, C, Hq, G] write gates of the ring's tokens
        self.memory_state: Optional[torch.Tensor] = None  # [B, Hq, K, V]
        # Salience (ahn.salience): per ring entry the scorer's token part and the window attention received,
        # [B, Hkv, C] float32 each; the buffer's slots [B, Hkv, M] (-1: empty) and scores (-inf: empty).
        self.sal_token: Optional[torch.Tensor] = None
        self.sal_mass: Optional[torch.Tensor] = None
        self.buf_slot: Optional[torch.Tensor] = None
        self.buf_score: Optional[torch.Tensor] = None

    # --------------------------------------------------------------------- buffers
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, gates=None,
                            salience: bool = False) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, self.ring_start, D)
        self.values = value_states.new_zeros(B, H, self.ring_start, value_states.shape[-1])
        if gates is not None:
            self.gates = gates.new_zeros(B, 0, *gates.shape[2:])
        if salience:
            self.sal_token = torch.zeros(B, H, 0, device=self.device)
            self.sal_mass = torch.zeros(B, H, 0, device=self.device)
        if self.buffer_slots:
            from ahn.salience import Buffer

            self.buf_slot, self.buf_score = Buffer.empty_entries(B, H, self.buffer_slots, self.device)
        self.is_initialized = True

    @property
    def sink_k(self) -> torch.Tensor:
        return self.keys[:, :, : self.sinks]

    @property
    def sink_v(self) -> torch.Tensor:
        return self.values[:, :, : self.sinks]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] - self.ring_start

    @property
    def buffer(self):
        """The priority buffer (:class:`ahn.salience.Buffer`, k / v views into the cache), or None."""
        if not self.buffer_slots:
            return None
        from ahn.salience import Buffer

        region = slice(self.sinks, self.ring_start)
        return Buffer(self.keys[:, :, region], self.values[:, :, region], self.buf_slot, self.buf_score)

    def set_buffer(self, buffer) -> None:
        """Store the buffer after a forward (its k / v were gathered into new tensors)."""
        self.keys[:, :, self.sinks: self.ring_start] = buffer.k
        self.values[:, :, self.sinks: self.ring_start] = buffer.v
        self.buf_slot, self.buf_score = buffer.slot, buffer.score

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
        if self.sal_token is not None:
            self.sal_token = F.pad(self.sal_token, (0, pad))
            self.sal_mass = F.pad(self.sal_mass, (0, pad))

    def write_sinks(self, k: torch.Tensor, v: torch.Tensor, pad_offsets: torch.Tensor, start: int) -> None:
        """Copy the new tokens that are sinks of their row (slots P_r .. P_r+S-1) into the sink entries."""
        T = k.shape[2]
        if self.sinks == 0 or start >= self.sink_ends(pad_offsets)[1]:
            return
        idx = start + torch.arange(T, device=k.device).view(1, T) - pad_offsets.view(-1, 1)  # [B, T] sink index
        b, t = ((idx >= 0) & (idx < self.sinks)).nonzero(as_tuple=True)
        self.keys[b, :, idx[b, t]] = k[b, :, t]
        self.values[b, :, idx[b, t]] = v[b, :, t]

    def read_slots(self, lo: int, hi: int):
        """Window entries of slots [lo, hi) (all in the ring), time-major: k, v ``[B, n, Hkv, D]``, gates or None."""
        assert self.seen - self.window <= lo <= hi <= self.seen, (lo, hi, self.seen)
        idx = self.ring_start + torch.arange(lo, hi, device=self.device) % self.window
        k = self.keys.index_select(2, idx).transpose(1, 2)
        v = self.values.index_select(2, idx).transpose(1, 2)
        g = self.gates.index_select(1, idx - self.ring_start) if self.gates is not None else None
        return k, v, g

    def read_salience(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scorer's token part and the attention received of window slots [lo, hi): ``[B, Hkv, n]`` each."""
        idx = torch.arange(lo, hi, device=self.device) % self.window
        return self.sal_token.index_select(2, idx), self.sal_mass.index_select(2, idx)

    def write_mass(self, mass: torch.Tensor, lo: int) -> None:
        """Store the attention received by slots lo .. lo+n-1 (``mass [B, Hkv, n]``) for those still in the ring."""
        first = max(lo, self.seen - self.window)
        idx = torch.arange(first, lo + mass.shape[2], device=self.device) % self.window
        self.sal_mass.index_copy_(2, idx, mass[:, :, first - lo:])

    def read_slot(self, slot: int):
        """Views of one window slot (in the ring): k, v ``[B, Hkv, D]``, gates ``[B, Hq, G]``.

        Views, not copies: use them before :meth:`append` overwrites the slot.
        """
        assert self.seen - self.window <= slot < self.seen and self.gates is not None, (slot, self.seen)
        i = slot % self.window
        return self.keys[:, :, self.ring_start + i], self.values[:, :, self.ring_start + i], self.gates[:, i]

    def append(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], start: int,
               sal_token: Optional[torch.Tensor] = None) -> None:
        """Store new slots start .. start+T-1 (the last min(T, W) of them) in the ring; ``sal_token
        [B, Hkv, T]``: their salience token part (their received attention starts at 0)."""
        assert start == self.seen, f"cache holds {self.seen} tokens but the new ones start at slot {start}"
        T = k.shape[2]
        self._grow(min(self.window, start + T))
        m = min(T, self.window)
        slots = torch.arange(start + T - m, start + T, device=self.device)
        idx = slots % self.window
        self.keys.index_copy_(2, self.ring_start + idx, k[:, :, T - m :])
        self.values.index_copy_(2, self.ring_start + idx, v[:, :, T - m :])
        if self.gates is not None and gates is not None:
            self.gates.index_copy_(1, idx, gates[:, T - m :].to(self.gates.dtype))
        if self.sal_token is not None:
            self.sal_token.index_copy_(2, idx, sal_token[:, :, T - m:])
            self.sal_mass.index_fill_(2, idx, 0.0)
        self.seen = start + T

    def append_one(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], t: int,
                   sal_token: Optional[torch.Tensor] = None) -> None:
        """:meth:`append` of one token (slot t), with direct writes into its ring entry (the decode hot path)."""
        assert t == self.seen, f"cache holds {self.seen} tokens but the new one is slot {t}"
        self._grow(min(self.window, t + 1))
        i = t % self.window
        self.keys[:, :, self.ring_start + i] = k[:, :, 0]
        self.values[:, :, self.ring_start + i] = v[:, :, 0]
        if self.gates is not None and gates is not None:
            self.gates[:, i] = gates
        if self.sal_token is not None:
            self.sal_token[:, :, i] = sal_token[:, :, 0]
            self.sal_mass[:, :, i] = 0.0
        self.seen = t + 1

    def decode_mask(self, t: int, pad_offsets: torch.Tensor) -> torch.Tensor:
        """``[B, S + M + C]`` bool: the entries one query at slot t sees under sinks + window attention
        (the priority buffer's entries are not among them)."""
        dev = self.device
        P = pad_offsets.view(-1, 1)  # [B, 1]
        sink_visible = P + torch.arange(self.sinks, device=dev).view(1, -1) <= t  # [B, S]
        i = torch.arange(self.capacity, device=dev)
        slot = t - torch.remainder(t - i, self.window)  # slot held by ring index i (negative: never written)
        ring_visible = (slot >= 0).view(1, -1) & (slot.view(1, -1) >= P + self.sinks)  # [B, C]
        if not self.buffer_slots:
            return torch.cat([sink_visible, ring_visible], dim=1)
        buffer = torch.zeros(P.shape[0], self.buffer_slots, dtype=torch.bool, device=dev)
        return torch.cat([sink_visible, buffer, ring_visible], dim=1)

    def decode_attention(self, q: torch.Tensor, t: int, pad_offsets: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one query (slot t, already appended) over the buffer in place: ``[B, 1, Hq, D]``."""
        assert not self.buffer_slots, "a cache with a priority buffer decodes through ahn.salience"
        if t - self.window + 1 >= self.sink_ends(pad_offsets)[1] and self.capacity == self.window:
            # Every sink is filled and every ring entry holds a real, non-sink token of the
            # window (the steady state of a long decode): nothing to mask.
            o = F.scaled_dot_product_attention(q, self.keys, self.values, scale=scale, enable_gqa=True)
            return o.transpose(1, 2)
        mask = self.decode_mask(t, pad_offsets)[:, None, None, :]  # [B, 1, 1, S + C]
        o = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(1, 2)

    def sink_ends(self, pad_offsets: torch.Tensor) -> tuple[int, int]:
        """Min and max over rows of P_r + S (each row's first slot after its sinks), computed once per batch."""
        if getattr(self, "_sink_end_for", None) is not pad_offsets:
            self._sink_end_for = pad_offsets
            self._sink_ends = (int(pad_offsets.min()) + self.sinks, int(pad_offsets.max()) + self.sinks)
        return self._sink_ends

    # ------------------------------------------------------------- Cache interface
    def update(self, key_states, value_states, *args, **kwargs):
        """The family's attention calls this before attending: hand the new tokens back unchanged.

        ahn's attention function (``ahn.attention.ahn_attention``) stores them: it first reads the
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

    _BATCHED = ("keys", "values", "gates", "memory_state", "sal_token", "sal_mass", "buf_slot", "buf_score")

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
    """Bounded cache of an :class:`ahn.AHNModel`: per layer sinks + window KV and the memory state.

    Args:
        num_layers: decoder layers of the model.
        window, sinks: W and S (at most S + M + W KV entries per layer).
        mode: ``"window"`` or ``"ahn"``; a cache is filled in one mode only.
        buffers: priority-buffer slots M per layer (``AHNModel.new_cache`` sets them from the
            config); None: none.
        model: the :class:`ahn.AHNModel` that fills it (``AHNModel.new_cache`` sets it; held by a weak
            reference), which :meth:`save` fingerprints.
    """

    def __init__(self, num_layers: int, window: int, sinks: int, mode: str = "ahn", buffers=None, model=None):
        buffers = tuple(buffers) if buffers is not None else (0,) * num_layers
        if len(buffers) != num_layers:
            raise ValueError(f"buffers={buffers!r} must give one slot count per layer ({num_layers})")
        super().__init__(layers=[AHNCacheLayer(window, sinks, m) for m in buffers])
        self.window, self.sinks, self.mode, self.buffers = window, sinks, mode, buffers
        self.pad_offsets: Optional[torch.Tensor] = None  # [B], set by the first forward
        self._model = weakref.ref(model) if model is not None else None

    def save(self, path, model=None) -> None:
        """Write this cache to ``path`` (safetensors, atomically; :mod:`ahn.state`) with the fingerprint of
        ``model``, by default the model whose ``new_cache()`` made it. The file's size does not grow with the
        tokens read."""
        from ahn.state import save_state

        if model is None:
            model = self._model() if self._model is not None else None
            if model is None:
                raise ValueError("this cache does not know its model (it was not made by model.new_cache(), or the "
                                 "model is gone): call cache.save(path, model)")
        save_state(self, model, path)

    @classmethod
    def load(cls, path, model) -> "AHNCache":
        """The cache saved at ``path``, on ``model``'s device; ValueError when ``path`` was saved with another base
        model, memory weights, AHN config or attention mode (naming what differs) or is not a readable state."""
        from ahn.state import load_state

        return load_state(path, model)

    def check_call(self, window: int, sinks: int, mode: str, batch: int, buffers=None) -> None:
        """Refuse a forward that does not match what this cache holds."""
        buffers = tuple(buffers) if buffers is not None else (0,) * len(self.layers)
        if (self.window, self.sinks, self.mode, self.buffers) != (window, sinks, mode, buffers):
            raise ValueError(
                f"this AHNCache was made for window={self.window}, sinks={self.sinks}, mode={self.mode!r}, "
                f"buffer slots per layer {list(self.buffers)}, but the call uses window={window}, sinks={sinks}, "
                f"mode={mode!r}, buffer slots {list(buffers)}; start a new cache (model.new_cache())"
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
