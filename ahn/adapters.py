"""Adapter files: save / load memory weights, and read the official AHN release.

ahn's adapter directory:
    ahn_adapter.safetensors   memory parameters only, named as in the base model
                              (``model.layers.<i>.self_attn.ahn.<param>``)
    ahn_config.json           the :class:`ahn.AHNConfig`

The official release (ByteDance-Seed/AHN-*-for-Qwen-2.5-Instruct-*) ships ``model.safetensors``
with keys ``model.layers.<i>.ahn.fn.<param>`` and a Qwen2 ``config.json`` whose
``_ahn_implementation`` names the rule. :func:`convert_official_state_dict` is the one place
that maps those names: ``ahn.fn.`` -> ``self_attn.ahn.``, and GatedDeltaNet's ``D`` (declared
but unused by the release's forward) is dropped. The release's ``sliding_window`` is a
training artefact (256), so window and sinks come from the paper's evaluation setting
(128 sinks + 32640 window) unless given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ahn._io import replace_file
from ahn.config import CONFIG_NAME, AHNConfig

WEIGHTS_NAME = "ahn_adapter.safetensors"
OFFICIAL_WEIGHTS_NAME = "model.safetensors"
# config.json "_ahn_implementation" of the official release -> ahn memory name.
OFFICIAL_MEMORY_NAMES = {"GatedDeltaNet": "gated_deltanet", "DeltaNet": "deltanet", "Mamba2": "mamba2"}
# Parameters the release stores but never uses in its forward pass.
OFFICIAL_UNUSED = {"gated_deltanet": ("D",)}
_OFFICIAL_KEY = re.compile(r"^model\.layers\.(\d+)\.ahn\.fn\.(.+)$")


def save_adapter(model, path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model``'s memory weights and config to ``path``, never leaving a half-written file.

    A new ``path`` is built in a temporary directory and renamed into place. In an existing
    directory (e.g. a distillation run's output, which also holds its log and checkpoints)
    each file is replaced atomically: the weights first, then the config. ``state``: memory
    weights to write instead of the model's own (a gathered state dict under ZeRO-3 / FSDP).
    """
    from ahn import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.memory_state_dict() if state is None else state
    tensors = {n: t.detach().contiguous().cpu() for n, t in state.items()}
    meta = {"format": "pt", "ahn_version": __version__}
    config_text = model.ahn_config.to_json_string()
    if path.is_dir():
        replace_file(path / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
        replace_file(path / CONFIG_NAME, lambda p: p.write_text(config_text))
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=meta)
        (tmp / CONFIG_NAME).write_text(config_text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
        if not (path / WEIGHTS_NAME).exists():
            raise ValueError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        config = AHNConfig.from_json_file(path / CONFIG_NAME)
        state = load_file(str(path / WEIGHTS_NAME))
    elif (path / "config.json").exists() and (path / OFFICIAL_WEIGHTS_NAME).exists():
        hf = json.loads((path / "config.json").read_text())
        impl = hf.get("_ahn_implementation")
        if impl not in OFFICIAL_MEMORY_NAMES:
            raise ValueError(
                f"{path / 'config.json'} has _ahn_implementation={impl!r}; official AHN releases use one of "
                f"{sorted(OFFICIAL_MEMORY_NAMES)}"
            )
        config = AHNConfig(memory=OFFICIAL_MEMORY_NAMES[impl])
        state = convert_official_state_dict(load_file(str(path / OFFICIAL_WEIGHTS_NAME)), config.memory)
    else:
        raise ValueError(
            f"{path} is not an adapter: expected {CONFIG_NAME} + {WEIGHTS_NAME} (ahn) or config.json with "
            f"_ahn_implementation + {OFFICIAL_WEIGHTS_NAME} (official AHN release)"
        )
    if overrides:
        config = replace(config, **overrides)
    return config, state


def load_adapter(base_model, path, **overrides):
    """Attach the adapter at ``path`` to ``base_model``; ``overrides`` replace AHNConfig fields (e.g. window).

    The memories are built and filled, and every name and shape checked, before ``base_model``
    is touched: a mismatched adapter leaves the base model exactly as it was.
    """
    from ahn.model import add_memory, build_memories, memory_parameter_names

    config, state = read_adapter(path, **overrides)
    memories = build_memories(base_model, config)
    expected = memory_parameter_names(base_model, memories)
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(
                f"adapter {path} has key {name!r} which this model does not have: the adapter was made for another "
                f"base model or memory layout (memory={config.memory!r}, layers={config.layers})"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"adapter {path}: {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}: the adapter was made for another base model"
            )
    missing = [n for n in expected if n not in state]
    if missing:
        raise ValueError(f"adapter {path} lacks {len(missing)} memory weights, first {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    return add_memory(base_model, config, memories)
