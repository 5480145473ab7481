#pragma once
// Shared helpers of the fastcurv CUDA kernels. Only torch's stable ABI is used
// (torch/csrc/stable/*, torch/headeronly/*), so these files compile with nvcc next to a CPU-only
// torch and the resulting library loads into any torch >= 2.13 (TORCH_TARGET_VERSION).
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <utility>
#include <string>

namespace fastcurv_cuda {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int kThreads = 256;

// Number of blocks for a grid-stride loop over n elements (the loops cover the rest).
inline unsigned int fc_blocks(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

inline const char* fc_dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    default: return "a non-float dtype";
  }
}

// Checks shared by every op: CUDA tensor on the device of `ref`, float32/float64, same dtype.
inline void fc_check_cuda_float(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), op, ": ", name, " is on cuda:", t.get_device_index(),
                  " but the first input is on cuda:", ref.get_device_index());
  const ScalarType st = t.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Double, op, ": ", name,
                  " must be float32 or float64, got ", fc_dtype_name(st));
  STD_TORCH_CHECK(st == ref.scalar_type(), op, ": dtype mismatch, ", name, " is ", fc_dtype_name(st), " but the first input is ",
                  fc_dtype_name(ref.scalar_type()));
}

// "[a, b, c]": sizes for error messages (the CPU kernels print at::IntArrayRef the same way).
template <typename Sizes>
inline std::string fc_sizes_str(const Sizes& sizes) {
  std::ostringstream s;
  s << "[";
  const char* sep = "";
  for (const int64_t v : sizes) {
    s << sep << v;
    sep = ", ";
  }
  s << "]";
  return s.str();
}

// Checks an optional operand against the tensor `ref` it is used with: the given sizes, then
// fc_check_cuda_float naming `ref` (the messages of csrc/cpu/common.h's fc_check_operand).
inline void fc_check_cuda_operand(const char* op, const char* ref_name, const Tensor& ref, const char* name,
                                  const std::optional<Tensor>& t, std::initializer_list<int64_t> sizes) {
  if (!t.has_value()) return;
  bool same = t->dim() == static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (const int64_t v : sizes) same = same && t->size(d++) == v;
  STD_TORCH_CHECK(same, op, ": ", name, " must be ", fc_sizes_str(sizes), ", got ", fc_sizes_str(t->sizes()));
  STD_TORCH_CHECK(t->is_cuda(), op, ": ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t->get_device_index() == ref.get_device_index(), op, ": ", name, " is on cuda:", t->get_device_index(), " but ",
                  ref_name, " is on cuda:", ref.get_device_index());
  STD_TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": dtype mismatch, ", name, " is ", fc_dtype_name(t->scalar_type()),
                  " but ", ref_name, " is ", fc_dtype_name(ref.scalar_type()));
}

// The current CUDA stream of the tensor's device (the one torch enqueues its own work on).
// Stream::nativeHandle() is stable API from torch 2.13 on; older (CUDA) builds of torch export the
// AOTI shim's CUDA-stream getter instead (it is absent from CPU builds, hence not used by default).
#if defined(TORCH_TARGET_VERSION) && TORCH_TARGET_VERSION < 0x020d000000000000
extern "C" int32_t aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
inline cudaStream_t fc_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == 0, "could not get the current CUDA stream");
  return reinterpret_cast<cudaStream_t>(stream);
}
#else
inline cudaStream_t fc_stream(const Tensor& t) {
  return reinterpret_cast<cudaStream_t>(torch::stable::accelerator::getCurrentStream(t.get_device_index()).nativeHandle());
}
#endif

inline void fc_check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Calls f(scalar_t{}) with scalar_t = float or double according to `st`.
template <typename F>
inline void fc_dispatch_float(ScalarType st, const char* op, const F& f) {
  switch (st) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype ", fc_dtype_name(st));
  }
}

