#include <torch/library.h>
#include "common.h"

namespace {

at::Tensor act_rop_bwd_cpu(const at::Tensor& d1, const at::Tensor& d2g, const at::Tensor& rz, const at::Tensor& rg) {
  TORCH_CHECK(d1.dim() == 2 && d2g.sizes() == d1.sizes(), "act_rop_bwd: d1 and d2g must both be [B, M]");
  TORCH_CHECK(rz.dim() == 3 && rz.sizes() == rg.sizes(), "act_rop_bwd: rz and rg must both be [B, K, M]");
  TORCH_CHECK(rz.size(0) == d1.size(0) && rz.size(2) == d1.size(1), "act_rop_bwd: rz ", rz.sizes(), " does not match d1 ", d1.sizes());
  auto a = d1.contiguous(), b = d2g.contiguous(), z = rz.contiguous(), g = rg.contiguous();
  auto out = at::empty_like(g);
  const int64_t B = z.size(0), K = z.size(1), M = z.size(2);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "act_rop_bwd_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    fc_parallel_rows(B * K, M, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* arow = ap + (row / K) * M;
        const scalar_t* brow = bp + (row / K) * M;
        const scalar_t* zrow = zp + row * M;
        const scalar_t* grow = gp + row * M;
        scalar_t* orow = op + row * M;
        for (int64_t i = 0; i < M; ++i) orow[i] = arow[i] * grow[i] + brow[i] * zrow[i];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("act_rop_bwd", &act_rop_bwd_cpu); }
