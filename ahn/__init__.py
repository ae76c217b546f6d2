"""ahn: long-context Hugging Face LMs with sliding-window attention, sinks and a compressed memory.

    import ahn
    model = ahn.add_memory(base, ahn.AHNConfig(memory="gated_deltanet", window=32640, sinks=128))
"""

from ahn._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "AHNConfig": "ahn.config",
    "AHNCache": "ahn.cache",
    "AHNModel": "ahn.model",
    "add_memory": "ahn.model",
    "available_memories": "ahn.memory",
}


# Lazy so that `import ahn` (and `ahn --version`) does not import transformers.
__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["__version__", *_LAZY]
