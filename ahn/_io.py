"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Temporary names carry the writing process's id (``.<name>.tmp-<pid>-<random>``), so that the
next writer in the same folder can remove what a killed writer left behind
(:func:`remove_stale_temporaries`) without touching the files of a live one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[^/]*$")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def make_readable(path, directory: bool = False) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the usual permissions (umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def replace_file(path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same directory, then an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
    os.close(fd)
    make_readable(tmp)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_folder(out, flag: str) -> None:
    """Refuse an output folder (the command's ``flag``, e.g. ``--out``) that is a file or cannot be written,
    before anything is created in it; a missing one must be creatable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; choose a folder (it is created if missing)")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: {existing} is not a writable folder; choose a folder you can write to")


def remove_stale_temporaries(folder) -> None:
    """Remove temporary files and folders that writers killed mid-write (their process is gone) left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
