// The Hessian-vector product through a network's last Linear layer and its loss, for R replicas x K
// probes, in one pass over the samples (CPU). See src/fastcurv/ops/head_hvp.py for the formula.
//
// A classifier's head has few outputs (O = 10 on MNIST): as GEMMs, its six products per probe have
// one dimension of 10, where sgemm runs at a third of its speed, and each reads or writes the
// [N, K, I] tangents once more. Here a work item is one (replica, probe): for every sample it forms
// the O outputs' tangent from the sample's input row and tangent row (held in registers), applies
// the loss Hessian to them, adds the two rank-1 terms to the weight product (an [O, I] accumulator in
// L1) and writes the input R-gradient row times the activation derivative. The weight, its probe
// block and the accumulator stay in L1 across the samples. Operands are read at their strides (rows
// of the last dimension contiguous), so both fused engines' layouts pass without copies.
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

// z[c] += sum_i x[i] * u[c, i] + y[i] * v[c, i] for c < O (u, v: [O, I] rows), four rows at a time so
// that x and y are loaded once per four.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void dots(const S* x, const S* y, const S* u, const S* v, int64_t O, int64_t I, S* z) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t Iv = I / W * W;
  int64_t c = 0;
  for (; c + 4 <= O; c += 4) {
    V s0 = L::zero(), s1 = L::zero(), s2 = L::zero(), s3 = L::zero();
    const S *u0 = u + c * I, *v0 = v + c * I;
    for (int64_t i = 0; i < Iv; i += W) {
      const V xv = L::load(x + i), yv = L::load(y + i);
      s0 += xv * L::load(u0 + i) + yv * L::load(v0 + i);
      s1 += xv * L::load(u0 + I + i) + yv * L::load(v0 + I + i);
      s2 += xv * L::load(u0 + 2 * I + i) + yv * L::load(v0 + 2 * I + i);
      s3 += xv * L::load(u0 + 3 * I + i) + yv * L::load(v0 + 3 * I + i);
    }
    S t[4] = {L::sum(s0), L::sum(s1), L::sum(s2), L::sum(s3)};
    for (int64_t i = Iv; i < I; ++i)
      for (int j = 0; j < 4; ++j) t[j] += x[i] * u0[j * I + i] + y[i] * v0[j * I + i];
    for (int j = 0; j < 4; ++j) z[c + j] += t[j];
  }
  for (; c < O; ++c) {
    V s = L::zero();
    const S *uc = u + c * I, *vc = v + c * I;
    for (int64_t i = 0; i < Iv; i += W) s += L::load(x + i) * L::load(uc + i) + L::load(y + i) * L::load(vc + i);
    S t = L::sum(s);
    for (int64_t i = Iv; i < I; ++i) t += x[i] * uc[i] + y[i] * vc[i];
    z[c] += t;
  }
}

// acc[c, i] += p[c] * x[i] + q[c] * y[i] for c < O, i < I.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void rank2(S* acc, const S* p, const S* x, const S* q, const S* y, int64_t O, int64_t I) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t Iv = I / W * W;
  for (int64_t i = 0; i < Iv; i += W) {
    const V xv = L::load(x + i), yv = L::load(y + i);
    for (int64_t c = 0; c < O; ++c) {
      S* ac = acc + c * I + i;
      L::store(ac, L::load(ac) + L::splat(p[c]) * xv + L::splat(q[c]) * yv);
    }
  }
  for (int64_t i = Iv; i < I; ++i)
    for (int64_t c = 0; c < O; ++c) acc[c * I + i] += p[c] * x[i] + q[c] * y[i];
}

// g[i] = (sum_c p[c] * u[c, i] + q[c] * v[c, i]) * d1[i] (d1 may be null: 1).
template <typename S, int BYTES>
FC_ALWAYS_INLINE void combine(S* g, const S* p, const S* u, const S* q, const S* v, const S* d1, int64_t O, int64_t I) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  const int64_t Iv = I / W * W;
  for (int64_t i = 0; i < Iv; i += W) {
    V s = L::zero();
    for (int64_t c = 0; c < O; ++c) s += L::splat(p[c]) * L::load(u + c * I + i) + L::splat(q[c]) * L::load(v + c * I + i);
    if (d1) s *= L::load(d1 + i);
    L::store(g + i, s);
  }
  for (int64_t i = Iv; i < I; ++i) {
    S s = 0;
    for (int64_t c = 0; c < O; ++c) s += p[c] * u[c * I + i] + q[c] * v[c * I + i];
    g[i] = d1 ? s * d1[i] : s;
  }
}

// Work items (replica r, probe k) = q in [q0, q1), q = r * K + k.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void head_range(const HeadArgs<S>& a, int64_t q0, int64_t q1) {
  const int64_t N = a.N, K = a.K, O = a.O, I = a.I;
  S* acc = fc_scratch<S, 0>(O * I + 3 * O);
  S *z = acc + O * I, *rd = z + O, *accb = rd + O;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = q / K, k = q % K;
    const S* w = a.w + r * a.w_r;
    const S* dw = a.dw + r * a.dw_r + k * a.dw_k;
    const S* db = a.db ? a.db + r * a.db_r + k * a.db_k : nullptr;
    std::memset(acc, 0, sizeof(S) * O * I);
    std::memset(accb, 0, sizeof(S) * O);
    for (int64_t n = 0; n < N; ++n) {
      const S* an = a.a + r * a.a_r + n * a.a_n;
      const S* ran = a.ra + r * a.ra_r + n * a.ra_n + k * a.ra_k;
      const S* dl = a.delta + r * a.dl_r + n * a.dl_n;
      for (int64_t c = 0; c < O; ++c) z[c] = db ? db[c] : S(0);
      dots<S, BYTES>(an, ran, dw, w, O, I, z);
      if (a.probs) {  // cross-entropy: scale * (diag(p) - p p^T) z
        const S* p = a.probs + r * a.p_r + n * a.p_n;
        S pz = 0;
        for (int64_t c = 0; c < O; ++c) pz += p[c] * z[c];
        for (int64_t c = 0; c < O; ++c) rd[c] = a.scale * p[c] * (z[c] - pz);
      } else {  // squared error: scale * z
        for (int64_t c = 0; c < O; ++c) rd[c] = a.scale * z[c];
      }
      for (int64_t c = 0; c < O; ++c) accb[c] += rd[c];
      rank2<S, BYTES>(acc, rd, an, dl, ran, O, I);
      combine<S, BYTES>(a.rg + r * a.rg_r + n * a.rg_n + k * a.rg_k, rd, w, dl, dw, a.d1 ? a.d1 + r * a.d1_r + n * a.d1_n : nullptr,
                        O, I);
    }
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
  auto rows = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor ac = rows(a), rac = rows(ra), dl = rows(delta);
  const at::Tensor pc = probs.has_value() ? rows(*probs) : at::Tensor(), d1c = d1.has_value() ? rows(*d1) : at::Tensor();
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
