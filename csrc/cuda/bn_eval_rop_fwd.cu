// CUDA kernel of fastcurv::bn_eval_rop_fwd: the forward R-op of an eval BatchNorm and the derivative
// of the activation that reads its output, in place, in one pass (shapes and formula: csrc/fastcurv.cpp,
// src/fastcurv/ops/bn_eval_rop_fwd.py):
//   dot[k, g] = sum_{n, s} rz * delta;  rz <- (scale[g] * rz + rgamma[k, g] * xh + rbeta[k, g]) * d1
// rz [N, K, G, S] contiguous; xh, d1, delta [N, G, S]; scale [G]; rgamma, rbeta [K, G].
//
// One kernel: a block per probe k and group g (or 32 groups when S is small) updates its elements
// of rz and reduces their dot with delta over the N*S samples; every input value is read once.
// The sums run in the input type: per-thread partial sums, then a tree over the block.
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

// One block per probe and group, or tile of 32 groups for small S: see fc_group_blocks and
// fc_group_thread (common.cuh).
template <typename T>
__global__ void bn_eval_rop_fwd_kernel(T* __restrict__ rz, const T* __restrict__ scale, const T* __restrict__ xh,
                                       const T* __restrict__ rgamma, const T* __restrict__ rbeta, const T* __restrict__ d1,
                                       const T* __restrict__ delta, T* __restrict__ dot, int64_t N, int64_t K, int64_t G,
                                       int64_t S, int bg) {
  const FcGroupThread t = fc_group_thread(bg, G);
  const int64_t k = t.k, j = t.j;
  const int64_t kg = k * G + j;
  const int64_t NS = N * S;
  T acc = T(0);
  if (j < G) {
    const T a = scale[j];
    const T b = xh != nullptr ? rgamma[kg] : T(0);
    const T c = rbeta != nullptr ? rbeta[kg] : T(0);
    for (int64_t e = t.ei; e < NS; e += t.be) {
      const int64_t n = e / S, s = e % S;
      const int64_t ia = (n * G + j) * S + s;  // xh, d1, delta
      const int64_t ib = ((n * K + k) * G + j) * S + s;  // rz
      const T r = rz[ib];
      if (delta != nullptr) acc += r * delta[ia];
      T o = a * r;
      if (xh != nullptr) o += b * xh[ia];
      if (rbeta != nullptr) o += c;
      if (d1 != nullptr) o *= d1[ia];
      rz[ib] = o;
    }
  }
  if (dot == nullptr) return;  // (the same in every thread of the block)
  T sums[1] = {acc};
  if (fc_group_sum(sums, t, bg) && j < G) dot[kg] = sums[0];
}

Tensor bn_eval_rop_fwd_cuda(Tensor rz, Tensor scale, std::optional<Tensor> xh, std::optional<Tensor> rgamma,
                            std::optional<Tensor> rbeta, std::optional<Tensor> d1, std::optional<Tensor> delta) {
  const char* op = "bn_eval_rop_fwd";
  STD_TORCH_CHECK(rz.dim() == 4, op, ": rz must be [N, K, G, S], got ", fc_sizes_str(rz.sizes()));
  STD_TORCH_CHECK(rz.is_contiguous(), op, ": rz is written in place and must be contiguous");
  const int64_t N = rz.size(0), K = rz.size(1), G = rz.size(2), S = rz.size(3);
  STD_TORCH_CHECK(xh.has_value() == rgamma.has_value(), op,
                  ": xh and rgamma must be given together (affine BatchNorm) or both be None");
  fc_check_cuda_float(op, "rz", rz, rz);
  fc_check_cuda_operand(op, "rz", rz, "scale", scale, {G});
  fc_check_cuda_operand(op, "rz", rz, "xh", xh, {N, G, S});
  fc_check_cuda_operand(op, "rz", rz, "rgamma", rgamma, {K, G});
  fc_check_cuda_operand(op, "rz", rz, "rbeta", rbeta, {K, G});
  fc_check_cuda_operand(op, "rz", rz, "d1", d1, {N, G, S});
  fc_check_cuda_operand(op, "rz", rz, "delta", delta, {N, G, S});
  torch::stable::accelerator::DeviceGuard guard(rz.get_device_index());
  const bool empty = rz.numel() == 0;
  Tensor dot = !delta.has_value() ? torch::stable::new_zeros(rz, {0})
               : empty            ? torch::stable::new_zeros(rz, {K, G})
                                  : torch::stable::new_empty(rz, {K, G});  // every entry written below
  if (empty) return dot;
  const Tensor sc = torch::stable::contiguous(scale);
  const std::optional<Tensor> x = fc_contiguous(xh), rga = fc_contiguous(rgamma), rbe = fc_contiguous(rbeta);
  const std::optional<Tensor> d = fc_contiguous(d1), de = fc_contiguous(delta);
  const auto [bg, blocks] = fc_group_blocks(op, K, G, S);
  const cudaStream_t stream = fc_stream(rz);
  fc_dispatch_float(rz.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    auto p = [](const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr<T>() : nullptr; };
    bn_eval_rop_fwd_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        rz.mutable_data_ptr<T>(), sc.const_data_ptr<T>(), p(x), p(rga), p(rbe), p(d), p(de),
        delta.has_value() ? dot.mutable_data_ptr<T>() : nullptr, N, K, G, S, bg);
  });
  fc_check_launch(op);
  return dot;
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("bn_eval_rop_fwd", TORCH_BOX(&fastcurv_cuda::bn_eval_rop_fwd_cuda)); }
