// The Hessian-vector product through a network's last Linear layer and its loss, for R replicas x K
// probes, in one pass over the samples (CPU). See src/fastcurv/ops/head_hvp.py for the formula.
//
// A classifier's head has few outputs (O = 10 on MNIST): as GEMMs, its six products per probe have
// one dimension of 10, where sgemm runs at a third of its speed, and each reads or writes the
// [N, K, I] tangents once more. Here a work item is one (replica, probe): for every pair of samples
// it forms the O outputs' tangents from the samples' input and tangent rows (held in registers),
// applies the loss Hessian to them, adds the rank-1 terms to the weight product (an [O, I]
// accumulator in L1) and writes the input R-gradient rows times the activation derivative. The
// weight, its probe block and the accumulator stay in L1 across the samples (up to about 400 inputs
// with AVX-512 floats), and each of their rows is read once per pair. Operands are read at their
// strides (rows of the last dimension contiguous), so both fused engines' layouts pass without copies.
#include <torch/library.h>
#include "common.h"

#include <cstring>

namespace {

template <typename S>
struct HeadArgs {
  const S *a, *ra, *w, *dw, *db, *probs, *delta, *d1;
  S *out_w, *out_b, *rg;
  int64_t N, K, O, I;
  // replica (_r), sample (_n) and probe (_k) strides; every row of the last dimension is contiguous
  int64_t a_r, a_n, ra_r, ra_n, ra_k, dl_r, dl_n, p_r, p_n, d1_r, d1_n, rg_r, rg_n, rg_k;
  int64_t w_r, dw_r, dw_k, db_r, db_k, ow_r, ow_k, ob_r, ob_k;
  S scale;
  bool accumulate;
};

// Per sample m < NS and row j < NR: s[m * W + j] = lane partial sums of x[m] . u[j] + y[m] . v[j] over
// the vectors of i < Iv (u, v: rows of stride I), every row loaded once for the NS samples and every
// sample's rows once for the NR rows.
template <typename S, int BYTES, int NS, int NR>
FC_ALWAYS_INLINE void dot_rows(const S* const* x, const S* const* y, const S* u, const S* v, int64_t I, int64_t Iv,
                               typename FcLanes<S, BYTES>::V* s) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  V t[NS][NR];
#pragma GCC unroll 8
  for (int j = 0; j < NS * NR; ++j) t[j / NR][j % NR] = L::zero();
  for (int64_t i = 0; i < Iv; i += W) {
    V xv[NS], yv[NS];
#pragma GCC unroll 4
    for (int m = 0; m < NS; ++m) xv[m] = L::load(x[m] + i), yv[m] = L::load(y[m] + i);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const V uj = L::load(u + j * I + i), vj = L::load(v + j * I + i);
#pragma GCC unroll 4
      for (int m = 0; m < NS; ++m) t[m][j] += xv[m] * uj + yv[m] * vj;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NS * NR; ++j) s[(j / NR) * W + j % NR] = t[j / NR][j % NR];
}

