// CSR form of G stacked dense matrices (CPU), for csr_linear and csr_masked_linear.
//
// x [G, M, F]; the stored entries are x's nonzeros, or where mask [G, M, F] (bool) is true.
//   transpose = false: the rows of x.reshape(G*M, F): row g*M + m holds the columns f of x[g, m, :];
//   transpose = true:  the rows of the stacked x[g]^T [G*F, M]: row g*F + f holds the m of x[g, :, f].
// Columns ascend within every row. Two passes over x, parallel over row blocks (transpose: over g):
// count the entries per row, then (after a serial prefix sum into indptr) write their columns and
// values, found as bit masks of 64 entries.
#include <torch/library.h>
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// x's rows [G, M] of F contiguous entries (strides sg, sm), and the same for mask (null: x != 0).
template <typename S>
struct Dense {
  const S* x;
  const bool* mask;
  int64_t sg, sm, mg, mm;
  FC_ALWAYS_INLINE int64_t row(int64_t g, int64_t m) const { return g * sg + m * sm; }
  FC_ALWAYS_INLINE const bool* mask_row(int64_t g, int64_t m) const { return mask + g * mg + m * mm; }
};

// Whether entry f of a row is stored: the mask's, or x's nonzeros.
template <typename S, bool MASK>
FC_ALWAYS_INLINE bool stored(const S* xr, const bool* mr, int64_t f) {
  return MASK ? mr[f] : xr[f] != S(0);
}

// Bit j set where entry j of the n <= 64 entries at xr / mr is stored (no branches: ReLU zeros fall at
// random, and branching on them mispredicted half the time: 6x slower than on a full tensor).
template <typename S, bool MASK>
FC_ALWAYS_INLINE uint64_t stored_bits(const S* xr, const bool* mr, int64_t n) {
  uint64_t bits = 0;
  for (int64_t j = 0; j < n; ++j) bits |= uint64_t(stored<S, MASK>(xr, mr, j)) << j;
  return bits;
}

template <typename F>
FC_ALWAYS_INLINE void for_each_bit(uint64_t bits, const F& f) {
  for (; bits; bits &= bits - 1) f(__builtin_ctzll(bits));
}

// indptr[1..rows] holds the entries per row: turned into row starts, and the column and value
// tensors allocated for their total.
inline void allocate_entries(int64_t* indptr, int64_t rows, const at::TensorOptions& vopt, at::Tensor& ti, at::Tensor& tv) {
  indptr[0] = 0;
  for (int64_t r = 0; r < rows; ++r) indptr[r + 1] += indptr[r];
  ti = at::empty({indptr[rows]}, vopt.dtype(at::kInt));
  tv = at::empty({indptr[rows]}, vopt);
}

template <typename S, bool MASK>
void fill_rows(const Dense<S>& d, int64_t G, int64_t M, int64_t F, int64_t* indptr, at::Tensor& ti, at::Tensor& tv,
               const at::TensorOptions& vopt) {
  const int64_t rows = G * M;
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / M, m = r % M;
      const S* xr = d.x + d.row(g, m);
      const bool* mr = MASK ? d.mask_row(g, m) : nullptr;
      int64_t c = 0;
      for (int64_t f = 0; f < F; ++f) c += stored<S, MASK>(xr, mr, f);
      indptr[r + 1] = c;
    }
  });
  allocate_entries(indptr, rows, vopt, ti, tv);
  int32_t* idx = ti.data_ptr<int32_t>();
  S* val = tv.data_ptr<S>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / M, m = r % M;
      const S* xr = d.x + d.row(g, m);
      const bool* mr = MASK ? d.mask_row(g, m) : nullptr;
      int64_t k = indptr[r];
      for (int64_t f0 = 0; f0 < F; f0 += 64) {
        const uint64_t bits = stored_bits<S, MASK>(xr + f0, MASK ? mr + f0 : nullptr, std::min<int64_t>(64, F - f0));
        for_each_bit(bits, [&](int j) { idx[k] = static_cast<int32_t>(f0 + j), val[k++] = xr[f0 + j]; });
      }
    }
  });
}

