"""ahn: long-context Hugging Face LMs with sliding-window attention, sinks and a compressed memory."""

__version__ = "0.1.0"

__all__ = ["__version__"]
