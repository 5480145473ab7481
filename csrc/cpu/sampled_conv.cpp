// A convolution evaluated only at chosen output positions, one set of positions per output channel,
// and its weight gradient from those positions (CPU). See src/fastcurv/ops/sampled_conv.py.
//
// The input comes as its patches cols [N, L, T] (L output positions, T = C_in * kh * kw taps), a
// position's patch one row, read as whole vectors: rows are padded to 64 bytes (the wrapper makes
// them so), and the lanes past T are masked out (forward) or dropped (weight gradient). The weight
// gradient and the one-probe forward are position-major: one vector load brings a position's patch
// (MNIST's 9 taps fit one AVX-512 vector) for every probe. Gathering the patches tap-major instead
// costs two scalar memory operations per tap and position, which only the forward with several
// probes amortizes (fwd_gather_range). In W3's default job (one probe per matvec) the two kernels
// took 0.28 s where the tap-major versions of both had taken 0.60 s (cProfile, one run each).
#include <torch/library.h>
#include "common.h"

#include <atomic>
#include <cstring>

namespace {

// Probes from which the forward gathers patches tap-major (fwd_gather_range): at one probe the
// position-major loop ran 1.3x faster, from two on the gathers were (1.04-1.2x at 2, 2.0-2.4x at 8;
// 8-32 samples of W3's first layer, 160 channels, 2 threads).
constexpr int64_t kFwdGatherMinProbes = 2;

template <typename S>
struct SampledArgs {
  const S* cols;
  const int64_t* pos;
  const S* w;     // forward: weight [G, K, T]
  const S* grad;  // wgrad: grad [N, K, G, P]
  S* out;         // forward: [N, K, G, P] contiguous; wgrad: [G, K, T] contiguous
  int64_t N, L, T, G, K, P;  // P: positions per channel
  int64_t c_n, c_l, p_n, p_g, w_g, w_k, g_n, g_k, g_g;
  bool accumulate;
  std::atomic<bool>* bad;  // a position outside [0, L)
};

// The row of cols[n] at position q (checked against [0, L); a bad one is flagged and row 0 read).
template <typename S>
FC_ALWAYS_INLINE const S* patch(const SampledArgs<S>& a, const S* cols_n, int64_t q) {
  if (q < 0 || q >= a.L) {
    a.bad->store(true, std::memory_order_relaxed);
    q = 0;
  }
  return cols_n + q * a.c_l;
}

// Forward, work items q = n * G + g in [q0, q1): out[n, k, g, s] = sum_t cols[n, pos[n, g, s], t] * w[g, k, t].
// Per block of W positions and probe k: the W products row * w[g, k] (lanes past T zero in the
// padded weight, and masked in the row, which may hold anything there), summed over their lanes W
// at a time by add_lane_sums.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_range(const SampledArgs<S>& a, int64_t q0, int64_t q1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t T = a.T, K = a.K, G = a.G, Pn = a.P, NV = (T + W - 1) / W;
  S* wpad = fc_scratch<S, 0>(K * NV * W + W);
  S* z = wpad + K * NV * W;
  V keep;  // lanes of the last vector below T
  for (int j = 0; j < W; ++j) keep[j] = (NV - 1) * W + j < T ? S(1) : S(0);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / G, g = q % G;
    const S* cols_n = a.cols + n * a.c_n;
    const int64_t* pos = a.pos + n * a.p_n + g * a.p_g;
    for (int64_t k = 0; k < K; ++k) {
      const S* wk = a.w + g * a.w_g + k * a.w_k;
      for (int64_t t = 0; t < NV * W; ++t) wpad[k * NV * W + t] = t < T ? wk[t] : S(0);
    }
    for (int64_t s0 = 0; s0 < Pn; s0 += W) {
      const int m = static_cast<int>(std::min<int64_t>(W, Pn - s0));
      const S* rows[W];
      for (int j = 0; j < m; ++j) rows[j] = patch(a, cols_n, pos[s0 + j]);
      for (int64_t k = 0; k < K; ++k) {
        const S* wk = wpad + k * NV * W;
        V acc[W];
        for (int j = 0; j < W; ++j) acc[j] = L::zero();
        for (int j = 0; j < m; ++j) {
          for (int64_t v = 0; v + 1 < NV; ++v) acc[j] += L::load(rows[j] + v * W) * L::load(wk + v * W);
          const V last = L::load(rows[j] + (NV - 1) * W);
          acc[j] += (keep != 0 ? last : L::zero()) * L::load(wk + (NV - 1) * W);
        }
        for (int j = 0; j < W; ++j) z[j] = S(0);
        L::add_lane_sums(acc, m, z);
        std::memcpy(a.out + ((n * K + k) * G + g) * Pn + s0, z, sizeof(S) * m);
      }
    }
  }
}

