"""Memory-kernel speed: chunkwise torch vs the recurrent reference, and on CUDA ahn's Triton kernels and fla.

    python -m ahn.benchmarks.kernels                       # T = 512 .. 8192, H = 4, K = V = 64, every rule
    python -m ahn.benchmarks.kernels --lengths 1024 4096 --rules ssd kda --repeats 5
    python -m ahn.benchmarks.kernels --gpu-sizes           # T = 4k .. 64k, H = 16, K = V = 128, no recurrent

Prints, for each rule and length, the median time of forward and forward+backward per
backend, the speed-up of each backend over the recurrent reference (and of triton over
fla), and the time per token (flat in T means linear time). A second table times one
decode step (a batch of evicted tokens written, the current queries read) of the fused
Triton step against the unfused torch step. The Triton kernels run on CUDA only: on
other devices their columns are left out and a note says so. KDA, GDN-2 and Gated
DeltaProduct (``NEW_RULES``: two writes per token, fla's default) have no Triton kernel of
ahn's own: their triton cells print ``-`` and their GPU rows compare torch with fla.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ahn.kernels import (
    delta_rule, delta_rule_step, gated_delta_product, gated_delta_product_step, gated_delta_rule, gated_delta_rule_step,
    gdn2, gdn2_step, kda, kda_step, ssd, ssd_step,
)
from ahn.kernels.dispatch import fla_available

# Writes per token of the Gated DeltaProduct rows (fla's GatedDeltaProduct default).
HOUSEHOLDER = 2
RULES = {
    "gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "ssd": ssd, "kda": kda, "gdn2": gdn2,
    "gated_delta_product": lambda *a, **kw: gated_delta_product(*a, HOUSEHOLDER, **kw),
}
STEPS = {
    "gated_delta_rule": gated_delta_rule_step, "delta_rule": delta_rule_step, "ssd": ssd_step, "kda": kda_step,
    "gdn2": gdn2_step, "gated_delta_product": gated_delta_product_step,
}
NEW_RULES = ("kda", "gdn2", "gated_delta_product")  # no Triton kernel or compiled step of ahn's own
# The sizes issue 7 asks the Triton kernels to be timed at (a Qwen2.5-7B-like layer: 16 heads of 128).
GPU_SIZES = dict(lengths=[4096, 8192, 16384, 32768, 65536], heads=16, head_dim=128)


def make_args(rule, B, T, H, K, V, device, dtype):
    n = HOUSEHOLDER if rule == "gated_delta_product" else 1  # writes per token
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, T * n, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T * n, H, V, device=device, dtype=dtype)
    args = [q, k, v]
    channels = K if rule in ("kda", "gdn2") else None  # a log decay per key channel
    if rule != "delta_rule":
        args.append(F.logsigmoid(torch.randn(B, T, H, *([channels] if channels else []), device=device) + 3).to(dtype))
    if rule == "gdn2":
        args += [torch.rand(B, T, H, K, device=device, dtype=dtype), torch.rand(B, T, H, V, device=device, dtype=dtype)]
    elif rule != "ssd":
        args.append(torch.rand(B, T * n, H, device=device, dtype=dtype))
    return args


def runs(rule: str, backend: str) -> bool:
    """Whether ``backend`` has an implementation of ``rule``."""
    return not (backend == "triton" and rule in NEW_RULES)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """``(median seconds of `repeats` timed calls of fn, the result of an untimed warm-up call before them)``."""
    result = fn()  # warm-up: compilation, autotuning, lazy imports
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def rule_fn(rule, args, backend, backward):
    """A function that runs ``rule`` once on ``args`` with ``backend`` and returns ``(o, final_state, grads)``:
    with ``backward``, the gradients of every argument under the loss ``o.sum() + final_state.sum()``
    (the leaves are made here, outside the timed call); without, ``grads`` is None and no graph is built."""
    f = RULES[rule]
    if not backward:

        def forward():
            with torch.no_grad():
                o, s = f(*args, backend=backend, output_final_state=True)
            return o, s, None

        return forward
    leaves = [a.detach().clone().requires_grad_(True) for a in args]

    def forward_backward():
        for t in leaves:
            t.grad = None
        o, s = f(*leaves, backend=backend, output_final_state=True)
        (o.float().sum() + s.sum()).backward()
        return o.detach(), s.detach(), [t.grad for t in leaves]

    return forward_backward


def bench(rule, backend, args, device, repeats, backward):
    return timed(rule_fn(rule, args, backend, backward), device, repeats)[0]


def step_args(rule, B, H, Hk, D, device, dtype):
    """Inputs of one decode step: ``(q [B, H, D], k / v [B, Hk, D] (GQA), gates (the rule's g [B, H] and / or
    beta [B, H], in its argument order), state [B, H, D, D] float32)``."""
    writes = (HOUSEHOLDER,) if rule == "gated_delta_product" else ()
    q = torch.randn(B, H, D, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, Hk, *writes, D, device=device), dim=-1).to(dtype)
    v = torch.randn(B, Hk, *writes, D, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, H, device=device) + 3).to(dtype)
    g_channels = F.logsigmoid(torch.randn(B, H, D, device=device) + 3).to(dtype)
    beta = torch.rand(B, H, *writes, device=device, dtype=dtype)
    state = torch.randn(B, H, D, D, device=device)
    channel = torch.rand(B, H, D, device=device, dtype=dtype)
    gates = {"gated_delta_rule": (g, beta), "delta_rule": (beta,), "ssd": (g,), "kda": (g_channels, beta),
             "gdn2": (g_channels, channel, channel), "gated_delta_product": (g, beta)}[rule]
    return q, k, v, gates, state


def step_fn(rule, inputs, backend):
    """A function that runs one decode step of ``rule`` on ``inputs`` (:func:`step_args`) without autograd
    and returns ``(o [B, H, D], state [B, H, D, D])``."""
    q, k, v, gates, state = inputs
    f = STEPS[rule]

    def step():
        with torch.no_grad():
            return f(q, k, v, *gates, state, backend=backend)

    return step


def bench_step(rule, B, H, Hk, D, backend, device, dtype, repeats):
    """Median time of one decode step (:func:`step_args`)."""
    return timed(step_fn(rule, step_args(rule, B, H, Hk, D, device, dtype), backend), device, repeats)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-recurrent", action="store_true", help="skip the (slow) recurrent reference")
    p.add_argument("--gpu-sizes", action="store_true",
                   help=f"issue 7's sizes: T = {GPU_SIZES['lengths']}, H = 16, K = V = 128, without the recurrent reference")
    p.add_argument("--decode-batch", type=int, default=8, help="rows of the decode-step table")
    p.add_argument("--kv-heads", type=int, default=None, help="k / v heads of the decode step (GQA); default: --heads / 4")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-step table")
    a = p.parse_args(argv)
    if a.gpu_sizes:
        a.lengths, a.heads, a.head_dim, a.no_recurrent = GPU_SIZES["lengths"], GPU_SIZES["heads"], GPU_SIZES["head_dim"], True
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backends = ([] if a.no_recurrent else ["recurrent"]) + ["torch"]
    if device.type == "cuda":
        backends.append("triton")
        if fla_available():
            backends.append("fla")
    else:
        print(f"note: backend 'triton' is timed on CUDA only (device={device}: its column is left out)")
    for rule in a.rules:  # one untimed call per rule and backend: thread pools, lazy imports
        for b in (b for b in backends if runs(rule, b)):
            bench(rule, b, make_args(rule, 1, 64, a.heads, a.head_dim, a.head_dim, device, dtype), device, 1, True)
    print(f"device={device} dtype={dtype} B={a.batch} H={a.heads} K=V={a.head_dim} repeats={a.repeats} (median seconds)")
    header = f"{'rule':<21}{'T':>7} {'pass':<8}" + "".join(f"{b:>12}" for b in backends)
    header += "".join(f"{'x ' + b:>11}" for b in backends if b != "recurrent" and "recurrent" in backends)
    ratio = "triton" in backends and "fla" in backends
    header += (f"{'fla/triton':>11}" if ratio else "") + f"{'us/token torch':>16}"
    print(header)
    print("-" * len(header))
    for rule in a.rules:
        for T in a.lengths:
            args = make_args(rule, a.batch, T, a.heads, a.head_dim, a.head_dim, device, dtype)
            for backward in (False, True):
                t = {b: bench(rule, b, args, device, a.repeats, backward) for b in backends if runs(rule, b)}
                row = f"{rule:<21}{T:>7} {'fwd+bwd' if backward else 'fwd':<8}"
                row += "".join(f"{t[b]:>12.4f}" if b in t else f"{'-':>12}" for b in backends)
                if "recurrent" in t:
                    row += "".join(f"{t['recurrent'] / t[b]:>10.1f}x" if b in t else f"{'-':>11}"
                                   for b in backends if b != "recurrent")
                if ratio:
                    row += f"{t['fla'] / t['triton']:>10.2f}x" if "triton" in t else f"{'-':>11}"
                print(row + f"{1e6 * t['torch'] / (a.batch * T):>16.2f}", flush=True)
    if not a.no_decode:
        decode_table(a, device, dtype)


def decode_table(a, device, dtype):
    """One decode step per rule: the unfused torch step vs the fused Triton step (CUDA only)."""
    Hk = a.kv_heads or max(1, a.heads // 4)
    if a.heads % Hk:
        raise SystemExit(f"--kv-heads {Hk} must divide --heads {a.heads}")
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    print(f"\ndecode step: B={a.decode_batch} H={a.heads} Hk={Hk} K=V={a.head_dim} (median seconds)")
    header = f"{'rule':<21}" + "".join(f"{b:>12}" for b in backends) + (f"{'torch/triton':>14}" if len(backends) > 1 else "")
    print(header)
    print("-" * len(header))
    for rule in a.rules:
        t = {b: bench_step(rule, a.decode_batch, a.heads, Hk, a.head_dim, b, device, dtype, max(a.repeats, 20))
             for b in backends if runs(rule, b)}
        row = f"{rule:<21}" + "".join(f"{t[b]:>12.6f}" if b in t else f"{'-':>12}" for b in backends)
        print(row + (f"{t['torch'] / t['triton']:>13.2f}x" if "triton" in t else ""), flush=True)


if __name__ == "__main__":
    main()
