"""How much each memory rule stores for its state size: gap closed against key-value pairs, rule by rule.

    python -m ahn.benchmarks.capacity --out capacity                 # every rule, 4 / 8 / 16 pairs (CPU, hours)
    python -m ahn.benchmarks.capacity --memories kda gated_deltanet --pairs 8 --jobs 2 --out capacity

Each cell is one ``ahn demo`` run (:func:`ahn.demo.run.run_demo`): the same shipped teacher, the same
training recipe and the same held-out sequences, with the memory alone by default (no priority
buffer, no salience-gated writes, the paper's read-out: ``--configuration memory``), because the
buffer would hide the state's capacity (with it every rule closes ~0.98 of the gap at 8 pairs).
``--configuration recommended`` runs the demo's default options instead.

Beside each rule it reports what its memory keeps per sequence, measured on the real cache after
one held-out sequence: the state (every layer's D x D matrices per head, float32) and the write
gates kept per window token until the token is written. Runs are resumable: each cell's
``results.json`` is written atomically when it finishes and is reused by the next invocation with
the same settings; ``capacity.json`` / ``capacity.md`` / ``capacity.png`` are rebuilt from the cells.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from ahn._io import check_writable_folder, replace_file
from ahn.adapters import WEIGHTS_NAME
from ahn.demo.run import DemoSettings, max_pairs, run_demo  # this benchmark is made of demo runs
from ahn.demo.teacher import DEMO_TASK, load_teacher
from ahn.memory import available_memories
from ahn.model import AHNModel, cache_kwargs
from ahn.plotting import line_panels

CONFIGURATIONS = {
    "memory": {"buffer_slots": 0, "salience_writes": False, "readout": "add"},
    "recommended": {},  # the demo's defaults
}
DEFAULT_PAIRS = (4, 8, 16)
SUMMARY_NAME = "capacity.json"


def cell_dir(out: Path, memory: str, pairs: int) -> Path:
    return out / f"{memory}-pairs{pairs}"


def run_cell(memory: str, pairs: int, out: str, settings: dict, threads: Optional[int]) -> dict:
    """One demo run (in a worker process when ``--jobs`` > 1); returns its results.json plus the cache sizes."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    folder = cell_dir(Path(out), memory, pairs)
    results = run_demo(memory, out=folder, settings=DemoSettings(num_pairs=pairs, **settings), progress=False,
                       print_fn=lambda line: None)
    return {"memory": memory, "pairs": pairs, "beyond": results["memories"][memory]["beyond"], "within": results["memories"][memory]["within"],
            "gap_closed": results["memories"][memory]["gap_closed"], "full": results["full"],
            "window": results["window"], "train_seconds": results["memories"][memory]["train_seconds"],
            "memory_params": adapter_params(folder / f"adapter-{memory}"),
            **cache_sizes(folder / f"adapter-{memory}")}


def adapter_params(adapter: Path) -> int:
    """The trained parameters (every tensor of the adapter's weights file), read from its header."""
    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def cache_sizes(adapter: Path) -> dict:
    """Bytes the memory keeps for one sequence, read off a real cache after one held-out-length sequence:
    the state (all layers) and the write gates per window token (all layers)."""
    model = AHNModel.from_pretrained(load_teacher(), str(adapter))
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.zeros(1, DEMO_TASK.seq_len, dtype=torch.long), **cache_kwargs(model, cache))
    layers = [layer for layer in cache.layers if layer.memory_state is not None]
    state = sum(layer.memory_state.numel() * layer.memory_state.element_size() for layer in layers)
    gates = sum(layer.gates[:, 0].numel() * layer.gates.element_size() for layer in layers)  # one window token
    return {"state_bytes": state, "gate_bytes_per_window_token": gates}


def summary_table(cells: dict, memories: Sequence[str], pairs: Sequence[int]) -> str:
    """Markdown: one row per rule, gap closed (beyond-window accuracy) per pair count, and the sizes."""
    head = ("| memory | state bytes | gate bytes / window token | trained parameters | "
            + " | ".join(f"{p} pairs" for p in pairs) + " |")
    lines = [head, "|" + " --- |" * (4 + len(pairs))]
    for mem in memories:
        row = [cells.get((mem, p)) for p in pairs]
        sizes = next((c for c in row if c is not None), None)
        state, gates, params = ("-", "-", "-") if sizes is None else (
            f"{sizes['state_bytes']:,}", f"{sizes['gate_bytes_per_window_token']:,}", f"{sizes['memory_params']:,}")
        values = ["-" if c is None else f"{c['gap_closed']:.3f} ({100 * c['beyond']:.1f}%)" for c in row]
        lines.append(f"| {mem} | {state} | {gates} | {params} | " + " | ".join(values) + " |")
    refs = [f"{p} pairs: full attention {100 * c['full']:.1f}%, window {100 * c['window']:.1f}%"
            for p in pairs for c in [next((cells[(m, p)] for m in memories if (m, p) in cells), None)] if c]
    return "\n".join(lines) + "\n\nEach cell: gap closed (beyond-window accuracy). " + "; ".join(refs) + ".\n"


