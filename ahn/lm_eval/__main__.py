"""``python -m ahn.lm_eval ARGS``: lm-eval's command line (``lm_eval.__main__.cli_evaluate``) with the
``ahn`` model registered. ARGS are lm-eval's (``run --model ahn --model_args ... --tasks ...``); when a
task shipped with ahn (``ahn_smoke*``) is named and no ``--include_path`` is given, the shipped task
folder is added as ``--include_path``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from lm_eval.__main__ import cli_evaluate

from ahn.lm_eval import TASKS_DIR  # importing the package registers the "ahn" model with lm-eval


def shipped_task_names() -> set[str]:
    return {p.name for p in TASKS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}


def with_shipped_tasks(argv: Sequence[str]) -> list[str]:
    """``argv`` plus ``--include_path TASKS_DIR`` when it names a shipped task and includes no path itself."""
    argv = list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    tasks = []
    for i, a in enumerate(argv):
        if a == "--tasks" and i + 1 < len(argv):
            tasks += argv[i + 1].split(",")
        elif a.startswith("--tasks="):
            tasks += a.split("=", 1)[1].split(",")
    shipped = shipped_task_names()
    if any(t.strip() == s or t.strip().startswith(s + "_") for t in tasks for s in shipped):
        argv += ["--include_path", str(TASKS_DIR)]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = with_shipped_tasks(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm-eval", *argv]  # lm-eval's CLI reads sys.argv
    cli_evaluate()


if __name__ == "__main__":
    main()
