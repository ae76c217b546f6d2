"""Adapter files: write and read memory weights, and read the official AHN release.

(Attaching what :func:`read_adapter` returns to a base model is :meth:`ahn.AHNModel.from_pretrained`.)

ahn's adapter directory:
    ahn_adapter.safetensors   memory parameters only, named as in the base model
                              (``model.layers.<i>.self_attn.ahn.<param>``); its metadata
                              also holds the config it was saved with
    ahn_config.json           the :class:`ahn.AHNConfig`, plus ``weights_sha256``: the hash
                              of the weights file it belongs to

Overwriting an adapter replaces the weights file (atomically), then the config. A reader
that finds a config whose ``weights_sha256`` is not that of the weights (the writer was
killed between the two renames) uses the config stored in the weights file: the directory
always holds the old adapter or the new one, whole. A config without ``weights_sha256``
(written by hand or by an older ahn) is taken as it is.

The official release (ByteDance-Seed/AHN-*-for-Qwen-2.5-Instruct-*) ships ``model.safetensors``
with keys ``model.layers.<i>.ahn.fn.<param>`` and a Qwen2 ``config.json`` whose
``_ahn_implementation`` names the rule. :func:`convert_official_state_dict` is the one place
that maps those names: ``ahn.fn.`` -> ``self_attn.ahn.``, and GatedDeltaNet's ``D`` (declared
but unused by the release's forward) is dropped. The release's ``sliding_window`` is a
training artefact (256), so window and sinks come from the paper's evaluation setting
(128 sinks + 32640 window) unless given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ahn._io import make_readable, remove_stale_temporaries, replace_file, temporary_prefix
from ahn.config import CONFIG_NAME, AHNConfig, read_config_json

WEIGHTS_NAME = "ahn_adapter.safetensors"
# Key of the config inside the weights file's metadata.
CONFIG_METADATA = "ahn_config"
OFFICIAL_WEIGHTS_NAME = "model.safetensors"
# config.json "_ahn_implementation" of the official release -> ahn memory name.
OFFICIAL_MEMORY_NAMES = {"GatedDeltaNet": "gated_deltanet", "DeltaNet": "deltanet", "Mamba2": "mamba2"}
# Parameters the release stores but never uses in its forward pass.
OFFICIAL_UNUSED = {"gated_deltanet": ("D",)}
_OFFICIAL_KEY = re.compile(r"^model\.layers\.(\d+)\.ahn\.fn\.(.+)$")


def save_adapter(model, path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model``'s memory weights and config to ``path``; at every instant ``path`` holds the old
    adapter or the new one, whole (see the module docstring).

    A new ``path`` is built in a temporary directory and renamed into place. In an existing
    directory (e.g. a distillation run's output, which also holds its log and checkpoints)
    the weights file is replaced first, then the config. ``state``: memory weights to write
    instead of the model's own (a gathered state dict under ZeRO-3 / FSDP).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.memory_state_dict() if state is None else state
    tensors = {n: t.detach().contiguous().cpu() for n, t in state.items()}
    config_text = model.ahn_config.to_json_string()
    # One metadata entry (the config, which carries ahn_version): safetensors writes its metadata map in no fixed
    # order, so several entries would make two saves of the same adapter differ in bytes (and in weights_sha256).
    weights = safetensors_bytes(tensors, {CONFIG_METADATA: config_text})
    config = json.loads(config_text) | {"weights_sha256": hashlib.sha256(weights).hexdigest()}
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    remove_stale_temporaries(path.parent)
    if path.is_dir():
        remove_stale_temporaries(path)
        replace_file(path / WEIGHTS_NAME, lambda p: p.write_bytes(weights))
        replace_file(path / CONFIG_NAME, lambda p: p.write_text(config_text))
        return
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path), dir=path.parent))
    try:
        make_readable(tmp, directory=True)
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(config_text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _load_safetensors(path: Path, load, source) -> dict[str, torch.Tensor]:
    """``load(source)`` of the weights file ``path``; a damaged file is a ValueError naming it."""
    try:
        return load(source)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the adapter is damaged") from None


def _read_ahn_adapter(path: Path) -> tuple[AHNConfig, dict[str, torch.Tensor]]:
    """ahn's format: the config that belongs to the weights (see the module docstring), and the weights."""
    weights_path = path / WEIGHTS_NAME
    if not weights_path.exists():
        raise ValueError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    weights = weights_path.read_bytes()
    state = _load_safetensors(weights_path, safetensors_load, weights)
    config_path = path / CONFIG_NAME
    d = read_config_json(config_path)
    sha = d.pop("weights_sha256", None)
    if sha is not None and sha != hashlib.sha256(weights).hexdigest():
        # The weights were replaced but their config not yet: the weights carry their own.
        with safe_open(str(weights_path), "pt") as f:
            embedded = (f.metadata() or {}).get(CONFIG_METADATA)
        if embedded is None:
            raise ValueError(f"{config_path} belongs to other weights than {weights_path} (weights_sha256 differs), "
                             "and the weights carry no config: save the adapter again")
        d = json.loads(embedded)
    return AHNConfig.from_dict(d), state


