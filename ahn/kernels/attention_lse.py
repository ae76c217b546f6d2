"""What the salience options need from attention beyond its output, on GPU without a [T, N] matrix.

:func:`ahn.attention.attend` (attention and its log-sum-exp) and the received-mass pass of
:func:`ahn.attention.window_attention` call these two functions; both share the arguments of the
attention block they serve:

* :func:`flex_attention_with_lse`: attention and its log-sum-exp from torch's public
  ``flex_attention`` (``torch.nn.attention.flex_attention``), compiled (a fused Triton kernel on
  CUDA), both differentiable through flex's own backward (which takes the log-sum-exp's gradient).
  The bool mask becomes a :class:`BlockMask` built from its 128 x 128 blocks (empty blocks are
  skipped, full ones need no mask reads).
* :func:`received_mass`: each key's received attention, ``sum_i mean_h exp(scale q_i.k_j - lse_i)``
  over the visible (i, j): a second pass over the keys from the log-sum-exp, in Triton on CUDA
  (:mod:`._triton.mass`), :func:`received_mass_reference` elsewhere. No autograd.

Which one runs is chosen per call from the device, with environment overrides for tests and
debugging: ``AHN_ATTENTION_LSE`` = ``auto`` (default: flex on CUDA; ahn.attention keeps torch's CPU
flash kernel on CPU) / ``flex`` (flex on any device; on CPU it runs uncompiled and has no backward) /
``explicit`` (the explicit float32 softmax of ahn.attention); ``AHN_RECEIVED_MASS`` = ``auto``
(Triton on CUDA) / ``triton`` (on any device: on CPU it needs ``TRITON_INTERPRET=1``) / ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # public since torch 2.5; AuxRequest (newer torch: the non-deprecated way to ask for the lse) where it exists
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # an older torch: ahn.attention's explicit softmax serves instead
    BlockMask = flex_attention = None
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None

# Environment overrides and their values (the first is the default).
LSE_ENV, LSE_CHOICES = "AHN_ATTENTION_LSE", ("auto", "flex", "explicit")
MASS_ENV, MASS_CHOICES = "AHN_RECEIVED_MASS", ("auto", "triton", "torch")
# flex_attention's sparse block (its default, _DEFAULT_SPARSE_BLOCK_SIZE): the mask is summarised per block this size.
FLEX_BLOCK = 128


def _setting(name: str, choices: tuple) -> str:
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}; unset it for the default "
                         f"({choices[0]})")
    return value


def lse_backend_setting() -> str:
    """``AHN_ATTENTION_LSE`` (``auto``, ``flex`` or ``explicit``)."""
    return _setting(LSE_ENV, LSE_CHOICES)


@functools.cache
def flex_available() -> bool:
    """torch's flex_attention with what this module needs: ``BlockMask.from_kv_blocks(..., seq_lengths=)`` for lengths
    that are not whole 128-blocks (added after torch 2.5, pytorch PR 141625; older torch uses the explicit softmax)."""
    return flex_attention is not None and "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


def use_flex(device: torch.device) -> bool:
    """Whether attention with its log-sum-exp on ``device`` runs :func:`flex_attention_with_lse`: on CUDA by
    default, anywhere with ``AHN_ATTENTION_LSE=flex``, never with ``explicit`` or without flex in this torch."""
    setting = lse_backend_setting()
    return flex_available() and (setting == "flex" or (setting == "auto" and device.type == "cuda"))


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process, at first use (importing ahn compiles nothing)."""
    return torch.compile(flex_attention)


