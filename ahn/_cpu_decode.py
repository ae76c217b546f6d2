"""The compiled CPU form of the one-token memory step (``backend="cpp"``), built on first use.

In eager PyTorch one generated token costs the memory ~50 small tensor ops per layer, and on
CPU each costs microseconds of dispatch and Python overhead while the arithmetic (H states of
D x D) takes well under one. This module compiles, once per machine, one C++ function that runs
the step of :func:`ahn.kernels.step.step_ref` (decay, write the evicted token, read with q) in
plain loops, with the same arguments as the torch and Triton backends (:func:`step`). Given the
new token's hidden state it also computes, in the same call, the token's write gates and the
memory's read-out (RMSNorm, output gate, per-head output projection): that is the memory decode
of ``ahn.memory`` (``Memory.decode`` calls :func:`compiled` with its rule's ``StepSpec``). The gate activations
are this file's :data:`GATE_ACTIVATIONS`, whose torch forms the torch path uses: one table.

The build is cached under a name made from a hash of the source, so a changed source builds
anew. ``AHN_CPU_DECODE=0`` (or a missing toolchain) leaves only the torch and Triton backends.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

# Each gate activation in its two forms, side by side: the torch function (the torch backend of
# the memory decode and the parallel form) and the C++ expression of float ``x`` (the compiled
# backend); its index is its code in the C++ switch. softplus: torch's threshold 20.
GATE_ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, "1.f / (1.f + std::exp(-x))"),
    "softplus": (F.softplus, "x > 20.f ? x : std::log1p(std::exp(x))"),
    "identity": (torch.nn.Identity(), "x"),  # a low-rank code the rule expands itself (KDA, GDN-2)
}

_TEMPLATE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

static inline float activate(int64_t code, float x) {
  switch (code) {
@ACTIVATIONS@
    default: return NAN;
  }
}

static inline const float* fptr(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// One token of every memory rule, float32 CPU (empty tensors stand for absent arguments):
//   q [B, H, K]; k, v [B, Hk, K], [B, Hk, V] of the written token (empty: read only), H % Hk == 0;
//   gates [B, H, G]: log decay g = gates[decay_ch] (times -exp(rate[h]) when rate [H] is given;
//   decay_ch < 0: no decay), strength beta = gates[strength_ch] (< 0: 1); delta: u = beta (v - S^T k),
//   else u = beta v; mask [B] bool (false: the row writes nothing); state [B, H, K, V] (empty: zeros).
// With x [B, C] (the new token) also: new_gates[b, h, c] = act_c(x . gate_w[c][h] + gate_b[c][h] +
// gate_c[c][h]) and the output gate z = x . z_w[h] + z_b[h]. With out_w [H, V, V] the read-out:
// joint_norm false: y = rmsnorm_V(o) * norm_w * silu(z); true: y = rmsnorm_{H V}(o silu(z)) * norm_w;
// out = y @ out_w[h]. Returns {o or out (undefined: nothing to read), new_gates (undefined without x),
// state (the input itself for a read-only step)}.
std::vector<torch::Tensor> decode_step(
    torch::Tensor x, std::vector<torch::Tensor> gate_w, std::vector<torch::Tensor> gate_b,
    std::vector<torch::Tensor> gate_c, std::vector<int64_t> gate_act, torch::Tensor z_w, torch::Tensor z_b,
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gates, int64_t decay_ch, torch::Tensor rate,
    int64_t strength_ch, bool delta, torch::Tensor mask, torch::Tensor state, torch::Tensor norm_w,
    bool joint_norm, torch::Tensor out_w, bool l2norm, double l2_eps, double norm_eps, double scale) {
  std::vector<torch::Tensor*> all = {&x, &z_w, &z_b, &q, &k, &v, &gates, &rate, &state, &norm_w, &out_w};
  for (auto* t : {&gate_w, &gate_b, &gate_c})
    for (auto& u : *t) all.push_back(&u);
  for (auto* t : all) {
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == torch::kFloat && t->device().is_cpu()),
                "ahn decode step (cpp): float32 CPU tensors only");
    *t = t->contiguous();
  }
  TORCH_CHECK(mask.numel() == 0 || mask.scalar_type() == torch::kBool, "ahn decode step (cpp): mask must be bool");
  mask = mask.contiguous();
  const int64_t NG = gate_w.size();
  TORCH_CHECK((int64_t)gate_b.size() == NG && (int64_t)gate_c.size() == NG && (int64_t)gate_act.size() == NG,
              "ahn decode step (cpp): one weight, bias, parameter bias and activation per gate");
  const bool has_x = x.numel() > 0, write = k.numel() > 0, has_state = state.numel() > 0;
  const bool has_mask = mask.numel() > 0, readout = out_w.numel() > 0;
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), C = has_x ? x.size(1) : 0;
  auto dot = [C](const float* a, const float* b) {
    float s = 0.f;
    for (int64_t i = 0; i < C; ++i) s += a[i] * b[i];
    return s;
  };
  torch::Tensor new_gates = has_x ? torch::empty({B, H, NG}, q.options()) : torch::Tensor();
  std::vector<float> zs(readout ? B * H : 0);
  auto head_gates = [&](int64_t b, int64_t h) {  // the new token's gates and output gate for (b, h)
    const float* xb = x.data_ptr<float>() + b * C;
    float* ng = new_gates.data_ptr<float>() + (b * H + h) * NG;
    for (int64_t c = 0; c < NG; ++c) {
      float a = dot(xb, gate_w[c].data_ptr<float>() + h * C);
      if (gate_b[c].numel()) a += gate_b[c].data_ptr<float>()[h];
      if (gate_c[c].numel()) a += gate_c[c].data_ptr<float>()[h];
      ng[c] = activate(gate_act[c], a);
    }
    if (readout)
      zs[b * H + h] = dot(xb, z_w.data_ptr<float>() + h * C) + (z_b.numel() ? z_b.data_ptr<float>()[h] : 0.f);
  };
  if (!write && !has_state) {
    if (has_x)
      for (int64_t bh = 0; bh < B * H; ++bh) head_gates(bh / H, bh % H);
    return {torch::Tensor(), new_gates, torch::Tensor()};
  }
  const int64_t V = write ? v.size(2) : state.size(3);
  const int64_t Hk = write ? k.size(1) : 1, R = H / Hk, GS = write ? gates.size(2) : 0;
  auto S_all = !has_state ? torch::zeros({B, H, K, V}, q.options()) : (write ? state.clone() : state);
  auto o_all = torch::empty({B, H, V}, q.options());
  float* SA = S_all.data_ptr<float>();
  float* OA = o_all.data_ptr<float>();
  const float *Q = fptr(q), *KK = fptr(k), *VV = fptr(v), *GT = fptr(gates), *RT = fptr(rate);
  const bool* MK = has_mask ? mask.data_ptr<bool>() : nullptr;
  std::vector<float> sumsq(readout ? B * H : 0);
  // (row, head) pairs in parallel once each chunk has ~64k flops of work (small problems stay inline).
  const int64_t grain = std::max<int64_t>(1, 65536 / (6 * K * V + 2 * C * (NG + 1)));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> kn(K), u(V), qn(K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      if (has_x) head_gates(b, h);
      float* S = SA + bh * K * V;  // S[i * V + j]: key dim i, value dim j
      if (write && (!has_mask || MK[b])) {
        const float* kk = KK + (b * Hk + h / R) * K;
        const float* vv = VV + (b * Hk + h / R) * V;
        const float* gt = GT + bh * GS;
        if (decay_ch >= 0) {
          const float decay = std::exp(RT ? -std::exp(RT[h]) * gt[decay_ch] : gt[decay_ch]);
          for (int64_t i = 0; i < K * V; ++i) S[i] *= decay;
        }
        const float beta = strength_ch >= 0 ? gt[strength_ch] : 1.f;
        float ss = 0.f;
        for (int64_t i = 0; i < K; ++i) ss += kk[i] * kk[i];
        const float inv = l2norm ? 1.f / std::sqrt(ss + (float)l2_eps) : 1.f;
        for (int64_t i = 0; i < K; ++i) kn[i] = kk[i] * inv;
        for (int64_t j = 0; j < V; ++j) u[j] = 0.f;
        if (delta)
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) u[j] += kn[i] * S[i * V + j];
        for (int64_t j = 0; j < V; ++j) u[j] = beta * (vv[j] - u[j]);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) S[i * V + j] += kn[i] * u[j];
      }
      const float* qq = Q + bh * K;
      float qs = 0.f;
      for (int64_t i = 0; i < K; ++i) qs += qq[i] * qq[i];
      const float qinv = (l2norm ? 1.f / std::sqrt(qs + (float)l2_eps) : 1.f) * (float)scale;
      for (int64_t i = 0; i < K; ++i) qn[i] = qq[i] * qinv;
      float* o = OA + bh * V;
      for (int64_t j = 0; j < V; ++j) o[j] = 0.f;
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < V; ++j) o[j] += qn[i] * S[i * V + j];
      if (readout) {
        if (joint_norm) {
          const float zz = zs[bh], gate = zz / (1.f + std::exp(-zz));  // silu
          for (int64_t j = 0; j < V; ++j) o[j] *= gate;
        }
        float os = 0.f;
        for (int64_t j = 0; j < V; ++j) os += o[j] * o[j];
        sumsq[bh] = os;
      }
    }
  });
  if (!readout) return {o_all, new_gates, S_all};
  auto out = torch::empty({B, H, V}, q.options());
  float* OUT = out.data_ptr<float>();
  const float* NW = norm_w.data_ptr<float>();
  const float* W = out_w.data_ptr<float>();
  at::parallel_for(0, B * H, std::max<int64_t>(1, 65536 / (2 * V * V)), [&](int64_t begin, int64_t end) {
    std::vector<float> y(V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float r;
      if (joint_norm) {
        float s = 0.f;
        for (int64_t hh = 0; hh < H; ++hh) s += sumsq[b * H + hh];
        r = 1.f / std::sqrt(s / (H * V) + (float)norm_eps);
      } else {
        const float zz = zs[bh];
        r = 1.f / std::sqrt(sumsq[bh] / V + (float)norm_eps) * (zz / (1.f + std::exp(-zz)));  // silu gate
      }
      const float* o = OA + bh * V;
      const float* nw = NW + (joint_norm ? h * V : 0);
      for (int64_t j = 0; j < V; ++j) y[j] = o[j] * r * nw[j];
      float* oo = OUT + bh * V;
      const float* Wh = W + h * V * V;  // out_w[h][j][m]
      for (int64_t m = 0; m < V; ++m) oo[m] = 0.f;
      for (int64_t j = 0; j < V; ++j)
        for (int64_t m = 0; m < V; ++m) oo[m] += y[j] * Wh[j * V + m];
    }
  });
  return {out, new_gates, S_all};
}
"""

