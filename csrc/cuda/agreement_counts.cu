// CUDA kernel of fastcurv::agreement_counts: out[i, j] = #{m : preds[i, m] == preds[j, m]} for
// integer preds [R, M]; out is int64 [R, R].
//
// A matmul-shaped tiling with "multiply-add" replaced by "compare-and-count": each block owns a
// 64 x 64 tile of replica pairs (only tiles on or above the diagonal; the result is mirrored),
// streams the examples through shared memory in chunks of 32, and each of its 16 x 16 threads
// keeps a 4 x 4 micro-tile of int32 counters in registers.
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

constexpr int kAgTile = 64;    // replicas per tile side
constexpr int kAgChunk = 32;   // examples per shared-memory chunk
constexpr int kAgThreads = 16; // threads per block side; each thread owns kAgTile / kAgThreads rows and cols
constexpr int kAgMicro = kAgTile / kAgThreads;

template <typename T>
__global__ void agreement_counts_kernel(const T* __restrict__ p, int64_t* __restrict__ out, int64_t R, int64_t M) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;  // lower tiles are filled by mirroring the upper ones
  const int64_t i0 = ti * kAgTile, j0 = tj * kAgTile;
  __shared__ T si[kAgChunk][kAgTile];
  __shared__ T sj[kAgChunk][kAgTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kAgThreads + tx;
  int acc[kAgMicro][kAgMicro];
#pragma unroll
  for (int a = 0; a < kAgMicro; ++a)
#pragma unroll
    for (int b = 0; b < kAgMicro; ++b) acc[a][b] = 0;

  for (int64_t m0 = 0; m0 < M; m0 += kAgChunk) {
    for (int e = tid; e < kAgTile * kAgChunk; e += kAgThreads * kAgThreads) {
      const int r = e / kAgChunk, k = e % kAgChunk;  // consecutive threads read consecutive examples
      const int64_t m = m0 + k, gi = i0 + r, gj = j0 + r;
      si[k][r] = (gi < R && m < M) ? p[gi * M + m] : T(0);
      sj[k][r] = (gj < R && m < M) ? p[gj * M + m] : T(0);
    }
    __syncthreads();
    const int kmax = static_cast<int>(M - m0 < kAgChunk ? M - m0 : kAgChunk);  // never count padding
    for (int k = 0; k < kmax; ++k) {
      T a[kAgMicro], b[kAgMicro];
#pragma unroll
      for (int u = 0; u < kAgMicro; ++u) {
        a[u] = si[k][ty + kAgThreads * u];
        b[u] = sj[k][tx + kAgThreads * u];
      }
#pragma unroll
      for (int u = 0; u < kAgMicro; ++u)
#pragma unroll
        for (int v = 0; v < kAgMicro; ++v) acc[u][v] += (a[u] == b[v]) ? 1 : 0;
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kAgMicro; ++u) {
#pragma unroll
    for (int v = 0; v < kAgMicro; ++v) {
      const int64_t i = i0 + ty + kAgThreads * u, j = j0 + tx + kAgThreads * v;
      if (i < R && j < R) {
        out[i * R + j] = acc[u][v];
        if (ti != tj) out[j * R + i] = acc[u][v];
      }
    }
  }
}

const char* fc_int_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Bool: return "bool";
    case ScalarType::UInt16: return "uint16";
    case ScalarType::UInt32: return "uint32";
    case ScalarType::UInt64: return "uint64";
    default: return "an unsupported dtype";
  }
}

Tensor agreement_counts_cuda(Tensor preds) {
  const char* op = "agreement_counts";
  STD_TORCH_CHECK(preds.is_cuda(), op, ": preds must be a CUDA tensor");
  STD_TORCH_CHECK(preds.dim() == 2, op, ": preds must be [R, M] (replicas x examples), got ", preds.dim(), " dimensions");
  torch::stable::accelerator::DeviceGuard guard(preds.get_device_index());
  Tensor p = preds;
  if (p.scalar_type() == ScalarType::Bool) p = torch::stable::to(p, ScalarType::Byte);
  const ScalarType st = p.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Byte || st == ScalarType::Char || st == ScalarType::Short || st == ScalarType::Int ||
                      st == ScalarType::Long,
                  op, ": preds must hold integer class indices (uint8, int8, int16, int32 or int64), got ", fc_int_name(st));
  p = torch::stable::contiguous(p);
  const int64_t R = p.size(0), M = p.size(1);
  STD_TORCH_CHECK(M < (int64_t(1) << 31), op, ": M = ", M, " examples exceeds the int32 counters of the CUDA kernel; split the examples");
  Tensor out = torch::stable::new_zeros(p, {R, R}, ScalarType::Long);
  if (R == 0 || M == 0) return out;
  const int64_t T = (R + kAgTile - 1) / kAgTile;
  STD_TORCH_CHECK(T <= 65535, op, ": R = ", R, " replicas is too many for one launch");
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(T));
  const dim3 block(kAgThreads, kAgThreads);
  const cudaStream_t stream = fc_stream(p);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  switch (p.scalar_type()) {
#define FC_AG_CASE(ST, CT)                                                                               \
  case ScalarType::ST:                                                                                   \
    agreement_counts_kernel<CT><<<grid, block, 0, stream>>>(p.const_data_ptr<CT>(), o, R, M);           \
    break;
    FC_AG_CASE(Byte, uint8_t)
    FC_AG_CASE(Char, int8_t)
    FC_AG_CASE(Short, int16_t)
    FC_AG_CASE(Int, int32_t)
    FC_AG_CASE(Long, int64_t)
#undef FC_AG_CASE
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype ", fc_int_name(p.scalar_type()));
  }
  fc_check_launch(op);
  return out;
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("agreement_counts", TORCH_BOX(&fastcurv_cuda::agreement_counts_cuda)); }
