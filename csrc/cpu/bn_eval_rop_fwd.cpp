// CPU kernel of fastcurv::bn_eval_rop_fwd: the forward R-op of an eval BatchNorm and the derivative
// of the activation that reads its output, in place, in one pass (shapes and formula:
// src/fastcurv/ops/bn_eval_rop_fwd.py):
//   dot[k, g] = sum_{n, s} rz * delta;  rz <- (scale[g] * rz + rgamma[k, g] * xh + rbeta[k, g]) * d1
// rz [N, K, G, S] contiguous; xh, d1, delta [N, G, S]; scale [G]; rgamma, rbeta [K, G].
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace {


template <typename T>
struct FwdArgs {
  T* rz;
  const T *scale, *xh, *rga, *rbe, *d1, *de;
  double* dot;
  int64_t N, K, G, S;
};

// One segment of S values of one (n, k, g), in one pass: the dot with delta (of rz before it is
// overwritten) in T over 16 lanes, added to the double total, and the update.
template <typename T, bool XH, bool RB, bool D1, bool DL>
FC_ALWAYS_INLINE void fwd_segment(T* __restrict__ r, const T* __restrict__ xh, const T* __restrict__ d1,
                                  const T* __restrict__ de, T a, T b, T c, int64_t S, double& dot) {
  constexpr int L = 16;
  T D[L] = {0};
  auto step = [&](int64_t s, T& acc) FC_LAMBDA_INLINE {
    const T v = r[s];
    if constexpr (DL) acc += v * de[s];
    T o = a * v;
    if constexpr (XH) o += b * xh[s];
    if constexpr (RB) o += c;
    if constexpr (D1) o *= d1[s];
    r[s] = o;
  };
  int64_t s = 0;
  for (; s + L <= S; s += L) {
    for (int l = 0; l < L; ++l) step(s + l, D[l]);
  }
  for (int l = 0; s < S; ++s, ++l) step(s, D[l]);
  if constexpr (DL) {
    double t = 0;
    for (int l = 0; l < L; ++l) t += double(D[l]);
    dot += t;
  }
}

// Groups [g0, g1) of every (n, k) row: the flags say which optional inputs are given, so that the
// inner loops carry no branches. Always inlined into its ISA variants (fc_pick_range). Threads own
// blocks of groups (no partial sums to merge; the order of the sums does not depend on the number
// of threads); each runs its groups in tiles (fc_for_group_tiles) whose xh, d1 and delta stay in L1
// while every probe k reads them.
template <typename T, bool XH, bool RB, bool D1, bool DL>
FC_ALWAYS_INLINE void fwd_range(const FwdArgs<T>& p, int64_t g0, int64_t g1) {
  const int64_t G = p.G, S = p.S;
  fc_for_group_tiles(p.N, p.K, S, g0, g1, [&](int64_t n, int64_t k, int64_t t0, int64_t t1) FC_LAMBDA_INLINE {
    const int64_t na = n * G * S;
    T* r = p.rz + (n * p.K + k) * G * S;
    const T* rga = XH ? p.rga + k * G : nullptr;
    const T* rbe = RB ? p.rbe + k * G : nullptr;
    double* dot = DL ? p.dot + k * G : nullptr;
    if (S == 1) {  // BatchNorm1d: vectorize over the groups
      for (int64_t g = t0; g < t1; ++g) {
        const T v = r[g];
        if constexpr (DL) dot[g] += double(v) * double(p.de[na + g]);
        T o = p.scale[g] * v;
        if constexpr (XH) o += rga[g] * p.xh[na + g];
        if constexpr (RB) o += rbe[g];
        if constexpr (D1) o *= p.d1[na + g];
        r[g] = o;
      }
      return;
    }
    double unused = 0;
    for (int64_t g = t0; g < t1; ++g) {
      const int64_t off = na + g * S;
      fwd_segment<T, XH, RB, D1, DL>(r + g * S, XH ? p.xh + off : nullptr, D1 ? p.d1 + off : nullptr, DL ? p.de + off : nullptr,
                                     p.scale[g], XH ? rga[g] : T(0), RB ? rbe[g] : T(0), S, DL ? dot[g] : unused);
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
    const FwdArgs<scalar_t> args{rz.data_ptr<scalar_t>(), p(sc), p(x), p(rg), p(rb), p(d), p(de), acc.data(), N, K, G, S};
    FcRangeFn<FwdArgs<scalar_t>> fn = nullptr;
    fc_dispatch_flags<4>({x.defined(), rb.defined(), d.defined(), de.defined()}, [&](auto XH, auto RB, auto D1, auto DL) {
      fn = fc_pick_range<&fwd_range<scalar_t, XH.value, RB.value, D1.value, DL.value>, FwdArgs<scalar_t>>();
    });
    at::parallel_for(0, G, fc_group_grain(S), [&](int64_t g0, int64_t g1) { fn(args, g0, g1); });
    scalar_t* dp = dot.data_ptr<scalar_t>();
    for (size_t i = 0; i < acc.size(); ++i) dp[i] = scalar_t(acc[i]);
  });
  return dot;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("bn_eval_rop_fwd", &bn_eval_rop_fwd_cpu); }
