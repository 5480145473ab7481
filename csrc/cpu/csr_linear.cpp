// A linear layer whose input is a sparse (CSR) data matrix, for R replicas at once (CPU).
//
// X [N, in] is given once as CSR (indptr [N+1] int64, indices [nnz] int32, values [nnz]); a
// minibatch is a table of row ids rows [R, B] (each replica its own rows; a stride-0 first axis
// shares them). With the weight stored transposed, wt [R, in, out]:
//   csr_linear:        z[r, b, :]  = bias[r, :] + sum_k values[k] * wt[r, indices[k], :],  k in row rows[r, b]
//   csr_linear_wgrad:  out[r, j, :] = sum_b sum_{k in row rows[r, b], indices[k] == j} values[k] * grad[r, b, :]
// i.e. X[rows[r]] @ W_r^T and X[rows[r]]^T @ grad_r, with only the nonzero inputs multiplied. MNIST
// pixels are 81% zero, so the first layer of an MLP on MNIST does a fifth of the dense GEMM's work.
// Each nonzero adds a scaled row of `out` contiguous numbers; the row tile being accumulated is
// held in vector registers (z) or read-modified-written in L1/L2 (the weight gradient, whose
// [in, out] block of a replica is 0.4 MB for 784 x 128). Written with GCC/Clang vector extensions;
// on x86-64 the loops are compiled again for AVX2 + FMA and for AVX-512, chosen at run time.
#include <torch/library.h>
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

#define FC_ALWAYS_INLINE inline __attribute__((always_inline))
// Lambdas are inlined too, so that their loops are compiled for the caller's target (AVX2/AVX-512).
#define FC_LAMBDA_INLINE __attribute__((always_inline))

// The vector helpers are always inlined, so the ABI of returning a vector never matters.
#pragma GCC diagnostic ignored "-Wpsabi"
// BYTES-wide vectors of GCC's vector extension, allowed at any element-aligned address.
template <typename S, int BYTES>
struct Lanes {
  typedef S V __attribute__((vector_size(BYTES), aligned(sizeof(S))));
  static constexpr int kWidth = BYTES / sizeof(S);
  static FC_ALWAYS_INLINE V load(const S* p) { return *reinterpret_cast<const V*>(p); }
  static FC_ALWAYS_INLINE V zero() { return V{}; }
  static FC_ALWAYS_INLINE V splat(S s) { return V{} + s; }
};

// z row tile of NV vectors: acc = init; acc += v_k * w[idx_k] over the row's nonzeros.
template <typename S, int BYTES, int NV>
FC_ALWAYS_INLINE void fwd_tile(const int32_t* idx, const S* val, int64_t nnz, const S* w, int64_t ldw,
                               const S* init, S* z) {
  using L = Lanes<S, BYTES>;
  using V = typename L::V;
  V acc[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) acc[i] = init ? L::load(init + i * L::kWidth) : L::zero();
  for (int64_t k = 0; k < nnz; ++k) {
    const V* wr = reinterpret_cast<const V*>(w + static_cast<int64_t>(idx[k]) * ldw);
    const V v = L::splat(val[k]);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[i] += v * wr[i];
  }
  V* zv = reinterpret_cast<V*>(z);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) zv[i] = acc[i];
}

// o[idx_k, tile] += v_k * g[tile] for the nonzeros of one CSR row, g's tile held in NV vectors.
template <typename S, int BYTES, int NV>
FC_ALWAYS_INLINE void wgrad_tile(const int32_t* idx, const S* val, int64_t nnz, const S* g, int64_t ldo, S* o) {
  using L = Lanes<S, BYTES>;
  using V = typename L::V;
  V gv[NV];
  const V* gp = reinterpret_cast<const V*>(g);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) gv[i] = gp[i];
  for (int64_t k = 0; k < nnz; ++k) {
    V* orow = reinterpret_cast<V*>(o + static_cast<int64_t>(idx[k]) * ldo);
    const V v = L::splat(val[k]);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) orow[i] += v * gv[i];
  }
}

