// CUDA kernel of fastcurv::bn_rop_bwd, the input-gradient R-op of a batch-statistics BatchNorm
// (formula and shapes: csrc/fastcurv.cpp, src/fastcurv/ops/bn_rop_bwd.py).
// xh, g [N, G, S]; rg, rxh [N, K, G, S]; inv, gamma [G]; rgamma, m2 [K, G].
//
// Two kernels. bn_rop_bwd_sums: one block per probe k and group g (or 32 groups when S is small)
// reduces the five sums over the N*S samples (sum rg, rg*xh, g*rxh, g, g*xh) and turns them into
// the five coefficients of the output, which is affine in the inputs:
// out = c_rg*rg + c_g*g + c_xh*xh + c_rxh*rxh + c_0.
// bn_rop_bwd_apply: element-wise over the output with those coefficients.
#include "common.cuh"

#include <optional>

namespace fastcurv_cuda {
namespace {

// One block per probe and group, or tile of 32 groups for small S: see fc_group_blocks and
// fc_group_thread (common.cuh).
template <typename T>
__global__ void bn_rop_bwd_sums(const T* __restrict__ xh, const T* __restrict__ g, const T* __restrict__ rg,
                                const T* __restrict__ rxh, const T* __restrict__ inv, const T* __restrict__ gamma,
                                const T* __restrict__ rgamma, const T* __restrict__ m2, T* __restrict__ coef, int64_t N,
                                int64_t K, int64_t G, int64_t S, int bg) {
  const FcGroupThread t = fc_group_thread(bg, G);
  const int64_t k = t.k, j = t.j;
  const int64_t NS = N * S;
  T acc[5] = {T(0), T(0), T(0), T(0), T(0)};  // sum rg, rg*xh, g*rxh, g, g*xh
  if (j < G) {
    for (int64_t e = t.ei; e < NS; e += t.be) {
      const int64_t n = e / S, s = e % S;
      const int64_t a = (n * G + j) * S + s;            // xh, g
      const int64_t b = ((n * K + k) * G + j) * S + s;  // rg, rxh
      const T x = xh[a], d = g[a], r = rg[b];
      acc[0] += r;
      acc[1] += r * x;
      if (rxh != nullptr) acc[2] += d * rxh[b];
      acc[3] += d;
      acc[4] += d * x;
    }
  }
  if (!fc_group_sum(acc, t, bg) || j >= G) return;
  const int64_t kg = k * G + j;
  const T count = T(NS);
  const T mean_rg = acc[0] / count, mean_rgxh = acc[1] / count, mean_grxh = acc[2] / count;
  const T mean_g = acc[3] / count, mean_gxh = acc[4] / count;
  const T gam = gamma != nullptr ? gamma[j] : T(1);
  const T rgam = rgamma != nullptr ? rgamma[kg] : T(0);
  const T mm = m2 != nullptr ? m2[kg] : T(0);
  const T in = inv[j];
  const T A = gam * mean_rg + rgam * mean_g;      // mean(rgx)
  const T B = gam * mean_rgxh + rgam * mean_gxh;  // mean(rgx * xh)
  const T D = gam * mean_grxh;                    // mean(gx * rxh)
  const T mg = gam * mean_gxh;                    // mean(gx * xh)
  const T mgx = gam * mean_g;                     // mean(gx)
  const T i2m = in * in * mm;
  const int64_t KG = K * G;
  coef[kg] = in * gam;
  coef[KG + kg] = in * rgam - i2m * gam;
  coef[2 * KG + kg] = -in * (B + D) + i2m * mg;
  coef[3 * KG + kg] = -in * mg;
  coef[4 * KG + kg] = -in * A + i2m * mgx;
}

template <typename T>
__global__ void bn_rop_bwd_apply(const T* __restrict__ xh, const T* __restrict__ g, const T* __restrict__ rg,
                                 const T* __restrict__ rxh, const T* __restrict__ coef, T* __restrict__ out, int64_t total,
                                 int64_t K, int64_t G, int64_t S) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t KG = K * G;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t s = i % S;
    const int64_t row = i / S;        // (n * K + k) * G + j
    const int64_t kg = row % KG;      // k * G + j
    const int64_t n = row / KG, j = kg % G;
    const int64_t a = (n * G + j) * S + s;
    T o = coef[kg] * rg[i] + coef[KG + kg] * g[a] + coef[2 * KG + kg] * xh[a] + coef[4 * KG + kg];
    if (rxh != nullptr) o += coef[3 * KG + kg] * rxh[i];
    out[i] = o;
  }
}

