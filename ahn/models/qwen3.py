"""Qwen3: like Qwen2 with per-head RMSNorm of q and k before RoPE."""

from __future__ import annotations

from . import HybridAttentionMixin, register_family


@register_family("qwen3")
def _qwen3():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, apply_rotary_pos_emb

    class AHNQwen3Attention(HybridAttentionMixin, Qwen3Attention):
        def project_qkv(self, hidden_states, position_embeddings):
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # [B, T, heads, D]
            q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
            k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
            return q, k, v

    return Qwen3Attention, AHNQwen3Attention