template <typename S>
struct Csr {
  const int64_t* indptr;
  const int32_t* indices;
  const S* values;
};

// Arguments of one call; `rows` is indexed with strides rs0 (replica) and rs1 (batch row).
template <typename S>
struct Args {
  Csr<S> X;
  const int64_t* rows;
  int64_t rs0, rs1, B, in, out;
  const S* w;     // fwd: weight_t [R, in, out]; wgrad: grad [R, B, out]
  const S* bias;  // fwd only, may be null
  S* dst;         // fwd: z [R, B, out]; wgrad: out [R, in, out]
};

// Both ops run the output columns in tiles (8 vectors, then single vectors, then scalars), each
// tile over all rows of a replica before the next, so that the weight (gradient) rows a tile reads
// stay in L2 even when `out` is wide (K probes x 128 outputs in the Hessian-vector products).

// z rows [b0, b1) of replica r.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_rows(const Args<S>& a, int64_t r, int64_t b0, int64_t b1) {
  constexpr int W = Lanes<S, BYTES>::kWidth;
  const S* w = a.w + r * a.in * a.out;
  const S* bias = a.bias ? a.bias + r * a.out : nullptr;
  auto each_row = [&](auto&& f) FC_LAMBDA_INLINE {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = a.rows[r * a.rs0 + b * a.rs1];
      const int64_t k0 = a.X.indptr[row], k1 = a.X.indptr[row + 1];
      f(a.X.indices + k0, a.X.values + k0, k1 - k0, a.dst + (r * a.B + b) * a.out);
    }
  };
  int64_t c = 0;
  for (; c + 8 * W <= a.out; c += 8 * W)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, S* z) FC_LAMBDA_INLINE {
      fwd_tile<S, BYTES, 8>(idx, val, nnz, w + c, a.out, bias ? bias + c : nullptr, z + c);
    });
  for (; c + W <= a.out; c += W)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, S* z) FC_LAMBDA_INLINE {
      fwd_tile<S, BYTES, 1>(idx, val, nnz, w + c, a.out, bias ? bias + c : nullptr, z + c);
    });
  for (; c < a.out; ++c)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, S* z) FC_LAMBDA_INLINE {
      S acc = bias ? bias[c] : S(0);
      for (int64_t k = 0; k < nnz; ++k) acc += val[k] * w[static_cast<int64_t>(idx[k]) * a.out + c];
      z[c] = acc;
    });
}

// out[r] for replica r: zeroed, then every row's nonzeros added.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_replica(const Args<S>& a, int64_t r) {
  constexpr int W = Lanes<S, BYTES>::kWidth;
  S* o = a.dst + r * a.in * a.out;
  std::memset(o, 0, sizeof(S) * a.in * a.out);
  auto each_row = [&](auto&& f) FC_LAMBDA_INLINE {
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t row = a.rows[r * a.rs0 + b * a.rs1];
      const int64_t k0 = a.X.indptr[row], k1 = a.X.indptr[row + 1];
      f(a.X.indices + k0, a.X.values + k0, k1 - k0, a.w + (r * a.B + b) * a.out);
    }
  };
  int64_t c = 0;
  for (; c + 8 * W <= a.out; c += 8 * W)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, const S* g) FC_LAMBDA_INLINE {
      wgrad_tile<S, BYTES, 8>(idx, val, nnz, g + c, a.out, o + c);
    });
  for (; c + W <= a.out; c += W)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, const S* g) FC_LAMBDA_INLINE {
      wgrad_tile<S, BYTES, 1>(idx, val, nnz, g + c, a.out, o + c);
    });
  for (; c < a.out; ++c)
    each_row([&](const int32_t* idx, const S* val, int64_t nnz, const S* g) FC_LAMBDA_INLINE {
      for (int64_t k = 0; k < nnz; ++k) o[static_cast<int64_t>(idx[k]) * a.out + c] += val[k] * g[c];
    });
}

