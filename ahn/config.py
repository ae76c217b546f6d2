"""`AHNConfig`: the architecture of a memory adapter (which rule, window, sinks, layers).

Architecture only: per-batch choices (a random window during distillation, say) are
passed to the forward call, never written into the config.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

from ahn import __version__

CONFIG_NAME = "ahn_config.json"
# The attention modes of a model with memory: full attention (the base model as it is), sinks + sliding window,
# and window + memory. Defined here, in a module without torch, for the CLI, the benchmarks and the model alike.
MODES = ("full", "window", "ahn")

# The largest priority buffer accepted (slots per memory layer and kv head): a decode step attends to every slot and
# a prefill block sorts them, so a buffer is meant to be small beside the window; 65,536 is already 2x the paper's
# longest window (32,640) and 4,096x the demo's 16.
MAX_BUFFER_SLOTS = 65536
# Bounds of the automatic attention block (AHNConfig.block_for): below 64 queries the per-block
# overhead dominates; above 1024 the [bq, S + W + bq] mask and scores only cost memory.
MIN_AUTO_BLOCK, MAX_AUTO_BLOCK = 64, 1024
# Queries each token's received mass is estimated from when salience_mass_stride is left to its default: the mass
# pass is one more q.k product over the window (half the attention's FLOPs), so summing it over every query would
# cost the recommended configuration a fifth of prefill at the Qwen2.5-0.5B shape (CPU, W = 2048).
MASS_SAMPLES = 256
# Memory read-outs: "add" (the paper's: added to the attention output as it is) and "defer" (weighted by its
# share of a softmax in which the memory is one more entry beside the attended keys).
READOUTS = ("add", "defer")
# Old spellings still accepted (with a FutureWarning), and what they mean now.
DEPRECATED_READOUTS = {"paper": "add"}


def readout_choice(value: str) -> str:
    """The ``--readout`` flags' argparse type: a read-out name, an old spelling mapped to its new name (FutureWarning)."""
    if value in DEPRECATED_READOUTS:
        warnings.warn(f"--readout {value} is renamed --readout {DEPRECATED_READOUTS[value]} (the same read-out)",
                      FutureWarning, stacklevel=2)
        return DEPRECATED_READOUTS[value]
    return value


