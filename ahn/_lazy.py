"""Lazy package exports: names imported from their module on first access."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, table: dict[str, str]):
    """A module-level ``__getattr__`` for ``package`` that imports ``table[name]`` (a module path)
    when ``name`` is first looked up, so that importing the package itself stays light."""

    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