// fwd: the rows p in [p0, p1) of the flattened R x B, replica by replica; wgrad: replicas [p0, p1).
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_range(const Args<S>& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1;) {
    const int64_t r = p / a.B, b1 = std::min(a.B, p1 - r * a.B);
    fwd_rows<S, BYTES>(a, r, p - r * a.B, b1);
    p = r * a.B + b1;
  }
}

template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_range(const Args<S>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) wgrad_replica<S, BYTES>(a, r);
}

template <typename S>
using RangeFn = void (*)(const Args<S>&, int64_t, int64_t);

template <typename S>
void fwd_default(const Args<S>& a, int64_t p0, int64_t p1) { fwd_range<S, 16>(a, p0, p1); }
template <typename S>
void wgrad_default(const Args<S>& a, int64_t p0, int64_t p1) { wgrad_range<S, 16>(a, p0, p1); }

// x86-64: the same loops for AVX2 + FMA (ymm) and AVX-512 (zmm), picked at run time. Contraction of
// acc + v * w into FMAs is enabled here (ISO C++ mode turns it off by default).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define FC_HAVE_X86_VARIANTS 1
#define FC_X86_VARIANT(NAME, BODY, BYTES, TARGET)                                                          \
  template <typename S>                                                                                    \
  __attribute__((target(TARGET), optimize("fp-contract=fast"))) void NAME(const Args<S>& a, int64_t p0, \
                                                                          int64_t p1) {                  \
    BODY<S, BYTES>(a, p0, p1);                                                                             \
  }
FC_X86_VARIANT(fwd_avx2, fwd_range, 32, "avx2,fma")
FC_X86_VARIANT(wgrad_avx2, wgrad_range, 32, "avx2,fma")
FC_X86_VARIANT(fwd_avx512, fwd_range, 64, "avx512f,avx512vl,fma")
FC_X86_VARIANT(wgrad_avx512, wgrad_range, 64, "avx512f,avx512vl,fma")
#undef FC_X86_VARIANT
#endif

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline; FASTCURV_CPU_LEVEL caps it (the tests run every variant).
int fc_x86_level() {
  int level = 0;
#ifdef FC_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
  if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) level = 2;
#endif
  if (const char* cap = std::getenv("FASTCURV_CPU_LEVEL")) level = std::min(level, std::atoi(cap));
  return level;
}

template <typename S>
RangeFn<S> pick(RangeFn<S> avx512, RangeFn<S> avx2, RangeFn<S> baseline) {
  switch (fc_x86_level()) {
    case 2: return avx512 ? avx512 : baseline;
    case 1: return avx2 ? avx2 : baseline;
    default: return baseline;
  }
}

#ifdef FC_HAVE_X86_VARIANTS
template <typename S>
RangeFn<S> pick_fwd() { return pick<S>(&fwd_avx512<S>, &fwd_avx2<S>, &fwd_default<S>); }
template <typename S>
RangeFn<S> pick_wgrad() { return pick<S>(&wgrad_avx512<S>, &wgrad_avx2<S>, &wgrad_default<S>); }
#else
template <typename S>
RangeFn<S> pick_fwd() { return &fwd_default<S>; }
template <typename S>
RangeFn<S> pick_wgrad() { return &wgrad_default<S>; }
#endif

