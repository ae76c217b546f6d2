"""Reading a long text with constant memory: speed, peak RSS and state size at 10k, 100k and 1M tokens.

    python -m ahn.benchmarks.stream --threads 1                     # demo-sized model, CPU: 10k, 100k, 1M tokens
    python -m ahn.benchmarks.stream --lengths 2000 4000             # seconds (the test suite runs this)

Each length runs in a fresh process, so that its peak RSS (``ru_maxrss``) is its own. The process
builds the demo-sized model: the demo's shipped teacher (a Qwen2 of hidden size 64, 2 layers,
``ahn/demo/weights``) with a GatedDeltaNet memory in the demo's recommended configuration (window
32, sinks 4, 16 buffer slots per kv head, salience-gated writes, the deferring read-out; the flags
below change each). It reads N random token ids through :func:`ahn.generate.read`, the path of ``ahn
generate``, in forward calls of ``--chunk`` tokens, drawing the ids chunk by chunk, then saves the
state (:meth:`ahn.AHNCache.save`). A fresh memory computes exactly as much as a trained one, so the
figures are the cost of any memory of this shape.

Per length it prints the read's seconds, tokens/s and microseconds per token, the peak RSS of the
process and its growth while reading (peak after the read minus peak before it), and the state
file's size. Constant memory shows as the same growth and state size at every length; constant
speed as the same microseconds per token.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ahn._shipped import load_demo_teacher
from ahn.config import READOUTS, AHNConfig, readout_choice
from ahn.generate import read
from ahn.model import add_memory

DEFAULT_LENGTHS = (10_000, 100_000, 1_000_000)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def measure(a) -> dict:
    """One length, in this process: build the model, read ``a.child`` tokens, save the state."""
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    config = AHNConfig(memory=a.memory, window=a.window, sinks=a.sinks, buffer_slots=a.buffer,
                           salience_writes=a.salience_writes, readout=a.readout, salience_mass=a.salience_mass)
    model = add_memory(load_demo_teacher(), config)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def ids():
        for start in range(0, a.child, a.chunk):
            yield torch.randint(0, vocab, (min(a.chunk, a.child - start),), generator=generator).tolist()

    cache = model.new_cache()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    read(model, ids(), cache, a.chunk)
    seconds = time.perf_counter() - t0
    after = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "read.state"
        cache.save(path)
        state_bytes = path.stat().st_size
    assert cache.get_seq_length() == a.child, (cache.get_seq_length(), a.child)
    return {"tokens": a.child, "seconds": seconds, "peak_rss_mib": after, "rss_growth_mib": after - before,
            "state_bytes": state_bytes, "cache_bytes": cache.nbytes, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def table(rows: list[dict]) -> str:
    lines = ["| tokens | read | tokens/s | us/token | peak RSS | RSS growth while reading | state file |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['seconds']:.1f} s | {r['tokens'] / r['seconds']:,.0f} | "
                     f"{1e6 * r['seconds'] / r['tokens']:.1f} | {r['peak_rss_mib']:.0f} MiB | "
                     f"{r['rss_growth_mib']:.1f} MiB | {r['state_bytes']:,} B |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="tokens to read, one process each")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per forward call (ahn generate --chunk)")
    p.add_argument("--memory", default="gated_deltanet")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--buffer-slots", "--buffer", dest="buffer", metavar="M", type=int, default=16, help="priority-buffer slots per kv head")
    p.add_argument("--salience-writes", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--salience-mass", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--readout", default="defer", type=readout_choice, choices=READOUTS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 keeps timings stable on a shared machine")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one length, in this process
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(measure(a)))
        return []
    flags = ["--chunk", str(a.chunk), "--memory", a.memory, "--window", str(a.window), "--sinks", str(a.sinks),
             "--buffer-slots", str(a.buffer), "--readout", a.readout,
             "--salience-writes" if a.salience_writes else "--no-salience-writes",
             "--salience-mass" if a.salience_mass else "--no-salience-mass"]
    flags += ["--threads", str(a.threads)] if a.threads is not None else []
    rows = []
    for n in a.lengths:
        out = subprocess.run([sys.executable, "-m", "ahn.benchmarks.stream", "--child", str(n), *flags],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the {n}-token run failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n:,} tokens: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    options = f"buffer {a.buffer}" + ", salience writes" * a.salience_writes + f", {a.readout} read-out"
    print(f"torch {rows[0]['torch']}, CPU, {rows[0]['threads']} threads; demo teacher (Qwen2 hidden 64, 2 layers) + "
          f"{a.memory}, window {a.window}, sinks {a.sinks}, {options}; chunks of {a.chunk} tokens; "
          f"cache {rows[0]['cache_bytes']:,} B")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