// The same, tap-major, for many probes: the patches of W positions gathered into buf[t * W + j] (two
// scalar memory operations per tap and position), then one vector multiply-add per tap and probe
// with no lane sums. It pays off from kFwdGatherMinProbes probes on.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_gather_range(const SampledArgs<S>& a, int64_t q0, int64_t q1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t T = a.T, K = a.K, G = a.G, Pn = a.P;
  S* buf = fc_scratch<S, 0>(T * W + W);
  S* tail = buf + T * W;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / G, g = q % G;
    const S* cols_n = a.cols + n * a.c_n;
    const int64_t* pos = a.pos + n * a.p_n + g * a.p_g;
    for (int64_t s0 = 0; s0 < Pn; s0 += W) {
      const int m = static_cast<int>(std::min<int64_t>(W, Pn - s0));
      for (int j = 0; j < W; ++j) {
        const S* row = j < m ? patch(a, cols_n, pos[s0 + j]) : nullptr;
        for (int64_t t = 0; t < T; ++t) buf[t * W + j] = row ? row[t] : S(0);
      }
      for (int64_t k = 0; k < K; ++k) {
        const S* wk = a.w + g * a.w_g + k * a.w_k;
        V acc = L::zero();
        for (int64_t t = 0; t < T; ++t) acc += L::splat(wk[t]) * L::load(buf + t * W);
        S* o = a.out + ((n * K + k) * G + g) * Pn + s0;
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

// Weight gradient of channel g for the probes [k0, k0 + KB), vector v of the taps: sum over samples
// and positions of grad[n, k, g, s] * (vector v of the position's row), in KB x U independent
// accumulators (U positions at a time, so that KB * U = 8 multiply-add chains run at once), written
// to acc[kk * W ..] (W lanes each; the caller keeps the lanes below T).
template <typename S, int BYTES, int KB>
FC_ALWAYS_INLINE void wgrad_taps(const SampledArgs<S>& a, int64_t g, int64_t k0, int64_t v, S* acc) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth, U = 8 / KB;
  const int64_t Pn = a.P;
  V t[KB][U];
  for (int j = 0; j < KB * U; ++j) t[j / U][j % U] = L::zero();
  for (int64_t n = 0; n < a.N; ++n) {
    const S* cols_n = a.cols + n * a.c_n + v * W;
    const int64_t* pos = a.pos + n * a.p_n + g * a.p_g;
    const S* gr = a.grad + n * a.g_n + k0 * a.g_k + g * a.g_g;
    int64_t s = 0;
    for (; s + U <= Pn; s += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const V row = L::load(patch(a, cols_n, pos[s + u]));
#pragma GCC unroll 8
        for (int kk = 0; kk < KB; ++kk) t[kk][u] += L::splat(gr[kk * a.g_k + s + u]) * row;
      }
    }
    for (; s < Pn; ++s) {
      const V row = L::load(patch(a, cols_n, pos[s]));
      for (int kk = 0; kk < KB; ++kk) t[kk][0] += L::splat(gr[kk * a.g_k + s]) * row;
    }
  }
  for (int kk = 0; kk < KB; ++kk) {
    V sum = t[kk][0];
    for (int u = 1; u < U; ++u) sum += t[kk][u];
    L::store(acc + kk * W, sum);
  }
}

// Weight gradient, channels g in [g0, g1): out[g, k, t] (+)= sum_{n, s} grad[n, k, g, s] * cols[n, pos[n, g, s], t],
// probes in blocks of 8 (then 4, 2, 1) per pass over the positions, one pass per vector of taps.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_range(const SampledArgs<S>& a, int64_t g0, int64_t g1) {
  constexpr int W = FcLanes<S, BYTES>::kWidth;
  const int64_t T = a.T, K = a.K, NV = (T + W - 1) / W;
  S* acc = fc_scratch<S, 0>(8 * W);
  for (int64_t g = g0; g < g1; ++g) {
    S* o = a.out + g * K * T;
    for (int64_t v = 0; v < NV; ++v) {
      const int64_t t0 = v * W, nt = std::min<int64_t>(W, T - t0);
      int64_t k0 = 0;
      auto run = [&](auto kb) FC_LAMBDA_INLINE {
        constexpr int KB = decltype(kb)::value;
        for (; k0 + KB <= K; k0 += KB) {
          wgrad_taps<S, BYTES, KB>(a, g, k0, v, acc);
          for (int kk = 0; kk < KB; ++kk) {
            S* ok = o + (k0 + kk) * T + t0;
            for (int64_t j = 0; j < nt; ++j) ok[j] = a.accumulate ? ok[j] + acc[kk * W + j] : acc[kk * W + j];
          }
        }
      };
      run(std::integral_constant<int, 8>{});
      run(std::integral_constant<int, 4>{});
      run(std::integral_constant<int, 2>{});
      run(std::integral_constant<int, 1>{});
    }
  }
}

