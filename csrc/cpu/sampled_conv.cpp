// A convolution evaluated only at chosen output positions, one set of positions per output channel,
// and its weight gradient from those positions (CPU). See src/fastcurv/ops/sampled_conv.py.
//
// The input comes as its patches cols [N, L, T] (L output positions, T = C_in * kh * kw taps): a
// position's patch is one contiguous row. A work item gathers the patches of a vector's worth of
// positions into a tap-major scratch ([T][lanes], in L1), then every probe's output (forward) or
// every (probe, tap) accumulator (weight gradient) takes one vector multiply-add per tap.
#include <torch/library.h>
#include "common.h"

#include <atomic>
#include <cstring>

namespace {

template <typename S>
struct SampledArgs {
  const S* cols;
  const int64_t* pos;
  const S* w;     // forward: weight [G, K, T]
  const S* grad;  // wgrad: grad [N, K, G, S]
  S* out;         // forward: [N, K, G, S] contiguous; wgrad: [G, K, T] contiguous
  int64_t N, L, T, G, K, P;  // P: positions per channel
  int64_t c_n, c_l, p_n, p_g, w_g, w_k, g_n, g_k, g_g;
  bool accumulate;
  std::atomic<bool>* bad;  // a position outside [0, L)
};

// buf[t * W + j] = cols[n][pos[j]][t] for j < m (m <= W lanes; lanes m..W-1 zero).
template <typename S, int W>
FC_ALWAYS_INLINE void gather(const SampledArgs<S>& a, const S* cols_n, const int64_t* pos, int m, S* buf) {
  const int64_t T = a.T;
  for (int j = 0; j < m; ++j) {
    int64_t q = pos[j];
    if (q < 0 || q >= a.L) {
      a.bad->store(true, std::memory_order_relaxed);
      q = 0;
    }
    const S* row = cols_n + q * a.c_l;
    for (int64_t t = 0; t < T; ++t) buf[t * W + j] = row[t];
  }
  for (int j = m; j < W; ++j)
    for (int64_t t = 0; t < T; ++t) buf[t * W + j] = S(0);
}

// Forward, work items q = n * G + g in [q0, q1): out[n, k, g, s] = sum_t cols[n, pos[n, g, s], t] * w[g, k, t].
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_range(const SampledArgs<S>& a, int64_t q0, int64_t q1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t T = a.T, K = a.K, G = a.G, Sn = a.P;
  S* buf = fc_scratch<S, 0>(T * W + W);
  S* tail = buf + T * W;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / G, g = q % G;
    const S* cols_n = a.cols + n * a.c_n;
    const int64_t* pos = a.pos + n * a.p_n + g * a.p_g;
    const S* wg = a.w + g * a.w_g;
    for (int64_t s0 = 0; s0 < Sn; s0 += W) {
      const int m = static_cast<int>(std::min<int64_t>(W, Sn - s0));
      gather<S, W>(a, cols_n, pos + s0, m, buf);
      for (int64_t k = 0; k < K; ++k) {
        const S* wk = wg + k * a.w_k;
        V acc = L::zero();
        for (int64_t t = 0; t < T; ++t) acc += L::splat(wk[t]) * L::load(buf + t * W);
        S* o = a.out + ((n * K + k) * G + g) * Sn + s0;
        if (m == W) {
          L::store(o, acc);
        } else {
          L::store(tail, acc);
          std::memcpy(o, tail, sizeof(S) * m);
        }
      }
    }
  }
}

// Weight gradient, groups g in [g0, g1): out[g, k, t] (+)= sum_{n, s} grad[n, k, g, s] * cols[n, pos[n, g, s], t].
// Each group's K * T accumulators (vectors over positions, in L1) are summed over its lanes at the end.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_range(const SampledArgs<S>& a, int64_t g0, int64_t g1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t T = a.T, K = a.K, Sn = a.P;
  S* buf = fc_scratch<S, 0>(T * W + W + K * T * W);
  S* gt = buf + T * W;
  S* acc = gt + W;
  for (int64_t g = g0; g < g1; ++g) {
    std::memset(acc, 0, sizeof(S) * K * T * W);
    for (int64_t n = 0; n < a.N; ++n) {
      const S* cols_n = a.cols + n * a.c_n;
      const int64_t* pos = a.pos + n * a.p_n + g * a.p_g;
      for (int64_t s0 = 0; s0 < Sn; s0 += W) {
        const int m = static_cast<int>(std::min<int64_t>(W, Sn - s0));
        gather<S, W>(a, cols_n, pos + s0, m, buf);
        for (int64_t k = 0; k < K; ++k) {
          const S* gr = a.grad + n * a.g_n + k * a.g_k + g * a.g_g + s0;
          V gk;
          if (m == W) {
            gk = L::load(gr);
          } else {
            for (int j = 0; j < W; ++j) gt[j] = j < m ? gr[j] : S(0);
            gk = L::load(gt);
          }
          S* ak = acc + k * T * W;
          for (int64_t t = 0; t < T; ++t) L::store(ak + t * W, L::load(ak + t * W) + gk * L::load(buf + t * W));
        }
      }
    }
    S* o = a.out + g * K * T;
    for (int64_t j = 0; j < K * T; ++j) {
      S total = 0;
      for (int l = 0; l < W; ++l) total += acc[j * W + l];
      o[j] = a.accumulate ? o[j] + total : total;
    }
  }
}

