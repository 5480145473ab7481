#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#define FC_ALWAYS_INLINE inline __attribute__((always_inline))
// Lambdas are inlined too, so that their loops are compiled for the caller's target (AVX2/AVX-512).
#define FC_LAMBDA_INLINE __attribute__((always_inline))

// Rows of `outer` independent lines of length `inner`, split over threads in blocks of rows.
template <typename F>
inline void fc_parallel_rows(int64_t outer, int64_t inner, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(inner, 1));
  at::parallel_for(0, outer, grain, f);
}


// BYTES-wide vectors of GCC's vector extension, allowed at any element-aligned address. The helpers
// are always inlined, so the ABI of returning a vector never matters (hence no -Wpsabi notes).
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename S, int BYTES>
struct FcLanes {
  typedef S V __attribute__((vector_size(BYTES), aligned(sizeof(S))));
  static constexpr int kWidth = BYTES / sizeof(S);
  static FC_ALWAYS_INLINE V load(const S* p) { return *reinterpret_cast<const V*>(p); }
  static FC_ALWAYS_INLINE void store(S* p, V v) { *reinterpret_cast<V*>(p) = v; }
  static FC_ALWAYS_INLINE V zero() { return V{}; }
  static FC_ALWAYS_INLINE V splat(S s) { return V{} + s; }
  // Lanes [0, W/2): a[2l] + a[2l+1]; lanes [W/2, W): the same of b.
  static FC_ALWAYS_INLINE V fold(V a, V b) {
    return stride2<0>(a, b, std::make_index_sequence<kWidth>{}) + stride2<1>(a, b, std::make_index_sequence<kWidth>{});
  }
  // z[c] += the sum of s[c]'s lanes for c < n <= W, by log2(W) rounds of fold over all W vectors at
  // once (s is overwritten): W - 1 folds in place of W (W - 1) scalar adds in a dependent chain.
  static FC_ALWAYS_INLINE void add_lane_sums(V* s, int n, S* z) {
    for (int c = n; c < kWidth; ++c) s[c] = zero();
#pragma GCC unroll 8
    for (int m = kWidth; m > 1; m /= 2) {
#pragma GCC unroll 16
      for (int j = 0; j < m / 2; ++j) s[j] = fold(s[2 * j], s[2 * j + 1]);
    }
    for (int c = 0; c < n; ++c) z[c] += s[0][c];
  }

 private:
  // Lanes ODD, ODD + 2, ... of the concatenation a|b.
  template <int ODD, std::size_t... I>
  static FC_ALWAYS_INLINE V stride2(V a, V b, std::index_sequence<I...>) {
#if defined(__clang__) || __GNUC__ >= 12
    return __builtin_shufflevector(a, b, (2 * I + ODD)...);
#else
    typedef std::conditional_t<sizeof(S) == 4, int32_t, int64_t> M __attribute__((vector_size(BYTES)));
    return __builtin_shuffle(a, b, M{(2 * I + ODD)...});
#endif
  }
};

// A per-thread buffer of at least n elements (reused across calls; SLOT tells apart buffers in use
// at once), 64-byte aligned: rows of a tile start on cache lines, so a 64-byte vector access never
// straddles two (with std::vector's 16-byte alignment csr_linear's weight gradient ran 1.6x slower).
template <typename S, int SLOT>
S* fc_scratch(int64_t n) {
  thread_local std::vector<S> buf;
  constexpr int64_t pad = 64 / sizeof(S);
  if (static_cast<int64_t>(buf.size()) < n + pad) buf.resize(static_cast<size_t>(n + pad));
  const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<S*>((addr + 63) & ~std::uintptr_t(63));
}

// sum_s u[s] * v[s]: in T over 16 independent lanes (vectorizes, and breaks the add latency
// chain), returned in double for the caller's totals over many segments.
template <typename T>
FC_ALWAYS_INLINE double fc_dot(const T* u, const T* v, int64_t S) {
  constexpr int L = 16;
  T b[L] = {0};
  int64_t s = 0;
  for (; s + L <= S; s += L) {
    for (int l = 0; l < L; ++l) b[l] += u[s + l] * v[s + l];
  }
  for (int l = 0; s < S; ++s, ++l) b[l] += u[s] * v[s];
  double tb = 0;
  for (int l = 0; l < L; ++l) tb += double(b[l]);
  return tb;
}

// su += sum_s u[s] and suv += sum_s u[s] * v[s], lanes as in fc_dot.
template <typename T>
FC_ALWAYS_INLINE void fc_sum_and_dot(const T* u, const T* v, int64_t S, double& su, double& suv) {
  constexpr int L = 16;
  T a[L] = {0}, b[L] = {0};
  int64_t s = 0;
  for (; s + L <= S; s += L) {
    for (int l = 0; l < L; ++l) {
      a[l] += u[s + l];
      b[l] += u[s + l] * v[s + l];
    }
  }
  for (int l = 0; s < S; ++s, ++l) {
    a[l] += u[s];
    b[l] += u[s] * v[s];
  }
  double ta = 0, tb = 0;
  for (int l = 0; l < L; ++l) {
    ta += double(a[l]);
    tb += double(b[l]);
  }
  su += ta;
  suv += tb;
}