// Taps per row rounded up to 64 bytes: what the kernels read of each row.
int64_t padded_taps(const at::Tensor& cols) {
  const int64_t per = 64 / static_cast<int64_t>(cols.element_size());
  return (cols.size(2) + per - 1) / per * per;
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
  // every position checked before anything is written (an output with accumulate stays untouched)
  if (pos.numel() > 0) {
    const auto [lo, hi] = at::aminmax(pos);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cols.size(1), op, ": pos has entries outside [0, ",
                cols.size(1), ") (the patches' positions)");
  }
  if (cols.numel() == 0) return;
  const int64_t tp = padded_taps(cols);
  const int64_t last = cols.storage_offset() + (cols.size(0) - 1) * cols.stride(0) + (cols.size(1) - 1) * cols.stride(1) + tp;
  TORCH_CHECK(cols.stride(2) == 1 && cols.stride(1) >= tp && cols.stride(0) >= 0 &&
                  last * static_cast<int64_t>(cols.element_size()) <= static_cast<int64_t>(cols.storage().nbytes()),
              op, ": cols must have its rows padded to ", tp, " entries (64 bytes; fastcurv.ops.conv_patches makes them so), got ",
              "sizes ", cols.sizes(), " and strides ", cols.strides());
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

at::Tensor sampled_conv_cpu(const at::Tensor& cols_in, const at::Tensor& pos_in, const at::Tensor& weight_in) {
  check_sampled("sampled_conv", cols_in, pos_in);
  const at::Tensor& cols = cols_in;
  const at::Tensor pos = fc_rows_contiguous(pos_in), weight = fc_rows_contiguous(weight_in);
  const int64_t N = cols.size(0), T = cols.size(2), G = pos.size(1), Sn = pos.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == G && weight.size(2) == T, "sampled_conv: weight must be [G, K, T] = [",
              G, ", K, ", T, "], got ", weight.sizes());
  fc_check_operand("sampled_conv", "cols", cols, "weight", weight, weight.sizes());
  const int64_t K = weight.size(1);
  at::Tensor out = at::empty({N, K, G, Sn}, cols.options());
  if (out.numel() == 0) return out;
  if (T == 0) return out.zero_();  // no taps: every sum is empty
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "sampled_conv", [&] {
    using S = scalar_t;
    SampledArgs<S> h = args_of<S>(cols, pos, &bad);
    h.w = weight.data_ptr<S>(), h.w_g = weight.stride(0), h.w_k = weight.stride(1), h.K = K;
    h.out = out.data_ptr<S>();
    const auto fn = K >= kFwdGatherMinProbes
                        ? fc_pick_range_widths<fwd_gather_range<S, 64>, fwd_gather_range<S, 32>, fwd_gather_range<S, 16>, SampledArgs<S>>()
                        : fc_pick_range_widths<fwd_range<S, 64>, fwd_range<S, 32>, fwd_range<S, 16>, SampledArgs<S>>();
    at::parallel_for(0, N * G, std::max<int64_t>(1, 256 / std::max<int64_t>(Sn * K, 1)),
                     [&](int64_t q0, int64_t q1) { fn(h, q0, q1); });
  });
  TORCH_CHECK(!bad.load(), "sampled_conv: pos has entries outside [0, ", cols.size(1), ") (the patches' positions)");
  return out;
}

void sampled_conv_wgrad_cpu(const at::Tensor& cols_in, const at::Tensor& pos_in, const at::Tensor& grad_in, at::Tensor& out,
                            bool accumulate) {
  check_sampled("sampled_conv_wgrad", cols_in, pos_in);
  const at::Tensor& cols = cols_in;
  const at::Tensor pos = fc_rows_contiguous(pos_in), grad = fc_rows_contiguous(grad_in);
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