// z[m * O + c] += sum_i x[m][i] * u[c, i] + y[m][i] * v[c, i] for samples m < NS and c < O (u, v: [O, I]
// rows): rows in blocks of 8 / NS, 4 / NS, ..., 1, their lanes summed W rows at a time (add_lane_sums).
template <typename S, int BYTES, int NS>
FC_ALWAYS_INLINE void dots(const S* const* x, const S* const* y, const S* u, const S* v, int64_t O, int64_t I, S* z) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t Iv = I / W * W;
  for (int64_t c0 = 0; c0 < O; c0 += W) {
    const int g = static_cast<int>(std::min<int64_t>(W, O - c0));
    const S *uc = u + c0 * I, *vc = v + c0 * I;
    V s[NS * W];
    int c = 0;
    if constexpr (NS == 1)
      for (; c + 8 <= g; c += 8) dot_rows<S, BYTES, NS, 8>(x, y, uc + c * I, vc + c * I, I, Iv, s + c);
    for (; c + 4 <= g; c += 4) dot_rows<S, BYTES, NS, 4>(x, y, uc + c * I, vc + c * I, I, Iv, s + c);
    if (c + 2 <= g) dot_rows<S, BYTES, NS, 2>(x, y, uc + c * I, vc + c * I, I, Iv, s + c), c += 2;
    if (c < g) dot_rows<S, BYTES, NS, 1>(x, y, uc + c * I, vc + c * I, I, Iv, s + c);
    for (int m = 0; m < NS; ++m) {
      S* zm = z + m * O + c0;
      L::add_lane_sums(s + m * W, g, zm);
      for (int64_t i = Iv; i < I; ++i)
        for (int j = 0; j < g; ++j) zm[j] += x[m][i] * uc[j * I + i] + y[m][i] * vc[j * I + i];
    }
  }
}

// acc[c, i] += sum_m p[m * O + c] * x[m][i] + q[m][c] * y[m][i] for c < O and NI vectors of i from i0:
// the samples' vectors held in registers while the rows of acc pass, each row read and written once
// for the NS samples.
template <typename S, int BYTES, int NS, int NI>
FC_ALWAYS_INLINE void rank2_cols(S* acc, const S* p, const S* const* x, const S* const* q, const S* const* y, int64_t O,
                                 int64_t I, int64_t i0) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  V xv[NS][NI], yv[NS][NI];
#pragma GCC unroll 8
  for (int j = 0; j < NS * NI; ++j)
    xv[j / NI][j % NI] = L::load(x[j / NI] + i0 + (j % NI) * W), yv[j / NI][j % NI] = L::load(y[j / NI] + i0 + (j % NI) * W);
  for (int64_t c = 0; c < O; ++c) {
    V pc[NS], qc[NS];
#pragma GCC unroll 4
    for (int m = 0; m < NS; ++m) pc[m] = L::splat(p[m * O + c]), qc[m] = L::splat(q[m][c]);
    S* ac = acc + c * I + i0;
#pragma GCC unroll 4
    for (int j = 0; j < NI; ++j) {
      V t = L::load(ac + j * W);
#pragma GCC unroll 4
      for (int m = 0; m < NS; ++m) t += pc[m] * xv[m][j] + qc[m] * yv[m][j];
      L::store(ac + j * W, t);
    }
  }
}

template <typename S, int BYTES, int NS>
FC_ALWAYS_INLINE void rank2(S* acc, const S* p, const S* const* x, const S* const* q, const S* const* y, int64_t O, int64_t I) {
  constexpr int W = FcLanes<S, BYTES>::kWidth, NI = 4 / NS;
  const int64_t Iv = I / W * W;
  int64_t i = 0;
  for (; i + NI * W <= Iv; i += NI * W) rank2_cols<S, BYTES, NS, NI>(acc, p, x, q, y, O, I, i);
  for (; i < Iv; i += W) rank2_cols<S, BYTES, NS, 1>(acc, p, x, q, y, O, I, i);
  for (; i < I; ++i)
    for (int64_t c = 0; c < O; ++c)
      for (int m = 0; m < NS; ++m) acc[c * I + i] += p[m * O + c] * x[m][i] + q[m][c] * y[m][i];
}

// g[m][i] = (sum_c p[m * O + c] * u[c, i] + q[m][c] * v[c, i]) * d1[m][i] for samples m < NS and NI
// vectors of i from i0 (d1 null: 1): NS * NI independent sums, so that the adds over c do not wait
// on each other, and each row of u and v read once for the NS samples.
template <typename S, int BYTES, int NS, int NI>
FC_ALWAYS_INLINE void combine_cols(S* const* g, const S* p, const S* u, const S* const* q, const S* v, const S* const* d1,
                                   int64_t O, int64_t I, int64_t i0) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  V s[NS][NI];
