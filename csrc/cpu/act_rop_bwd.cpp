#include <torch/library.h>
#include "common.h"

namespace {

template <typename T>
struct Args {
  const T *d1, *d2g, *rz, *rg;
  T* out;
  int64_t K, M;
};

// Rows [begin, end) of out [B*K, M] (row = b * K + k); always inlined into its ISA variants
// (fc_pick_range).
template <typename T>
FC_ALWAYS_INLINE void rows(const Args<T>& p, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict__ a = p.d1 + (row / p.K) * p.M;
    const T* __restrict__ b = p.d2g + (row / p.K) * p.M;
    const T* __restrict__ z = p.rz + row * p.M;
    const T* __restrict__ g = p.rg + row * p.M;
    T* __restrict__ o = p.out + row * p.M;
    for (int64_t i = 0; i < p.M; ++i) o[i] = a[i] * g[i] + b[i] * z[i];
  }
}

at::Tensor act_rop_bwd_cpu(const at::Tensor& d1, const at::Tensor& d2g, const at::Tensor& rz, const at::Tensor& rg) {
  TORCH_CHECK(d1.dim() == 2 && d2g.sizes() == d1.sizes(), "act_rop_bwd: d1 and d2g must both be [B, M]");
  TORCH_CHECK(rz.dim() == 3 && rz.sizes() == rg.sizes(), "act_rop_bwd: rz and rg must both be [B, K, M]");
  TORCH_CHECK(rz.size(0) == d1.size(0) && rz.size(2) == d1.size(1), "act_rop_bwd: rz ", rz.sizes(), " does not match d1 ", d1.sizes());
  auto a = d1.contiguous(), b = d2g.contiguous(), z = rz.contiguous(), g = rg.contiguous();
  auto out = at::empty_like(g);
  const int64_t B = z.size(0), K = z.size(1), M = z.size(2);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "act_rop_bwd_cpu", [&] {
    const Args<scalar_t> args{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), K, M};
    const auto fn = fc_pick_range<&rows<scalar_t>, Args<scalar_t>>();
    fc_parallel_rows(B * K, M, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("act_rop_bwd", &act_rop_bwd_cpu); }
