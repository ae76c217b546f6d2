"""Self-distillation of memory adapters (``ahn distill``): losses, window sampling, data, trainer.

The frozen base model with full attention is the teacher; the same model with sinks +
sliding window + memory is the student; only the memory is trained.

    from ahn.distill import DistillConfig, distill
    distill(DistillConfig(model="Qwen/Qwen2.5-3B-Instruct", data="train.jsonl", output="out"))
"""

from ahn._lazy import lazy_exports

_LAZY = {
    "DistillConfig": "ahn.distill.config",
    "WindowSampler": "ahn.distill.sampling",
    "distill": "ahn.distill.trainer",
    "chunked_head_losses": "ahn.distill.losses",
    "cross_entropy": "ahn.distill.losses",
    "distill_positions": "ahn.distill.losses",
    "hidden_mse": "ahn.distill.losses",
    "kl_divergence": "ahn.distill.losses",
}


# Lazy: `ahn distill --help` builds its flags from DistillConfig without importing torch.
__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = list(_LAZY)
