"""`ahn demo`: memory recovering what the window forgot, on CPU, in minutes.

1. The shipped teacher (``ahn/demo/weights``, or a retrained one with ``retrain_teacher``)
   answers multi-query associative recall over 256 tokens with full attention.
2. ``ahn distill`` trains a memory into it (window 32, sinks 4) on generated recall data:
   KL(teacher || student) on the answer predictions.
3. The same held-out sequences are scored three ways (full attention, sinks + window,
   window + memory): accuracy on answers whose source lies beyond the window (and within it,
   as a sanity check), by distance, as a table, ``results.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ahn._cli_args import int_at_least
from ahn._io import check_writable_folder, replace_file
from ahn._progress import library_progress
from ahn.config import READOUTS, readout_choice
from ahn.distill.config import DistillConfig

# torch, the model, the trainer and this package's modules that import them (teacher, evaluate, analysis) are
# imported when the demo runs, so that building the command line (``ahn --help``) stays instant ("start-up time").

RESULTS_NAME = "results.json"
DEFAULT_MEMORY = "gated_deltanet"
PLOT_NAME = "accuracy.png"
SALIENCE_PLOT_NAME = "salience.png"
# torch CPU threads of a run unless --threads is given: floating-point sums (and so the table, to the last
# digit) depend on how work is split across threads; the documented table was measured at 2.
DEMO_THREADS = 2


@dataclass(frozen=True)
class DemoSettings:
    """The distillation and evaluation settings of the demo (chosen by measurement, see README).

    num_pairs: key-value pairs per sequence. The teacher learned 8; with 8 the memory's D x D
        states per head saturate (about 0.65 of the gap closed in a measured run), with 4 they
        hold them (about 0.84), so the demo uses 4 and ``--pairs 8`` shows the capacity limit.
    steps / batch_size / learning_rate / warmup_ratio / lr_scheduler: the memory's training run
        (a constant rate after warmup: 300 steps are far from convergence, a decay only slows them).
    response_weight: KL weight of the answer predictions relative to the other positions
        beyond the window (answers are ~3% of them; weighting them 10x nearly doubled the gap
        closed in the measured runs).
    train_examples: generated training sequences (seed ``seed``); eval_examples: held-out
        sequences (seed ``eval_seed``).
    buffer_slots / salience_writes / readout: the memory's :mod:`ahn.salience` options. The demo
        runs the recommended configuration, 16 buffer slots per layer and kv head (32 tokens per
        layer: 15% of the ~220 evicted), salience-gated writes and the deferring read-out; the
        ablation in docs/salience.md gives each one's share. ``--buffer 0 --no-salience-writes
        --readout add`` is the paper's mechanism.
    salience_mass: whether the salience score reads the attention each token received in the window
        (docs/salience.md: its measured worth and cost).
    salience_mass_stride: that mass from every s-th query only (``AHNConfig.salience_mass_stride``; the
        default is exact at the demo's 32-token window).
    salience_weight: weight of the scorer's loss against the teacher's attention mass.
    """

    num_pairs: int = 4
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 1e-2
    warmup_ratio: float = 0.07
    lr_scheduler: str = "constant_with_warmup"
    response_weight: float = 10.0
    train_examples: Optional[int] = None  # default steps * batch_size: fresh sequences every step
    eval_examples: int = 256
    buffer_slots: int = 16
    salience_writes: bool = True
    readout: str = "defer"
    salience_mass: bool = True
    salience_mass_stride: Optional[int] = None
    salience_weight: float = 1.0
    seed: int = 0
    eval_seed: int = 20261  # never used for training data (train_teacher draws from seed + 1)


def _memories(memory: str) -> list[str]:
    from ahn.memory import available_memories  # start-up time

    if memory == "all":  # the default rule first: it is the one "ahn" in results.json reports
        return sorted(available_memories(), key=lambda m: (m != DEFAULT_MEMORY, m))
    if memory not in available_memories():
        raise ValueError(f"memory={memory!r} is unknown; choose one of {available_memories()} or 'all'")
    return [memory]


def max_pairs() -> int:
    """The most key-value pairs the demo's sequences hold (the recall task's own checks decide)."""
    from .teacher import DEMO_TASK  # start-up time

    def fits(n: int) -> bool:
        try:
            replace(DEMO_TASK, num_pairs=n)
        except ValueError:
            return False
        return True

    n = 1
    while fits(n + 1):
        n += 1
    return n


def default_out_dir() -> Path:
    """A fresh ``ahn-demo-<date>-<time>`` folder in the working directory."""
    return Path(time.strftime("ahn-demo-%Y%m%d-%H%M%S"))


def run_demo(memory: str = DEFAULT_MEMORY, out: Optional[Path] = None, settings: DemoSettings = DemoSettings(),
             retrain_teacher: bool = False, teacher_steps: Optional[int] = None, progress: bool = True,
             print_fn=print) -> dict:
    """Run the demo; returns the results written to ``out/results.json``."""
    out = Path(out) if out is not None else default_out_dir()
    check_writable_folder(out, "--out")  # before the slow imports below

    import torch  # start-up time

    from ahn.distill.synthetic import sample_recall
    from ahn.distill.trainer import distill
    from ahn.model import AHNModel

    from .analysis import format_analysis
    from .evaluate import evaluate_modes
    from .teacher import DEMO_SINKS, DEMO_TASK, DEMO_WINDOW, WEIGHTS_DIR, load_teacher, train_teacher

    memories = _memories(memory)
    teacher_dir = out / "teacher" if retrain_teacher else WEIGHTS_DIR
    task = {"seq_len": DEMO_TASK.seq_len, "num_pairs": settings.num_pairs}
    held_out_task = replace(DEMO_TASK, num_pairs=settings.num_pairs)
    # Built (and so checked) before anything is written.
    configs = {mem: DistillConfig(
        model=str(teacher_dir), memory=mem, data="synthetic", output=str(out / f"adapter-{mem}"), resume="never",
        synthetic={"num_examples": settings.train_examples or settings.steps * settings.batch_size,
                   "seed": settings.seed, **task},
        min_length=0, max_length=None, response_weight=settings.response_weight, window=DEMO_WINDOW,
        sinks=DEMO_SINKS, buffer_slots=settings.buffer_slots, salience_writes=settings.salience_writes,
        readout=settings.readout, salience_mass=settings.salience_mass, salience_mass_stride=settings.salience_mass_stride, salience_weight=settings.salience_weight, learning_rate=settings.learning_rate, warmup_ratio=settings.warmup_ratio, weight_decay=0.0,
        lr_scheduler=settings.lr_scheduler,
        batch_size=settings.batch_size, max_steps=settings.steps, logging_steps=max(1, settings.steps // 10),
        save_steps=settings.steps, save_total_limit=1, seed=settings.seed, progress=progress,
    ) for mem in memories}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if retrain_teacher:
        print_fn(f"ahn demo: training the teacher from scratch into {teacher_dir}")
        train_teacher(teacher_dir, seed=settings.seed, steps=teacher_steps, progress=progress)
    held_out = sample_recall(held_out_task, settings.eval_examples, torch.Generator().manual_seed(settings.eval_seed))
    # "full" / "window" / "ahn" hold beyond-window accuracies; the attention setting has its own key.
    results: dict = {"task": task, "attention": {"window": DEMO_WINDOW, "sinks": DEMO_SINKS}, "memories": {}, "settings": {
        k: getattr(settings, k) for k in settings.__dataclass_fields__}}
    for mem in memories:
        print_fn(f"ahn demo: distilling a {mem} memory into the teacher ({settings.steps} steps)")
        t0 = time.perf_counter()
        adapter = distill(configs[mem])
        seconds = time.perf_counter() - t0
        with library_progress(progress):
            model = AHNModel.from_pretrained(load_teacher(teacher_dir), adapter)
        modes = ("full", "window", "ahn") if not results.get("detail") else ("ahn",)
        r = evaluate_modes(model, held_out, DEMO_WINDOW, modes=modes)
        if "detail" not in results:
            results["detail"] = {m: r["detail"][m] for m in ("full", "window")}
            results["counts"] = r["counts"]
            results["full"], results["window"] = r["full"], r["window"]
        results["memories"][mem] = {"beyond": r["detail"]["ahn"]["beyond"], "within": r["detail"]["ahn"]["within"],
                                    "train_seconds": round(seconds, 1), "by_distance": r["detail"]["ahn"]["by_distance"],
                                    "analysis": analyse(model, held_out, held_out_task, out, mem == memories[0])}
    first = memories[0]
    results["ahn"] = results["memories"][first]["beyond"]
    gap = results["full"] - results["window"]
    for mem, r in results["memories"].items():
        r["gap_closed"] = (r["beyond"] - results["window"]) / gap if gap > 0 else None
    results["gap_closed"] = results["memories"][first]["gap_closed"]
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["threads"] = torch.get_num_threads()
    write_outputs(results, out)
    print_fn(format_table(results))
    analysis = format_analysis(results["memories"][first]["analysis"])
    if analysis:
        print_fn(f"{first}: " + analysis.replace("\n", f"\n{first}: "))
    print_fn(f"ahn demo: {results['seconds']:.0f} s on {results['threads']} threads; results in {out / RESULTS_NAME}, plot in {out / PLOT_NAME}")
    return results


def analyse(model, held_out: dict, task, out: Path, plot: bool) -> dict:
    """The analysis of :mod:`ahn.demo.analysis` on the held-out sequences; ``plot``: also write salience.png."""
    from .analysis import buffer_at_query, drift, plot_salience, salience_by_kind  # start-up time (torch)
    from .teacher import DEMO_WINDOW

    by_kind, scores = salience_by_kind(model, held_out, task)
    if plot and scores is not None:
        plot_salience(out / SALIENCE_PLOT_NAME, held_out["input_ids"][0], {k: v[:1] for k, v in scores.items()}, task,
                      DEMO_WINDOW)
    return {"salience_by_kind": by_kind, "buffer_at_query": buffer_at_query(model, held_out, task),
            "drift": drift(model, held_out, DEMO_WINDOW)}


def write_outputs(results: dict, out: Path) -> None:
    from .evaluate import plot_accuracy  # start-up time

    replace_file(out / RESULTS_NAME, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    detail = dict(results["detail"])
    for mem, r in results["memories"].items():
        detail[f"ahn ({mem})"] = {"by_distance": r["by_distance"]}
    plot_accuracy({"detail": detail}, out / PLOT_NAME,
                  title=f"recall over {results['task']['seq_len']} tokens, window {results['attention']['window']} + "
                        f"{results['attention']['sinks']} sinks")


def format_table(results: dict) -> str:
    """Console table: accuracy beyond / within the window per mode, and the share of the gap closed."""
    def pct(x):
        return "-" if x is None else f"{100 * x:5.1f}%"

    rows = [("full attention", results["detail"]["full"]["beyond"], results["detail"]["full"]["within"], None),
            ("sinks + window", results["detail"]["window"]["beyond"], results["detail"]["window"]["within"], None)]
    for mem, r in results["memories"].items():
        rows.append((f"window + {mem}", r["beyond"], r["within"], r["gap_closed"]))
    c = results["counts"]
    lines = [f"{'':<24}{'beyond window':>15}{'within window':>15}{'gap closed':>12}",
             f"{'(answers)':<24}{c['beyond']:>15}{c['within']:>15}"]
    lines += [f"{name:<24}{pct(b):>15}{pct(w):>15}{pct(g) if g is not None else '':>12}" for name, b, w, g in rows]
    return "\n".join(lines)


TASKS = ("recall", "text")
# Flags that only the recall task reads, and the text task's own: each refused with the other task.
# A flag counts as given when its value is not None: every one of them defaults to None (--quick too), so a
# --no-X (False) is refused with the other task as --X is, never silently dropped.
RECALL_ONLY = (("pairs", "--pairs"), ("salience_writes", "--salience-writes"), ("readout", "--readout"),
               ("salience_mass_stride", "--salience-mass-stride"))
TEXT_ONLY = (("teacher", "--teacher"), ("quick", "--quick"), ("needles_per_cell", "--needles-per-cell"),
             ("length", "--length"), ("modes", "--modes"))


def _check_task_flags(args) -> None:
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: choose one of {', '.join(TASKS)}")
    other = RECALL_ONLY if args.task == "text" else TEXT_ONLY
    given = [flag for name, flag in other if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to the "
                         f"{'recall' if args.task == 'text' else 'text'} task, not --task {args.task}; drop "
                         f"{'it' if len(given) == 1 else 'them'}")
    if args.task == "text" and args.teacher is not None and args.retrain_teacher:
        raise ValueError("--teacher and --retrain-teacher both name the teacher; give one")
    if args.task == "text" and args.memory == "all":
        raise ValueError("--memory all is the recall task's; the text task distils one rule (e.g. --memory "
                         "gated_deltanet)")


def _run_text(args) -> None:
    from .text.run import TextSettings, quick_settings, run_text_demo  # start-up time (torch, the trainer)

    given = {k: v for k, v in (("memory", args.memory), ("steps", args.steps), ("seed", args.seed),
                               ("buffer_slots", args.buffer), ("salience_weight", args.salience_weight),
                               ("salience_mass", args.salience_mass),
                               ("needles_per_cell", args.needles_per_cell), ("length", args.length)) if v is not None}
    settings = quick_settings(**given) if args.quick else TextSettings(**given)
    texts = None
    if args.quick:
        from .text.corpus import sample_text  # start-up time

        half = len(sample_text()) // 2
        texts = {"train": [sample_text()[:half]], "heldout": [sample_text()[half:]]}
    modes = {"modes": [m.strip() for m in args.modes.split(",") if m.strip()]} if args.modes else {}
    run_text_demo(out=args.out, settings=settings, teacher_dir=args.teacher, texts=texts, **modes,
                  retrain_teacher=args.retrain_teacher, teacher_steps=args.teacher_steps, progress=not args.no_progress)


def main_args(args) -> int:
    """Entry point of ``ahn demo`` (argparse namespace from :func:`ahn.cli`)."""
    import torch  # start-up time

    _check_task_flags(args)
    if args.task == "text":
        previous = torch.get_num_threads()
        torch.set_num_threads(args.threads or DEMO_THREADS)
        try:
            _run_text(args)
        finally:
            torch.set_num_threads(previous)
        return 0
    if args.pairs is not None and args.pairs > max_pairs():
        raise ValueError(f"--pairs {args.pairs}: the demo's sequences hold at most {max_pairs()} key-value pairs")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads or DEMO_THREADS)
    given = (("steps", args.steps), ("seed", args.seed), ("num_pairs", args.pairs), ("buffer_slots", args.buffer),
             ("salience_writes", args.salience_writes), ("readout", args.readout), ("salience_mass", args.salience_mass),
             ("salience_mass_stride", args.salience_mass_stride), ("salience_weight", args.salience_weight))
    settings = DemoSettings(**{k: v for k, v in given if v is not None})
    try:
        run_demo(memory=args.memory, out=args.out, settings=settings, retrain_teacher=args.retrain_teacher,
                 teacher_steps=args.teacher_steps, progress=not args.no_progress)
    finally:
        torch.set_num_threads(previous)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--task", default="recall", choices=TASKS,
                   help="recall: the shipped recall teacher, 256 tokens, window 32 (default); text: the text teacher on "
                        "held-out Paul Graham essays, window 256 + 16 sinks, six modes side by side (docs/demo.md)")
    p.add_argument("--memory", default=DEFAULT_MEMORY,
                   help="memory rule to distil: gated_deltanet, deltanet, mamba2, kda, gdn2, gated_deltaproduct "
                        "(ahn.available_memories()), or all "
                        "(side by side)")
    p.add_argument("--out", "--output", dest="out", type=Path, default=None, help="output folder (default: a fresh ./ahn-demo-<date>-<time>)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help=f"distillation steps per memory (default {DemoSettings.steps}; --task text: 150, docs/demo.md)")
    p.add_argument("--pairs", type=int_at_least(1), default=None,
                   help=f"key-value pairs per sequence (default {DemoSettings.num_pairs}; 8 shows the state's capacity limit)")
    p.add_argument("--seed", type=int, default=None, help="seed of the training data and the memory init (default 0)")
    p.add_argument("--buffer-slots", "--buffer", dest="buffer", metavar="M", type=int_at_least(0), default=None,
                   help=f"priority-buffer slots per layer and kv head (default {DemoSettings.buffer_slots}; 0: none)")
    p.add_argument("--salience-writes", action=argparse.BooleanOptionalAction, default=None,
                   help=f"gate memory writes by salience (default {DemoSettings.salience_writes})")
    p.add_argument("--readout", type=readout_choice, choices=READOUTS, default=None,
                   help=f"memory read-out: add (the paper's) or defer (default {DemoSettings.readout})")
    p.add_argument("--salience-mass", action=argparse.BooleanOptionalAction, default=None,
                   help=f"the salience score reads the attention each token received in the window (default "
                        f"{DemoSettings.salience_mass}; --task text: in the recommended, buffer_only and memory_only "
                        "modes)")
    p.add_argument("--salience-mass-stride", type=int_at_least(1), default=None, metavar="S",
                   help="estimate that mass from every S-th query (default: window // 256, at least 1, so exact at "
                        "the demo's window; docs/salience.md)")
    p.add_argument("--salience-weight", type=float, default=None,
                   help=f"weight of the scorer's loss against the teacher's attention mass (default "
                        f"{DemoSettings.salience_weight}; 0: the scorer learns through the gated writes only)")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train the teacher from scratch first instead of using the shipped one (recall: ~6 min on one core; "
                        "text: python -m ahn.demo.text.teacher's recipe, 52 minutes on 2 cores for the shipped one)")
    p.add_argument("--teacher-steps", type=int_at_least(1), default=None,
                   help="at most this many steps of --retrain-teacher (default: the recipe's; the text teacher's phases end "
                        "on its loss, so it may stop before)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help=f"torch CPU threads (default {DEMO_THREADS}: the results depend on the thread count in the last "
                        "digits; the documented table is reproduced at 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    text = p.add_argument_group("the text task (--task text)")
    text.add_argument("--teacher", type=Path, default=None,
                      help="a model folder with its tokenizer to use as the teacher (default: the shipped text teacher)")
    text.add_argument("--quick", action="store_true", default=None,
                      help="every stage at toy size on the shipped sample text (seconds to minutes; figures mean nothing)")
    text.add_argument("--needles-per-cell", type=int_at_least(1), default=None,
                      help="held-out needles per depth x length cell of the grid (default 8)")
    text.add_argument("--modes", default=None, metavar="M1,M2",
                      help="the modes to distil and score, comma-separated (default all: full, window, paper, "
                           "recommended, buffer_only, memory_only); a later run into the same --out adds the others")
    text.add_argument("--length", type=int_at_least(2), default=None,
                      help="context length of training and perplexity sequences (default: the teacher's)")
