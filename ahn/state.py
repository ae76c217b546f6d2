"""Saved reading states: an :class:`ahn.AHNCache` written to a file and read back into its model.

A state holds everything a model needs to continue reading where it stopped: per layer the
sinks, the window's ring of KV, the priority buffer, the per-token memory gates and salience of
the window, the memory state and the position (tokens seen); per cache the left pads of each
row. Its size is set by the configuration (sinks + buffer + window KV entries, one K x V state
per head and layer), not by how much was read: once the window has filled, it never changes.

The file is a safetensors file, written atomically (:func:`ahn._io.replace_file`):

* tensors ``layers.<i>.<attribute>``: every public attribute of each cache layer that is a
  tensor, an int or a bool (ints and bools as 0-d tensors, so that the header, and with it the
  file's size, does not depend on the position), and ``pad_offsets`` ``[B]``;
* metadata ``ahn_state``: JSON with the format (:data:`FORMAT`), the cache's window, sinks,
  mode and buffer slots, per layer the kind of each attribute (:data:`KINDS`), and the
  fingerprint of the model it belongs to (:func:`fingerprint`).

A layer is serialised attribute by attribute, whatever it holds, so a memory rule that keeps
more state in the cache layer needs no change here; an attribute of another kind is refused
when saving, never silently dropped. Loading checks the fingerprint: a state read into another
base model, other memory weights, another AHN configuration or another attention mode is a
ValueError naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ahn._io import make_readable, remove_stale_temporaries, replace_file

if TYPE_CHECKING:
    from ahn.cache import AHNCache
    from ahn.model import AHNModel

FORMAT = "ahn-state/1"
METADATA_KEY = "ahn_state"
# Kinds of cache-layer attributes a state holds: tensors, ints and bools (as tensors), None,
# a torch dtype (by name) and the device (restored as the loading model's).
KINDS = ("tensor", "int", "bool", "none", "dtype", "device")
# Model config keys that do not change what the model computes: where it was loaded from, the
# transformers release that wrote it, output switches, and the dtype field (the parameters'
# actual dtypes are part of the weights' fingerprint instead).
VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_commit_hash",
})
# AHNConfig fields that choose how the same function is computed (kernel backend, prefill block),
# not what a saved state means: a state may be continued under other values.
COMPUTE_ONLY_FIELDS = frozenset({"backend", "attention_block"})
# Elements sampled from each base-model parameter (evenly spaced) for the weights' fingerprint:
# a fine-tune changes essentially every weight, and hashing all of a 7B model would take seconds.
WEIGHT_SAMPLE = 64


def _canonical(obj):
    """``obj`` as JSON would give it back (tuples as lists, keys as strings): comparable across a file."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def fingerprint(model: "AHNModel") -> dict:
    """What a state belongs to: the base model (its config without :data:`VOLATILE_CONFIG_KEYS`, and a
    hash of names, shapes, dtypes and a :data:`WEIGHT_SAMPLE`-element sample of every base parameter),
    the AHN config (without :data:`COMPUTE_ONLY_FIELDS`) and a hash of every memory parameter's bytes
    (so a trained adapter and an untrained memory differ)."""
    base = model.base_model
    memory = dict(model.named_memory_parameters())
    weights, samples = hashlib.sha256(), []
    for name, p in base.named_parameters():
        if name in memory:
            continue
        weights.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), WEIGHT_SAMPLE), device=flat.device).long()
        samples.append(flat[idx].float())
    if samples:
        weights.update(_tensor_bytes(torch.cat(samples)))
    memory_hash = hashlib.sha256()
    for name, p in memory.items():
        memory_hash.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        memory_hash.update(_tensor_bytes(p))
    config = {k: v for k, v in base.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    ahn_config = {k: v for k, v in model.ahn_config.to_dict().items() if k not in COMPUTE_ONLY_FIELDS}
    return _canonical({
        "model_name": getattr(base.config, "_name_or_path", "") or "",
        "model_config": config,
        "model_weights_sha256": weights.hexdigest(),
        "ahn_config": ahn_config,
        "memory_sha256": memory_hash.hexdigest(),
    })


def save_state(cache: "AHNCache", model: "AHNModel", path) -> None:
    """Write ``cache`` (filled by ``model``) to ``path`` atomically: a reader finds the old file or the new one."""
    from ahn.cache import AHNCache
    from ahn.model import AHNModel

    if not isinstance(cache, AHNCache):
        raise TypeError(f"cache must be an ahn.AHNCache, got {type(cache).__name__}")
    if not isinstance(model, AHNModel):
        raise TypeError(f"model must be the ahn.AHNModel that filled the cache, got {type(model).__name__}")
    if len(cache.layers) != model.base_model.config.num_hidden_layers:
        raise ValueError(f"this cache has {len(cache.layers)} layers but the model has "
                         f"{model.base_model.config.num_hidden_layers}: it was filled by another model")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot save a state to {path}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"cannot save a state to {path}: it is a folder; give a file name")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        kinds = {}
        for name, value in vars(layer).items():
            if name.startswith("_"):  # derived per-call caches (e.g. the sink ends of a pad_offsets tensor)
                continue
            key = f"layers.{i}.{name}"
            if value is None:
                kinds[name] = "none"
            elif isinstance(value, torch.Tensor):
                tensors[key], kinds[name] = value.detach().contiguous().cpu(), "tensor"
            elif isinstance(value, bool):
                tensors[key], kinds[name] = torch.tensor(value), "bool"
            elif isinstance(value, int):
                tensors[key], kinds[name] = torch.tensor(value, dtype=torch.int64), "int"
            elif isinstance(value, torch.dtype):
                kinds[name] = "dtype:" + str(value).removeprefix("torch.")
            elif isinstance(value, torch.device):
                kinds[name] = "device"
            else:
                raise TypeError(f"cache layer {i} attribute {name!r} is a {type(value).__name__}; a state file holds "
                                f"only {', '.join(KINDS)} attributes (ahn.state.KINDS)")
        layers.append(kinds)
    if cache.pad_offsets is not None:
        tensors["pad_offsets"] = cache.pad_offsets.detach().contiguous().cpu()
    from ahn import __version__

    meta = {
        "format": FORMAT, "ahn_version": __version__, "fingerprint": fingerprint(model),
        "cache": {"window": cache.window, "sinks": cache.sinks, "mode": cache.mode, "buffers": list(cache.buffers),
                  "pad_offsets": cache.pad_offsets is not None},
        "layers": layers,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        make_readable(tmp)  # safetensors creates its file readable by its owner only

    remove_stale_temporaries(path.parent)
    replace_file(path, write)


def read_metadata(path) -> dict:
    """The ``ahn_state`` metadata of the state file ``path`` (format checked); ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"state file {path} does not exist" if not path.exists() else f"state file {path} is a folder")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable state file ({e}): it is damaged (a truncated copy?) or not a "
                         "state saved by ahn") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not an ahn state (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the state's metadata is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} has state format {found!r}; this ahn reads {FORMAT!r} (save the state again "
                         "with this ahn)")
    missing = [k for k in ("fingerprint", "cache", "layers") if k not in meta]
    if missing:
        raise ValueError(f"{path}: the state's metadata lacks {', '.join(missing)}; the file is damaged")
    return meta


def _differences(saved: dict, here: dict) -> list[str]:
    return [f"{k}={saved.get(k)!r} (this model: {here.get(k)!r})" for k in sorted(set(saved) | set(here))
            if saved.get(k) != here.get(k)]


def check_fingerprint(path, meta: dict, model: "AHNModel") -> None:
    """Refuse to continue a state with another model, adapter, AHN config or attention mode, naming what differs."""
    saved, here = meta["fingerprint"], fingerprint(model)
    name = f" ({saved['model_name']})" if saved.get("model_name") else ""
    diff = _differences(saved["model_config"], here["model_config"])
    if diff:
        raise ValueError(f"{path} was saved with another base model{name}: its config differs in "
                         f"{'; '.join(diff[:4])}; load the model the state was saved with")
    if saved["model_weights_sha256"] != here["model_weights_sha256"]:
        raise ValueError(f"{path} was saved with a model of this architecture but other weights{name} (another "
                         "checkpoint or fine-tune); load the model the state was saved with")
    diff = _differences(saved["ahn_config"], here["ahn_config"])
    if diff:
        raise ValueError(f"{path} was saved with another AHN configuration: {'; '.join(diff)}; attach the memory with "
                         "the settings the state was saved with (ahn generate: the same --adapter, --window, --sinks)")
    mode = meta["cache"]["mode"]
    if mode != model.mode:
        raise ValueError(f"{path} was saved in attention mode {mode!r} but the model is in {model.mode!r}; load it "
                         f"inside model.attention_mode({mode!r})")
    if mode == "ahn" and saved["memory_sha256"] != here["memory_sha256"]:
        raise ValueError(f"{path} was saved with other memory weights than this model's (another adapter, or a trained "
                         "one vs a fresh memory); attach the adapter the state was saved with")


def load_state(path, model: "AHNModel") -> "AHNCache":
    """The cache saved at ``path``, on ``model``'s device, after checking that it belongs to ``model``."""
    from ahn.cache import AHNCache
    from ahn.model import AHNModel

    if not isinstance(model, AHNModel):
        raise TypeError(f"model must be an ahn.AHNModel, got {type(model).__name__}")
    path = Path(path)
    meta = read_metadata(path)
    check_fingerprint(path, meta, model)
    device = next(model.base_model.parameters()).device
    c = meta["cache"]
    cache = AHNCache(len(meta["layers"]), c["window"], c["sinks"], c["mode"], c["buffers"], model=model)
    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())

        def tensor(key: str) -> torch.Tensor:
            if key not in stored:
                raise ValueError(f"{path} lacks the tensor {key!r} its metadata lists; the file is damaged")
            return f.get_tensor(key)

        for i, (layer, kinds) in enumerate(zip(cache.layers, meta["layers"])):
            for name, kind in kinds.items():
                key = f"layers.{i}.{name}"
                if kind == "tensor":
                    value = tensor(key).to(device)
                elif kind in ("int", "bool"):
                    value = (int if kind == "int" else bool)(tensor(key))
                elif kind == "none":
                    value = None
                elif kind == "device":
                    value = device
                elif kind.startswith("dtype:") and isinstance(getattr(torch, kind[6:], None), torch.dtype):
                    value = getattr(torch, kind[6:])
                else:
                    raise ValueError(f"{path}: layer {i} attribute {name!r} has kind {kind!r}, not one of {KINDS}; "
                                     "the file is damaged")
                setattr(layer, name, value)
        if c["pad_offsets"]:
            cache.pad_offsets = tensor("pad_offsets").to(device)
    return cache
