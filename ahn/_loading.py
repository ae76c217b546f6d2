"""Loading a base model's config, tokenizer and weights from a local directory or a Hub id.

transformers answers a mistyped path with an ``OSError`` about repo-id characters or a failed
connection, and a directory without tokenizer files with an empty tokenizer that encodes
every text to nothing. These helpers turn both into a ``ValueError`` that says what is
missing and names the path, for the CLI to report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def from_path_or_hub(load: Callable[[str], T], spec: str, what: str, hint: str = "") -> T:
    """``load(spec)``; an ``OSError`` becomes a ValueError: "not found" (plus ``hint``) when ``spec`` is
    no local path, else one naming the path and ``what`` (e.g. "model config") that could not be read."""
    try:
        return load(spec)
    except OSError as e:
        if Path(spec).exists():
            raise ValueError(f"cannot read the {what} of {spec!r}: {e}") from None
        raise ValueError(f"model {spec!r} not found: no such directory, and not a reachable Hub id{hint}") from None


def load_tokenizer(spec: str):
    """The tokenizer of the model at ``spec`` (directory or Hub id); ValueError when it has none."""
    from transformers import AutoTokenizer  # start-up time: the CLI's parser modules import this one

    tokenizer = from_path_or_hub(AutoTokenizer.from_pretrained, spec, "tokenizer")
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        raise ValueError(f"the tokenizer of {spec!r} is missing: no tokenizer files there (tokenizer.json, or "
                         "vocab.json + merges.txt, ...); copy them from the base model's checkpoint")
    return tokenizer


def load_causal_lm(spec: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(spec, **kwargs)`` with a "not found" error for an unknown model."""
    from transformers import AutoModelForCausalLM  # start-up time

    return from_path_or_hub(lambda s: AutoModelForCausalLM.from_pretrained(s, **kwargs), spec, "model")
