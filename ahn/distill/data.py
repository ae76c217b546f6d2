"""Training data for self-distillation: loading, validation, tokenisation, length filter, collation.

Sources (``load_records``):
    * a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a directory of them;
    * a Hugging Face Hub dataset id (needs network), with ``split``;
    * ``synthetic`` (see :mod:`ahn.distill.synthetic`): generated long-range recall data.

Each record holds exactly one of
    ``input_ids``  a list of token ids (pre-tokenised; no tokenizer needed), optionally with
                   ``labels`` (same length; -100 marks tokens that are not "response"),
    ``text``       a string, tokenised as is,
    ``messages``   a chat: a list of ``{"role": ..., "content": ...}``, rendered with the
                   tokenizer's chat template; its assistant tokens are the "response".
A malformed record (or a token id outside the model's vocabulary) raises ValueError naming
the file, the line (JSONL) or record index, and the field. Blank lines in JSONL are skipped,
as ``ahn eval`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import datasets
import torch

from ahn._jsonl import read_jsonl

from .losses import IGNORE_INDEX
from .synthetic import RecallTask, recall_records

FORMATS = ("input_ids", "text", "messages")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SYNTHETIC = "synthetic"


def check_record(record: Any, where: str, vocab_size: Optional[int] = None) -> str:
    """Validate one record (token ids below ``vocab_size`` when given); return its format
    (``input_ids`` / ``text`` / ``messages``)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object with one of the fields {FORMATS}, "
                         f"got {type(record).__name__}")
    present = [f for f in FORMATS if record.get(f) is not None]
    nulls = [f for f in FORMATS if f in record and record[f] is None]
    if not present and nulls:
        raise ValueError(f"{where}: field {nulls[0]!r} is null; a record needs a value in one of the fields {FORMATS}")
    if len(present) != 1:
        raise ValueError(f"{where}: a record needs exactly one of the fields {FORMATS}, found "
                         f"{present or sorted(record)}")
    fmt = present[0]
    value = record[fmt]
    labels = record.get("labels")
    if labels is not None and fmt != "input_ids":
        raise ValueError(f"{where}: field 'labels' goes with 'input_ids' only (chat records get theirs from the roles)")
    if fmt == "input_ids":
        if not isinstance(value, (list, tuple)) or not value or any(
            not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in value
        ):
            raise ValueError(f"{where}: field 'input_ids' must be a non-empty list of non-negative ints")
        if vocab_size is not None and max(value) >= vocab_size:
            raise ValueError(f"{where}: token id {max(value)} is outside the model's vocabulary (vocab_size "
                             f"{vocab_size}): the data was tokenised for another model")
        if labels is not None and (
            not isinstance(labels, (list, tuple)) or len(labels) != len(value)
            or any(not isinstance(t, int) or isinstance(t, bool) or (t < 0 and t != IGNORE_INDEX) for t in labels)
        ):
            raise ValueError(f"{where}: field 'labels' must be a list of ints (>= 0 or -100) as long as 'input_ids'")
    elif fmt == "text":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: field 'text' must be a non-empty string")
    else:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
    return fmt


def _files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in FILE_TYPES)
        if not files:
            raise ValueError(f"data directory {source} holds no {sorted(FILE_TYPES)} files")
        return files
    if source.suffix not in FILE_TYPES:
        raise ValueError(f"data file {source} has an unsupported type; use one of {sorted(FILE_TYPES)}")
    return [source]


def _check_jsonl(path: Path, vocab_size: Optional[int]) -> None:
    """Parse every line first: a broken line is reported with its number (datasets' error would not)."""
    count = 0
    try:
        for n, record in read_jsonl(path):
            check_record(record, f"{path}, line {n}", vocab_size)
            count += 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    if not count:
        raise ValueError(f"{path}: holds no records (the file is empty)")


def synthetic_records(num_examples: int = 1024, seed: int = 0, **task) -> list[dict]:
    """``num_examples`` multi-query associative-recall sequences (:mod:`ahn.distill.synthetic`) as
    ``input_ids`` + ``labels`` records; labels mark the answers, so ``response_only`` distils
    exactly the recall predictions. ``task``: :class:`~ahn.distill.synthetic.RecallTask` fields."""
    allowed = {f.name for f in fields(RecallTask)}
    unknown = sorted(set(task) - allowed)
    if unknown:
        raise ValueError(f"synthetic options {unknown} are unknown; allowed: num_examples, seed, {sorted(allowed)}")
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"synthetic num_examples={num_examples!r} must be an int >= 1")
    records = recall_records(RecallTask(**task), num_examples, seed)
    return [{"input_ids": r["input_ids"].tolist(), "labels": r["labels"].tolist()} for r in records]


def _common_schema(ds):
    """Bring a file's records to one schema (the three fields, absent ones None), so files of
    different formats and integer widths concatenate."""
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int64")),
        "text": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "labels": datasets.List(datasets.Value("int64")),
    })
    return ds.map(lambda r: {f: r.get(f) for f in (*FORMATS, "labels")}, remove_columns=ds.column_names,
                  features=features, desc="reading")


