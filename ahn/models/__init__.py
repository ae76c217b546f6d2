"""Model families: one thin file each, mapping a transformers attention class to its hybrid subclass."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ahn.attention import AHNContext, hybrid_attention

# model_type -> loader of (base attention class, hybrid attention class); imported lazily so
# that `import ahn` does not import every transformers model.
_FAMILIES: dict[str, Callable[[], tuple[type, type]]] = {}


def register_family(model_type: str):
    def deco(loader):
        _FAMILIES[model_type] = loader
        return loader

    return deco


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def attention_classes(model_type: str) -> tuple[type, type]:
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by ahn; supported: {supported_model_types()} "
            "(a new family is one thin file in ahn/models/)"
        )
    return _FAMILIES[model_type]()


class HybridAttentionMixin(nn.Module):
    """Mixed into a family's attention class: the base forward unless the mask is an AHNContext.

    Subclasses implement ``project_qkv(hidden_states, position_embeddings)`` returning q
    ``[B, Hq, T, D]`` and k, v ``[B, Hkv, T, D]``, after RoPE, exactly as the base does.
    The memory module lives in ``self.ahn`` (None for a layer without memory; set by
    :func:`ahn.add_memory`, not a class attribute, which would shadow the registered module).
    """

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        if not isinstance(attention_mask, AHNContext):
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        out = hybrid_attention(self.ahn, hidden_states, q, k, v, attention_mask, self.layer_idx, self.scaling)
        return self.o_proj(out), None


from . import qwen2, qwen3  # noqa: E402,F401  (registration)
