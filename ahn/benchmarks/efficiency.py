"""Prefill and decode cost of an AHN model against context length, side by side per mode.

    python -m ahn.benchmarks.efficiency                              # tiny random Qwen2, CPU
    python -m ahn.benchmarks.efficiency --prefill 65536 --decode-at 4096 32768 --modes ahn
    python -m ahn.benchmarks.efficiency --shape Qwen2.5-3B-Instruct --window 32640 --sinks 128 \
        --prefill 32768 65536 131072 --decode-at 32768 131072         # GPU: a random 3B-shaped model

For each mode (``full``: the base model with a growing KV cache; ``window``: sinks + window;
``ahn``: window + memory; ``salient``: window + memory with the :mod:`ahn.salience` options of
``--buffer`` / ``--salience-writes`` / ``--readout`` / ``--salience-mass``, on a copy of the same base) it prefills N tokens (time, peak RSS growth, cache size) and
decodes tokens after contexts of several lengths (ms per token: the median of ``--steps``
steps, best of ``--rounds`` interleaved rounds), then prints ratios against full attention. A random model: the figures are about cost, not quality.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ahn.cache import AHNCache
from ahn.config import READOUTS, AHNConfig, readout_choice
from ahn.configs import load_model_config
from ahn.model import add_memory, cache_kwargs, output_cache
from ahn.plotting import line_panels


def tiny_model(hidden: int, layers: int, heads: int, kv_heads: int, max_len: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len + 1024,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


def shaped_model(name: str, max_len: int, device: str, dtype: torch.dtype, seed: int = 0,
                 overrides: Optional[dict] = None):
    """A randomly initialised model with the architecture of a real one (a config shipped in
    ``configs/models``, a config.json, a model directory or a Hub id), built on ``device``;
    ``overrides`` replaces config fields (e.g. fewer layers for a dry run of a GPU benchmark)."""
    cfg = load_model_config(name)
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    if getattr(cfg, "layer_types", None) and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]  # fewer layers: the first ones' types
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_len + 1024)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_gb(device) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" else None


def cache_bytes(cache) -> int:
    if isinstance(cache, AHNCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


@torch.no_grad()
def prefill(model, n: int, block: int, **window_and_sinks):
    """Prefill n tokens in chunks of ``block`` (full attention would need an n x n mask otherwise);
    ``window=`` / ``sinks=`` override the config's (window / ahn modes).

    Returns ``(seconds, cache, logits [1, 1, vocab] of the last token, CPU seconds of this process)``."""
    device = model.device
    x = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache(**window_and_sinks) if model.mode != "full" else None
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, n, block):
        out = model(x[:, a : a + block], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1,
                    **window_and_sinks)
        cache = output_cache(out)
    sync(device)
    return time.perf_counter() - t0, cache, out.logits, time.process_time() - c0


@torch.no_grad()
def decode_ms(model, cache, steps: int) -> float:
    device = model.device
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        model(tok, **cache_kwargs(model, cache), use_cache=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", type=int, nargs="+", default=[4096, 16384, 65536], help="prefill lengths")
    p.add_argument("--decode-at", type=int, nargs="+", default=[2048, 4096, 16384, 32768], help="context lengths for decode")
    p.add_argument("--modes", nargs="+", default=["ahn", "window", "full"], choices=["full", "window", "ahn", "salient"])
    p.add_argument("--buffer-slots", "--buffer", dest="buffer", metavar="M", type=int, default=16, help="'salient' mode: priority-buffer slots")
    p.add_argument("--salience-writes", action=argparse.BooleanOptionalAction, default=True,
                   help="'salient' mode: salience-gated writes")
    p.add_argument("--readout", default="defer", type=readout_choice, choices=READOUTS,
                   help="'salient' mode: memory read-out")
    p.add_argument("--salience-mass", action=argparse.BooleanOptionalAction, default=True,
                   help="'salient' mode: the salience score reads the attention received in the window")
    p.add_argument("--salience-mass-stride", type=int, default=None, metavar="S",
                   help="'salient' mode: that mass from every S-th query (default: window // 256, at least 1)")
    p.add_argument("--memory", default="gated_deltanet")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block", type=int, default=4096, help="prefill chunk length")
    p.add_argument("--steps", type=int, default=10, help="decode steps timed per context length and round (median)")
    p.add_argument("--rounds", type=int, default=6,
                   help="interleaved decode timing rounds (the best is kept): more, shorter rounds ride out a "
                        "slow phase of a shared machine better than fewer, longer ones")
    p.add_argument("--prefill-rounds", type=int, default=1, help="interleaved prefill timing rounds (the best is kept)")
    p.add_argument("--plot", metavar="PNG", help="also plot prefill time and decode latency against length")
    p.add_argument("--shape", metavar="MODEL", default=None,
                   help="benchmark a random model with this architecture instead of the tiny one: a config shipped in "
                        "configs/models (e.g. Qwen2.5-3B-Instruct), a config.json, a model directory or a Hub id")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 keeps timings stable on a shared machine")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    longest = max(a.prefill + a.decode_at)
    dtype = getattr(torch, a.dtype or ("bfloat16" if torch.device(a.device).type == "cuda" else "float32"))
    if a.shape:
        base = shaped_model(a.shape, longest, a.device, dtype)
        what = f"random {a.shape}-shaped model"
    else:
        base = tiny_model(a.hidden, a.layers, a.heads, a.kv_heads, longest).to(a.device, dtype)
        what = f"Qwen2 hidden={a.hidden} layers={a.layers} heads={a.heads}/{a.kv_heads}"
    config = AHNConfig(memory=a.memory, window=a.window, sinks=a.sinks)
    models = {}
    if "salient" in a.modes:
        salient = dict(buffer_slots=a.buffer, salience_writes=a.salience_writes, readout=a.readout,
                       salience_mass=a.salience_mass, salience_mass_stride=a.salience_mass_stride)
        models["salient"] = add_memory(copy.deepcopy(base), AHNConfig(**config.to_dict() | salient))
    model = add_memory(base, config)
    models.update({mode: model for mode in ("full", "window", "ahn")})

    def running(mode):
        """The model and attention mode of a benchmark mode ('salient' is "ahn" on its own model)."""
        m = models[mode]
        return m.attention_mode("ahn" if mode == "salient" else mode)
    where = torch.cuda.get_device_name(a.device) if torch.device(a.device).type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {dtype}; {what}; memory={a.memory} window={a.window} sinks={a.sinks}")
    rows = []
    prefill_best: dict = {}
    kept: dict = {}  # (mode, n) -> the cache of the last prefill round, for n in --decode-at
    for r in range(a.prefill_rounds):  # interleaved rounds, the best kept (as for decode below)
        for mode in a.modes:
            with running(mode) as m:
                for n in a.prefill:
                    rss0 = peak_rss_gb()
                    if torch.device(a.device).type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        rss0 = torch.cuda.memory_allocated() / 1e9
                    secs, cache, _, cpu = prefill(m, n, a.block)
                    growth = (peak_gpu_gb(a.device) or peak_rss_gb()) - rss0
                    best = prefill_best.get((mode, n))
                    prefill_best[mode, n] = (min(secs, best[0]) if best else secs, cache_bytes(cache),
                                             max(growth, best[2]) if best else growth, min(cpu, best[3]) if best else cpu)
                    if n in a.decode_at and r == a.prefill_rounds - 1:
                        kept[mode, n] = cache  # decoded from below, not prefilled a second time
                    del cache
    cpu_secs = {}
    for (mode, n), (secs, nbytes, growth, cpu) in prefill_best.items():
        rows.append((mode, "prefill", n, secs, nbytes, growth))
        cpu_secs[mode, n] = cpu
        print(f"{mode:<7} prefill {n:>7} tokens: {secs:8.2f} s ({cpu:8.2f} s CPU)  cache {nbytes / 2**20:8.2f} MiB  "
              f"peak {'GPU memory' if torch.device(a.device).type == 'cuda' else 'RSS'} +{growth:.2f} GB", flush=True)
    # Decode: every (mode, context) cache is prefilled first, then timed in interleaved rounds and
    # the best round kept, so a burst of load from other processes does not bias one row.
    caches = {}
    for mode in a.modes:
        with running(mode) as m:
            for n in a.decode_at:
                caches[mode, n] = kept.pop((mode, n)) if (mode, n) in kept else prefill(m, n, a.block)[1]
    best = {}
    for _ in range(a.rounds):
        for (mode, n), cache in caches.items():
            with running(mode) as m:
                ms = decode_ms(m, cache, a.steps)
            best[mode, n] = min(ms, best.get((mode, n), float("inf")))
    for (mode, n), cache in caches.items():
        rows.append((mode, "decode", n, best[mode, n], cache_bytes(cache), 0.0))
        print(f"{mode:<7} decode at {n:>7}: {best[mode, n]:8.2f} ms/token  cache {cache_bytes(cache) / 2**20:8.2f} MiB",
              flush=True)
    base = "full" if "full" in a.modes else a.modes[0]
    print(f"\nratios to '{base}' (time, cache bytes):")
    ref = {(kind, n): (t, c) for mode, kind, n, t, c, _ in rows if mode == base}
    for mode, kind, n, t, c, _ in rows:
        if mode != base:
            rt, rc = ref[(kind, n)]
            print(f"  {mode:<7} {kind:<7} {n:>7}: time x{t / rt:6.2f}   cache x{c / rc:6.2f}")
    if "ahn" in a.modes and "salient" in a.modes:
        # The recommended configuration against the paper's mechanism (issue targets: prefill <= 1.10x, decode <=
        # 1.05x); the process's CPU time beside the wall time, the steadier of the two on a shared machine.
        print("\nsalient / ahn:")
        for n in a.prefill:
            print(f"  prefill {n:>7}: time x{prefill_best['salient', n][0] / prefill_best['ahn', n][0]:6.2f}   "
                  f"CPU x{cpu_secs['salient', n] / cpu_secs['ahn', n]:6.2f}   peak growth "
                  f"{prefill_best['salient', n][2]:.2f} vs {prefill_best['ahn', n][2]:.2f} GB")
        for n in a.decode_at:
            print(f"  decode at {n:>7}: time x{best['salient', n] / best['ahn', n]:6.2f}")
    if "ahn" in a.modes:
        dec = {n: t for mode, kind, n, t, _, _ in rows if mode == "ahn" and kind == "decode"}
        lo, hi = min(dec), max(dec)
        print(f"\nahn decode latency at {hi} vs {lo} tokens of context: x{dec[hi] / dec[lo]:.2f}")
    if a.plot:
        plot(rows, a.modes, a.plot, f"{what}, window={a.window} sinks={a.sinks}")
        print(f"plot written to {a.plot}")


def plot(rows, modes, path, title: str) -> None:
    """PNG: prefill seconds and decode ms/token against tokens, one line per mode."""
    def series(kind):
        pts = {m: sorted((n, t) for mode, k, n, t, _, _ in rows if mode == m and k == kind) for m in modes}
        return {m: ([n for n, _ in p], [t for _, t in p]) for m, p in pts.items()}

    xlabel = "tokens (prefill length / context length)"
    line_panels(path, title, [(xlabel, "prefill time (s)", series("prefill"), True),
                              (xlabel, "decode latency (ms/token)", series("decode"), True)])


if __name__ == "__main__":
    main()