// The contiguous form of an optional operand.
inline std::optional<Tensor> fc_contiguous(const std::optional<Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return torch::stable::contiguous(*t);
}

// Launch shape of the BatchNorm kernels' per-(probe k, group g) reductions over N * S samples:
// {groups per block, blocks}; 32 groups per block when S is small, so that a warp reads
// consecutive groups (contiguous for BatchNorm1d), else one.
inline std::pair<int, int64_t> fc_group_blocks(const char* op, int64_t K, int64_t G, int64_t S) {
  const int bg = S < 8 ? 32 : 1;
  const int64_t blocks = K * ((G + bg - 1) / bg);
  STD_TORCH_CHECK(blocks < (int64_t(1) << 31), op, ": too many groups (K * G = ", K * G, ")");
  return {bg, blocks};
}

// A thread of such a block: the block's threads form a [kThreads / bg, bg] grid; this one handles
// group j of probe k and its samples e = ei, ei + be, ... (e = n * S + s).
struct FcGroupThread {
  int be, ei;
  int64_t k, j;
};
__device__ __forceinline__ FcGroupThread fc_group_thread(int bg, int64_t G) {
  const int64_t tiles = (G + bg - 1) / bg;
  return {kThreads / bg, static_cast<int>(threadIdx.x) / bg, static_cast<int64_t>(blockIdx.x) / tiles,
          (static_cast<int64_t>(blockIdx.x) % tiles) * bg + threadIdx.x % bg};
}

// Sums each of the Q values acc over the be threads of the thread's group (a tree in shared memory;
// every thread of the block must call it). Returns true in the group's thread ei == 0, whose acc
// then holds the totals.
template <typename T, int Q>
__device__ __forceinline__ bool fc_group_sum(T (&acc)[Q], const FcGroupThread& t, int bg) {
  __shared__ T sh[Q][kThreads];
  for (int q = 0; q < Q; ++q) sh[q][threadIdx.x] = acc[q];
  __syncthreads();
  for (int stride = t.be / 2; stride > 0; stride >>= 1) {  // be is a power of two
    if (t.ei < stride) {
      for (int q = 0; q < Q; ++q) sh[q][threadIdx.x] += sh[q][threadIdx.x + stride * bg];
    }
    __syncthreads();
  }
  for (int q = 0; q < Q; ++q) acc[q] = sh[q][threadIdx.x];
  return t.ei == 0;
}

// Activation kinds: keep in sync with csrc/cpu/activation.h and src/fastcurv/ops/activation.py.
enum FcActivationCuda : int64_t { FCC_IDENTITY = 0, FCC_RELU = 1, FCC_LEAKY_RELU = 2, FCC_TANH = 3, FCC_SIGMOID = 4, FCC_GELU = 5 };

// First and second derivative of the activation at z (device version of fc_act_derivs).
template <typename T>
__device__ __forceinline__ void fc_act_derivs_dev(int64_t kind, T z, T slope, T& d1, T& d2) {
  switch (kind) {
    case FCC_RELU: d1 = z > T(0) ? T(1) : T(0); d2 = T(0); break;
    case FCC_LEAKY_RELU: d1 = z > T(0) ? T(1) : slope; d2 = T(0); break;
    case FCC_TANH: { const T t = tanh(z); d1 = T(1) - t * t; d2 = T(-2) * t * d1; break; }
    case FCC_SIGMOID: { const T s = T(1) / (T(1) + exp(-z)); d1 = s * (T(1) - s); d2 = d1 * (T(1) - T(2) * s); break; }
    case FCC_GELU: {
      const T phi = exp(T(-0.5) * z * z) * T(0.3989422804014327);
      const T cdf = T(0.5) * (T(1) + erf(z * T(0.7071067811865476)));
      d1 = cdf + z * phi; d2 = phi * (T(2) - z * z); break;
    }
    default: d1 = T(1); d2 = T(0);
  }
}

}  // namespace fastcurv_cuda
