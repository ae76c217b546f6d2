"""Shipped configs (``ahn.configs``): ``models/<name>.json`` are published configs of real base models."""

from __future__ import annotations

from pathlib import Path

from ahn._loading import from_path_or_hub

MODELS_DIR = Path(__file__).parent / "models"


def shipped_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_model_config(spec: str):
    """A transformers config from a shipped name (``Qwen2.5-3B-Instruct``, also with its ``Qwen/``
    prefix), a ``config.json`` path, a model directory, or a Hub id (needs network)."""
    from transformers import AutoConfig, PretrainedConfig  # start-up time: `ahn flops --help` and the CLI import this

    path = Path(spec)
    if path.is_file():
        config_dict, _ = from_path_or_hub(PretrainedConfig.get_config_dict, spec, "model config")
        if "model_type" not in config_dict:
            raise ValueError(f"{spec} has no \"model_type\" field, so its architecture is unknown; add one "
                             "(e.g. \"qwen2\") or pass a shipped config name")
        return AutoConfig.for_model(**config_dict)
    shipped = MODELS_DIR / f"{spec.split('/')[-1]}.json"
    if not path.is_dir() and shipped.is_file():
        return load_model_config(str(shipped))
    return from_path_or_hub(AutoConfig.from_pretrained, spec, "model config",
                            hint=f" (shipped configs: {', '.join(shipped_models())})")
