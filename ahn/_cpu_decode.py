"""A fused CPU decode step for the (gated) delta-rule memories, built on first use.

In eager PyTorch one generated token costs the memory ~50 small tensor ops per layer, and on
CPU each costs microseconds of dispatch and Python overhead while the arithmetic (H states of
D x D) takes well under one. This module compiles, once per machine, a small C++ function
that does a whole decode step of GatedDeltaNet / DeltaNet in plain loops: the new token's
write gates, the evicted token's write, the read with q, the per-head RMSNorm, the output gate
and the per-head output projection. ``Memory.decode`` uses it for float32 CPU tensors without
autograd, and falls back to the torch ops when it cannot be built (no compiler) or when
``AHN_CPU_DECODE=0``. It computes what the torch path computes (tested to float32 rounding).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Optional

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// x [B, hidden]: the new token's normed hidden state; wa (empty: plain delta rule), wb, wg
// [H, hidden] and bg [H] (or empty) the a / b / g projections; dt_bias, A_log [H] (or empty);
// q [B, H, D]; k, v [B, Hk, D] of the evicted token or empty (no write); gates [B, H, G];
// mask [B] bool or empty; state [B, H, D, D] or empty; norm_w [D]; out_w [H, D, D]. Returns
// {out [B, H, D] (undefined: nothing to read), new_gates [B, H, G], state}. float32 only.
std::vector<torch::Tensor> delta_decode(torch::Tensor x, torch::Tensor wa, torch::Tensor wb, torch::Tensor wg,
                                        torch::Tensor bg, torch::Tensor dt_bias, torch::Tensor A_log,
                                        torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gates,
                                        torch::Tensor mask, torch::Tensor state, torch::Tensor norm_w,
                                        torch::Tensor out_w, bool l2norm, double l2_eps, double norm_eps,
                                        double scale) {
  for (const auto& t : {x, wa, wb, wg, bg, dt_bias, A_log, q, k, v, gates, state, norm_w, out_w})
    TORCH_CHECK(t.numel() == 0 || (t.scalar_type() == torch::kFloat && t.device().is_cpu()),
                "ahn fused CPU decode: float32 CPU tensors only");
  x = x.contiguous(); wa = wa.contiguous(); wb = wb.contiguous(); wg = wg.contiguous(); bg = bg.contiguous();
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); gates = gates.contiguous(); mask = mask.contiguous();
  state = state.contiguous(); norm_w = norm_w.contiguous(); out_w = out_w.contiguous();
  dt_bias = dt_bias.contiguous(); A_log = A_log.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), C = x.size(1);
  const bool gated = wa.numel() > 0;
  const int64_t G = gated ? 2 : 1;
  const bool write = k.numel() > 0, has_state = state.numel() > 0, has_mask = mask.numel() > 0;
  auto dot = [C](const float* a, const float* b) {
    float s = 0.f;
    for (int64_t i = 0; i < C; ++i) s += a[i] * b[i];
    return s;
  };
  std::vector<float> zs(B * H);
  auto new_gates = torch::empty({B, H, G}, q.options());
  float* NG = new_gates.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const float* xb = x.data_ptr<float>() + b * C;
      zs[b * H + h] = dot(xb, wg.data_ptr<float>() + h * C) + (bg.numel() ? bg.data_ptr<float>()[h] : 0.f);
      const float pb = dot(xb, wb.data_ptr<float>() + h * C);
      if (gated) {
        const float xa = dot(xb, wa.data_ptr<float>() + h * C) + dt_bias.data_ptr<float>()[h];
        const float sp = xa > 20.f ? xa : std::log1p(std::exp(xa));  // softplus, threshold 20 as torch
        NG[(b * H + h) * 2] = -std::exp(A_log.data_ptr<float>()[h]) * sp;
        NG[(b * H + h) * 2 + 1] = 1.f / (1.f + std::exp(-pb));
      } else {
        NG[b * H + h] = 1.f / (1.f + std::exp(-pb));
      }
    }
  if (!write && !has_state) return {torch::Tensor(), new_gates, torch::Tensor()};
  auto S_all = has_state ? state.clone() : torch::zeros({B, H, D, D}, q.options());
  auto out = torch::empty({B, H, D}, q.options());
  float* SA = S_all.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float* Q = q.data_ptr<float>();
  const float* W = out_w.data_ptr<float>();
  const float* NW = norm_w.data_ptr<float>();
  const int64_t Hk = write ? k.size(1) : 1, R = H / Hk;
  // (row, head) pairs in parallel once each chunk has ~64k flops of work (small problems stay inline).
  const int64_t grain = std::max<int64_t>(1, 65536 / (6 * D * D + 2 * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
  std::vector<float> kn(D), u(D), qn(D), o(D), y(D);
  for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = SA + (b * H + h) * D * D;  // S[i * D + j]: key dim i, value dim j
      if (write && (!has_mask || mask.data_ptr<bool>()[b])) {
        const float* kk = k.data_ptr<float>() + (b * Hk + h / R) * D;
        const float* vv = v.data_ptr<float>() + (b * Hk + h / R) * D;
        const float* gt = gates.data_ptr<float>() + (b * H + h) * G;
        const float decay = gated ? std::exp(gt[0]) : 1.f, beta = gt[G - 1];
        float ss = 0.f;
        for (int64_t i = 0; i < D; ++i) ss += kk[i] * kk[i];
        const float inv = l2norm ? 1.f / std::sqrt(ss + (float)l2_eps) : 1.f;
        for (int64_t i = 0; i < D; ++i) kn[i] = kk[i] * inv;
        if (gated)
          for (int64_t i = 0; i < D * D; ++i) S[i] *= decay;
        for (int64_t j = 0; j < D; ++j) u[j] = 0.f;
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j) u[j] += kn[i] * S[i * D + j];
        for (int64_t j = 0; j < D; ++j) u[j] = beta * (vv[j] - u[j]);
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j) S[i * D + j] += kn[i] * u[j];
      }
      const float* qq = Q + (b * H + h) * D;
      float qs = 0.f;
      for (int64_t i = 0; i < D; ++i) qs += qq[i] * qq[i];
      const float qinv = (l2norm ? 1.f / std::sqrt(qs + (float)l2_eps) : 1.f) * (float)scale;
      for (int64_t i = 0; i < D; ++i) qn[i] = qq[i] * qinv;
      for (int64_t j = 0; j < D; ++j) o[j] = 0.f;
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) o[j] += qn[i] * S[i * D + j];
      float os = 0.f;
      for (int64_t j = 0; j < D; ++j) os += o[j] * o[j];
      const float zz = zs[b * H + h];
      const float gate = zz / (1.f + std::exp(-zz));  // silu
      const float r = 1.f / std::sqrt(os / D + (float)norm_eps) * gate;
      for (int64_t j = 0; j < D; ++j) y[j] = o[j] * r * NW[j];
      float* oo = O + (b * H + h) * D;
      const float* Wh = W + h * D * D;  // out_w[h][j][m]
      for (int64_t m = 0; m < D; ++m) oo[m] = 0.f;
      for (int64_t j = 0; j < D; ++j)
        for (int64_t m = 0; m < D; ++m) oo[m] += y[j] * Wh[j * D + m];
    }
  });
  return {out, new_gates, S_all};
}
"""


