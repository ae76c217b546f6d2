"""The saved-state file: an :class:`ahn.AHNCache` written to disk and read back into its model.

A state holds everything a model needs to continue reading where it stopped: per layer the
sinks, the priority buffer, the window's ring of KV, the per-token memory gates and salience of
the window, the memory state and the position (tokens seen); per cache the left pads of each row.
Its size is set by the configuration (sinks + buffer + window KV entries, one K x V state per head
and layer), not by how much was read: once the window has filled, it never changes.

The file is a safetensors file, written atomically next to its real target (a symlink is followed,
never replaced; anything but a regular file is refused). Format :data:`FORMAT`:

* tensors ``layers.<i>.<field>`` for the fields of :data:`LAYER_FIELDS` that the layer holds, the
  0-d ``layers.<i>.seen`` (tokens read; 0-d so the header's size does not depend on the position),
  and ``pad_offsets`` ``[B]``. The names are this schema's, not the cache's attribute names
  (:meth:`ahn.cache.AHNCacheLayer.state_fields` maps them), so a rename in the cache does not
  change the format;
* metadata ``ahn_state``: JSON with the format, the cache's window, sinks, mode, buffer slots and
  layer count, the fingerprint of the model it belongs to (:func:`fingerprint`), and the SHA-256 of
  every tensor (name, dtype, shape and bytes): a file whose contents changed after it was written
  is refused, naming the tensor.

Files of format ``ahn-state/1`` (ahn 0.1.0 before the schema) still load: their attribute names are
mapped onto the schema; they carry no checksums, so only their shapes are checked. Loading checks
the fingerprint (another base model, other memory weights, another AHN configuration or attention
mode is a ValueError naming what differs) and then every shape and position against the model
(:meth:`ahn.AHNCache.load`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ahn import __version__
from ahn._io import make_readable, remove_stale_temporaries, replace_file
from ahn.config import DEPRECATED_READOUTS

FORMAT = "ahn-state/2"
# Formats this version reads: the current one, and the one before the explicit schema.
FORMAT_V1 = "ahn-state/1"
METADATA_KEY = "ahn_state"
# The tensors a cache layer may hold, by their name in the file (absent ones are not stored).
LAYER_FIELDS = ("keys", "values", "gates", "memory_state", "salience_token", "salience_mass", "buffer_slot",
                "buffer_score")
# ahn-state/1 stored every cache-layer attribute under its attribute name: the ones the schema keeps.
_V1_FIELDS = {"keys": "keys", "values": "values", "gates": "gates", "memory_state": "memory_state",
              "sal_token": "salience_token", "sal_mass": "salience_mass", "buf_slot": "buffer_slot",
              "buf_score": "buffer_score", "seen": "seen"}
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


def _checksum(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def fingerprint(model) -> dict:
    """What a state belongs to: the base model (its config without :data:`VOLATILE_CONFIG_KEYS`, and a
    hash of names, shapes, dtypes and a :data:`WEIGHT_SAMPLE`-element sample of every base parameter),
    the AHN config (without :data:`COMPUTE_ONLY_FIELDS`) and a hash of every memory parameter's bytes
    (so a trained adapter and an untrained memory differ). ``model``: an :class:`ahn.AHNModel`."""
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
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for name, p in base.named_parameters() if name not in memory})
    return _canonical({
        "model_name": getattr(base.config, "_name_or_path", "") or "",
        "model_dtype": ",".join(dtypes),
        "model_config": config,
        "model_weights_sha256": weights.hexdigest(),
        "ahn_config": ahn_config,
        "memory_sha256": memory_hash.hexdigest(),
    })


def writable_target(path) -> Path:
    """The file a state written to ``path`` lands in: ``path`` itself, or the file a symlink points to (the link
    stays a link). ValueError for a folder, a missing folder, or anything that is not a regular file (a device, a
    pipe): a state replaces only a regular file or creates a new one."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if target.is_dir():
        raise ValueError(f"cannot save a state to {path}: it is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise ValueError(f"cannot save a state to {path}: {target} is not a regular file (a device or a pipe?); give a "
                         "file name")
    if not target.parent.is_dir():
        raise ValueError(f"cannot save a state to {path}: the folder {str(target.parent)!r} does not exist")
    return target


def write_state(path, tensors: dict[str, torch.Tensor], header: dict, model_fingerprint: dict) -> None:
    """Write a state file atomically (a reader finds the old file or the new one): ``tensors`` by schema name,
    ``header`` the cache's settings; each tensor's checksum goes into the metadata."""
    target = writable_target(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "ahn_version": __version__, "fingerprint": model_fingerprint, "cache": header,
            "sha256": {k: _checksum(v) for k, v in tensors.items()}}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        make_readable(tmp)  # safetensors creates its file readable by its owner only

    remove_stale_temporaries(target.parent)
    replace_file(target, write)


