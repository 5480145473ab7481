// CUDA kernel of fastcurv::softmax_ce_hvp: out[b,k,n,:] = scale * p * (w - <p, w>), w = t - t_m,
// p = probs[b,n,:] ([B, N, C]), t = tangent[b,k,n,:] ([B, K, N, C]), m the row's most probable class
// (the pivot that keeps confident rows precise, see src/fastcurv/ops/softmax_ce_hvp.py). One warp per row.
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void softmax_ce_hvp_kernel(const T* __restrict__ probs, const T* __restrict__ tangent, T* __restrict__ out,
                                      int64_t rows, int64_t K, int64_t N, int64_t C, T scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t row = warp; row < rows; row += nwarps) {  // row = (b * K + k) * N + n
    const int64_t b = row / (K * N), n = row % N;
    const T* prow = probs + (b * N + n) * C;
    const T* trow = tangent + row * C;
    T* orow = out + row * C;
    // pivot m: the row's most probable class, the first if tied (as the CPU kernel and torch's argmax)
    T best = T(0);
    int64_t m = C;
    for (int64_t c = lane; c < C; c += 32)
      if (m == C || prow[c] > best) best = prow[c], m = c;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int64_t om = __shfl_xor_sync(0xffffffffu, m, off);
      if (om < C && (m == C || ob > best || (ob == best && om < m))) best = ob, m = om;
    }
    const T tm = m < C ? trow[m] : T(0);
    T dot = T(0);
    for (int64_t c = lane; c < C; c += 32) dot += prow[c] * (trow[c] - tm);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    for (int64_t c = lane; c < C; c += 32) orow[c] = scale * prow[c] * ((trow[c] - tm) - dot);
  }
}

Tensor softmax_ce_hvp_cuda(Tensor probs, Tensor tangent, double scale) {
  const char* op = "softmax_ce_hvp";
  STD_TORCH_CHECK(probs.dim() == 3, op, ": probs must be [B, N, C], got ", probs.dim(), " dims");
  STD_TORCH_CHECK(tangent.dim() == 4, op, ": tangent must be [B, K, N, C], got ", tangent.dim(), " dims");
  STD_TORCH_CHECK(tangent.size(0) == probs.size(0) && tangent.size(2) == probs.size(1) && tangent.size(3) == probs.size(2), op,
                  ": tangent [", tangent.size(0), ", ", tangent.size(1), ", ", tangent.size(2), ", ", tangent.size(3),
                  "] does not match probs [", probs.size(0), ", ", probs.size(1), ", ", probs.size(2), "]");
  fc_check_cuda_float(op, "probs", probs, probs);
  fc_check_cuda_float(op, "tangent", tangent, probs);
  torch::stable::accelerator::DeviceGuard guard(probs.get_device_index());
  Tensor p = torch::stable::contiguous(probs);
  Tensor t = torch::stable::contiguous(tangent);
  Tensor out = torch::stable::empty_like(t);
  const int64_t K = t.size(1), N = t.size(2), C = t.size(3);
  const int64_t rows = t.size(0) * K * N;
  if (rows == 0 || C == 0) return out;
  const cudaStream_t stream = fc_stream(t);
  const int threads = kWarpsPerBlock * 32;
  const unsigned int blocks = fc_blocks(rows * 32, threads);
  fc_dispatch_float(t.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    softmax_ce_hvp_kernel<T><<<blocks, threads, 0, stream>>>(p.const_data_ptr<T>(), t.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                                                             rows, K, N, C, static_cast<T>(scale));
  });
  fc_check_launch(op);
  return out;
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("softmax_ce_hvp", TORCH_BOX(&fastcurv_cuda::softmax_ce_hvp_cuda)); }
