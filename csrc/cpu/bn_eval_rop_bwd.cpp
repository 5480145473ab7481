// CPU kernel of fastcurv::bn_eval_rop_bwd: the backward R-op of an eval BatchNorm behind the
// derivative of the activation that reads its output, in one pass (shapes and formula:
// src/fastcurv/ops/bn_eval_rop_bwd.py). With u = rd * d1:
//   sum_u[k, g] = sum_{n, s} u;  sum_uxh[k, g] = sum_{n, s} u * xh;
//   rd <- scale[g] * u + crg[k, g] * delta    (only with input_grad)
// rd [N, K, G, S]; xh, delta, d1 [N, G, S]; scale [G]; crg [K, G]. Sums run in the input type within a
// segment of S values (16 lanes) and in double across segments.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace {


template <typename T>
struct BwdArgs {
  T* rd;
  const T *scale, *xh, *de, *crg, *d1;
  double *su, *sx;
  int64_t N, K, G, S;
};

// One segment of S values of one (n, k, g): the flags say which optional inputs are given and
// whether rd is overwritten, so that the inner loops carry no branches. The segment's sums run in
// T over 16 lanes (vectorized), and are added to the double totals.
template <typename T, bool XH, bool D1, bool IG, bool DL>
FC_ALWAYS_INLINE void bwd_segment(T* __restrict__ r, const T* __restrict__ x, const T* __restrict__ d,
                                   const T* __restrict__ de, T a, T c, int64_t S, double& su, double& sx) {
  constexpr int L = 16;
  T A[L] = {0}, B[L] = {0};
  auto step = [&](int64_t s, T& ua, T& xa) FC_LAMBDA_INLINE {
    T u = r[s];
    if constexpr (D1) u *= d[s];
    ua += u;
    if constexpr (XH) xa += u * x[s];
    if constexpr (IG) {
      T o = a * u;
      if constexpr (DL) o += c * de[s];
      r[s] = o;
    }
  };
  int64_t s = 0;
  for (; s + L <= S; s += L) {
    for (int l = 0; l < L; ++l) step(s + l, A[l], B[l]);
  }
  for (int l = 0; s < S; ++s, ++l) step(s, A[l], B[l]);
  double ta = 0, tb = 0;
  for (int l = 0; l < L; ++l) {
    ta += double(A[l]);
    tb += double(B[l]);
  }
  su += ta;
  sx += tb;
}

// Groups [g0, g1) of every (n, k) row; always inlined into its ISA variants (fc_pick_range).
// Threads own blocks of groups: no partial sums to merge, and the order of the sums does not depend
// on the number of threads. Tiles of groups (fc_for_group_tiles) keep xh, delta and d1 in L1 while every
// probe k reads them.
template <typename T, bool XH, bool D1, bool IG, bool DL>
FC_ALWAYS_INLINE void bwd_range(const BwdArgs<T>& p, int64_t g0, int64_t g1) {
  const int64_t G = p.G, S = p.S;
  fc_for_group_tiles(p.N, p.K, S, g0, g1, [&](int64_t n, int64_t k, int64_t t0, int64_t t1) FC_LAMBDA_INLINE {
    const int64_t na = n * G * S;
    T* r = p.rd + (n * p.K + k) * G * S;
    double *u = p.su + k * G, *x = p.sx + k * G;
    const T* cr = DL ? p.crg + k * G : nullptr;
    if (S == 1) {  // BatchNorm1d: vectorize over the groups
      for (int64_t g = t0; g < t1; ++g) {
        T v = r[g];
        if constexpr (D1) v *= p.d1[na + g];
        u[g] += double(v);
        if constexpr (XH) x[g] += double(v) * double(p.xh[na + g]);
        if constexpr (IG) {
          T o = p.scale[g] * v;
          if constexpr (DL) o += cr[g] * p.de[na + g];
          r[g] = o;
        }
      }
      return;
    }
    for (int64_t g = t0; g < t1; ++g) {
      const int64_t off = na + g * S;
      bwd_segment<T, XH, D1, IG, DL>(r + g * S, XH ? p.xh + off : nullptr, D1 ? p.d1 + off : nullptr, DL ? p.de + off : nullptr,
                                     p.scale[g], DL ? cr[g] : T(0), S, u[g], x[g]);
    }
  });
}


std::tuple<at::Tensor, at::Tensor> bn_eval_rop_bwd_cpu(at::Tensor& rd, const at::Tensor& scale, const std::optional<at::Tensor>& xh,
                                                       const std::optional<at::Tensor>& delta, const std::optional<at::Tensor>& crg,
                                                       const std::optional<at::Tensor>& d1, bool input_grad) {
  const char* op = "bn_eval_rop_bwd";
  TORCH_CHECK(rd.dim() == 4, op, ": rd must be [N, K, G, S], got ", rd.sizes());
  TORCH_CHECK(!input_grad || rd.is_contiguous(), op, ": input_grad overwrites rd, which must then be contiguous");
  const int64_t N = rd.size(0), K = rd.size(1), G = rd.size(2), S = rd.size(3);
  TORCH_CHECK(delta.has_value() == crg.has_value(), op, ": delta and crg must be given together (affine BatchNorm) or both be None");
  fc_check_operand(op, "rd", rd, "scale", scale, {G});
  fc_check_operand(op, "rd", rd, "xh", xh, {N, G, S});
  fc_check_operand(op, "rd", rd, "delta", delta, {N, G, S});
  fc_check_operand(op, "rd", rd, "crg", crg, {K, G});
  fc_check_operand(op, "rd", rd, "d1", d1, {N, G, S});
  at::Tensor sum_u = at::zeros({K, G}, rd.options());
  at::Tensor sum_uxh = xh.has_value() ? at::zeros({K, G}, rd.options()) : at::zeros({0}, rd.options());
  if (rd.numel() == 0) return {sum_u, sum_uxh};
  const at::Tensor sc = scale.contiguous(), x = fc_contiguous(xh), de = fc_contiguous(delta), cr = fc_contiguous(crg);
  const at::Tensor d = fc_contiguous(d1);
  at::Tensor r = input_grad ? rd : rd.contiguous();  // read-only without input_grad
  AT_DISPATCH_FLOATING_TYPES(rd.scalar_type(), "bn_eval_rop_bwd_cpu", [&] {
    auto p = fc_data<scalar_t>;
    std::vector<double> su(K * G, 0.0), sx(K * G, 0.0);
    const BwdArgs<scalar_t> args{r.data_ptr<scalar_t>(), p(sc), p(x), p(de), p(cr), p(d), su.data(), sx.data(), N, K, G, S};
    FcRangeFn<BwdArgs<scalar_t>> fn = nullptr;
    // (delta only enters the input gradient)
    fc_dispatch_flags<4>({x.defined(), d.defined(), input_grad, input_grad && de.defined()}, [&](auto XH, auto D1, auto IG, auto DL) {
      fn = fc_pick_range<&bwd_range<scalar_t, XH.value, D1.value, IG.value, DL.value>, BwdArgs<scalar_t>>();
    });
    at::parallel_for(0, G, fc_group_grain(S), [&](int64_t g0, int64_t g1) { fn(args, g0, g1); });
    scalar_t *up = sum_u.data_ptr<scalar_t>(), *xp = x.defined() ? sum_uxh.data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < K * G; ++i) {
      up[i] = scalar_t(su[i]);
      if (xp != nullptr) xp[i] = scalar_t(sx[i]);
    }
  });
  return {sum_u, sum_uxh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("bn_eval_rop_bwd", &bn_eval_rop_bwd_cpu); }