@dataclass(frozen=True)
class AHNConfig:
    """Configuration of an AHN memory adapter.

    Args:
        memory: memory rule, one of :func:`ahn.memory.available_memories`
            (``"gated_deltanet"``, ``"deltanet"``, ``"mamba2"``, ``"kda"``, ``"gdn2"``, ``"gated_deltaproduct"``).
        window: tokens kept losslessly in the sliding window (>= 1).
        sinks: first tokens always kept (attention sinks, >= 0).
        layers: decoder layer indices that get a memory; ``None`` means all layers.
            Layers without memory still use sinks + window attention.
        use_qk_l2norm: L2-normalise q and k before they enter the memory (delta rules need
            it for stability; the paper's GatedDeltaNet does it).
        backend: ``ahn.kernels`` backend for the memory (``"auto"``, ``"torch"``, ...).
        attention_block: query block length of the blocked sliding-window attention used
            for prefill / training (peak memory grows with it, not with T). ``None`` (default)
            picks :meth:`block_for` the window: a block of bq queries attends to S + W + bq
            keys of which about S + W are needed, so blocks shorter than W waste less.
        memory_kwargs: rule-specific options, checked against the rule's ``allowed_options``; no shipped
            rule takes any yet, so leave it ``{}``.
        buffer_slots: M, exact KV slots per memory layer, sequence and kv head that keep the most
            salient evicted tokens (a priority buffer attended in the same softmax as sinks and
            window; see :mod:`ahn.salience`). 0 (default): no buffer, the paper's mechanism.
        salience_writes: scale each evicted token's memory write strength by sigmoid(its salience).
        readout: ``"add"`` (default, the paper's): the memory read-out is added to the attention output;
            ``"defer"``: it is weighted by its share of a softmax in which the memory is one more
            entry beside the attended keys, with a learned logit, so it stands back when attention
            already has a strong match (see :mod:`ahn.salience`).
        salience_mass: the salience score reads the attention a token received while in the window
            (True, default) or only the token itself (False: the score is known when the token enters, so
            prefill attention needs no explicit softmax for it; see :mod:`ahn.salience`).
        salience_mass_stride: the received mass is summed over every s-th query only (the queries at
            slots divisible by s, each counted s times): an estimate of the sum over all queries that costs
            1/s of the exact pass, the same in prefill, decode and on every device. ``None`` (default):
            s = W // MASS_SAMPLES (at least 1), so each token's mass comes from about MASS_SAMPLES = 256
            queries whatever the window (exact up to W = 511); 1: every query (exact).

    With ``buffer_slots=0``, ``salience_writes=False`` and ``readout="add"`` everything is the
    paper's mechanism; any of them adds a salience scorer (or the read-out's logit) to each memory.
    """

    memory: str = "gated_deltanet"
    window: int = 32640
    sinks: int = 128
    layers: Optional[tuple[int, ...]] = None
    use_qk_l2norm: bool = True
    backend: str = "auto"
    attention_block: Optional[int] = None
    memory_kwargs: dict = field(default_factory=dict)
    buffer_slots: int = 0
    salience_writes: bool = False
    readout: str = "add"
    salience_mass: bool = True
    salience_mass_stride: Optional[int] = None

    def __post_init__(self):
        # start-up time: the CLI imports this module to build its flags; the memory rules and backends import torch
        from ahn.kernels import BACKENDS
        from ahn.memory import available_memories, memory_class

        if self.memory not in available_memories():
            raise ValueError(f"memory={self.memory!r} is unknown; choose one of {available_memories()}")
        optional = ("attention_block", "salience_mass_stride")
        for name, lo in (("window", 1), ("sinks", 0), ("attention_block", 1), ("buffer_slots", 0),
                         ("salience_mass_stride", 1)):
            value = getattr(self, name)
            if name in optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{name}={value!r} must be an int >= {lo}" + (" or None" if name in optional else ""))
        if self.buffer_slots > MAX_BUFFER_SLOTS:
            raise ValueError(f"buffer_slots={self.buffer_slots} is above the bound of {MAX_BUFFER_SLOTS} slots per layer and "
                             "kv head (ahn.config.MAX_BUFFER_SLOTS): the buffer is attended at every step; use fewer "
                             "slots (the demo uses 16)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if self.backend == "triton" and not memory_class(self.memory).fused:
            raise ValueError(f"backend='triton': memory {self.memory!r} has no Triton kernel of ahn's own (gated_deltanet, "
                             "deltanet and mamba2 do); use backend='auto' (fla on CUDA) or 'torch'")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ValueError(f"layers={self.layers!r} must be a list of layer indices or None (all layers)")
            layers = tuple(self.layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"layers={self.layers!r} must be distinct non-negative layer indices")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if not isinstance(self.memory_kwargs, dict):
            raise ValueError(f"memory_kwargs={self.memory_kwargs!r} must be a dict")
        for name in ("salience_writes", "salience_mass"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.readout in DEPRECATED_READOUTS:
            new = DEPRECATED_READOUTS[self.readout]
            warnings.warn(f"readout={self.readout!r} is renamed readout={new!r} (the same read-out); the old name will "
                          "be removed", FutureWarning, stacklevel=3)
            object.__setattr__(self, "readout", new)
        if self.readout not in READOUTS:
            raise ValueError(f"readout={self.readout!r} must be one of {READOUTS}")

    @property
    def uses_salience(self) -> bool:
        """Whether each memory has a salience scorer (a buffer or salience-gated writes need one)."""
        return self.buffer_slots > 0 or self.salience_writes

    def block_for(self, window: int) -> int:
        """Query block of the sliding-window attention for ``window``: ``attention_block`` if set,
        else W / 2 clamped to [64, 1024] (measured on CPU at W = 1024: 512 is 1.6x faster than 1024)."""
        if self.attention_block is not None:
            return self.attention_block
        return min(MAX_AUTO_BLOCK, max(MIN_AUTO_BLOCK, window // 2))

    def mass_stride_for(self, window: int) -> int:
        """Stride of the received-mass estimate for ``window``: ``salience_mass_stride`` if set, else
        ``window // MASS_SAMPLES`` (at least 1): about MASS_SAMPLES queries per token whatever the window."""
        if self.salience_mass_stride is not None:
            return self.salience_mass_stride
        return max(1, window // MASS_SAMPLES)

    def memory_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """Indices of the layers that get a memory in a model with ``num_hidden_layers`` layers."""
        if self.layers is None:
            return tuple(range(num_hidden_layers))
        bad = [i for i in self.layers if i >= num_hidden_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {num_hidden_layers} layers (0 .. {num_hidden_layers - 1})")
        return self.layers

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AHNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"ahn_version", "weights_sha256"})
        if unknown:
            raise ValueError(f"unknown AHNConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps({**self.to_dict(), "ahn_version": __version__}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path) -> "AHNConfig":
        return cls.from_dict(read_config_json(path))


def read_config_json(path) -> dict:
    """The JSON object of AHNConfig fields in ``path``; a ValueError naming the file otherwise."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object of AHNConfig fields")
    return d
