"""Qwen2 / Qwen2.5: the frozen attention's q, k, v after RoPE."""

from __future__ import annotations

from . import HybridAttentionMixin, register_family


@register_family("qwen2")
def _qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, apply_rotary_pos_emb

    class AHNQwen2Attention(HybridAttentionMixin, Qwen2Attention):
        def project_qkv(self, hidden_states, position_embeddings):
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # [B, T, heads, D]
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
            return q, k, v

    return Qwen2Attention, AHNQwen2Attention