def _block_mask(mask: torch.Tensor, Hq: int) -> "BlockMask":
    """A :class:`BlockMask` of ``mask [B, T, N]`` or ``[B, Hkv, T, N]`` bool for ``Hq`` query heads: per block
    of FLEX_BLOCK x FLEX_BLOCK, skipped (no entry visible), full (all visible) or partial (the mask is read)."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    B, Hm, T, N = mask.shape
    nq, nk = -(-T // FLEX_BLOCK), -(-N // FLEX_BLOCK)
    # Padded to whole blocks with False: the mask_mod may read any index of a block.
    padded = mask.new_zeros(B, Hm, nq * FLEX_BLOCK, nk * FLEX_BLOCK)
    padded[:, :, :T, :N] = mask
    blocks = padded.view(B, Hm, nq, FLEX_BLOCK, nk, FLEX_BLOCK)
    full = blocks.all(dim=5).all(dim=3)  # [B, Hm, nq, nk]
    partial = blocks.any(dim=5).any(dim=3) & ~full
    group = Hq // Hm  # query heads per mask head (Hq for a shared mask)
    if Hm > 1:  # flex takes one mask per query head (or one for all)
        full, partial = full.repeat_interleave(group, 1), partial.repeat_interleave(group, 1)

    def listed(which: torch.Tensor):
        """(blocks per query block [B, H, nq], their indices first [B, H, nq, nk]) int32."""
        order = torch.argsort(which.to(torch.int8), dim=-1, descending=True, stable=True)
        return which.sum(dim=-1, dtype=torch.int32), order.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[b, h // group, q_idx, kv_idx]

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(T, N))


def flex_attention_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
                            scale: float):
    """:func:`ahn.attention.attend` through torch's ``flex_attention``: ``q [B, Hq, T, D]``, ``keys, values
    [B, Hkv, N, D]`` (GQA), ``mask [B, T, N]`` / ``[B, Hkv, T, N]`` bool (True: visible; every row sees a key) or
    None. Returns ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``, both differentiable (flex's backward
    takes the log-sum-exp's gradient). Compiled on CUDA; elsewhere flex runs uncompiled (it materialises the scores,
    and torch has no flex backward on CPU: a test / debugging path)."""
    block_mask = None if mask is None else _block_mask(mask, q.shape[1])
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
    if AuxRequest is not None:
        out, aux = fn(q, keys, values, return_aux=AuxRequest(lse=True), **kw)
        lse = aux.lse
    else:
        out, lse = fn(q, keys, values, return_lse=True, **kw)
    return out, lse.float()


# ----------------------------------------------------------------------------- received mass
def use_triton_mass(device: torch.device) -> bool:
    """Whether :func:`received_mass` on ``device`` runs the Triton kernel: on CUDA with triton installed by default,
    anywhere with ``AHN_RECEIVED_MASS=triton``, never with ``torch``."""
    setting = _setting(MASS_ENV, MASS_CHOICES)
    if setting == "triton":
        return True
    return setting == "auto" and device.type == "cuda" and importlib.util.find_spec("triton") is not None


def received_mass_reference(q: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor], lse: torch.Tensor,
                            scale: float, n_sinks: int) -> torch.Tensor:
    """The specification of :func:`received_mass` (it materialises ``[B, Hq, T, N - n_sinks]`` float32)."""
    B, Hq, T, D = q.shape
    Hkv = keys.shape[1]
    ctx = keys[:, :, n_sinks:]  # [B, Hkv, N', D]
    logits = torch.matmul((q * scale).reshape(B, Hkv, Hq // Hkv * T, D), ctx.transpose(-1, -2)).float()
    logits = logits.view(B, Hkv, Hq // Hkv, T, -1)  # [B, Hkv, R, T, N']
    if mask is not None:
        logits.masked_fill_(~mask[..., n_sinks:].view(B, -1, 1, T, ctx.shape[2]), float("-inf"))
    p = logits.sub_(lse.float().view(B, Hkv, -1, T, 1)).exp_()
    return p.sum(dim=3).mean(dim=2)


# exp of a float32 argument below about -87 (a result that underflows, -inf included) takes a scalar path on CPU
# that is 5-35x slower than the vectorised one (measured with torch 2.13: 0.17 ms for 164k arguments in [-4, 4],
# 0.84 ms with half of them -inf, 2.1-6.3 ms below -87): arguments are clamped to this floor and masked entries are
# zeroed after the exp, not set to -inf before it. e^-87 ~ 1.6e-38: nothing a float32 sum of probabilities can see.
EXP_FLOOR = -87.0
# The same for exp2 (2^-126, the smallest normal float32; exp2 of -inf is fast too) and the factor to base 2.
EXP2_FLOOR = -126.0
LOG2E = 1.4426950408889634

# Queries per step of :func:`received_mass_in_bands`: a step's scores are [R * sub, W + sub], so fewer queries waste
# fewer masked keys (W / (W + sub) of each row is visible) and stay nearer the cache; below 64 the steps' overhead
# shows.
MASS_QUERIES = 64


def received_mass_in_bands(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor, scale: float,
                           own: int, window: int, gap: int = 0, stride: int = 1, first: int = 0) -> torch.Tensor:
    """The attention each key receives from a block of queries: ``sum_i mean_h exp(scale q_hi . k_j - lse_hi)`` over
    the visible pairs (the softmax's probabilities, from its log-sum-exp), without autograd.

    ``q [B, Hkv, R, bq, D]`` (R query heads per kv head), ``keys [B, Hkv, n, D]``, ``mask [B, bq, n]`` bool
    (True: visible; ``[1, bq, n]``: one for every row), ``lse [B, Hkv, R, bq]`` float32 of the whole softmax (keys
    beyond these, the sinks say, count in it), ``own``: the column of query 0's own slot; query i sees at most
    columns ``own + i - window + 1 .. own + i`` (a sliding window). ``gap``: count only queries at least this many
    slots after the key (the teacher's probe). ``stride``, ``first``: count only queries ``first, first + stride,
    ...`` of the block, each ``stride`` times (an estimate of the sum over all queries from every ``stride``-th:
    ``AHNConfig.salience_mass_stride``). Returns ``[B, Hkv, n]`` float32.

    Steps of :data:`MASS_QUERIES` queries: each scores only its band of columns, with ``-lse`` folded into the
    matmul (``[q * scale, -lse] . [k, 1]``, in base 2) and the exp's argument floored at :data:`EXP2_FLOOR`; the
    middle of the band, which every query of the step sees in a steady block, is not masked."""
    B, Hkv, R, bq, D = q.shape
    n = keys.shape[2]
    if stride != 1 or first != 0:  # the counted queries only; their positions in the block set the bands' columns
        rows = torch.arange(first, bq, stride, device=q.device)
        q, mask, lse = q.index_select(3, rows), mask.index_select(1, rows), lse.index_select(3, rows)
    pos = range(first, bq, stride)  # pos[j]: the block position of counted query j
    nq = len(pos)
    # In base 2 (log2(e) folded into q and the lse): exp2 is 1.9x cheaper than exp on CPU (torch 2.13, 2.15 against
    # 1.13 ms for 2M floats) and has no slow path down to EXP2_FLOOR.
    qs = torch.cat([q.float() * (scale * LOG2E), -LOG2E * lse.float().unsqueeze(-1)], dim=-1)  # [B, Hkv, R, nq, D + 1]
    ks = F.pad(keys.float(), (0, 1), value=1.0).transpose(-1, -2)  # [B, Hkv, D + 1, n]
    mass = torch.zeros(B, Hkv, n, device=q.device)
    for j0 in range(0, nq, MASS_QUERIES):
        j1 = min(nq, j0 + MASS_QUERIES)
        b, p0, p1 = j1 - j0, pos[j0], pos[j1 - 1]  # queries, first and last block position of the step
        c0, c1 = max(0, own + p0 - window + 1), min(n, own + p1 + 1 - gap)  # the columns any query of the step may see
        if c1 <= c0:
            continue
        s = torch.matmul(qs[:, :, :, j0:j1].reshape(B, Hkv, R * b, D + 1), ks[..., c0:c1]).view(B, Hkv, R, b, -1)
        m = mask[:, j0:j1, c0:c1]
        if gap:
            rows = torch.tensor(pos[j0:j1], device=q.device).view(-1, 1)
            m = m & (torch.arange(c0, c1, device=q.device) <= rows + own - gap)
        m = m.view(m.shape[0], 1, 1, b, -1)  # (B or 1: a mask shared by the rows)
        m0, m1 = max(c0, own + p1 + 1 - window) - c0, min(c1, own + p0 + 1 - gap) - c0  # the columns every query may see
        s = s.clamp_(min=EXP2_FLOOR).exp2_()
        # A broadcast bool multiply: 7x faster than masked_fill_ with the same broadcast mask (torch 2.13, CPU).
        if m1 > m0 and bool(m[..., m0:m1].all()):
            s[..., :m0].mul_(m[..., :m0])
            s[..., m1:].mul_(m[..., m1:])
        else:
            s.mul_(m)
        mass[:, :, c0:c1] += s.view(B, Hkv, R * b, -1).sum(dim=2)
    return mass.mul_(stride / R)


def received_mass(q: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor], lse: torch.Tensor, scale: float,
                  n_sinks: int) -> torch.Tensor:
    """Each key's received attention in one block: ``sum_i mean_h exp(scale q_hi . k_j - lse_hi)`` over the queries
    i that see key j, averaged over the query heads h of its kv head; the first ``n_sinks`` keys are left out.

    ``q [B, Hq, T, D]``, ``keys [B, Hkv, N, D]``, ``mask [B, T, N]`` or ``[B, Hkv, T, N]`` bool or None,
    ``lse [B, Hq, T]`` the attention's log-sum-exp (float32). Returns ``[B, Hkv, N - n_sinks]`` float32, without
    gradient. Triton on CUDA (:func:`use_triton_mass`; no ``[T, N]`` matrix), else the torch reference."""
    with torch.no_grad():
        if use_triton_mass(q.device):
            # optional dependency: triton (CUDA, or its CPU interpreter)
            from ._triton.mass import triton_received_mass
            return triton_received_mass(q, keys, mask, lse, scale, n_sinks)
        return received_mass_reference(q, keys, mask, lse, scale, n_sinks)