// Grain of a parallel loop over the groups (replica x channel) of a [.., G, S] layout: at least 64
// contiguous values per row and task.
inline int64_t fc_group_grain(int64_t S) { return std::max<int64_t>(1, 64 / std::max<int64_t>(S, 1)); }

// For every sample n < N, every tile [t0, t1) of the groups [g0, g1) of a [N, G, S] layout and every
// probe k < K, in that order: body(n, k, t0, t1). A tile spans 4096 values of each [N, G, S] operand
// (16 KiB of float32), which stay in L1 while the K probes' rows read them.
template <typename F>
FC_ALWAYS_INLINE void fc_for_group_tiles(int64_t N, int64_t K, int64_t S, int64_t g0, int64_t g1, const F& body) {
  const int64_t tile = std::max<int64_t>(1, 4096 / S);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t0 = g0; t0 < g1; t0 += tile) {
      const int64_t t1 = std::min(g1, t0 + tile);
      for (int64_t k = 0; k < K; ++k) body(n, k, t0, t1);
    }
  }
}

// t, or a contiguous copy where the rows of its last dimension are not contiguous (other strides free).
inline at::Tensor fc_rows_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// Checks an optional operand against the tensor `ref` it is used with (CPU, same dtype, given sizes).
inline void fc_check_operand(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                             const std::optional<at::Tensor>& t, at::IntArrayRef sizes) {
  TORCH_CHECK(ref.device().is_cpu(), op, ": ", ref_name, " must be a CPU tensor, got ", ref.device());
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op, ": ", ref_name,
              " must be float32 or float64, got ", ref.scalar_type());
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == sizes, op, ": ", name, " must be ", sizes, ", got ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": dtype mismatch, ", name, " is ", t->scalar_type(), " but ",
              ref_name, " is ", ref.scalar_type());
}

// The contiguous form of an optional operand (undefined when absent), and its data (nullptr when undefined).
inline at::Tensor fc_contiguous(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }
template <typename T>
inline T* fc_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Calls fn(std::bool_constant<flags[0]>{}, ..., std::bool_constant<flags[N-1]>{}): runtime flags
// turned into template arguments, so that each combination gets branch-free inner loops.
template <int N, typename F, typename... B>
inline void fc_dispatch_flags(std::array<bool, N> flags, const F& fn, B... b) {
  if constexpr (sizeof...(B) == N) {
    fn(b...);
  } else if (flags[sizeof...(B)]) {
    fc_dispatch_flags<N>(flags, fn, b..., std::true_type{});
  } else {
    fc_dispatch_flags<N>(flags, fn, b..., std::false_type{});
  }
}

// x86-64 with GCC/Clang: kernels define AVX2 and AVX-512 clones of their range functions
// (__attribute__((target(...))) around always-inlined loops) and pick one with fc_pick.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define FC_HAVE_X86_VARIANTS 1
#endif

// The x86 vector level the kernels with per-ISA variants use: 2: AVX-512, 1: AVX2 + FMA, 0: baseline;
// FASTCURV_CPU_LEVEL caps it (the tests run every variant).
inline int fc_x86_level() {
  int level = 0;
#ifdef FC_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
  if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) level = 2;
#endif
  if (const char* cap = std::getenv("FASTCURV_CPU_LEVEL")) level = std::min(level, std::atoi(cap));
  return level;
}

// One of a kernel's ISA variants by fc_x86_level() (nullptr variants fall back to the baseline).
template <typename Fn>
inline Fn fc_pick(Fn avx512, Fn avx2, Fn baseline) {
  switch (fc_x86_level()) {
    case 2: return avx512 ? avx512 : baseline;
    case 1: return avx2 ? avx2 : baseline;
    default: return baseline;
  }
}

// ISA variants of a kernel's range function F(args, begin, end) (always inlined, so that its loops
// are compiled for each variant's target, with contraction into FMAs), and the one fc_pick chooses.
template <auto F, typename A>
void fc_range_base(const A& a, int64_t begin, int64_t end) { F(a, begin, end); }
#ifdef FC_HAVE_X86_VARIANTS
template <auto F, typename A>
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void fc_range_avx2(const A& a, int64_t begin, int64_t end) {
  F(a, begin, end);
}
template <auto F, typename A>
__attribute__((target("avx512f,avx512vl,fma"), optimize("fp-contract=fast"))) void fc_range_avx512(const A& a, int64_t begin,
                                                                                                    int64_t end) {
  F(a, begin, end);
}
#endif
template <typename A>
using FcRangeFn = void (*)(const A&, int64_t, int64_t);
// fc_pick_range_widths takes one range function per vector width, for kernels written with FcLanes:
// F64 (64-byte vectors) for AVX-512, F32 for AVX2, F16 for the baseline (wider GCC vectors than the
// target has are split into several registers, which for AVX2 ran a 64-byte kernel 7x slower).
template <auto F64, auto F32, auto F16, typename A>
FcRangeFn<A> fc_pick_range_widths() {
#ifdef FC_HAVE_X86_VARIANTS
  return fc_pick<FcRangeFn<A>>(&fc_range_avx512<F64, A>, &fc_range_avx2<F32, A>, &fc_range_base<F16, A>);
#else
  return &fc_range_base<F16, A>;
#endif
}
template <auto F, typename A>
FcRangeFn<A> fc_pick_range() {
  return fc_pick_range_widths<F, F, F, A>();
}