Tensor bn_rop_bwd_cuda(Tensor xh, Tensor g, Tensor rg, Tensor inv, std::optional<Tensor> gamma, std::optional<Tensor> rgamma,
                       std::optional<Tensor> rxh, std::optional<Tensor> m2) {
  const char* op = "bn_rop_bwd";
  STD_TORCH_CHECK(xh.dim() == 3, op, ": xh must be [N, G, S]");
  const int64_t N = xh.size(0), G = xh.size(1), S = xh.size(2);
  STD_TORCH_CHECK(g.dim() == 3 && g.size(0) == N && g.size(1) == G && g.size(2) == S, op, ": g must have the shape of xh [", N, ", ", G,
                  ", ", S, "]");
  STD_TORCH_CHECK(rg.dim() == 4 && rg.size(0) == N && rg.size(2) == G && rg.size(3) == S, op, ": rg must be [N, K, G, S] = [", N,
                  ", K, ", G, ", ", S, "]");
  const int64_t K = rg.size(1);
  STD_TORCH_CHECK(inv.dim() == 1 && inv.size(0) == G, op, ": inv must be [G] = [", G, "]");
  STD_TORCH_CHECK(gamma.has_value() == rgamma.has_value(), op,
                  ": gamma and rgamma must be given together (affine BatchNorm) or both be None");
  STD_TORCH_CHECK(rxh.has_value() == m2.has_value(), op, ": rxh and m2 must be given together (input tangent) or both be None");
  fc_check_cuda_float(op, "xh", xh, xh);
  fc_check_cuda_float(op, "g", g, xh);
  fc_check_cuda_float(op, "rg", rg, xh);
  fc_check_cuda_float(op, "inv", inv, xh);
  if (gamma.has_value()) {
    STD_TORCH_CHECK(gamma->dim() == 1 && gamma->size(0) == G, op, ": gamma must be [G] = [", G, "]");
    STD_TORCH_CHECK(rgamma->dim() == 2 && rgamma->size(0) == K && rgamma->size(1) == G, op, ": rgamma must be [K, G] = [", K, ", ", G, "]");
    fc_check_cuda_float(op, "gamma", *gamma, xh);
    fc_check_cuda_float(op, "rgamma", *rgamma, xh);
  }
  if (rxh.has_value()) {
    STD_TORCH_CHECK(rxh->dim() == 4 && rxh->size(0) == N && rxh->size(1) == K && rxh->size(2) == G && rxh->size(3) == S, op,
                    ": rxh must have the shape of rg [", N, ", ", K, ", ", G, ", ", S, "]");
    STD_TORCH_CHECK(m2->dim() == 2 && m2->size(0) == K && m2->size(1) == G, op, ": m2 must be [K, G] = [", K, ", ", G, "]");
    fc_check_cuda_float(op, "rxh", *rxh, xh);
    fc_check_cuda_float(op, "m2", *m2, xh);
  }
  torch::stable::accelerator::DeviceGuard guard(xh.get_device_index());
  Tensor x = torch::stable::contiguous(xh);
  Tensor d = torch::stable::contiguous(g);
  Tensor r = torch::stable::contiguous(rg);
  Tensor iv = torch::stable::contiguous(inv);
  std::optional<Tensor> ga, rga, q, mm;
  if (gamma.has_value()) {
    ga = torch::stable::contiguous(*gamma);
    rga = torch::stable::contiguous(*rgamma);
  }
  if (rxh.has_value()) {
    q = torch::stable::contiguous(*rxh);
    mm = torch::stable::contiguous(*m2);
  }
  Tensor out = torch::stable::empty_like(r);
  const int64_t total = r.numel();
  if (total == 0) return out;
  Tensor coef = torch::stable::new_empty(r, {5, K * G});
  const auto [bg, blocks] = fc_group_blocks(op, K, G, S);
  const cudaStream_t stream = fc_stream(r);
  fc_dispatch_float(r.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* qp = q.has_value() ? q->const_data_ptr<T>() : nullptr;
    bn_rop_bwd_sums<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), d.const_data_ptr<T>(), r.const_data_ptr<T>(), qp, iv.const_data_ptr<T>(),
        ga.has_value() ? ga->const_data_ptr<T>() : nullptr, rga.has_value() ? rga->const_data_ptr<T>() : nullptr,
        mm.has_value() ? mm->const_data_ptr<T>() : nullptr, coef.mutable_data_ptr<T>(), N, K, G, S, bg);
    fc_check_launch(op);
    bn_rop_bwd_apply<T><<<fc_blocks(total), kThreads, 0, stream>>>(x.const_data_ptr<T>(), d.const_data_ptr<T>(), r.const_data_ptr<T>(),
                                                                  qp, coef.const_data_ptr<T>(), out.mutable_data_ptr<T>(), total, K,
                                                                  G, S);
  });
  fc_check_launch(op);
  return out;
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("bn_rop_bwd", TORCH_BOX(&fastcurv_cuda::bn_rop_bwd_cuda)); }
