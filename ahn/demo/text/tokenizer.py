"""The text teacher's tokenizer: a byte-level BPE of 4096 tokens trained on the training essays only.

Byte level, so every string has a tokenization; digits are split one per token (as Llama and Qwen do), so a
7-digit magic number is 7 tokens whatever the digits, and copying it is 7 steps of the same induction. Training
is deterministic: the same texts give the same vocabulary and merges.

The pipeline is exactly Qwen2's (NFC, its pre-tokenizer regex, byte level without a regex of its own): for a
checkpoint whose config says ``qwen2``, ``AutoTokenizer`` builds ``Qwen2Tokenizer`` from the vocabulary and merges
with that fixed pipeline whatever ``tokenizer.json`` holds, so any other pipeline would tokenize differently
there. The unknown token is named (EOS, as Qwen names one token for both), or Qwen2Tokenizer would add one
beyond the model's vocabulary.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)  # ids 0, 1, 2
# Qwen2's pre-tokenizer pattern (transformers' Qwen2Tokenizer, PRETOKENIZE_REGEX; the same as Qwen's tiktoken
# pattern): contractions, letters with at most one leading non-letter, single digits, punctuation runs, spaces.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` tokens (specials included) trained on ``texts``, as a
    ``transformers`` fast tokenizer that adds no specials by itself (callers place BOS where they want it)."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {256 + len(SPECIALS)} (the 256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=EOS,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
