// CUDA kernel of fastcurv::act_rop_bwd: out[b,k,:] = d1[b,:] * rg[b,k,:] + d2g[b,:] * rz[b,k,:],
// d1, d2g [B, M]; rz, rg [B, K, M].
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

template <typename T>
__global__ void act_rop_bwd_kernel(const T* __restrict__ d1, const T* __restrict__ d2g, const T* __restrict__ rz,
                                   const T* __restrict__ rg, T* __restrict__ out, int64_t n, int64_t K, int64_t M) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t KM = K * M;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t j = (i / KM) * M + i % M;  // index into d1/d2g: same b, same m
    out[i] = d1[j] * rg[i] + d2g[j] * rz[i];
  }
}

Tensor act_rop_bwd_cuda(Tensor d1, Tensor d2g, Tensor rz, Tensor rg) {
  const char* op = "act_rop_bwd";
  STD_TORCH_CHECK(d1.dim() == 2 && d2g.dim() == 2 && d1.size(0) == d2g.size(0) && d1.size(1) == d2g.size(1), op,
                  ": d1 and d2g must both be [B, M] of the same shape");
  STD_TORCH_CHECK(rz.dim() == 3 && rg.dim() == 3 && rz.size(0) == rg.size(0) && rz.size(1) == rg.size(1) && rz.size(2) == rg.size(2),
                  op, ": rz and rg must both be [B, K, M] of the same shape");
  STD_TORCH_CHECK(rz.size(0) == d1.size(0) && rz.size(2) == d1.size(1), op, ": rz [", rz.size(0), ", ", rz.size(1), ", ", rz.size(2),
                  "] does not match d1 [", d1.size(0), ", ", d1.size(1), "]");
  fc_check_cuda_float(op, "d1", d1, d1);
  fc_check_cuda_float(op, "d2g", d2g, d1);
  fc_check_cuda_float(op, "rz", rz, d1);
  fc_check_cuda_float(op, "rg", rg, d1);
  torch::stable::accelerator::DeviceGuard guard(d1.get_device_index());
  Tensor a = torch::stable::contiguous(d1);
  Tensor b = torch::stable::contiguous(d2g);
  Tensor z = torch::stable::contiguous(rz);
  Tensor g = torch::stable::contiguous(rg);
  Tensor out = torch::stable::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return out;
  const cudaStream_t stream = fc_stream(g);
  fc_dispatch_float(g.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    act_rop_bwd_kernel<T><<<fc_blocks(n), kThreads, 0, stream>>>(a.const_data_ptr<T>(), b.const_data_ptr<T>(), z.const_data_ptr<T>(),
                                                                g.const_data_ptr<T>(), out.mutable_data_ptr<T>(), n, g.size(1),
                                                                g.size(2));
  });
  fc_check_launch(op);
  return out;
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("act_rop_bwd", TORCH_BOX(&fastcurv_cuda::act_rop_bwd_cuda)); }