def convert_official_state_dict(state: dict[str, torch.Tensor], memory: str) -> dict[str, torch.Tensor]:
    """Rename the official release's ``model.layers.<i>.ahn.fn.*`` keys to ahn's names."""
    out = {}
    for key, tensor in state.items():
        m = _OFFICIAL_KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in an official AHN checkpoint (expected model.layers.<i>.ahn.fn.*)")
        layer, param = m.groups()
        if param in OFFICIAL_UNUSED.get(memory, ()):
            continue
        out[f"model.layers.{layer}.self_attn.ahn.{param}"] = tensor
    return out


def read_adapter(path, **overrides) -> tuple[AHNConfig, dict[str, torch.Tensor]]:
    """Config and memory weights (in ahn's names) of an adapter directory, either format."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter path {str(path)!r} is not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    if (path / CONFIG_NAME).exists():
        config, state = _read_ahn_adapter(path)
    elif (path / "config.json").exists() and (path / OFFICIAL_WEIGHTS_NAME).exists():
        hf = json.loads((path / "config.json").read_text())
        impl = hf.get("_ahn_implementation")
        if impl not in OFFICIAL_MEMORY_NAMES:
            raise ValueError(
                f"{path / 'config.json'} has _ahn_implementation={impl!r}; official AHN releases use one of "
                f"{sorted(OFFICIAL_MEMORY_NAMES)}"
            )
        config = AHNConfig(memory=OFFICIAL_MEMORY_NAMES[impl])
        weights_path = path / OFFICIAL_WEIGHTS_NAME
        state = convert_official_state_dict(_load_safetensors(weights_path, load_file, str(weights_path)),
                                            config.memory)
    else:
        raise ValueError(
            f"{path} is not an adapter: expected {CONFIG_NAME} + {WEIGHTS_NAME} (ahn) or config.json with "
            f"_ahn_implementation + {OFFICIAL_WEIGHTS_NAME} (official AHN release)"
        )
    if overrides:
        saved, config = config, replace(config, **overrides)
        learned = (lambda c: (c.uses_salience, c.readout, c.uses_salience and c.salience_mass))
        if learned(saved) != learned(config):
            raise ValueError(
                f"adapter {path} was trained with buffer_slots={saved.buffer_slots}, salience_writes="
                f"{saved.salience_writes}, readout={saved.readout!r}, salience_mass={saved.salience_mass}; the "
                f"overrides {overrides} change which learned weights it needs (a salience scorer and its mass weight, "
                "the deferring read-out's logit). Keep readout, salience_mass and whether it has a scorer; "
                "buffer_slots may change when it has one (buffer_slots > 0 or salience_writes)"
            )
    return config, state
