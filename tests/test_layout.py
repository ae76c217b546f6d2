"""Every Python package folder of the repo is declared in pyproject.toml (a non-editable install needs it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_declared():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join((pkg, *init.parent.relative_to(ROOT / folder).parts))
        for pkg, folder in setup["package-dir"].items()
        for init in (ROOT / folder).rglob("__init__.py")
        if ".venv" not in init.parts
    }
    missing = sorted(found - set(setup["packages"]))
    assert not missing, f"package folders not listed in pyproject.toml [tool.setuptools] packages: {missing}"


# What would tie ahn to one transformers release: restating a private forward, swapping classes,
# patching methods, copying a family's RoPE, or overriding the Trainer's private methods.
PRIVATE_SEAMS = {
    "def forward(self, hidden_states": "a restated transformers forward signature",
    "__class__ = ": "a class swap",
    "types.MethodType": "a patched method",
    "apply_rotary_pos_emb": "a family's RoPE code",
    "modeling_qwen": "an import from a family's modelling file",
    "def _save(": "an override of Trainer._save",
    "def _load_from_checkpoint": "an override of Trainer._load_from_checkpoint",
    '"full_attention":': "the dict-of-masks shortcut of a family's forward",
}


def test_no_private_transformers_seam_is_used():
    sources = [p for folder in ("ahn", "kernels", "distill", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {what} ({needle!r})" for p in sources for needle, what in PRIVATE_SEAMS.items()
             if needle in p.read_text()]
    assert not found, "\n".join(found)
