// The compiled CPU form of the one-token memory step (backend="cpp"), loaded and built on first use by
// cpu_step.py beside this file (torch.utils.cpp_extension.load). It restates, in plain loops over float32
// CPU tensors, what the Python side defines once:
//   the step                  ahn/kernels/step.py        step_ref (decay, write the evicted token, read with q)
//   the log decay             ahn/kernels/rule.py        log_decay: g = -exp(A_log) * gate
//   masked writes are inert   ahn/kernels/rule.py        inert_writes (here: a masked row skips its write)
//   the gate activations      ahn/kernels/cpu_step.py    GATE_ACTIVATIONS (the case numbers below are their codes)
//   the read-out              ahn/memory/base.py         Memory.read_out (RMSNorm, SiLU output gate, o_proj)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

static inline float activate(int64_t code, float x) {
  switch (code) {
    case 0: return 1.f / (1.f + std::exp(-x));  // sigmoid
    case 1: return x > 20.f ? x : std::log1p(std::exp(x));  // softplus
    case 2: return x;  // identity
    default: return NAN;
  }
}

static inline const float* fptr(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// One token of every scalar-gated memory rule, float32 CPU (empty tensors stand for absent arguments):
//   q [B, H, K]; k, v [B, Hk, K], [B, Hk, V] of the written token (empty: read only), H % Hk == 0;
//   gates [B, H, G]: log decay g = gates[decay_ch] (times -exp(rate[h]) when rate [H] is given;
//   decay_ch < 0: no decay), strength beta = gates[strength_ch] (< 0: 1); delta: u = beta (v - h^T k),
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
  auto state_all = !has_state ? torch::zeros({B, H, K, V}, q.options()) : (write ? state.clone() : state);
  auto o_all = torch::empty({B, H, V}, q.options());
  float* STATE = state_all.data_ptr<float>();
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
      float* st = STATE + bh * K * V;  // this head's state h: st[i * V + j], key dim i, value dim j
      if (write && (!has_mask || MK[b])) {
        const float* kk = KK + (b * Hk + h / R) * K;
        const float* vv = VV + (b * Hk + h / R) * V;
        const float* gt = GT + bh * GS;
        if (decay_ch >= 0) {
          // log_decay (rule.py): g = -exp(A_log) * gate when the rate is given, else the gate is g
          const float decay = std::exp(RT ? -std::exp(RT[h]) * gt[decay_ch] : gt[decay_ch]);
          for (int64_t i = 0; i < K * V; ++i) st[i] *= decay;
        }
        const float beta = strength_ch >= 0 ? gt[strength_ch] : 1.f;
        float ss = 0.f;
        for (int64_t i = 0; i < K; ++i) ss += kk[i] * kk[i];
        const float inv = l2norm ? 1.f / std::sqrt(ss + (float)l2_eps) : 1.f;
        for (int64_t i = 0; i < K; ++i) kn[i] = kk[i] * inv;
        for (int64_t j = 0; j < V; ++j) u[j] = 0.f;
        if (delta)
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) u[j] += kn[i] * st[i * V + j];
        for (int64_t j = 0; j < V; ++j) u[j] = beta * (vv[j] - u[j]);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) st[i * V + j] += kn[i] * u[j];
      }
      const float* qq = Q + bh * K;
      float qs = 0.f;
      for (int64_t i = 0; i < K; ++i) qs += qq[i] * qq[i];
      const float qinv = (l2norm ? 1.f / std::sqrt(qs + (float)l2_eps) : 1.f) * (float)scale;
      for (int64_t i = 0; i < K; ++i) qn[i] = qq[i] * qinv;
      float* o = OA + bh * V;
      for (int64_t j = 0; j < V; ++j) o[j] = 0.f;
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < V; ++j) o[j] += qn[i] * st[i * V + j];
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
  if (!readout) return {o_all, new_gates, state_all};
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
  return {out, new_gates, state_all};
}

// What torch's load_inline would generate: c10 errors (TORCH_CHECK) reach Python as RuntimeError.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_step", torch::wrap_pybind_function(decode_step), "decode_step"); }
