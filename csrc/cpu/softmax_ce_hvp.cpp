#include <torch/library.h>
#include "common.h"

namespace {

at::Tensor softmax_ce_hvp_cpu(const at::Tensor& probs, const at::Tensor& tangent, double scale) {
  TORCH_CHECK(probs.dim() == 3, "softmax_ce_hvp: probs must be [B, N, C], got ", probs.sizes());
  TORCH_CHECK(tangent.dim() == 4, "softmax_ce_hvp: tangent must be [B, K, N, C], got ", tangent.sizes());
  TORCH_CHECK(tangent.size(0) == probs.size(0) && tangent.size(2) == probs.size(1) && tangent.size(3) == probs.size(2),
              "softmax_ce_hvp: tangent ", tangent.sizes(), " does not match probs ", probs.sizes());
  TORCH_CHECK(probs.scalar_type() == tangent.scalar_type(), "softmax_ce_hvp: dtype mismatch");
  auto p = probs.contiguous();
  auto t = tangent.contiguous();
  auto out = at::empty_like(t);
  const int64_t B = t.size(0), K = t.size(1), N = t.size(2), C = t.size(3);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "softmax_ce_hvp_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    fc_parallel_rows(B * K * N, C, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (K * N), n = row % N;
        const scalar_t* prow = pp + (b * N + n) * C;
        const scalar_t* trow = tp + row * C;
        scalar_t* orow = op + row * C;
        // pivoted on the most probable class m (see ops/softmax_ce_hvp.py): t - t_m keeps the
        // precision that t - <p, t> loses at m once p_m rounds to 1
        int64_t m = 0;
        for (int64_t c = 1; c < C; ++c) m = prow[c] > prow[m] ? c : m;
        const scalar_t tm = C > 0 ? trow[m] : scalar_t(0);
        scalar_t dot = 0;
        for (int64_t c = 0; c < C; ++c) dot += prow[c] * (trow[c] - tm);
        for (int64_t c = 0; c < C; ++c) orow[c] = s * prow[c] * ((trow[c] - tm) - dot);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("softmax_ce_hvp", &softmax_ce_hvp_cpu); }
