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