def load_records(source: str, *, split: str = "train", synthetic_options: Optional[dict] = None,
                 vocab_size: Optional[int] = None):
    """Load and validate the records of ``source``: a ``datasets.Dataset``.

    ``source`` is a file, a directory, ``"synthetic"`` or a Hub dataset id (tried last).
    ``vocab_size``: the model's; a token id at or above it is an error naming the record.
    """
    if source == SYNTHETIC:
        records = synthetic_records(**(synthetic_options or {}))
        for i, record in enumerate(records):
            check_record(record, f"synthetic record {i}", vocab_size)
        return datasets.Dataset.from_list(records)
    path = Path(source)
    if path.exists():
        parts = []
        for file in _files(path):
            if file.suffix == ".jsonl":
                _check_jsonl(file, vocab_size)
            elif file.stat().st_size == 0:
                raise ValueError(f"{file}: holds no records (the file is empty)")
            try:
                ds = datasets.load_dataset(FILE_TYPES[file.suffix], data_files=str(file), split="train")
            except Exception as e:  # datasets raises many types for unreadable files
                raise ValueError(f"{file}: cannot be read as {FILE_TYPES[file.suffix]} ({type(e).__name__}: {e})") from None
            if file.suffix != ".jsonl":
                for i, record in enumerate(ds):
                    check_record(record, f"{file} record {i}", vocab_size)  # JSONL was checked by line above
            parts.append(_common_schema(ds))
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if "/" not in source or source.startswith((".", "/")) or source.count("/") > 1:
        raise ValueError(f"data {source!r} is neither an existing file or directory, {SYNTHETIC!r}, "
                         "nor a Hub dataset id (owner/name)")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise ValueError(f"cannot load Hub dataset {source!r} split {split!r} ({type(e).__name__}: {e}); "
                         "without network, pass a local file") from None
    for i, record in enumerate(ds):
        check_record(record, f"{source} record {i}", vocab_size)
    return ds


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Render a chat with the tokenizer's template: ``(ids, is_response)`` per token.

    Assistant message i's tokens are those between the rendering of messages[:i] with the
    generation prompt and the rendering of messages[:i+1].
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("records with 'messages' need a tokenizer with a chat template; this tokenizer has none")

    def render(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    response = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        a = len(render(messages[:i], True))
        b = len(render(messages[: i + 1], False))
        for j in range(a, min(b, len(ids))):
            response[j] = True
    return ids, response


def tokenize_record(record: dict, tokenizer, *, max_length: Optional[int], response_only: bool) -> dict:
    """One record -> ``{"input_ids", "labels"}`` (labels -100 on non-response tokens), cut to ``max_length``."""
    fmt = next(f for f in FORMATS if record.get(f) is not None)
    if fmt == "input_ids":
        ids = list(record["input_ids"])
        given = record.get("labels")
        response = [t != IGNORE_INDEX for t in given] if given is not None else None
    elif tokenizer is None:
        raise ValueError(f"records with {fmt!r} need a tokenizer: the model directory has none; "
                         "pre-tokenise the data into 'input_ids'")
    elif fmt == "text":
        ids, response = tokenizer(record["text"], add_special_tokens=True)["input_ids"], None
    else:
        ids, response = chat_tokens(tokenizer, record["messages"])
    if response_only and response is None:
        raise ValueError("response_only needs chat records ('messages') or 'input_ids' with 'labels'; this record "
                         f"is {fmt!r} without labels: drop response_only or use such data")
    # Labels mark the response (all tokens when the record has no notion of one): response_only
    # distils only positions that predict them, response_weight weights them, CE trains on them.
    labels = [t if r else IGNORE_INDEX for t, r in zip(ids, response or [True] * len(ids))]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def prepare_dataset(ds, tokenizer, *, max_length: Optional[int], min_length: int, response_only: bool,
                    lossless: int = 0, vocab_size: Optional[int] = None, num_proc: Optional[int] = None):
    """Tokenise, cut to ``max_length`` and keep samples longer than ``min_length`` and ``lossless`` tokens.

    ``lossless``: the tokens at the start of a sample that are never distilled (sinks + window):
    a sample no longer than that holds nothing to train on. ``vocab_size``: the model's; the
    tokenizer's ids must stay below it (``input_ids`` records were checked by :func:`load_records`).
    """
    def fn(record):
        out = tokenize_record(record, tokenizer, max_length=max_length, response_only=response_only)
        if vocab_size is not None and record.get("input_ids") is None and max(out["input_ids"], default=0) >= vocab_size:
            raise ValueError(f"the tokenizer produced token id {max(out['input_ids'])}, outside the model's vocabulary "
                             f"(vocab_size {vocab_size}): the model directory's tokenizer belongs to another model")
        return out

    tokenised = ds.map(fn, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenising")
    keep = max(min_length, lossless)
    out = tokenised.filter(lambda r: len(r["input_ids"]) > keep, desc=f"keeping samples > {keep} tokens")
    if len(out) == 0:
        longest = max(len(ids) for ids in tokenised["input_ids"])
        cut = f" after max_length={max_length}" if max_length is not None else ""
        if lossless >= min_length:
            raise ValueError(f"no sample is longer than sinks + window = {lossless} tokens (the longest has {longest}"
                             f"{cut}): no position lies beyond the lossless part, so nothing would be distilled; use "
                             "a smaller window / sinks or longer data")
        raise ValueError(f"no sample is longer than min_length={min_length} tokens (the longest has {longest}{cut}); "
                         "lower min_length or use longer data")
    return out


@dataclass
class DistillCollator:
    """Right-pads a list of ``{"input_ids", "labels"}`` into ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``."""

    pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        B = len(features)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
