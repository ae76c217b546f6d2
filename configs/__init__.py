"""Shipped configs (``ahn.configs``): ``models/<name>.json`` are published configs of real base models."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"


def shipped_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_model_config(spec: str):
    """A transformers config from a shipped name (``Qwen2.5-3B-Instruct``, also with its ``Qwen/``
    prefix), a ``config.json`` path, a model directory, or a Hub id (needs network)."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(spec)
    if path.is_file():
        config_dict, _ = PretrainedConfig.get_config_dict(str(path))
        return AutoConfig.for_model(**config_dict)
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    shipped = MODELS_DIR / f"{spec.split('/')[-1]}.json"
    if shipped.is_file():
        return load_model_config(str(shipped))
    try:
        return AutoConfig.from_pretrained(spec)
    except OSError as e:
        raise ValueError(
            f"cannot find a model config for {spec!r}: not a file, a directory, a shipped config "
            f"({', '.join(shipped_models())}) or a reachable Hub id ({e.__class__.__name__})"
        ) from None