#pragma GCC unroll 8
  for (int j = 0; j < NS * NI; ++j) s[j / NI][j % NI] = L::zero();
  for (int64_t c = 0; c < O; ++c) {
    V pc[NS], qc[NS];
#pragma GCC unroll 4
    for (int m = 0; m < NS; ++m) pc[m] = L::splat(p[m * O + c]), qc[m] = L::splat(q[m][c]);
    const S *uc = u + c * I + i0, *vc = v + c * I + i0;
#pragma GCC unroll 4
    for (int j = 0; j < NI; ++j) {
      const V uj = L::load(uc + j * W), vj = L::load(vc + j * W);
#pragma GCC unroll 4
      for (int m = 0; m < NS; ++m) s[m][j] += pc[m] * uj + qc[m] * vj;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NS * NI; ++j) {
    const int m = j / NI, o = i0 + (j % NI) * W;
    L::store(g[m] + o, d1[m] ? s[m][j % NI] * L::load(d1[m] + o) : s[m][j % NI]);
  }
}

template <typename S, int BYTES, int NS>
FC_ALWAYS_INLINE void combine(S* const* g, const S* p, const S* u, const S* const* q, const S* v, const S* const* d1,
                              int64_t O, int64_t I) {
  constexpr int W = FcLanes<S, BYTES>::kWidth, NI = 4 / NS;
  const int64_t Iv = I / W * W;
  int64_t i = 0;
  for (; i + NI * W <= Iv; i += NI * W) combine_cols<S, BYTES, NS, NI>(g, p, u, q, v, d1, O, I, i);
  for (; i < Iv; i += W) combine_cols<S, BYTES, NS, 1>(g, p, u, q, v, d1, O, I, i);
  for (; i < I; ++i)
    for (int m = 0; m < NS; ++m) {
      S t = 0;
      for (int64_t c = 0; c < O; ++c) t += p[m * O + c] * u[c * I + i] + q[m][c] * v[c * I + i];
      g[m][i] = d1[m] ? t * d1[m][i] : t;
    }
}

// The samples [n, n + NS) of work item (replica r, probe k): their contributions to acc ([O, I]) and
// accb ([O]), and their rows of rg. z and rd: scratch of NS * O.
template <typename S, int BYTES, int NS>
FC_ALWAYS_INLINE void head_samples(const HeadArgs<S>& a, int64_t r, int64_t k, int64_t n, S* acc, S* accb, S* z, S* rd) {
  const int64_t O = a.O, I = a.I;
  const S* w = a.w + r * a.w_r;
  const S* dw = a.dw + r * a.dw_r + k * a.dw_k;
  const S* db = a.db ? a.db + r * a.db_r + k * a.db_k : nullptr;
  const S *an[NS], *ran[NS], *dl[NS], *d1[NS];
  S* rg[NS];
  for (int m = 0; m < NS; ++m) {
    an[m] = a.a + r * a.a_r + (n + m) * a.a_n;
    ran[m] = a.ra + r * a.ra_r + (n + m) * a.ra_n + k * a.ra_k;
    dl[m] = a.delta + r * a.dl_r + (n + m) * a.dl_n;
    d1[m] = a.d1 ? a.d1 + r * a.d1_r + (n + m) * a.d1_n : nullptr;
    rg[m] = a.rg + r * a.rg_r + (n + m) * a.rg_n + k * a.rg_k;
    for (int64_t c = 0; c < O; ++c) z[m * O + c] = db ? db[c] : S(0);
  }
  dots<S, BYTES, NS>(an, ran, dw, w, O, I, z);
  for (int m = 0; m < NS; ++m) {
    const S* zm = z + m * O;
    S* rdm = rd + m * O;
    if (a.probs) {  // cross-entropy: scale * (diag(p) - p p^T) z, pivoted on the most probable class
      const S* p = a.probs + r * a.p_r + (n + m) * a.p_n;
      int64_t top = 0;
      for (int64_t c = 1; c < O; ++c) top = p[c] > p[top] ? c : top;
      const S zt = O > 0 ? zm[top] : S(0);
      S pz = 0;
      for (int64_t c = 0; c < O; ++c) pz += p[c] * (zm[c] - zt);
      for (int64_t c = 0; c < O; ++c) rdm[c] = a.scale * p[c] * ((zm[c] - zt) - pz);
    } else {  // squared error: scale * z
      for (int64_t c = 0; c < O; ++c) rdm[c] = a.scale * zm[c];
    }
    for (int64_t c = 0; c < O; ++c) accb[c] += rdm[c];
  }
  rank2<S, BYTES, NS>(acc, rd, an, dl, ran, O, I);
  combine<S, BYTES, NS>(rg, rd, w, dl, dw, d1, O, I);
}

