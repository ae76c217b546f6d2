"""Time of one ``ahn distill`` step, the paper's mechanism against the recommended configuration, side by side.

    python -m ahn.benchmarks.distill_step                                   # the demo's teacher and task
    python -m ahn.benchmarks.distill_step --shape Qwen2.5-0.5B-Instruct --layers 4 --seq-len 4096 \\
        --window 2048 --sinks 64 --buffer 32                                 # a random 0.5B-shaped model, 4k samples

Both modes go through :func:`ahn.distill.trainer.build_trainer` with the same model, data and window; a step is what
the Trainer runs per optimizer step without the optimizer's own update (the memory's few parameters): the teacher's
forward (the paper's: full attention; the recommended: ahn's attention over the whole sequence with the salience
probe), the student's forward with the loss, and the backward. Steps alternate between the modes and the median of
each is kept, so a burst of load from other processes does not bias one mode; the process's CPU time is printed
beside the wall time (on a shared machine it is the steadier of the two).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ahn._cli_args import int_at_least
from ahn._shipped import DEMO_TEACHER_DIR
from ahn.benchmarks.efficiency import shaped_model
from ahn.demo.teacher import DEMO_SINKS, DEMO_TASK, DEMO_WINDOW
from ahn.distill.config import DistillConfig
from ahn.distill.trainer import build_trainer

PAPER = dict(buffer_slots=0, salience_writes=False, readout="add")


def recommended(buffer_slots: int, salience_mass: bool) -> dict:
    return dict(buffer_slots=buffer_slots, salience_writes=True, readout="defer", salience_mass=salience_mass)


def time_steps(trainers: dict, steps: int, warmup: int) -> dict:
    """``{mode: (median wall s, median CPU s)}`` of ``steps`` loss + backward passes per mode, alternating."""
    batches = {mode: next(iter(t.get_train_dataloader())) for mode, t in trainers.items()}
    wall: dict = {mode: [] for mode in trainers}
    cpu: dict = {mode: [] for mode in trainers}
    for i in range(warmup + steps):
        for mode, trainer in trainers.items():
            model = trainer.model
            model.train()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = trainer.compute_loss(model, batches[mode])
            loss.backward()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            model.zero_grad(set_to_none=True)
            if i >= warmup:
                wall[mode].append(t)
                cpu[mode].append(c)
                print(f"  step {i - warmup + 1}/{steps} {mode:<12} {t:8.2f} s wall  {c:8.2f} s CPU", flush=True)
    return {mode: (statistics.median(wall[mode]), statistics.median(cpu[mode])) for mode in trainers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", metavar="MODEL", default=None,
                   help="a random model with this architecture (a config shipped in ahn/configs/models, a config.json,"
                        " a model directory or a Hub id); default: the demo's teacher on its task")
    p.add_argument("--layers", type=int_at_least(1), default=None, help="--shape: keep only this many layers")
    p.add_argument("--seq-len", type=int_at_least(2), default=None, help="tokens per sample (default: the demo's 256)")
    p.add_argument("--window", type=int_at_least(1), default=DEMO_WINDOW)
    p.add_argument("--sinks", type=int_at_least(0), default=DEMO_SINKS)
    p.add_argument("--buffer-slots", "--buffer", dest="buffer", metavar="M", type=int_at_least(1), default=16,
                   help="the recommended configuration's priority-buffer slots")
    p.add_argument("--salience-mass", action=argparse.BooleanOptionalAction, default=True,
                   help="the recommended configuration's salience score reads the received attention")
    p.add_argument("--batch", type=int_at_least(1), default=None, help="samples per step (default: 16 for the demo, "
                                                                      "1 with --shape)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="timed steps per mode, the median kept (default: 30 at the demo's shape, where a step takes a "
                        "fraction of a second and 9-step ratios spread over 0.13 on a 2-core VM; 5 with --shape)")
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed steps per mode first")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    steps = a.steps or (5 if a.shape else 30)
    seq_len = a.seq_len or DEMO_TASK.seq_len
    batch = a.batch or (1 if a.shape else 16)
    with tempfile.TemporaryDirectory(prefix="ahn-distill-step-") as tmp:
        if a.shape:
            overrides = {"num_hidden_layers": a.layers} if a.layers else None
            model = shaped_model(a.shape, seq_len, "cpu", torch.float32, overrides=overrides)
            model_dir = str(Path(tmp) / "model")
            model.save_pretrained(model_dir)
            what = f"random {a.shape}-shaped model" + (f", {a.layers} layers" if a.layers else "")
            del model
        else:
            model_dir, what = str(DEMO_TEACHER_DIR), "the demo's teacher"
        task = dict(seq_len=seq_len)  # associative recall (ahn.distill.synthetic): its ids fit every vocabulary
        settings = {"paper": PAPER, "recommended": recommended(a.buffer, a.salience_mass)}
        trainers = {}
        for mode, options in settings.items():
            cfg = DistillConfig(model=model_dir, data="synthetic", output=str(Path(tmp) / mode), window=a.window,
                                sinks=a.sinks, batch_size=batch, max_steps=a.warmup + steps, progress=False,
                                synthetic=dict(task, num_examples=batch), **options)
            trainers[mode] = build_trainer(cfg)
        print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; {what}; {batch} x {seq_len} tokens, "
              f"window {a.window}, sinks {a.sinks}; recommended: buffer {a.buffer}, salience writes, deferring "
              f"read-out, salience mass {'on' if a.salience_mass else 'off'}", flush=True)
        result = time_steps(trainers, steps, a.warmup)
    (pw, pc), (rw, rc) = result["paper"], result["recommended"]
    print(f"\nmedian step: paper {pw:.2f} s wall / {pc:.2f} s CPU; recommended {rw:.2f} s wall / {rc:.2f} s CPU")
    print(f"recommended / paper: x{rw / pw:.2f} wall, x{rc / pc:.2f} CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
