"""ahn: long-context Hugging Face LMs with sliding-window attention, sinks and a compressed memory.

    import ahn
    model = ahn.add_memory(base, ahn.AHNConfig(memory="gated_deltanet", window=32640, sinks=128))
"""

__version__ = "0.1.0"

_LAZY = {
    "AHNConfig": "ahn.config",
    "AHNCache": "ahn.cache",
    "AHNModel": "ahn.model",
    "add_memory": "ahn.model",
    "available_memories": "ahn.memory",
}


def __getattr__(name):
    # Lazy so that `import ahn` (and `ahn --version`) does not import transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ahn' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