_SOURCE = _TEMPLATE.replace("@ACTIVATIONS@", "\n".join(
    f"    case {code}: return {cpp};  // {name}" for code, (name, (_, cpp)) in enumerate(GATE_ACTIVATIONS.items())))
ACTIVATION_CODES = {name: code for code, name in enumerate(GATE_ACTIVATIONS)}
# The build cache key: a changed source builds anew under a new name.
_NAME = "ahn_cpu_decode_" + hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
# Stands for an absent tensor argument of the compiled step (it reads only its size).
EMPTY = torch.empty(0)


def _ninja_version() -> str:
    """The version of the ``ninja`` on PATH (what torch builds with); "none" without one."""
    try:
        return subprocess.run(["ninja", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"


def build_directory() -> str:
    """Where the step is built: one folder per source and ninja version. ninja records each compile
    command in its folder, and two ninja versions record them differently, so sharing one folder
    would rebuild (silently, ~25 s) every time the other ninja comes first on PATH."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(root, "ahn", f"{_NAME}-ninja{_ninja_version()}")


@functools.lru_cache(maxsize=None)
def compiled():
    """The compiled ``decode_step``, or None (disabled with ``AHN_CPU_DECODE=0``, or no toolchain)."""
    if os.environ.get("AHN_CPU_DECODE", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        if not os.path.exists(os.path.join(folder, _NAME + ".so")):
            print(f"ahn: building the compiled CPU decode step in {folder} (once per machine and ninja version, "
                  "about 30 s; AHN_CPU_DECODE=0 skips it)", file=sys.stderr, flush=True)
        os.makedirs(folder, exist_ok=True)
        module = cpp_extension.load_inline(_NAME, cpp_sources=[_SOURCE], functions=["decode_step"],
                                           extra_cflags=["-O3"], build_directory=folder, verbose=False)
        return module.decode_step
    except Exception as e:  # no compiler / ninja / headers: the torch ops do the same, slower
        warnings.warn(f"ahn: the compiled CPU decode step could not be built ({type(e).__name__}: {e}); "
                      "decoding uses torch ops (set AHN_CPU_DECODE=0 to skip the attempt)")
        return None


def _opt(t: Optional[torch.Tensor]) -> torch.Tensor:
    return EMPTY if t is None else t


def step(q, k, v, g, beta, state, mask, *, scale: float, use_qk_l2norm: bool, l2_eps: float, delta: bool):
    """The ``"cpp"`` backend of :func:`ahn.kernels.step.step_unchecked` (same arguments): the bare step,
    no gates or read-out. Returns ``(o [B, H, V], state [B, H, K, V])`` float32."""
    gates = EMPTY
    decay_ch = strength_ch = -1
    if k is not None:
        channels = [t for t in (g, beta) if t is not None]
        decay_ch, strength_ch = (0 if g is not None else -1), (len(channels) - 1 if beta is not None else -1)
        gates = torch.stack(channels, -1) if channels else EMPTY  # [B, H, G]
    o, _, state = compiled()(
        EMPTY, [], [], [], [], EMPTY, EMPTY, q, _opt(k), _opt(v), gates, decay_ch, EMPTY, strength_ch, delta,
        _opt(mask), _opt(state), EMPTY, False, EMPTY, use_qk_l2norm, l2_eps, 0.0, scale,
    )
    return o, state
