"""`AHNCache`: a bounded KV cache (sinks + sliding window) plus the memory state, per layer.

Per layer one buffer ``[B, Hkv, S + C, D]`` holds the sinks in its first S entries and a
ring buffer of the window in the remaining C entries (C grows geometrically up to W, then
the ring wraps): slot j of the sequence lives at ring index ``j % W``. Decoding a token
writes one ring entry and reads the buffer in place, so a decode step costs O(S + W) and
copies nothing of size W. Tokens leaving the window are written into the memory state
``[B, H, K, V]`` by the attention layer before their ring entry is overwritten.

``get_seq_length()`` counts every token seen (RoPE positions stay correct after
eviction); ``kv_length`` is the number of KV entries held per layer (never above S + W).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin


class AHNCacheLayer(CacheLayerMixin):
    """One decoder layer's sinks, window ring buffer, per-token memory gates and memory state."""

    is_sliding = True

    def __init__(self, window: int, sinks: int):
        super().__init__()
        self.window, self.sinks = window, sinks
        self.seen = 0
        self.gates: Optional[torch.Tensor] = None  # [B, C, Hq, G] write gates of the ring's tokens
        self.memory_state: Optional[torch.Tensor] = None  # [B, Hq, K, V]

    # --------------------------------------------------------------------- buffers
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, gates=None) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, self.sinks, D)
        self.values = value_states.new_zeros(B, H, self.sinks, value_states.shape[-1])
        if gates is not None:
            self.gates = gates.new_zeros(B, 0, *gates.shape[2:])
        self.is_initialized = True

    @property
    def sink_k(self) -> torch.Tensor:
        return self.keys[:, :, : self.sinks]

    @property
    def sink_v(self) -> torch.Tensor:
        return self.values[:, :, : self.sinks]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] - self.sinks

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
        idx = self.sinks + torch.arange(lo, hi, device=self.device) % self.window
        k = self.keys.index_select(2, idx).transpose(1, 2)
        v = self.values.index_select(2, idx).transpose(1, 2)
        g = self.gates.index_select(1, idx - self.sinks) if self.gates is not None else None
        return k, v, g

    def read_slot(self, slot: int):
        """Views of one window slot (in the ring): k, v ``[B, Hkv, D]``, gates ``[B, Hq, G]``.

        Views, not copies: use them before :meth:`append` overwrites the slot.
        """
        assert self.seen - self.window <= slot < self.seen and self.gates is not None, (slot, self.seen)
        i = slot % self.window
        return self.keys[:, :, self.sinks + i], self.values[:, :, self.sinks + i], self.gates[:, i]

    def append(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], start: int) -> None:
        """Store new slots start .. start+T-1 (the last min(T, W) of them) in the ring."""
        assert start == self.seen, f"cache holds {self.seen} tokens but the new ones start at slot {start}"
        T = k.shape[2]
        self._grow(min(self.window, start + T))
        m = min(T, self.window)
        slots = torch.arange(start + T - m, start + T, device=self.device)
        idx = slots % self.window
        self.keys.index_copy_(2, self.sinks + idx, k[:, :, T - m :])
        self.values.index_copy_(2, self.sinks + idx, v[:, :, T - m :])
        if self.gates is not None and gates is not None:
            self.gates.index_copy_(1, idx, gates[:, T - m :].to(self.gates.dtype))
        self.seen = start + T

    def append_one(self, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor], t: int) -> None:
        """:meth:`append` of one token (slot t), with direct writes into its ring entry (the decode hot path)."""
        assert t == self.seen, f"cache holds {self.seen} tokens but the new one is slot {t}"
        self._grow(min(self.window, t + 1))
        i = t % self.window
        self.keys[:, :, self.sinks + i] = k[:, :, 0]
        self.values[:, :, self.sinks + i] = v[:, :, 0]
        if self.gates is not None and gates is not None:
            self.gates[:, i] = gates
        self.seen = t + 1

    def decode_attention(self, q: torch.Tensor, t: int, pad_offsets: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one query (slot t, already appended) over the buffer in place: ``[B, 1, Hq, D]``."""
        if t - self.window + 1 >= self.sink_ends(pad_offsets)[1] and self.capacity == self.window:
            # Every sink is filled and every ring entry holds a real, non-sink token of the
            # window (the steady state of a long decode): nothing to mask.
            o = F.scaled_dot_product_attention(q, self.keys, self.values, scale=scale, enable_gqa=True)
            return o.transpose(1, 2)
        dev = q.device
        P = pad_offsets.view(-1, 1)  # [B, 1]
        sink_visible = P + torch.arange(self.sinks, device=dev).view(1, -1) <= t  # [B, S]
        i = torch.arange(self.capacity, device=dev)
        slot = t - torch.remainder(t - i, self.window)  # slot held by ring index i (negative: never written)
        ring_visible = (slot >= 0).view(1, -1) & (slot.view(1, -1) >= P + self.sinks)  # [B, C]
        mask = torch.cat([sink_visible, ring_visible], dim=1)[:, None, None, :]  # [B, 1, 1, S + C]
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

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (self.keys, self.values, self.gates, self.memory_state) if x is not None]

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.gates is not None:
            self.gates = fn(self.gates)
        if self.memory_state is not None:
            self.memory_state = fn(self.memory_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices])

    def reset(self) -> None:
        self.__init__(self.window, self.sinks)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AHNCache cannot be cropped: evicted tokens are already folded into the memory")


class AHNCache(Cache):
    """Bounded cache of an :class:`ahn.AHNModel`: per layer sinks + window KV and the memory state.

    Args:
        num_layers: decoder layers of the model.
        window, sinks: W and S (at most S + W KV entries per layer).
        mode: ``"window"`` or ``"ahn"``; a cache is filled in one mode only.
    """

    def __init__(self, num_layers: int, window: int, sinks: int, mode: str = "ahn"):
        super().__init__(layers=[AHNCacheLayer(window, sinks) for _ in range(num_layers)])
        self.window, self.sinks, self.mode = window, sinks, mode
        self.pad_offsets: Optional[torch.Tensor] = None  # [B], set by the first forward

    def check_call(self, window: int, sinks: int, mode: str, batch: int) -> None:
        """Refuse a forward that does not match what this cache holds."""
        if (self.window, self.sinks, self.mode) != (window, sinks, mode):
            raise ValueError(
                f"this AHNCache was made for window={self.window}, sinks={self.sinks}, mode={self.mode!r}, "
                f"but the call uses window={window}, sinks={sinks}, mode={mode!r}; start a new cache"
            )
        if self.pad_offsets is not None and self.pad_offsets.shape[0] != batch:
            raise ValueError(
                f"batch size changed: this AHNCache holds {self.pad_offsets.shape[0]} sequences but the call has {batch}; "
                "start a new cache (model.new_cache()) for another batch"
            )

    @property
    def kv_length(self) -> int:
        """KV entries held per layer (max over layers): at most sinks + window."""
        return max((layer.kv_length for layer in self.layers), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (KV, memory gates of the window, memory states)."""
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
