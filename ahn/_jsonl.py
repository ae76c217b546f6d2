"""JSON Lines files: reading them with errors that name the line, and appending to them a record at a time.

A low-level module (standard library only): the benchmarks' predictions files, the distillation
data and the trainer's log all read through it, so none of those layers imports another for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-empty line; a malformed line raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}")
            yield n, record


def read_appended(path: Path) -> list[dict]:
    """The records of a file written by :func:`append_line` (``[]`` if there is none yet); an unfinished last
    line (a writer killed mid-line) is cut off the file, so the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    return [record for _, record in read_jsonl(path)]


def append_line(path: Path, record: dict) -> None:
    """Append ``record`` as one line, flushed."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