void check_sampled(const char* op, const at::Tensor& cols, const at::Tensor& pos) {
  TORCH_CHECK(cols.dim() == 3, op, ": cols must be [N, L, T], got ", cols.sizes());
  TORCH_CHECK(cols.device().is_cpu() && pos.device().is_cpu(), op, ": CPU tensors required, got cols on ", cols.device(),
              " and pos on ", pos.device());
  TORCH_CHECK(cols.scalar_type() == at::kFloat || cols.scalar_type() == at::kDouble, op,
              ": cols must be float32 or float64, got ", cols.scalar_type());
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == cols.size(0), op, ": pos must be [N, G, S] with N = ", cols.size(0), ", got ",
              pos.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": pos must be int64, got ", pos.scalar_type());
}

template <typename S>
SampledArgs<S> args_of(const at::Tensor& cols, const at::Tensor& pos, std::atomic<bool>* bad) {
  SampledArgs<S> h{};
  h.cols = cols.data_ptr<S>(), h.pos = pos.data_ptr<int64_t>();
  h.N = cols.size(0), h.L = cols.size(1), h.T = cols.size(2), h.G = pos.size(1), h.P = pos.size(2);
  h.c_n = cols.stride(0), h.c_l = cols.stride(1), h.p_n = pos.stride(0), h.p_g = pos.stride(1);
  h.bad = bad;
  return h;
}

// Rows of the last dimension contiguous (any other strides).
at::Tensor rows(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor sampled_conv_cpu(const at::Tensor& cols_in, const at::Tensor& pos_in, const at::Tensor& weight_in) {
  check_sampled("sampled_conv", cols_in, pos_in);
  const at::Tensor cols = rows(cols_in), pos = rows(pos_in), weight = rows(weight_in);
  const int64_t N = cols.size(0), T = cols.size(2), G = pos.size(1), Sn = pos.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == G && weight.size(2) == T, "sampled_conv: weight must be [G, K, T] = [",
              G, ", K, ", T, "], got ", weight.sizes());
  fc_check_operand("sampled_conv", "cols", cols, "weight", weight, weight.sizes());
  const int64_t K = weight.size(1);
  at::Tensor out = at::empty({N, K, G, Sn}, cols.options());
  if (out.numel() == 0) return out;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "sampled_conv", [&] {
    using S = scalar_t;
    SampledArgs<S> h = args_of<S>(cols, pos, &bad);
    h.w = weight.data_ptr<S>(), h.w_g = weight.stride(0), h.w_k = weight.stride(1), h.K = K;
    h.out = out.data_ptr<S>();
    const auto fn = fc_pick_range_widths<fwd_range<S, 64>, fwd_range<S, 32>, fwd_range<S, 16>, SampledArgs<S>>();
    at::parallel_for(0, N * G, std::max<int64_t>(1, 256 / std::max<int64_t>(Sn * K, 1)),
                     [&](int64_t q0, int64_t q1) { fn(h, q0, q1); });
  });
  TORCH_CHECK(!bad.load(), "sampled_conv: pos has entries outside [0, ", cols.size(1), ") (the patches' positions)");
  return out;
}

void sampled_conv_wgrad_cpu(const at::Tensor& cols_in, const at::Tensor& pos_in, const at::Tensor& grad_in, at::Tensor& out,
                            bool accumulate) {
  check_sampled("sampled_conv_wgrad", cols_in, pos_in);
  const at::Tensor cols = rows(cols_in), pos = rows(pos_in), grad = rows(grad_in);
  const int64_t N = cols.size(0), T = cols.size(2), G = pos.size(1), Sn = pos.size(2);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == N && grad.size(2) == G && grad.size(3) == Sn,
              "sampled_conv_wgrad: grad must be [N, K, G, S] = [", N, ", K, ", G, ", ", Sn, "], got ", grad.sizes());
  const int64_t K = grad.size(1);
  fc_check_operand("sampled_conv_wgrad", "cols", cols, "grad", grad, grad.sizes());
  fc_check_operand("sampled_conv_wgrad", "cols", cols, "out", out, {G, K, T});
  TORCH_CHECK(out.is_contiguous(), "sampled_conv_wgrad: out must be contiguous");
  if (out.numel() == 0) return;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "sampled_conv_wgrad", [&] {
    using S = scalar_t;
    SampledArgs<S> h = args_of<S>(cols, pos, &bad);
    h.grad = grad.data_ptr<S>(), h.g_n = grad.stride(0), h.g_k = grad.stride(1), h.g_g = grad.stride(2), h.K = K;
    h.out = out.data_ptr<S>(), h.accumulate = accumulate;
    const auto fn = fc_pick_range_widths<wgrad_range<S, 64>, wgrad_range<S, 32>, wgrad_range<S, 16>, SampledArgs<S>>();
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) { fn(h, g0, g1); });
  });
  TORCH_CHECK(!bad.load(), "sampled_conv_wgrad: pos has entries outside [0, ", cols.size(1), ") (the patches' positions)");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("sampled_conv", &sampled_conv_cpu);
  m.impl("sampled_conv_wgrad", &sampled_conv_wgrad_cpu);
}
