// CUDA kernel of fastcurv::bn_eval_rop_bwd: the backward R-op of an eval BatchNorm behind the
// derivative of the activation that reads its output, in one pass (shapes and formula:
// csrc/fastcurv.cpp, src/fastcurv/ops/bn_eval_rop_bwd.py). With u = rd * d1:
//   sum_u[k, g] = sum_{n, s} u;  sum_uxh[k, g] = sum_{n, s} u * xh;
//   rd <- scale[g] * u + crg[k, g] * delta    (only with input_grad)
// rd [N, K, G, S]; xh, delta, d1 [N, G, S]; scale [G]; crg [K, G].
//
// One kernel: a block per probe k and group g (or 32 groups when S is small) reduces the two sums
// over the N*S samples and, with input_grad, overwrites its elements of rd; every input value is
// read once.
// The sums run in the input type: per-thread partial sums, then a tree over the block.
#include "common.cuh"

namespace fastcurv_cuda {
namespace {

// Block layout as in bn_eval_rop_fwd.cu (fc_group_thread).
// out is rd itself with input_grad, else nullptr (rd is then only read).
template <typename T>
__global__ void bn_eval_rop_bwd_kernel(const T* rd, T* out, const T* __restrict__ scale, const T* __restrict__ xh,
                                       const T* __restrict__ delta, const T* __restrict__ crg, const T* __restrict__ d1,
                                       T* __restrict__ sum_u, T* __restrict__ sum_uxh, int64_t N, int64_t K, int64_t G,
                                       int64_t S, int bg) {
  const FcGroupThread t = fc_group_thread(bg, G);
  const int64_t k = t.k, j = t.j;
  const int64_t kg = k * G + j;
  const int64_t NS = N * S;
  T su = T(0), sx = T(0);
  if (j < G) {
    const T a = scale[j];
    const T c = delta != nullptr ? crg[kg] : T(0);
    for (int64_t e = t.ei; e < NS; e += t.be) {
      const int64_t n = e / S, s = e % S;
      const int64_t ia = (n * G + j) * S + s;  // xh, delta, d1
      const int64_t ib = ((n * K + k) * G + j) * S + s;  // rd
      T u = rd[ib];
      if (d1 != nullptr) u *= d1[ia];
      su += u;
      if (xh != nullptr) sx += u * xh[ia];
      if (out != nullptr) out[ib] = delta != nullptr ? a * u + c * delta[ia] : a * u;
    }
  }
  T sums[2] = {su, sx};
  if (!fc_group_sum(sums, t, bg) || j >= G) return;
  sum_u[kg] = sums[0];
  if (sum_uxh != nullptr) sum_uxh[kg] = sums[1];
}

std::tuple<Tensor, Tensor> bn_eval_rop_bwd_cuda(Tensor rd, Tensor scale, std::optional<Tensor> xh, std::optional<Tensor> delta,
                                                std::optional<Tensor> crg, std::optional<Tensor> d1, bool input_grad) {
  const char* op = "bn_eval_rop_bwd";
  STD_TORCH_CHECK(rd.dim() == 4, op, ": rd must be [N, K, G, S], got ", fc_sizes_str(rd.sizes()));
  STD_TORCH_CHECK(!input_grad || rd.is_contiguous(), op, ": input_grad overwrites rd, which must then be contiguous");
  const int64_t N = rd.size(0), K = rd.size(1), G = rd.size(2), S = rd.size(3);
  STD_TORCH_CHECK(delta.has_value() == crg.has_value(), op,
                  ": delta and crg must be given together (affine BatchNorm) or both be None");
  fc_check_cuda_float(op, "rd", rd, rd);
  fc_check_cuda_operand(op, "rd", rd, "scale", scale, {G});
  fc_check_cuda_operand(op, "rd", rd, "xh", xh, {N, G, S});
  fc_check_cuda_operand(op, "rd", rd, "delta", delta, {N, G, S});
  fc_check_cuda_operand(op, "rd", rd, "crg", crg, {K, G});
  fc_check_cuda_operand(op, "rd", rd, "d1", d1, {N, G, S});
  torch::stable::accelerator::DeviceGuard guard(rd.get_device_index());
  const bool empty = rd.numel() == 0;
  // every entry is written by the kernel unless there are no samples
  Tensor sum_u = empty ? torch::stable::new_zeros(rd, {K, G}) : torch::stable::new_empty(rd, {K, G});
  Tensor sum_uxh = !xh.has_value() ? torch::stable::new_zeros(rd, {0})
                   : empty         ? torch::stable::new_zeros(rd, {K, G})
                                   : torch::stable::new_empty(rd, {K, G});
  if (empty) return std::make_tuple(sum_u, sum_uxh);
  const Tensor sc = torch::stable::contiguous(scale);
  const std::optional<Tensor> x = fc_contiguous(xh), de = fc_contiguous(delta), cr = fc_contiguous(crg), d = fc_contiguous(d1);
  const Tensor r = input_grad ? rd : torch::stable::contiguous(rd);  // read-only without input_grad
  const auto [bg, blocks] = fc_group_blocks(op, K, G, S);
  const cudaStream_t stream = fc_stream(rd);
  fc_dispatch_float(rd.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    auto p = [](const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr<T>() : nullptr; };
    bn_eval_rop_bwd_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        r.const_data_ptr<T>(), input_grad ? rd.mutable_data_ptr<T>() : nullptr, sc.const_data_ptr<T>(), p(x), p(de), p(cr), p(d),
        sum_u.mutable_data_ptr<T>(), xh.has_value() ? sum_uxh.mutable_data_ptr<T>() : nullptr, N, K, G, S, bg);
  });
  fc_check_launch(op);
  return std::make_tuple(sum_u, sum_uxh);
}

}  // namespace
}  // namespace fastcurv_cuda

STABLE_TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) { m.impl("bn_eval_rop_bwd", TORCH_BOX(&fastcurv_cuda::bn_eval_rop_bwd_cuda)); }
