"""Self-distillation losses: pure functions of tensors (no modules, no state, no logging).

The teacher is the frozen model with full attention, the student the same model with
sinks + window + memory. Position t's next-token distribution is compared where the
student cannot see everything the teacher sees: t >= S + W (the first token has left the
window). Positions are picked by :func:`distill_positions`; the losses then take the
selected rows ``[N, ...]`` and return per-position values ``[N]`` that the caller averages.

The LM head is applied chunk by chunk under activation checkpointing
(:func:`chunked_head_losses`), so ``[N, vocab]`` logits never exist at once: at 24k tokens
and a 151k vocabulary they would take 14 GiB in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of tokens that carry no loss (transformers' convention)
# salience_loss's score for tokens that do not compete: far below any score, finite (exp underflows to 0).
NON_CANDIDATE_SCORE = -1e9


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions, per row: ``[N, V], [N, V] -> [N]`` (float32).

    With a temperature T both distributions are softened and the result is scaled by T^2
    (Hinton et al., 2015), so gradients keep their magnitude across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy ``[N, V], [N] -> [N]`` (float32); rows with target -100 give 0."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden size, per row: ``[N, D], [N, D] -> [N]`` (float32)."""
    return (student.float() - teacher.float()).pow(2).mean(-1)


def distill_positions(
    attention_mask: torch.Tensor,  # [B, T] 1 for real tokens
    window: int,
    sinks: int,
    labels: Optional[torch.Tensor] = None,  # [B, T]; given: only positions whose next token has a label
) -> torch.Tensor:
    """``[B, T]`` bool: positions whose next-token distribution is distilled.

    Position t (counted from the row's first real token) is selected when it is a real
    token and t >= sinks + window, i.e. some earlier token is neither a sink nor in the
    window (before that the student equals the teacher exactly). With ``labels`` (chat data
    distilled on responses only), t is kept only if token t+1 has a label other than -100.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    index = real.long().cumsum(-1) - 1  # position within the row's real tokens
    keep = real & (index >= sinks + window)
    if labels is not None:
        if labels.shape != attention_mask.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of attention_mask {tuple(attention_mask.shape)}")
        has_next = torch.zeros_like(keep)
        has_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        keep &= has_next
    return keep


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets of each position's next-token distribution: ``labels`` shifted left, -100 at the end."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _head_terms(h_s, h_t, weight, bias, targets, kl_weights, temperature, with_kl: bool):
    s = F.linear(h_s, weight, bias)  # [n, V]
    kl = s.new_zeros(())
    if with_kl:
        kl = kl_divergence(s, F.linear(h_t, weight, bias), temperature)  # [n]
        kl = (kl * kl_weights).sum() if kl_weights is not None else kl.sum()
    ce = cross_entropy(s, targets).sum() if targets is not None else s.new_zeros(())
    return kl, ce


def chunked_head_losses(
    student_hidden: torch.Tensor,  # [N, D] final (normed) hidden states at the selected positions
    teacher_hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D] the LM head
    bias: Optional[torch.Tensor] = None,  # [V]
    targets: Optional[torch.Tensor] = None,  # [N] next-token labels (-100: none) for the CE term
    kl_weights: Optional[torch.Tensor] = None,  # [N] per-row weights of the KL term (default 1)
    *,
    temperature: float = 1.0,
    with_kl: bool = True,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) summed KL(teacher || student) and summed CE over the N rows, the LM head applied per chunk.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so
    peak memory is O(chunk * V) instead of O(N * V). Returns ``(kl_sum, ce_sum)`` (float32 scalars).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be >= 1")
    teacher_hidden = teacher_hidden.detach()
    kl = student_hidden.new_zeros((), dtype=torch.float32)
    ce = kl.clone()
    for a in range(0, student_hidden.shape[0], chunk):
        sl = slice(a, a + chunk)
        tg = targets[sl] if targets is not None else None
        kw = kl_weights[sl] if kl_weights is not None else None
        args = (student_hidden[sl], teacher_hidden[sl], weight, bias, tg, kw, temperature, with_kl)
        if student_hidden.requires_grad:
            k, c = checkpoint(_head_terms, *args, use_reentrant=False)
        else:
            k, c = _head_terms(*args)
        kl, ce = kl + k, ce + c
    return kl, ce


def evictable_positions(attention_mask: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """``[B, T]`` bool: tokens that leave the window inside the sequence (real, not sinks, and a real query
    ``window`` later evicts them): the candidates of :func:`salience_loss`."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    index = real.long().cumsum(-1) - 1  # position within the row's real tokens
    count = real.long().sum(-1, keepdim=True)
    return real & (index >= sinks) & (index + window <= count - 1)


def salience_loss(scores: torch.Tensor, target_mass: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Listwise cross entropy of salience scores against the teacher's attention mass (a scalar, float32).

    ``scores [B, H, T]``: each token's salience at eviction (per kv head); ``target_mass [B, H, T]``:
    the attention the full-attention teacher puts on it from queries at least a window later;
    ``candidates [B, T]``: the tokens that compete (:func:`evictable_positions`). Per (row, head),
    the target distribution is the mass normalised over the candidates and the prediction the
    softmax of the scores over them; (row, head) pairs with no target mass are left out.
    """
    if scores.shape != target_mass.shape or scores.shape[::2] != candidates.shape:
        raise ValueError(f"scores {tuple(scores.shape)}, target_mass {tuple(target_mass.shape)} and candidates "
                         f"{tuple(candidates.shape)} must be [B, H, T], [B, H, T] and [B, T]")
    keep = candidates.unsqueeze(1)  # [B, 1, T]
    target = target_mass.float() * keep
    total = target.sum(-1, keepdim=True)  # [B, H, 1]
    # Non-candidates get a finite floor, not -inf: a row without candidates stays finite, and so do its gradients.
    log_p = torch.log_softmax(scores.float().masked_fill(~keep, NON_CANDIDATE_SCORE), dim=-1)
    per_row = -(target / total.clamp(min=1e-12) * log_p).sum(-1)  # [B, H]
    has_target = (total.squeeze(-1) > 0).float()
    return (per_row * has_target).sum() / has_target.sum().clamp(min=1)
