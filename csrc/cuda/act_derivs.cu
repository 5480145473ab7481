// CUDA kernel of fastcurv::act_derivs: (sigma'(z), sigma''(z) * g) element-wise, z and g of any
// (equal) shape. Activation kinds as in csrc/cpu/activation.h.
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

template <typename T>
__global__ void act_derivs_kernel(const T* __restrict__ z, const T* __restrict__ g, T* __restrict__ d1, T* __restrict__ d2g,
                                  int64_t n, int64_t kind, T slope) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T a, b;
    fc_act_derivs_dev<T>(kind, z[i], slope, a, b);
    d1[i] = a;
    d2g[i] = b * g[i];
  }
}

std::tuple<Tensor, Tensor> act_derivs_cuda(Tensor z, Tensor g, int64_t kind, double slope) {
  const char* op = "act_derivs";
  STD_TORCH_CHECK(z.dim() == g.dim(), op, ": z and g differ in shape (", z.dim(), " vs ", g.dim(), " dims)");
  for (int64_t d = 0; d < z.dim(); ++d)
    STD_TORCH_CHECK(z.size(d) == g.size(d), op, ": z and g differ in shape at dim ", d, " (", z.size(d), " vs ", g.size(d), ")");
  STD_TORCH_CHECK(kind >= FCC_IDENTITY && kind <= FCC_GELU, op, ": unknown activation kind ", kind);
  fc_check_cuda_float(op, "z", z, z);
  fc_check_cuda_float(op, "g", g, z);
  torch::stable::accelerator::DeviceGuard guard(z.get_device_index());
  Tensor zc = torch::stable::contiguous(z);
  Tensor gc = torch::stable::contiguous(g);
  Tensor d1 = torch::stable::empty_like(zc);
  Tensor d2g = torch::stable::empty_like(zc);
  const int64_t n = zc.numel();
  if (n == 0) return std::make_tuple(d1, d2g);
  const cudaStream_t stream = fc_stream(zc);
  fc_dispatch_float(zc.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    act_derivs_kernel<T><<<fc_blocks(n), kThreads, 0, stream>>>(zc.const_data_ptr<T>(), gc.const_data_ptr<T>(), d1.mutable_data_ptr<T>(),
                                                               d2g.mutable_data_ptr<T>(), n, kind, static_cast<T>(slope));
  });
  fc_check_launch(op);
  return std::make_tuple(d1, d2g);
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("act_derivs", TORCH_BOX(&fastcurv_cuda::act_derivs_cuda)); }