_NAME = "ahn_cpu_decode_v3"  # bump with every change of _SOURCE: builds are cached under this name


def _built(cpp_extension) -> bool:
    try:
        return os.path.exists(os.path.join(cpp_extension._get_build_directory(_NAME, verbose=False), _NAME + ".so"))
    except Exception:  # a private helper of torch: if it moves, only the notice is lost
        return True


@functools.lru_cache(maxsize=None)
def fused_delta_decode():
    """The compiled function, or None (disabled with ``AHN_CPU_DECODE=0``, or no toolchain)."""
    if os.environ.get("AHN_CPU_DECODE", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        if not _built(cpp_extension):
            print("ahn: building the fused CPU decode step (once per machine, about 30 s; AHN_CPU_DECODE=0 skips it)",
                  file=sys.stderr, flush=True)
        module = cpp_extension.load_inline(_NAME, cpp_sources=[_SOURCE], functions=["delta_decode"],
                                           extra_cflags=["-O3"], verbose=False)
        return module.delta_decode
    except Exception as e:  # no compiler / ninja / headers: the torch ops do the same, slower
        warnings.warn(f"ahn: the fused CPU decode step could not be built ({type(e).__name__}: {e}); "
                      "decoding uses torch ops (set AHN_CPU_DECODE=0 to skip the attempt)")
        return None


# Stands for an absent tensor argument of the compiled step (it reads only sizes of it).
EMPTY = torch.empty(0)


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the fused step applies: float32 CPU tensors, autograd off."""
    if torch.is_grad_enabled():
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