// Work items (replica r, probe k) = q in [q0, q1), q = r * K + k; samples two at a time.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void head_range(const HeadArgs<S>& a, int64_t q0, int64_t q1) {
  const int64_t N = a.N, K = a.K, O = a.O, I = a.I;
  S* acc = fc_scratch<S, 0>(O * I + 5 * O);
  S *accb = acc + O * I, *z = accb + O, *rd = z + 2 * O;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = q / K, k = q % K;
    std::memset(acc, 0, sizeof(S) * O * I);
    std::memset(accb, 0, sizeof(S) * O);
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) head_samples<S, BYTES, 2>(a, r, k, n, acc, accb, z, rd);
    if (n < N) head_samples<S, BYTES, 1>(a, r, k, n, acc, accb, z, rd);
    S* ow = a.out_w + r * a.ow_r + k * a.ow_k;
    for (int64_t j = 0; j < O * I; ++j) ow[j] = a.accumulate ? ow[j] + acc[j] : acc[j];
    if (a.out_b) {
      S* ob = a.out_b + r * a.ob_r + k * a.ob_k;
      for (int64_t c = 0; c < O; ++c) ob[c] = a.accumulate ? ob[c] + accb[c] : accb[c];
    }
  }
}

// [d0, d1, ...] with its last `inner` dimensions contiguous (the leading ones any stride).
void check_inner(const at::Tensor& t, int64_t inner, const char* name) {
  if (t.numel() == 0) return;  // (nothing is read)
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= t.dim() - inner; --d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) == expect, "head_hvp: ", name, " ", t.sizes(),
                " must have its last ", inner, " dimension(s) contiguous, got strides ", t.strides());
    expect *= t.size(d);
  }
}