def read_metadata(path) -> dict:
    """The ``ahn_state`` metadata of the state file ``path`` (format checked): ``format``, ``fingerprint``,
    ``cache`` (window, sinks, mode, buffer_slots, layers), ``sha256``. ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"state file {path} does not exist" if not path.exists() else f"state file {path} is a folder"
                         if path.is_dir() else f"state file {path} is not a regular file (a device or a pipe?); give a "
                         "state written by --save-state or AHNCache.save")
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
    found = meta.get("format") if isinstance(meta, dict) else None
    if found not in (FORMAT, FORMAT_V1):
        raise ValueError(f"{path} has state format {found!r}; this ahn reads {FORMAT!r} and {FORMAT_V1!r} (save the "
                         "state again with the ahn that reads it, or upgrade ahn)")
    needed = ("fingerprint", "cache", "layers") if found == FORMAT_V1 else ("fingerprint", "cache", "sha256")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ValueError(f"{path}: the state's metadata lacks {', '.join(missing)}; the file is damaged")
    if found == FORMAT_V1:  # the settings under the schema's names
        c = meta["cache"]
        meta["cache"] = {"window": c["window"], "sinks": c["sinks"], "mode": c["mode"],
                         "buffer_slots": c["buffers"], "layers": len(meta["layers"])}
    try:
        c = meta["cache"]
        ok = (all(isinstance(c[k], int) for k in ("window", "sinks", "layers")) and isinstance(c["mode"], str)
              and isinstance(c["buffer_slots"], list) and isinstance(meta["fingerprint"]["ahn_config"], dict))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: the state's header is incomplete or malformed; the file is damaged")
    return meta


def read_state(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors by schema name)`` of the state file ``path``, every tensor checked against its checksum
    (format 2). ValueError naming the file and what is wrong."""
    path = Path(path)
    meta = read_metadata(path)
    v1 = meta["format"] == FORMAT_V1
    tensors = {}
    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())
        if v1:
            for i, kinds in enumerate(meta["layers"]):
                for name, kind in kinds.items():
                    key = f"layers.{i}.{name}"
                    if name in _V1_FIELDS and kind in ("tensor", "int"):
                        if key not in stored:
                            raise ValueError(f"{path} lacks the tensor {key!r} its metadata lists; the file is damaged")
                        tensors[f"layers.{i}.{_V1_FIELDS[name]}"] = f.get_tensor(key)
            if "pad_offsets" in stored:
                tensors["pad_offsets"] = f.get_tensor("pad_offsets")
            warnings.warn(f"{path} is a state of format {FORMAT_V1!r} (no integrity checksums); save it again to "
                          f"write {FORMAT!r}", FutureWarning, stacklevel=3)
        else:
            listed = set(meta["sha256"])
            if listed != stored:
                raise ValueError(f"{path}: its tensors ({len(stored)}) and its checksums ({len(listed)}) disagree "
                                 f"({sorted(listed ^ stored)[:4]}); the file is damaged")
            for key in sorted(stored):
                t = f.get_tensor(key)
                if _checksum(t) != meta["sha256"][key]:
                    raise ValueError(f"{path}: tensor {key!r} fails its integrity check (its contents changed after "
                                     "it was saved); the file is damaged")
                tensors[key] = t
    return meta, tensors


def _differences(saved: dict, here: dict) -> list[str]:
    return [f"{k}={saved.get(k)!r} (this model: {here.get(k)!r})" for k in sorted(set(saved) | set(here))
            if saved.get(k) != here.get(k)]


def check_fingerprint(path, meta: dict, model) -> None:
    """Refuse to continue a state with another model, adapter, AHN config or attention mode, naming what differs."""
    saved, here = meta["fingerprint"], fingerprint(model)
    name = f" ({saved['model_name']})" if saved.get("model_name") else ""
    diff = _differences(saved["model_config"], here["model_config"])
    if diff:
        raise ValueError(f"{path} was saved with another base model{name}: its config differs in "
                         f"{'; '.join(diff[:4])}; load the model the state was saved with")
    if saved.get("model_dtype", here["model_dtype"]) != here["model_dtype"]:  # ahn-state/1 files do not record it
        raise ValueError(f"{path} was saved with the model in {saved['model_dtype']}, but this model is in "
                         f"{here['model_dtype']}: load it in {saved['model_dtype']} (ahn generate: --dtype "
                         f"{saved['model_dtype']})")
    if saved["model_weights_sha256"] != here["model_weights_sha256"]:
        raise ValueError(f"{path} was saved with a model of this architecture but other weights{name} (another "
                         "checkpoint or fine-tune); load the model the state was saved with")
    saved_config = dict(saved["ahn_config"])
    if saved_config.get("readout") in DEPRECATED_READOUTS:  # saved before the read-outs were renamed
        saved_config["readout"] = DEPRECATED_READOUTS[saved_config["readout"]]
    diff = _differences(saved_config, here["ahn_config"])
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