// Checks shared by both ops (the column indices are validated once, where the CSR matrix is built);
// returns (R, B).
std::tuple<int64_t, int64_t> check_csr(const char* op, const at::Tensor& indptr, const at::Tensor& indices,
                                       const at::Tensor& values, const at::Tensor& rows) {
  TORCH_CHECK(indptr.dim() == 1 && indptr.scalar_type() == at::kLong && indptr.is_contiguous() && indptr.numel() >= 1,
              op, ": indptr must be a contiguous int64 vector [N+1]");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kInt && indices.is_contiguous(), op,
              ": indices must be a contiguous int32 vector [nnz]");
  TORCH_CHECK(values.dim() == 1 && values.numel() == indices.numel() && values.is_contiguous(), op,
              ": values must be a contiguous vector with one entry per index, got ", values.sizes(), " for ",
              indices.numel(), " indices");
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kLong, op, ": rows must be int64 [R, B], got ",
              rows.scalar_type(), " ", rows.sizes());
  const int64_t N = indptr.numel() - 1;
  TORCH_CHECK(indptr.data_ptr<int64_t>()[N] == indices.numel(), op, ": indptr[-1] = ", indptr.data_ptr<int64_t>()[N],
              " but there are ", indices.numel(), " indices");
  if (rows.numel()) {
    auto mm = at::aminmax(rows);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < N, op, ": rows must lie in [0, ", N, "), got [", lo, ", ", hi, "]");
  }
  return {rows.size(0), rows.size(1)};
}

at::Tensor csr_linear_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                          const at::Tensor& rows, const at::Tensor& wt, const std::optional<at::Tensor>& bias) {
  auto [R, B] = check_csr("csr_linear", indptr, indices, values, rows);
  TORCH_CHECK(wt.dim() == 3 && wt.size(0) == R && wt.is_contiguous(), "csr_linear: weight_t must be a contiguous [R, in, out] = [",
              R, ", in, out] tensor, got ", wt.sizes(), wt.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(wt.scalar_type() == values.scalar_type(), "csr_linear: weight_t is ", wt.scalar_type(), " but values are ",
              values.scalar_type());
  const int64_t in = wt.size(1), out = wt.size(2);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == R && b.size(1) == out && b.is_contiguous() &&
                    b.scalar_type() == wt.scalar_type(),
                "csr_linear: bias must be a contiguous [R, out] = [", R, ", ", out, "] tensor of the weight's dtype, got ",
                b.sizes());
  }
  at::Tensor z = at::empty({R, B, out}, wt.options());
  if (R * B == 0 || out == 0) return z;
  AT_DISPATCH_FLOATING_TYPES(wt.scalar_type(), "csr_linear", [&] {
    const RangeFn<scalar_t> fn = pick_fwd<scalar_t>();
    const Args<scalar_t> a{{indptr.data_ptr<int64_t>(), indices.data_ptr<int32_t>(), values.data_ptr<scalar_t>()},
                           rows.data_ptr<int64_t>(), rows.stride(0), rows.stride(1), B, in, out,
                           wt.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                           z.data_ptr<scalar_t>()};
    at::parallel_for(0, R * B, 16, [&](int64_t p0, int64_t p1) { fn(a, p0, p1); });
  });
  return z;
}

void csr_linear_wgrad_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                          const at::Tensor& rows, const at::Tensor& grad, const at::Tensor& out) {
  auto [R, B] = check_csr("csr_linear_wgrad", indptr, indices, values, rows);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == R && grad.size(1) == B && grad.is_contiguous(),
              "csr_linear_wgrad: grad must be a contiguous [R, B, out] = [", R, ", ", B, ", out] tensor, got ", grad.sizes());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == R && out.size(2) == grad.size(2) && out.is_contiguous(),
              "csr_linear_wgrad: out must be a contiguous [R, in, out] = [", R, ", in, ", grad.size(2), "] tensor, got ",
              out.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type() && out.scalar_type() == values.scalar_type(),
              "csr_linear_wgrad: values, grad and out must share one dtype");
  const int64_t in = out.size(1), nout = out.size(2);
  if (R == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "csr_linear_wgrad", [&] {
    const RangeFn<scalar_t> fn = pick_wgrad<scalar_t>();
    const Args<scalar_t> a{{indptr.data_ptr<int64_t>(), indices.data_ptr<int32_t>(), values.data_ptr<scalar_t>()},
                           rows.data_ptr<int64_t>(), rows.stride(0), rows.stride(1), B, in, nout,
                           grad.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>()};
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_wgrad", &csr_linear_wgrad_cpu);
}