at::Tensor head_hvp_cpu(const at::Tensor& a, const at::Tensor& ra, const at::Tensor& weight, const at::Tensor& dweight,
                        const std::optional<at::Tensor>& dbias, const std::optional<at::Tensor>& probs,
                        const at::Tensor& delta, double scale, const std::optional<at::Tensor>& d1, at::Tensor& out_w,
                        const std::optional<at::Tensor>& out_b, bool accumulate) {
  TORCH_CHECK(a.dim() == 3, "head_hvp: a must be [R, N, I], got ", a.sizes());
  const int64_t R = a.size(0), N = a.size(1), I = a.size(2);
  TORCH_CHECK(ra.dim() == 4 && ra.size(0) == R && ra.size(1) == N && ra.size(3) == I, "head_hvp: ra must be [R, N, K, I] = [",
              R, ", ", N, ", K, ", I, "], got ", ra.sizes());
  const int64_t K = ra.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == R && weight.size(2) == I, "head_hvp: weight must be [R, O, I], got ",
              weight.sizes());
  const int64_t O = weight.size(1);
  fc_check_operand("head_hvp", "a", a, "ra", ra, {R, N, K, I});
  fc_check_operand("head_hvp", "a", a, "weight", weight, {R, O, I});
  fc_check_operand("head_hvp", "a", a, "dweight", dweight, {R, K, O, I});
  fc_check_operand("head_hvp", "a", a, "dbias", dbias, {R, K, O});
  fc_check_operand("head_hvp", "a", a, "probs", probs, {R, N, O});
  fc_check_operand("head_hvp", "a", a, "delta", delta, {R, N, O});
  fc_check_operand("head_hvp", "a", a, "d1", d1, {R, N, I});
  fc_check_operand("head_hvp", "a", a, "out_w", out_w, {R, K, O, I});
  fc_check_operand("head_hvp", "a", a, "out_b", out_b, {R, K, O});
  check_inner(weight, 2, "weight");
  check_inner(dweight, 2, "dweight");
  check_inner(out_w, 2, "out_w");
  if (dbias.has_value()) check_inner(*dbias, 1, "dbias");
  if (out_b.has_value()) check_inner(*out_b, 1, "out_b");
  // rows of the last dimension contiguous (any other strides: the fused engines pass [N, K, R, I] and
  // [R, N, K, I] layouts); the result takes ra's layout where ra is dense
  const at::Tensor ac = fc_rows_contiguous(a), rac = fc_rows_contiguous(ra), dl = fc_rows_contiguous(delta);
  const at::Tensor pc = probs.has_value() ? fc_rows_contiguous(*probs) : at::Tensor();
  const at::Tensor d1c = d1.has_value() ? fc_rows_contiguous(*d1) : at::Tensor();
  at::Tensor rg = at::empty_like(rac);
  if (R * K == 0) return rg;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "head_hvp", [&] {
    using S = scalar_t;
    HeadArgs<S> h{};
    h.a = ac.data_ptr<S>(), h.ra = rac.data_ptr<S>(), h.w = weight.data_ptr<S>(), h.dw = dweight.data_ptr<S>();
    h.db = dbias.has_value() ? dbias->data_ptr<S>() : nullptr;
    h.probs = fc_data<S>(pc), h.delta = dl.data_ptr<S>(), h.d1 = fc_data<S>(d1c);
    h.out_w = out_w.data_ptr<S>(), h.out_b = out_b.has_value() ? out_b->data_ptr<S>() : nullptr, h.rg = rg.data_ptr<S>();
    h.N = N, h.K = K, h.O = O, h.I = I;
    h.a_r = ac.stride(0), h.a_n = ac.stride(1), h.ra_r = rac.stride(0), h.ra_n = rac.stride(1), h.ra_k = rac.stride(2);
    h.dl_r = dl.stride(0), h.dl_n = dl.stride(1), h.rg_r = rg.stride(0), h.rg_n = rg.stride(1), h.rg_k = rg.stride(2);
    h.p_r = pc.defined() ? pc.stride(0) : 0, h.p_n = pc.defined() ? pc.stride(1) : 0;
    h.d1_r = d1c.defined() ? d1c.stride(0) : 0, h.d1_n = d1c.defined() ? d1c.stride(1) : 0;
    h.w_r = weight.stride(0), h.dw_r = dweight.stride(0), h.dw_k = dweight.stride(1);
    h.db_r = dbias.has_value() ? dbias->stride(0) : 0, h.db_k = dbias.has_value() ? dbias->stride(1) : 0;
    h.ow_r = out_w.stride(0), h.ow_k = out_w.stride(1);
    h.ob_r = out_b.has_value() ? out_b->stride(0) : 0, h.ob_k = out_b.has_value() ? out_b->stride(1) : 0;
    h.scale = static_cast<S>(scale), h.accumulate = accumulate;
    const auto fn = fc_pick_range_widths<head_range<S, 64>, head_range<S, 32>, head_range<S, 16>, HeadArgs<S>>();
    at::parallel_for(0, R * K, 1, [&](int64_t q0, int64_t q1) { fn(h, q0, q1); });
  });
  return rg;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("head_hvp", &head_hvp_cpu); }
