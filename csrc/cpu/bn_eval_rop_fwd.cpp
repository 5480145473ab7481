// CPU kernel of fastcurv::bn_eval_rop_fwd: the forward R-op of an eval BatchNorm and the derivative
// of the activation that reads its output, in place, in one pass (shapes and formula:
// src/fastcurv/ops/bn_eval_rop_fwd.py):
//   dot[k, g] = sum_{n, s} rz * delta;  rz <- (scale[g] * rz + rgamma[k, g] * xh + rbeta[k, g]) * d1
// rz [N, K, G, S] contiguous; xh, d1, delta [N, G, S]; scale [G]; rgamma, rbeta [K, G].
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace {

// One (n, k) row's groups [g0, g1): the flags say which optional inputs are given, so that the
// inner loops carry no branches. dot: see fc_dot.
template <typename T, bool XH, bool RB, bool D1, bool DL>
void fwd_row(T* r, const T* scale, const T* xh, const T* rga, const T* rbe, const T* d1, const T* de, double* dot,
             int64_t g0, int64_t g1, int64_t S) {
  if (S == 1) {  // BatchNorm1d: vectorize over the groups
    for (int64_t g = g0; g < g1; ++g) {
      const T v = r[g];
      if constexpr (DL) dot[g] += double(v) * double(de[g]);
      T o = scale[g] * v;
      if constexpr (XH) o += rga[g] * xh[g];
      if constexpr (RB) o += rbe[g];
      if constexpr (D1) o *= d1[g];
      r[g] = o;
    }
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t off = g * S;
    T* rr = r + off;
    if constexpr (DL) dot[g] += fc_dot(rr, de + off, S);
    const T a = scale[g];
    const T b = XH ? rga[g] : T(0), c = RB ? rbe[g] : T(0);
    for (int64_t s = 0; s < S; ++s) {
      T o = a * rr[s];
      if constexpr (XH) o += b * xh[off + s];
      if constexpr (RB) o += c;
      if constexpr (D1) o *= d1[off + s];
      rr[s] = o;
    }
  }
}

template <typename T, bool XH, bool RB, bool D1, bool DL>
void fwd_all(T* rz, const T* scale, const T* xh, const T* rga, const T* rbe, const T* d1, const T* de,
             std::vector<double>& dot, int64_t N, int64_t K, int64_t G, int64_t S) {
  // Threads own blocks of groups (no partial sums to merge; the order of the sums does not depend
  // on the number of threads); each reads, for every (n, k), a contiguous run of its groups.
  at::parallel_for(0, G, fc_group_grain(S), [&](int64_t g0, int64_t g1) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t a = n * G * S;
      for (int64_t k = 0; k < K; ++k) {
        fwd_row<T, XH, RB, D1, DL>(rz + (n * K + k) * G * S, scale, XH ? xh + a : nullptr, XH ? rga + k * G : nullptr,
                                   RB ? rbe + k * G : nullptr, D1 ? d1 + a : nullptr, DL ? de + a : nullptr,
                                   DL ? dot.data() + k * G : nullptr, g0, g1, S);
      }
    }
  });
}

at::Tensor bn_eval_rop_fwd_cpu(at::Tensor& rz, const at::Tensor& scale, const std::optional<at::Tensor>& xh,
                               const std::optional<at::Tensor>& rgamma, const std::optional<at::Tensor>& rbeta,
                               const std::optional<at::Tensor>& d1, const std::optional<at::Tensor>& delta) {
  const char* op = "bn_eval_rop_fwd";
  TORCH_CHECK(rz.dim() == 4, op, ": rz must be [N, K, G, S], got ", rz.sizes());
  TORCH_CHECK(rz.is_contiguous(), op, ": rz is written in place and must be contiguous");
  const int64_t N = rz.size(0), K = rz.size(1), G = rz.size(2), S = rz.size(3);
  TORCH_CHECK(xh.has_value() == rgamma.has_value(), op, ": xh and rgamma must be given together (affine BatchNorm) or both be None");
  fc_check_operand(op, "rz", rz, "scale", scale, {G});
  fc_check_operand(op, "rz", rz, "xh", xh, {N, G, S});
  fc_check_operand(op, "rz", rz, "rgamma", rgamma, {K, G});
  fc_check_operand(op, "rz", rz, "rbeta", rbeta, {K, G});
  fc_check_operand(op, "rz", rz, "d1", d1, {N, G, S});
  fc_check_operand(op, "rz", rz, "delta", delta, {N, G, S});
  at::Tensor dot = delta.has_value() ? at::zeros({K, G}, rz.options()) : at::zeros({0}, rz.options());
  if (rz.numel() == 0) return dot;
  const at::Tensor sc = scale.contiguous(), x = fc_contiguous(xh), rg = fc_contiguous(rgamma), rb = fc_contiguous(rbeta);
  const at::Tensor d = fc_contiguous(d1), de = fc_contiguous(delta);
  AT_DISPATCH_FLOATING_TYPES(rz.scalar_type(), "bn_eval_rop_fwd_cpu", [&] {
    auto p = fc_data<scalar_t>;
    std::vector<double> acc(delta.has_value() ? K * G : 0, 0.0);
    fc_dispatch_flags<4>({x.defined(), rb.defined(), d.defined(), de.defined()}, [&](auto XH, auto RB, auto D1, auto DL) {
      fwd_all<scalar_t, XH.value, RB.value, D1.value, DL.value>(rz.data_ptr<scalar_t>(), p(sc), p(x), p(rg), p(rb), p(d),
                                                                p(de), acc, N, K, G, S);
    });
    scalar_t* dp = dot.data_ptr<scalar_t>();
    for (size_t i = 0; i < acc.size(); ++i) dp[i] = scalar_t(acc[i]);
  });
  return dot;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("bn_eval_rop_fwd", &bn_eval_rop_fwd_cpu); }