template <typename S, bool MASK>
void fill_columns(const Dense<S>& d, int64_t G, int64_t M, int64_t F, int64_t* indptr, at::Tensor& ti, at::Tensor& tv,
                  const at::TensorOptions& vopt) {
  const int64_t rows = G * F;
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      int64_t* cnt = indptr + g * F + 1;
      for (int64_t f = 0; f < F; ++f) cnt[f] = 0;
      for (int64_t m = 0; m < M; ++m) {
        const S* xr = d.x + d.row(g, m);
        const bool* mr = MASK ? d.mask_row(g, m) : nullptr;
        for (int64_t f = 0; f < F; ++f) cnt[f] += stored<S, MASK>(xr, mr, f);
      }
    }
  });
  allocate_entries(indptr, rows, vopt, ti, tv);
  int32_t* idx = ti.data_ptr<int32_t>();
  S* val = tv.data_ptr<S>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<int64_t> cur(static_cast<size_t>(F));
    std::vector<uint64_t> bits(static_cast<size_t>(F));  // per column f: which of 64 rows m store an entry
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t f = 0; f < F; ++f) cur[f] = indptr[g * F + f];
      for (int64_t m0 = 0; m0 < M; m0 += 64) {
        const int64_t n = std::min<int64_t>(64, M - m0);
        std::fill(bits.begin(), bits.end(), 0);
        for (int64_t j = 0; j < n; ++j) {
          const S* xr = d.x + d.row(g, m0 + j);
          const bool* mr = MASK ? d.mask_row(g, m0 + j) : nullptr;
          for (int64_t f = 0; f < F; ++f) bits[f] |= uint64_t(stored<S, MASK>(xr, mr, f)) << j;
        }
        for (int64_t f = 0; f < F; ++f)
          for_each_bit(bits[f], [&](int j) {
            const int64_t k = cur[f]++;
            idx[k] = static_cast<int32_t>(m0 + j), val[k] = d.x[d.row(g, m0 + j) + f];
          });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_dense_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                                  bool transpose) {
  TORCH_CHECK(x.dim() == 3 && x.is_floating_point(), "csr_from_dense: x must be a floating-point [G, M, F] tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) <= 1, "csr_from_dense: x's last dim must be contiguous, got strides ", x.strides());
  const int64_t G = x.size(0), M = x.size(1), F = x.size(2);
  TORCH_CHECK((transpose ? M : F) < (int64_t(1) << 31), "csr_from_dense: ", transpose ? M : F,
              " columns do not fit int32 column indices");
  at::Tensor mk;
  if (mask.has_value() && mask->defined()) {
    mk = *mask;
    TORCH_CHECK(mk.scalar_type() == at::kBool && mk.sizes() == x.sizes(), "csr_from_dense: mask must be a bool tensor of x's shape ",
                x.sizes(), ", got ", mk.scalar_type(), " ", mk.sizes());
    TORCH_CHECK(mk.stride(2) == 1 || mk.size(2) <= 1, "csr_from_dense: mask's last dim must be contiguous, got strides ",
                mk.strides());
  }
  const int64_t rows = transpose ? G * F : G * M;
  at::Tensor indptr = at::empty({rows + 1}, x.options().dtype(at::kLong));
  at::Tensor ti, tv;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_from_dense", [&] {
    Dense<scalar_t> d{x.data_ptr<scalar_t>(), mk.defined() ? mk.data_ptr<bool>() : nullptr, x.stride(0), x.stride(1),
                      mk.defined() ? mk.stride(0) : 0, mk.defined() ? mk.stride(1) : 0};
    int64_t* ip = indptr.data_ptr<int64_t>();
    if (transpose)
      mk.defined() ? fill_columns<scalar_t, true>(d, G, M, F, ip, ti, tv, x.options())
                   : fill_columns<scalar_t, false>(d, G, M, F, ip, ti, tv, x.options());
    else
      mk.defined() ? fill_rows<scalar_t, true>(d, G, M, F, ip, ti, tv, x.options())
                   : fill_rows<scalar_t, false>(d, G, M, F, ip, ti, tv, x.options());
  });
  return {indptr, ti, tv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("csr_from_dense", &csr_from_dense_cpu); }
