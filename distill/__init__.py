"""Self-distillation of memory adapters (``ahn.distill``)."""
