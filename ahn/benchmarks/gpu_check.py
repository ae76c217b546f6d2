"""The GPU check: every part of ahn that only a GPU runs, in one command of at most 8 minutes.

    python -m ahn.benchmarks.gpu_check [--out build/gpu-check]    # on a CUDA machine (make gpu-check)
    python -m ahn.benchmarks.gpu_check --dry-run --out /tmp/gc    # the same code, tiny sizes, CPU (the suite runs it)

Five sections, in this order:

1. ``cuda_tests``: the ``cuda``-marked tests (``pytest -m cuda`` on the test files that carry
   the mark): fla and ahn's Triton kernels against torch in bfloat16, the fused decode step.
2. ``kernels``: ahn's Triton kernels vs fla vs the torch chunkwise path, forward and
   forward+backward, bfloat16, T = 4k, 16k and 64k, with the query heads and head size of
   Qwen2.5-3B and 7B (the memory runs on the query heads): median seconds and each backend's
   relative max error against torch (output and final state; gradients for forward+backward).
   KDA, GDN-2 and Gated DeltaProduct have no Triton kernel of ahn's own: their rows time torch
   against fla only.
3. ``decode_step``: the fused Triton decode step vs the unfused torch step, same shapes,
   batch 1 and 8, the k / v heads of the model (GQA): median seconds and the error. The
   newer rules decode with torch ops only: their rows time the torch step.
4. ``attention``: what the recommended configuration needs from attention, on steady-state
   prefill blocks (Qwen2.5-3B's heads, 128 sinks, 32k and 8k windows): attention with its
   log-sum-exp through torch's compiled flex_attention vs the explicit float32 softmax
   (forward; forward+backward with the log-sum-exp's gradient), and the Triton received-mass
   kernel vs its torch reference: median seconds, peak GPU memory, relative errors.
5. ``end_to_end``: a random-weight Qwen2.5-3B-shaped model in bfloat16 prefills 32k and 128k
   tokens, then decodes tokens after them: sinks + window vs ahn (window + gated DeltaNet
   memory, the paper's mechanism) vs the recommended configuration ("salient": ahn with a
   16-slot priority buffer, salience-gated writes from a mass-reading scorer, the deferring
   read-out) vs full attention (sdpa), with time, cache size and peak GPU memory. Logits checks
   of docs/design.md's invariants: ahn equals sinks + window (zero-initialised memory output),
   so does "salient" while n <= sinks + window (nothing has left the window, the buffer is
   empty), and sinks + window equals full attention when n <= sinks + window.

Each section gets a share of the time budget (``--budget``; what one leaves, the next ones
get); inside a section the cases run from small to large, and a case predicted (from the last
smaller one) to overrun the section's time is recorded as skipped instead of run. A case
that raises (out of memory, say) is recorded with its error and the next runs; so is a
section. ``results.json`` and ``results.md`` in ``--out`` are rewritten after every section.
The exit status is 1 if a check failed or anything raised. Setting up an offline GPU
machine and reading the results: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ahn.attention import _explicit_attention, window_block_mask
from ahn.benchmarks.efficiency import cache_bytes, decode_ms, peak_gpu_gb, prefill, shaped_model
from ahn.benchmarks.kernels import RULES, make_args, rule_fn, runs, step_args, step_fn, timed
from ahn.config import AHNConfig
from ahn.configs import load_model_config
from ahn.kernels.attention_lse import flex_attention_with_lse, flex_available, received_mass_reference
from ahn.kernels.dispatch import fla_available
from ahn.kernels._triton import interpreting
from ahn.model import add_memory

# ----------------------------------------------------------------------------- sizes
# Issue 16: <= 8 minutes on one GPU, all sections together; 15 s of it are kept for start-up and writing.
BUDGET_S = 480
RESERVE_S = 15
# Relative shares of the budget, in run order. Compiling the Triton kernels (ahn's and every config fla
# autotunes) falls in the tests, which run first; the compiled kernels are cached on disk for the rest.
# attention: mostly compiling flex's forward and backward kernels (the timed calls are milliseconds); end_to_end runs
# four modes (the recommended configuration's prefill compiles flex and the mass kernel in its warm-up).
SHARES = {"cuda_tests": 2.5, "kernels": 1.25, "decode_step": 0.5, "attention": 1.25, "end_to_end": 3.5}
# Model shapes of ahn/configs/models/ (the memory runs on the query heads; head size = hidden / heads).
KERNEL_SHAPES = ("Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct")
E2E_SHAPE = "Qwen2.5-3B-Instruct"
# ahn's documented GPU set-up (ahn/__init__.py, efficiency.py): 128 sinks + a 32640-token window =
# 32768, Qwen2.5-3B's max_position_embeddings, the context its attention was trained on.
SINKS, WINDOW = 128, 32640
MEMORY = "gated_deltanet"
# The end-to-end modes, in run order: the product's first, full attention (the costliest, a comparison) last.
# "salient" is "ahn" with the recommended options (the demo's defaults, ahn/demo/run.py DemoSettings, and
# efficiency.py's 'salient' mode): a 16-slot priority buffer, salience-gated writes, a scorer that reads the
# received mass, the deferring read-out.
E2E_MODES = ("window", "ahn", "salient", "full")
RECOMMENDED = dict(buffer_slots=16, salience_writes=True, readout="defer", salience_mass=True)
# Tolerances, relative to max(1, |reference| max), from the tests: bf16 outputs and states
# (TOL of tests/kernel_cases.py), bf16 gradients (TOL_BF16_GRAD of tests/kernel_cases.py),
# the decode step's float32 state (test_fused_step_bfloat16_on_cuda).
TOL = 5e-2
TOL_GRAD = 0.1
TOL_STEP_STATE = 1e-5
# How a case's time grows with its size, to predict the next one: linear for the kernels, the window and
# the memory. Full attention's blocked prefill is a linear part (the weights: 2 x 3e9 FLOPs a token for a
# 3B model) plus a quadratic one (masked sdpa over [block, n]: 4 n^2 x hidden x layers FLOPs in all),
# about equal at 32k, so 32k -> 128k costs ~11x = 4^1.75.
GROWTH_POWER = {"full": 1.75}
# Before timing, each mode runs a short prefill with a small window (so that ahn's memory writes and its
# kernels compile / autotune outside the timed prefill).
WARMUP_TOKENS, WARMUP_BLOCK, WARMUP_WINDOW, WARMUP_SINKS = 256, 128, 64, 4
CUDA_MARK = "pytest.mark.cuda"
# JUnit XML element of a test case that did not pass -> its outcome.
OUTCOMES = {"failure": "failed", "error": "errored", "skipped": "skipped"}


@dataclass(frozen=True)
class Sizes:
    kernel_lengths: tuple
    head_divisor: int  # query / k-v heads and head size divided by this (1 on the GPU)
    decode_batches: tuple
    e2e_lengths: tuple
    sinks: int
    window: int
    block: int  # prefill chunk (efficiency.prefill)
    decode_steps: int
    kernel_repeats: int
    step_repeats: int
    attention_cases: tuple  # (query block, window) of the attention section (keys: sinks + window - 1 + block)
    model_overrides: dict = field(default_factory=dict)


GPU_SIZES = Sizes(
    kernel_lengths=(4096, 16384, 65536), head_divisor=1, decode_batches=(1, 8), e2e_lengths=(32768, 131072),
    sinks=SINKS, window=WINDOW,
    block=4096,  # efficiency.py's --block default: a full-attention mask is then [4096, n], not [n, n]
    decode_steps=10, kernel_repeats=3, step_repeats=50,
    # A prefill block at ahn's GPU set-up first: flex's compilation falls in the first case, and if it leaves too
    # little of the section's share, the smaller case is the one skipped.
    attention_cases=((4096, WINDOW), (1024, 8192)),
)
# --dry-run: the same sections at sizes a CPU runs in seconds (lengths / 256 for the model, heads / 16).
DRY_SIZES = Sizes(
    kernel_lengths=(64,), head_divisor=16, decode_batches=(1, 8), e2e_lengths=(128, 512), sinks=4, window=124,
    block=128, decode_steps=2, kernel_repeats=1, step_repeats=2, attention_cases=((128, 124), (32, 60)),
    model_overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=1024),
)


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class Run:
    """One gpu-check run: where it runs, its sizes, its deadline and its results (written as it goes)."""

    out: Path
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    tests: Optional[Path]
    t0: float  # time.monotonic() at the start
    end: float  # time.monotonic() deadline of the whole run
    results: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


@dataclass
class Section:
    name: str
    title: str
    deadline: float
    config: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    status: str = "pass"
    error: Optional[str] = None
    seconds: float = 0.0
    _last: dict = field(default_factory=dict)  # key -> (size, seconds) of the last case run

    def fits(self, key, size, power: float = 1.0) -> Optional[str]:
        """None if a case of ``size`` is predicted to end before the deadline, else why it is skipped."""
        left = self.deadline - time.monotonic()
        if key not in self._last:
            return None if left > 0 else f"time budget: the section's time ran out ({left:.0f} s left)"
        last_size, last_s = self._last[key]
        predicted = last_s * (size / last_size) ** power
        return None if predicted < left else f"time budget: predicted {predicted:.0f} s, {max(left, 0):.0f} s left"

    def ran(self, key, size, seconds: float) -> None:
        self._last[key] = (size, seconds)

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "status": self.status, "seconds": round(self.seconds, 1),
                "config": self.config, "rows": self.rows, "notes": self.notes, "error": self.error}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|), in float64 (the tests' assert_close measure)."""
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` here, or None if it can."""
    if backend == "fla":
        if device.type != "cuda":
            return "fla needs CUDA"
        return None if fla_available() else "flash-linear-attention is not installed (docs/gpu.md)"
    if backend == "triton":
        if version("triton") is None:
            return "triton is not installed"
        if device.type != "cuda" and not interpreting():
            return "triton needs CUDA (or TRITON_INTERPRET=1 set before triton is imported)"
    return None


def shape_of(name: str, divisor: int) -> dict:
    """Query heads, k / v heads and head size of a shipped model config, divided by ``divisor``."""
    cfg = load_model_config(name)
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"H": max(1, cfg.num_attention_heads // divisor), "Hk": max(1, cfg.num_key_value_heads // divisor),
            "D": D // divisor}


# ----------------------------------------------------------------------------- sections
def section_cuda_tests(run: Run, sec: Section) -> None:
    """``pytest -m cuda`` on the test files that carry the mark; one row per test from its JUnit XML."""
    if run.tests is None:
        sec.status = "skipped"
        sec.notes.append("no tests/ folder found (next to the package or in the working directory): pass --tests DIR")
        return
    files = sorted(p for p in run.tests.glob("test_*.py") if CUDA_MARK in p.read_text())
    xml, log = run.out / "cuda-tests.xml", run.out / "cuda-tests.log"
    sec.config.update(device=str(run.device), tests=str(run.tests), files=[p.name for p in files], junit=xml.name,
                      log=log.name)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *map(str, files)]
    timeout = max(sec.deadline - time.monotonic(), 30.0)
    try:
        proc = subprocess.run(cmd, cwd=run.tests.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(text)
        # -v prints one line per finished test: keep those (the JUnit XML is written only at the end).
        for line in text.splitlines():
            test, _, outcome = line.partition(" ")
            if "::" in test and outcome.split(" ")[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                outcome = outcome.split(" ")[0].lower().replace("error", "errored")
                sec.rows.append({"test": test, "outcome": outcome, "ok": outcome in ("passed", "skipped")})
        raise TimeoutError(f"pytest ran past the section's {timeout:.0f} s and was stopped; the tests that "
                           f"finished are listed, the rest did not run (see {log.name})") from None
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    sec.notes.append(f"pytest exit status {proc.returncode}: {lines[-1] if lines else '(no output)'}")
    for case in ET.parse(xml).getroot().iter("testcase") if xml.exists() else []:
        outcome, message = "passed", ""
        for child in case:
            if child.tag in OUTCOMES:
                outcome, message = OUTCOMES[child.tag], (child.get("message") or "").strip()[:200]
        sec.rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                         "seconds": round(float(case.get("time") or 0.0), 2), "message": message,
                         "ok": outcome in ("passed", "skipped")})
    if proc.returncode not in (0, 5):  # 5: no test collected
        sec.status = "fail"


def section_kernels(run: Run, sec: Section) -> None:
    """Triton vs fla vs torch chunkwise, per length (small first), model shape, rule, forward / forward+backward."""
    s, dev = run.sizes, run.device
    shapes = {name: shape_of(name, s.head_divisor) for name in KERNEL_SHAPES}
    others = [b for b in ("triton", "fla") if not unavailable(b, dev)]
    for b in ("triton", "fla"):
        if unavailable(b, dev):
            sec.notes.append(f"{b} column left empty: {unavailable(b, dev)}")
    sec.config.update(device=str(dev), dtype=dtype_name(run.dtype), B=1, lengths=list(s.kernel_lengths),
                      shapes={n: {"H": sh["H"], "K=V": sh["D"]} for n, sh in shapes.items()}, repeats=s.kernel_repeats,
                      reference="torch", tolerance={"output, state": TOL, "gradients": TOL_GRAD})
    sec.notes.append("times: median seconds of the repeats after a warm-up call (compilation, autotuning); "
                     "errors: relative max error against torch (the warm-up call's results)")
    for T in s.kernel_lengths:
        for name, sh in shapes.items():
            for rule in RULES:
                args = make_args(rule, 1, T, sh["H"], sh["D"], sh["D"], dev, run.dtype)
                for backward in (False, True):
                    direction = "fwd+bwd" if backward else "fwd"
                    row = {"T": T, "shape": name, "H": sh["H"], "D": sh["D"], "rule": rule, "direction": direction}
                    sec.rows.append(row)
                    key = (name, rule, direction)
                    why = sec.fits(key, T)
                    if why:
                        row["skipped"] = why
                        continue
                    try:
                        kernel_case(run, row, rule, args, backward, others)
                    except Exception as e:  # noqa: BLE001 (recorded, the next case runs)
                        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                    finally:
                        free(dev)
                    # The next, longer case's cost: its timed calls, the warm-up's compilation being done.
                    times = [v for k, v in row.items() if k.endswith("_s")]
                    sec.ran(key, T, (1 + s.kernel_repeats) * sum(times))
                    run.log(f"kernels T={T} {name} {rule} {direction}: {brief(row, 'T', 'shape', 'rule', 'direction')}")
                del args


def kernel_case(run: Run, row: dict, rule: str, args, backward: bool, others: list) -> None:
    t_ref, (o_ref, s_ref, g_ref) = timed(rule_fn(rule, args, "torch", backward), run.device, run.sizes.kernel_repeats)
    row["torch_s"] = t_ref
    ok = True
    for b in others:
        if not runs(rule, b):  # KDA, GDN-2, DeltaProduct: no Triton kernel of ahn's own (fla's is timed)
            continue
        t, (o, st, grads) = timed(rule_fn(rule, args, b, backward), run.device, run.sizes.kernel_repeats)
        row[f"{b}_s"] = t
        row[f"{b}_err"] = max(rel_err(o, o_ref), rel_err(st, s_ref))
        ok &= row[f"{b}_err"] <= TOL
        if backward:
            row[f"{b}_grad_err"] = max(rel_err(g, r) for g, r in zip(grads, g_ref))
            ok &= row[f"{b}_grad_err"] <= TOL_GRAD
        del o, st, grads
    if "triton_s" in row and "fla_s" in row:
        row["fla/triton"] = row["fla_s"] / row["triton_s"]
    row["ok"] = bool(ok)


def section_decode_step(run: Run, sec: Section) -> None:
    """The fused Triton step vs the unfused torch step, per model shape, batch and rule."""
    s, dev = run.sizes, run.device
    shapes = {name: shape_of(name, s.head_divisor) for name in KERNEL_SHAPES}
    fused = unavailable("triton", dev)
    if fused:
        sec.notes.append(f"triton column left empty: {fused}")
    sec.notes.append("kda, gdn2 and gated_delta_product have no fused step (torch ops only): torch_ms alone")
    sec.config.update(device=str(dev), dtype=dtype_name(run.dtype), batches=list(s.decode_batches),
                      repeats=s.step_repeats,
                      shapes={n: {"H": sh["H"], "Hk": sh["Hk"], "K=V": sh["D"]} for n, sh in shapes.items()},
                      tolerance={"output": TOL, "state (float32)": TOL_STEP_STATE})
    for name, sh in shapes.items():
        for B in s.decode_batches:
            for rule in RULES:
                row = {"shape": name, "B": B, "H": sh["H"], "Hk": sh["Hk"], "D": sh["D"], "rule": rule}
                sec.rows.append(row)
                why = sec.fits("step", 1)
                if why:
                    row["skipped"] = why
                    continue
                t0 = time.monotonic()
                try:
                    inputs = step_args(rule, B, sh["H"], sh["Hk"], sh["D"], dev, run.dtype)
                    row["torch_ms"], (o_ref, s_ref) = timed(step_fn(rule, inputs, "torch"), dev, s.step_repeats)
                    row["torch_ms"] *= 1e3
                    if not fused and runs(rule, "triton"):
                        t, (o, st) = timed(step_fn(rule, inputs, "triton"), dev, s.step_repeats)
                        row.update(triton_ms=1e3 * t, speedup=row["torch_ms"] / (1e3 * t),
                                   out_err=rel_err(o, o_ref), state_err=rel_err(st, s_ref))
                        row["ok"] = row["out_err"] <= TOL and row["state_err"] <= TOL_STEP_STATE
                except Exception as e:  # noqa: BLE001 (recorded, the next case runs)
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                sec.ran("step", 1, time.monotonic() - t0)
                run.log(f"decode_step {name} B={B} {rule}: {brief(row, 'shape', 'B', 'H', 'Hk', 'D', 'rule')}")


def section_attention(run: Run, sec: Section) -> None:
    """flex attention with its lse vs the explicit softmax, and the Triton received mass vs torch, per block size."""
    s, dev = run.sizes, run.device
    sh = shape_of(E2E_SHAPE, s.head_divisor)
    mass_why = unavailable("triton", dev)
    sec.config.update(device=str(dev), dtype=dtype_name(run.dtype), shape=E2E_SHAPE, B=1, Hq=sh["H"], Hkv=sh["Hk"],
                      D=sh["D"], sinks=s.sinks, cases=[list(c) for c in s.attention_cases], repeats=s.kernel_repeats,
                      reference="explicit float32 softmax on the same (rounded) inputs",
                      tolerance={"output, lse, mass": TOL, "gradients": TOL_GRAD})
    sec.notes.append("a steady-state prefill block: `block` queries against the sinks and the window (mask of "
                     "ahn.attention.window_block_mask); flex_* : ahn.kernels.attention_lse.flex_attention_with_lse "
                     "(compiled on CUDA), explicit_*: the fallback it replaces; *_peak_GB: peak GPU memory of the call "
                     "above the inputs (CUDA only); mass: Triton vs ahn.kernels.attention_lse.received_mass_reference")
    if not flex_available():
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
    if dev.type != "cuda":
        sec.notes.append("flex fwd+bwd left empty: torch has no flex_attention backward on CPU")
    if mass_why:
        sec.notes.append(f"mass columns left empty: {mass_why}")
    for bq, window in s.attention_cases:
        row = {"block": bq, "window": window, "keys": s.sinks + window - 1 + bq}
        sec.rows.append(row)
        size = bq * row["keys"]
        why = sec.fits("attention", size)
        if why:
            row["skipped"] = why
            continue
        try:
            attention_case(run, row, sh, bq, window, mass=mass_why is None)
        except Exception as e:  # noqa: BLE001 (recorded, the next case runs)
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            free(dev)
        # The next case's cost: its calls (warm-up and peak-memory calls included), compilation being done.
        sec.ran("attention", size, (2 + run.sizes.kernel_repeats) * sum(v for k, v in row.items() if k.endswith("_s")))
        run.log(f"attention block={bq} window={window}: {brief(row, 'block', 'window')}")


def peak_above(dev: torch.device, fn):
    """``(fn(), peak GPU memory in GB above what was allocated before it)``; None for the memory off CUDA."""
    if dev.type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - before) / 1e9


def attention_case(run: Run, row: dict, sh: dict, bq: int, window: int, mass: bool) -> None:
    dev, dtype, S, repeats = run.device, run.dtype, run.sizes.sinks, run.sizes.kernel_repeats
    t0 = window  # the first query slot: the window is full, every key slot is a real token
    lo, hi = t0 - window + 1, t0 + bq
    P = torch.zeros(1, 1, 1, dtype=torch.long, device=dev)
    mask = window_block_mask(t0, bq, lo, hi, window, S, P, P + torch.arange(S, device=dev).view(1, 1, -1))
    N = S + hi - lo
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, sh["D"], generator=gen).to(dev, dtype)
               for h, n in ((sh["H"], bq), (sh["Hk"], N), (sh["Hk"], N)))
    scale = sh["D"] ** -0.5
    ok = True

    def explicit():
        return _explicit_attention(q.float(), k.float(), v.float(), mask, scale)

    def flex():
        return flex_attention_with_lse(q, k, v, mask, scale)

    with torch.no_grad():
        row["explicit_s"], _ = timed(explicit, dev, repeats)
        (ref_out, ref_lse), row["explicit_peak_GB"] = peak_above(dev, explicit)
        row["flex_s"], _ = timed(flex, dev, repeats)
        (out, lse), row["flex_peak_GB"] = peak_above(dev, flex)
    row["out_err"], row["lse_err"] = rel_err(out, ref_out), rel_err(lse, ref_lse)
    ok &= row["out_err"] <= TOL and row["lse_err"] <= TOL
    if dev.type == "cuda":  # forward + backward, the lse's gradient included (the deferring read-out trains it)
        g_out = torch.randn(out.shape, generator=gen).to(dev)
        g_lse = torch.randn(lse.shape, generator=gen).to(dev)

        def grads(f, cast):
            def run_once():
                leaves = [cast(x).requires_grad_() for x in (q, k, v)]
                o, l = f(*leaves, mask, scale)
                return torch.autograd.grad((o.float() * g_out).sum() + (l * g_lse).sum(), leaves)
            return run_once

        ref_grads = grads(_explicit_attention, lambda x: x.float())()
        row["flex_fwd_bwd_s"], got = timed(grads(flex_attention_with_lse, lambda x: x.detach().clone()), dev, repeats)
        row["grad_err"] = max(rel_err(g, r) for g, r in zip(got, ref_grads))
        ok &= row["grad_err"] <= TOL_GRAD
        del ref_grads, got
    if mass:
        # optional dependency: triton (CUDA, or its interpreter in the dry run)
        from ahn.kernels._triton.mass import triton_received_mass

        lse = lse.float()
        ref_mass = received_mass_reference(q, k, mask, lse, scale, S)
        row["mass_s"], got = timed(lambda: triton_received_mass(q, k, mask, lse, scale, S), dev, repeats)
        row["mass_err"] = rel_err(got, ref_mass)
        ok &= row["mass_err"] <= TOL
    row["ok"] = bool(ok)


def gpu_forms(device: torch.device) -> dict:
    """Environment settings that make attention on ``device`` take the GPU's forms of ahn.kernels.attention_lse (flex
    uncompiled, the Triton mass kernel in the interpreter) off CUDA, so that a dry run covers them end to end; none on
    CUDA, where they are the default."""
    if device.type == "cuda":
        return {}
    env = {"AHN_ATTENTION_LSE": "flex"} if flex_available() else {}
    if not unavailable("triton", device):
        env["AHN_RECEIVED_MASS"] = "triton"
    return env


@contextlib.contextmanager
def environ(values: dict):
    """Set environment variables for the duration of a ``with`` block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def section_end_to_end(run: Run, sec: Section) -> None:
    """Prefill n tokens and decode after them, per n (small first) and mode, on one random-weight model (and a copy
    of it with the recommended options, for "salient")."""
    s, dev = run.sizes, run.device
    base = shaped_model(E2E_SHAPE, max(s.e2e_lengths), str(dev), run.dtype, overrides=s.model_overrides)
    cfg = base.config
    paper = AHNConfig(memory=MEMORY, window=s.window, sinks=s.sinks)
    salient = add_memory(copy.deepcopy(base), AHNConfig(**paper.to_dict() | RECOMMENDED))
    model = add_memory(base, paper)
    models = {mode: model for mode in E2E_MODES} | {"salient": salient}

    @contextlib.contextmanager
    def running(mode: str):
        """The model in the attention mode of an end-to-end mode ("salient" is "ahn" on its own model, with the GPU's
        attention forms in a dry run)."""
        with models[mode].attention_mode("ahn" if mode == "salient" else mode) as m, \
                environ(gpu_forms(dev) if mode == "salient" else {}):
            yield m

    sec.config.update(device=str(dev), dtype=dtype_name(run.dtype), shape=E2E_SHAPE, overrides=s.model_overrides,
                      layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                      kv_heads=cfg.num_key_value_heads, memory=MEMORY, sinks=s.sinks, window=s.window,
                      prefill_block=s.block, decode_steps=s.decode_steps, logits_tolerance=TOL,
                      memory_backend=model.ahn_config.backend, salient=RECOMMENDED,
                      salient_attention_block=salient.ahn_config.attention_block)
    sec.notes.append("prefill_s: n tokens in blocks of prefill_block; decode_ms: median of decode_steps tokens "
                     "after them; peak_GB: peak GPU memory of prefill + decode (the weights of both models included: "
                     "'salient' runs on a copy; CUDA only); work_GB: that peak above what was allocated before the "
                     "case (cache, activations, attention's working memory)")
    sec.notes.append("vs_window: the last-token logits against sinks + window: ahn's always (the memory output starts "
                     "at zero), salient's while n <= sinks + window (nothing has left the window, the buffer is "
                     "empty); vs_full: sinks + window against full attention, checked while n <= sinks + window; "
                     "*_x_ahn: the recommended configuration against the paper's mechanism")
    if gpu_forms(dev):
        sec.notes.append(f"salient runs the GPU's attention forms here, with {gpu_forms(dev)}")
    run.log(f"end_to_end: models built ({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters each)")
    for mode in E2E_MODES:  # the recommended one compiles flex attention and the mass kernel here
        with running(mode) as m:
            small = {} if mode == "full" else {"window": WARMUP_WINDOW, "sinks": WARMUP_SINKS}
            prefill(m, WARMUP_TOKENS, WARMUP_BLOCK, **small)
    free(dev)
    run.log("end_to_end: warmed up")
    for n in s.e2e_lengths:
        logits = {}
        for mode in E2E_MODES:
            row = {"n": n, "mode": mode}
            sec.rows.append(row)
            why = sec.fits(mode, n, GROWTH_POWER.get(mode, 1.0))
            if why:
                row["skipped"] = why
                continue
            t0 = time.monotonic()
            try:
                before = 0
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                with running(mode) as m:
                    secs, cache, last, _ = prefill(m, n, s.block)
                    row.update(prefill_s=secs, prefill_tok_per_s=n / secs, cache_MiB=cache_bytes(cache) / 2**20)
                    row["decode_ms"] = decode_ms(m, cache, s.decode_steps)
                row["peak_GB"] = peak_gpu_gb(dev)
                row["work_GB"] = None if row["peak_GB"] is None else row["peak_GB"] - before / 1e9
                logits[mode] = last.float()
                row["ok"] = bool(torch.isfinite(logits[mode]).all())
                del cache, last
            except Exception as e:  # noqa: BLE001 (recorded, the next case runs)
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            finally:
                free(dev)
            sec.ran(mode, n, time.monotonic() - t0)
            run.log(f"end_to_end n={n} {mode}: {brief(row, 'n', 'mode')}")
        rows = {r["mode"]: r for r in sec.rows if r["n"] == n}
        for mode in ("ahn", "salient"):
            if mode in logits and "window" in logits and (mode == "ahn" or n <= s.sinks + s.window):
                rows[mode]["vs_window"] = rel_err(logits[mode], logits["window"])
                rows[mode]["ok"] &= rows[mode]["vs_window"] <= TOL
        if "window" in logits and "full" in logits and n <= s.sinks + s.window:
            rows["window"]["vs_full"] = rel_err(logits["window"], logits["full"])
            rows["window"]["ok"] &= rows["window"]["vs_full"] <= TOL
        for mode, against in (("window", "full"), ("ahn", "full"), ("salient", "full"), ("salient", "ahn")):
            if all("decode_ms" in rows[m] for m in (mode, against)):
                rows[mode][f"prefill_x_{against}"] = rows[mode]["prefill_s"] / rows[against]["prefill_s"]
                rows[mode][f"decode_x_{against}"] = rows[mode]["decode_ms"] / rows[against]["decode_ms"]
    del model, salient, models, base


SECTIONS: dict[str, tuple[str, Callable[[Run, Section], None]]] = {
    "cuda_tests": ("The cuda-marked tests", section_cuda_tests),
    "kernels": ("Memory kernels: ahn's Triton vs fla vs torch chunkwise", section_kernels),
    "decode_step": ("Decode step: fused Triton vs unfused torch", section_decode_step),
    "attention": ("Attention with its log-sum-exp (flex vs explicit) and the received mass (Triton vs torch)",
                  section_attention),
    "end_to_end": ("End to end: sinks + window vs ahn vs the recommended configuration vs full attention",
                   section_end_to_end),
}


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def brief(row: dict, *leave_out: str) -> str:
    """A row for the progress log, without the keys that name its case."""
    return ", ".join(("ok" if v else "FAIL") if k == "ok" else f"{k} {fmt(v)}" for k, v in row.items()
                     if k not in leave_out)


# ----------------------------------------------------------------------------- results
def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": version("triton"), "fla-core": version("fla-core"),
        "flash-linear-attention": version("flash-linear-attention"), "transformers": version("transformers"),
        "ahn": version("ahn"),
    }


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "**FAIL**"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


# Row fields shown after the figures in results.md: whether the case passed, or why it did not run.
LAST_COLUMNS = ("ok", "skipped", "error")


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# ahn gpu-check", "",
        " · ".join(f"{k} {v}" for k, v in env.items() if v is not None),
        "",
        f"{'dry run (tiny sizes, CPU)' if results['dry_run'] else 'full run'}, {results['dtype']}; "
        f"status **{results['status']}**; {results['wall_s']:.0f} s of a {results['budget_s']} s budget; "
        f"started {results['started']}",
        "", "| section | status | seconds | cases | skipped | failed |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for sec in results["sections"]:
        skipped = sum("skipped" in r for r in sec["rows"])
        failed = sum(r.get("ok") is False for r in sec["rows"])
        lines.append(f"| {sec['name']} | {sec['status']} | {sec['seconds']} | {len(sec['rows'])} | {skipped} "
                     f"| {failed} |")
    for sec in results["sections"]:
        lines += ["", f"## {sec['name']}: {sec['title']}", "", f"status **{sec['status']}**, {sec['seconds']} s", ""]
        lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else fmt(v)}"
                  for k, v in sec["config"].items()]
        if sec["error"]:
            lines += ["", "```", sec["error"], "```"]
        if sec["rows"]:
            columns = list(dict.fromkeys(k for row in sec["rows"] for k in row))
            columns = [c for c in columns if c not in LAST_COLUMNS] + [c for c in LAST_COLUMNS if c in columns]
            lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in sec["rows"]]
        if sec["notes"]:
            lines += [""] + [f"- {note}" for note in sec["notes"]]
    return "\n".join(lines) + "\n"


def finite(value):
    """``value`` with NaN / inf floats (a kernel that overflowed) as strings: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def write(run: Run) -> None:
    r = run.results
    r["wall_s"] = round(time.monotonic() - run.t0, 1)
    r["status"] = "pass" if all(s["status"] in ("pass", "skipped") for s in r["sections"]) else "fail"
    (run.out / "results.json").write_text(json.dumps(finite(r), indent=2) + "\n")
    (run.out / "results.md").write_text(markdown(r))


def find_tests(given: Optional[str]) -> Optional[Path]:
    """The repository's tests/ folder: ``given``, next to the package (a source checkout), or in the cwd."""
    if given:
        path = Path(given)
        if not (path / "conftest.py").is_file():
            raise SystemExit(f"--tests {given}: no conftest.py there; pass the repository's tests/ folder")
        return path.resolve()
    for path in (Path(__file__).resolve().parents[1] / "tests", Path.cwd() / "tests"):
        if (path / "conftest.py").is_file() and (path / "test_kernels.py").is_file():
            return path
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/gpu-check", help="folder for results.json, results.md and the test log")
    p.add_argument("--dry-run", action="store_true", help="the same code at tiny sizes on CPU (no GPU needed)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--tests", default=None, help="the repository's tests/ folder (default: found next to the package "
                                                 "or in the working directory)")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
                         "machine (docs/gpu.md), or pass --dry-run to run the same code at tiny sizes on CPU")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if a.dry_run else "cuda")
    t0 = time.monotonic()
    run = Run(out=out, device=device, dtype=torch.bfloat16, sizes=DRY_SIZES if a.dry_run else GPU_SIZES,
              tests=find_tests(a.tests), t0=t0, end=t0 + a.budget - RESERVE_S)
    run.results = {"environment": environment(device), "dry_run": a.dry_run, "dtype": dtype_name(run.dtype),
                   "sizes": dataclasses.asdict(run.sizes), "budget_s": a.budget,
                   "started": datetime.datetime.now().isoformat(timespec="seconds"), "sections": []}
    run.log(f"gpu-check on {run.results['environment']['device']}, budget {a.budget:.0f} s, results in {out}")
    for i, name in enumerate(a.sections):
        shares_left = sum(SHARES[n] for n in a.sections[i:])
        now = time.monotonic()
        sec = Section(name=name, title=SECTIONS[name][0],
                      deadline=now + max(run.end - now, 0.0) * SHARES[name] / shares_left)
        run.log(f"{name}: {sec.deadline - now:.0f} s")
        try:
            SECTIONS[name][1](run, sec)
        except Exception as e:  # noqa: BLE001 (recorded; the next section runs)
            sec.status, sec.error = "error", "".join(traceback.format_exception_only(e)).strip()[:2000]
            run.log(f"{name} raised: {sec.error}")
            traceback.print_exc()
        finally:
            free(device)
        if sec.status == "pass" and any(row.get("ok") is False for row in sec.rows):
            sec.status = "fail"
        sec.seconds = time.monotonic() - now
        run.results["sections"].append(sec.as_dict())
        write(run)
        run.log(f"{name}: {sec.status} in {sec.seconds:.0f} s")
    run.log(f"status {run.results['status']}: {out / 'results.md'}")
    return 0 if run.results["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