def plot(path: Path, cells: dict, memories: Sequence[str], pairs: Sequence[int], title: str) -> None:
    series = {}
    for mem in memories:
        done = [(p, cells[(mem, p)]) for p in pairs if (mem, p) in cells]
        if done:
            label = f"{mem} ({done[0][1]['state_bytes'] / 1024:.0f} KiB state)"
            series[label] = ([p for p, _ in done], [c["gap_closed"] for _, c in done])
    line_panels(path, title, [("key-value pairs", "gap closed", series, True)], figsize=(7, 4.5))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ahn.benchmarks.capacity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memories", nargs="+", default=None, metavar="RULE",
                   help=f"rules to compare (default: all of {', '.join(available_memories())})")
    p.add_argument("--pairs", nargs="+", type=int, default=list(DEFAULT_PAIRS), help="key-value pairs per sequence")
    p.add_argument("--configuration", choices=sorted(CONFIGURATIONS), default="memory",
                   help="memory: the memory alone (default); recommended: the demo's default options")
    p.add_argument("--steps", type=int, default=DemoSettings.steps, help="distillation steps per run")
    p.add_argument("--eval-examples", type=int, default=DemoSettings.eval_examples, help="held-out sequences")
    p.add_argument("--batch-size", type=int, default=DemoSettings.batch_size, help="training batch size")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (worker processes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's choice)")
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    a = p.parse_args(argv)
    memories = a.memories or list(available_memories())
    unknown = [m for m in memories if m not in available_memories()]
    if unknown:
        p.error(f"--memories {' '.join(unknown)}: unknown; choose from {', '.join(available_memories())}")
    bad = [n for n in a.pairs if not 1 <= n <= max_pairs()]
    if bad or a.steps < 1 or a.jobs < 1 or a.eval_examples < 1 or a.batch_size < 1:
        p.error(f"need 1 <= --pairs <= {max_pairs()} (got {bad or a.pairs}) and positive --steps, --jobs, "
                "--eval-examples, --batch-size")
    try:
        check_writable_folder(a.out, "--out")
    except ValueError as e:
        p.error(str(e))
    settings = dict(CONFIGURATIONS[a.configuration], steps=a.steps, eval_examples=a.eval_examples,
                    batch_size=a.batch_size)
    a.out.mkdir(parents=True, exist_ok=True)
    summary_path = a.out / SUMMARY_NAME
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if previous and previous.get("settings") != settings:
        p.error(f"--out {a.out} holds runs with other settings ({previous.get('settings')}); choose another folder")
    cells = {(c["memory"], c["pairs"]): c for c in previous.get("cells", [])}
    for (m, n), cell in cells.items():  # cells written before the parameter count was reported
        cell.setdefault("memory_params", adapter_params(cell_dir(a.out, m, n) / f"adapter-{m}"))
    todo = [(m, n) for n in a.pairs for m in memories if (m, n) not in cells]
    print(f"capacity: {len(todo)} runs to do, {len(memories) * len(a.pairs) - len(todo)} reused ({a.configuration} "
          f"configuration, {a.steps} steps)", flush=True)

    def save():
        data = {"settings": settings, "configuration": a.configuration,
                "cells": [cells[key] for key in sorted(cells)]}
        replace_file(summary_path, lambda path: path.write_text(json.dumps(data, indent=2) + "\n"))
        done = [m for m in memories if any((m, n) in cells for n in a.pairs)]
        table = summary_table(cells, done, a.pairs)
        replace_file(a.out / "capacity.md", lambda path: path.write_text(table))
        if done:
            plot(a.out / "capacity.png", cells, done, a.pairs, f"demo recall, {a.configuration} configuration")
        return table

    def finished(cell: dict) -> None:
        cells[(cell["memory"], cell["pairs"])] = cell
        print(f"capacity: {cell['memory']} at {cell['pairs']} pairs: gap closed {cell['gap_closed']:.3f} (beyond "
              f"{100 * cell['beyond']:.1f}%, within {100 * cell['within']:.1f}%), {cell['train_seconds']:.0f} s",
              flush=True)
        save()

    if a.jobs == 1:
        for m, n in todo:
            finished(run_cell(m, n, str(a.out), settings, a.threads))
    else:
        # Fresh interpreters ("spawn"): a forked child of a process whose torch thread pools are running can hang.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=a.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(run_cell, m, n, str(a.out), settings, a.threads) for m, n in todo]
            for future in concurrent.futures.as_completed(futures):
                finished(future.result())
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
