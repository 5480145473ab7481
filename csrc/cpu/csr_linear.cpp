// A linear layer whose input is a sparse (CSR) data matrix, for R replicas at once (CPU).
//
// X [N, in] is given once as CSR (indptr [N+1] int64, indices [nnz] int32, values [nnz]); a
// minibatch is a table of row ids rows [R, B] (each replica its own rows; a stride-0 first axis
// shares them). With W^T[r] = the transposed weight [in, out] of replica r:
//   csr_linear:        z[r, b, :]   = bias[r, :] + sum_k values[k] * W^T[r][indices[k], :],  k in row rows[r, b]
//   csr_linear_wgrad:  gW^T[r][j, :] = sum_b sum_{k in row rows[r, b], indices[k] == j} values[k] * grad[r, b, :]
//   csr_masked_linear: z[r, b, p, :] = sum_{k in row rows[r, b]} dense[r, b, p, indices[k]] * W^T[r][indices[k], :]
// i.e. X[rows[r]] @ W_r^T and X[rows[r]]^T @ grad_r, with only the nonzero inputs multiplied. MNIST
// pixels are 81% zero, so the first layer of an MLP on MNIST does a fifth of the dense GEMM's work.
// csr_masked_linear takes only the pattern of X (its values are not read): the values come from P
// dense rows per CSR row, e.g. the K probes' tangents of a ReLU layer's output, which are zero
// wherever the output is.
// Each nonzero adds a scaled row of W^T to an output row tile held in vector registers, or a
// scaled output-gradient row tile (in registers) to a row of the weight gradient, which is
// read-modified-written in L1 (the input columns run in blocks, see kBlockBytes). Weights given as
// W [out, in] (the Linear layout) are transposed one tile at a time into a per-thread scratch, and
// gradients wanted in that layout are transposed out of it. Written with GCC/Clang vector
// extensions; on x86-64 the loops are compiled again for AVX2 + FMA and for AVX-512, chosen at run
// time.
#include <torch/library.h>
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// The nonzeros k in [k, kend) of one CSR row whose column is below i1 (columns ascend within a
// row): z (NV vectors in memory) += v_k * w[idx_k]; k moves past them. z is loaded and stored
// only if there are any.
// DENSE: val is a dense row read at the nonzeros' columns, else the CSR values.
template <typename S, int BYTES, int NV, bool DENSE>
FC_ALWAYS_INLINE void fwd_block(const int32_t* idx, const S* val, int64_t& k, int64_t kend, int64_t i1, const S* w,
                                int64_t ldw, S* z) {
  if (k == kend || idx[k] >= i1) return;
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  V* zv = reinterpret_cast<V*>(z);
  V acc[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) acc[i] = zv[i];
  do {
    const V* wr = reinterpret_cast<const V*>(w + static_cast<int64_t>(idx[k]) * ldw);
    const V v = L::splat(DENSE ? val[idx[k]] : val[k]);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[i] += v * wr[i];
  } while (++k < kend && idx[k] < i1);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) zv[i] = acc[i];
}

// fwd_block (DENSE) for M dense rows of one CSR row (val + m * ldv, into z + m * ldz) at once,
// starting at nonzero k: each row of w is loaded once for all M rows, whose M x NV accumulators
// stay in registers (an outer product per nonzero: M + NV loads for M * NV multiply-adds, where
// one row at a time loads NV + 1 for NV). Returns the nonzero after those below i1.
template <typename S, int BYTES, int M, int NV>
FC_ALWAYS_INLINE int64_t fwd_block_rows(const int32_t* idx, const S* val, int64_t ldv, int64_t k, int64_t kend, int64_t i1,
                                        const S* w, int64_t ldw, S* z, int64_t ldz) {
  if (k == kend || idx[k] >= i1) return k;
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  V acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[m][i] = L::load(z + m * ldz + i * L::kWidth);
  do {
    const int64_t j = idx[k];
    const V* wr = reinterpret_cast<const V*>(w + j * ldw);
    V wv[NV];
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) wv[i] = wr[i];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const V v = L::splat(val[j + m * ldv]);
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[m][i] += v * wv[i];
    }
  } while (++k < kend && idx[k] < i1);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) L::store(z + m * ldz + i * L::kWidth, acc[m][i]);
  return k;
}

// The same nonzeros: o[idx_k] (NV vectors, stride ldo) += v_k * g, g's NV vectors held in registers.
template <typename S, int BYTES, int NV>
FC_ALWAYS_INLINE void wgrad_block(const int32_t* idx, const S* val, int64_t& k, int64_t kend, int64_t i1, const S* g,
                                  S* o, int64_t ldo) {
  if (k == kend || idx[k] >= i1) return;
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  V gv[NV];
  const V* gp = reinterpret_cast<const V*>(g);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) gv[i] = gp[i];
  do {
    V* orow = reinterpret_cast<V*>(o + static_cast<int64_t>(idx[k]) * ldo);
    const V v = L::splat(val[k]);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) orow[i] += v * gv[i];
  } while (++k < kend && idx[k] < i1);
}

template <typename S>
struct Csr {
  const int64_t* indptr;
  const int32_t* indices;
  const S* values;
};

// The out index c of a matrix stored in groups of `size` consecutive indices (e.g. the K probes'
// blocks of a Hessian engine's probe tensor [K, O, in], O per group), group g = c / size at g * stride,
// index c % size in it at (c % size) * ld (the rows of W or z^T) or at c % size (the columns of W^T,
// then ld is the row stride). One group of size out: a plain matrix of row stride ld.
struct Groups {
  int64_t size, stride, ld;
  // Offset of out index c (rows: W, z^T) or of its column (cols: W^T).
  int64_t at(int64_t c, bool cols) const { return (c / size) * stride + (c % size) * (cols ? 1 : ld); }
  // Calls f(c0', n) over the pieces of [c0, c0 + n) that lie in one group each.
  template <typename F>
  FC_ALWAYS_INLINE void pieces(int64_t c0, int64_t n, const F& f) const {
    for (int64_t c = c0; c < c0 + n;) {
      const int64_t m = std::min(c0 + n, (c / size + 1) * size) - c;
      f(c, m);
      c += m;
    }
  }
};

// Arguments of one call; `rows` is indexed with strides rs0 (replica) and rs1 (batch row). Weights
// and weight gradients are per replica either W^T [in, out] ("_t", the layout the loops read) or W
// [out, in] (transposed through a per-thread L2 scratch tile); their replica stride is free.
template <typename S>
struct Args {
  Csr<S> X;
  const int64_t* rows;
  int64_t rs0, rs1, B, in, out;
  const S* src;    // fwd: the weight; wgrad: grad [R, B, out] (contiguous)
  int64_t src_rs;  // replica stride of src
  bool src_t;      // fwd: src holds W^T
  const S* bias;   // fwd only, may be null: [R, out] (contiguous)
  const S* dense;  // masked fwd only: the values, kd rows [in] per minibatch row (B counts those rows)
  int64_t dense_rs;  // replica stride of dense
  int64_t kd;        // output rows per minibatch row: 1, or the masked fwd's dense rows per CSR row
  bool by_blocks;    // fwd: work items are (replica, kColBlock output columns), else rows of R x B
  S* dst;          // fwd: z [R, B, out], or z^T [R, out, B] with dst_t; wgrad: the weight gradient
  int64_t dst_rs;  // replica stride of dst (fwd: B * out unless dst_t)
  bool dst_t;      // fwd: dst holds z^T; wgrad: dst holds the gradient of W^T
  Groups src_g, dst_g;  // fwd: where the out index's groups of W or W^T (src) and of z^T (dst_t) lie
  bool accumulate; // add to dst instead of overwriting it
  // fwd, may be null: z's row b (after accumulating) is multiplied by row b / mask_kd of the mask,
  // its column c by mask column c % mask_cols; the mask's rows lie mask_ld apart, replicas mask_rs
  const S* mask;
  int64_t mask_rs, mask_ld, mask_kd, mask_cols;
  // fwd, may be null: the sums over the in rows of W^T (the bias gradient when the weight is an output
  // gradient, as in csr_linear_wgrad_shared), written or added (accumulate) at sums_g.at(c, true) for
  // column c, replicas sums_rs apart
  S* sums;
  int64_t sums_rs;
  Groups sums_g;
};

// b[j * ldb + i] (+)= a[i * lda + j] for i < rows, j < cols: 16 rows of b at a time, each written
// front to back (doubles, and the edges of the float blocks below).
template <typename S, bool ADD>
FC_ALWAYS_INLINE void transpose_blocks(const S* a, int64_t lda, S* b, int64_t ldb, int64_t rows, int64_t cols) {
  constexpr int64_t T = 16;
  for (int64_t j0 = 0; j0 < cols; j0 += T) {
    const int64_t j1 = std::min(cols, j0 + T);
    for (int64_t i = 0; i < rows; ++i) {
      const S* ai = a + i * lda;
      for (int64_t j = j0; j < j1; ++j) {
        if (ADD)
          b[j * ldb + i] += ai[j];
        else
          b[j * ldb + i] = ai[j];
      }
    }
  }
}

// Floats: 8 x 8 blocks through registers, transposed by three rounds of two-input shuffles (pairs
// of rows, then pairs of pairs, then halves); the edges as above. The scalar loops stored one float
// at a time: on the Hessian engine's first layer (a K=8 probe block, 1024 x 784 per replica) the
// forward product took 1.24x the time it took from an already transposed weight (now 0.98x). In the
// engine, in alternation with the scalar loops: W1 matvecs 0.94x (K=1) and 0.955-0.97x (K=8), the
// gradient 0.944x, the default job 0.96x; W2 matvecs 0.97x.
typedef float Fc8 __attribute__((vector_size(32), aligned(4)));
#if defined(__clang__)
#define FC_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else  // GCC before 12 has no __builtin_shufflevector; __builtin_shuffle with a constant mask is the same
typedef int FcI8 __attribute__((vector_size(32)));
#define FC_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, FcI8{__VA_ARGS__})
#endif

template <bool ADD>
FC_ALWAYS_INLINE void transpose8x8(const float* a, int64_t lda, float* b, int64_t ldb) {
  Fc8 r[8], u[8], v[8];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) r[k] = *reinterpret_cast<const Fc8*>(a + k * lda);
#pragma GCC unroll 4
  for (int k = 0; k < 8; k += 2) {  // u[k]: columns 0, 1, 4, 5 of rows k, k+1 interleaved; u[k+1]: 2, 3, 6, 7
    u[k] = FC_SHUFFLE8(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    u[k + 1] = FC_SHUFFLE8(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 8; h += 4) {  // v[h + c]: column c (low half) and c + 4 (high half) of rows h..h+3
    v[h] = FC_SHUFFLE8(u[h], u[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    v[h + 1] = FC_SHUFFLE8(u[h], u[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    v[h + 2] = FC_SHUFFLE8(u[h + 1], u[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    v[h + 3] = FC_SHUFFLE8(u[h + 1], u[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const Fc8 lo = FC_SHUFFLE8(v[c], v[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const Fc8 hi = FC_SHUFFLE8(v[c], v[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    Fc8* bl = reinterpret_cast<Fc8*>(b + c * ldb);
    Fc8* bh = reinterpret_cast<Fc8*>(b + (c + 4) * ldb);
    if (ADD)
      *bl += lo, *bh += hi;
    else
      *bl = lo, *bh = hi;
  }
}

template <bool ADD>
FC_ALWAYS_INLINE void transpose_blocks_f32(const float* a, int64_t lda, float* b, int64_t ldb, int64_t rows, int64_t cols) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t i = 0; i < r8; i += 8)
    for (int64_t j = 0; j < c8; j += 8) transpose8x8<ADD>(a + i * lda + j, lda, b + j * ldb + i, ldb);
  if (c8 < cols) transpose_blocks<float, ADD>(a + c8, lda, b + c8 * ldb, ldb, rows, cols - c8);
  if (r8 < rows) transpose_blocks<float, ADD>(a + r8 * lda, lda, b + r8, ldb, rows - r8, c8);
}

template <typename S>
FC_ALWAYS_INLINE void transpose(const S* a, int64_t lda, S* b, int64_t ldb, int64_t rows, int64_t cols, bool add) {
  if constexpr (std::is_same_v<S, float>) {
    if (add)
      transpose_blocks_f32<true>(a, lda, b, ldb, rows, cols);
    else
      transpose_blocks_f32<false>(a, lda, b, ldb, rows, cols);
  } else if (add) {
    transpose_blocks<S, true>(a, lda, b, ldb, rows, cols);
  } else {
    transpose_blocks<S, false>(a, lda, b, ldb, rows, cols);
  }
}

// Both ops run the output columns in tiles of TW = 8 vectors (then single vectors, then scalars),
// and the input columns in blocks of rows: a block of a TW-wide weight (gradient) tile stays in
// L1 and L2's nearest lines while every minibatch row of a chunk adds its nonzeros in that block
// (streaming the whole tile from L2 for each row ran the AVX-512 loops at a third of the FMA
// rate, the AVX2 ones, with half-width loads, less slowed). A row's output (fwd) or gradient
// (wgrad) tile is then loaded once per block in which the row has nonzeros. Tiles of rows more
// than two tiles wide (K probes x O outputs in the Hessian engine) are gathered into contiguous
// scratch first (the minibatch rows' tiles only when read in more than two blocks), as their long,
// often power-of-two strides would map them onto few cache sets.
template <typename S, int BYTES>
constexpr int64_t kTileCols = 8 * FcLanes<S, BYTES>::kWidth;
// A block spans the rows of kBlockBytes of the tile's storage (rows of stride ldt: where ldt is
// wider than the tile, its rows fill only some of L1's cache sets, so fewer of them fit), about
// the size of L1. Measured on Zen 5 (48 KiB L1, 1 MiB L2) over 24-128 KiB, with each call of the
// Hessian engine's W1 K=8 matvec timed alone (one replica per call, 1000 rows): 48 KiB was the
// fastest or within noise for every product. Against the 64 KiB (AVX-512) and 128 KiB (AVX2) used
// before, it helps most where a row visits a large share of a block's rows (half of them, in the
// transposed products over a ReLU layer's 50% nonzeros: 83-89 -> 66-71 ms for AVX-512 and
// 118-125 -> 101-104 ms for AVX2), the sparse MNIST input's products moved within 5%; at 32 KiB
// those were up to 10% slower than at 48 KiB. AVX2 ran as fast at 64 KiB as at 48 KiB. A compile-
// time constant: machines with a 32 KiB L1 were not measured.
template <int BYTES>
constexpr int64_t kBlockBytes = BYTES >= 32 ? 48 << 10 : 128 << 10;
template <typename S, int BYTES>
FC_ALWAYS_INLINE int64_t block_rows(int64_t ldt) {
  return std::max<int64_t>(16, kBlockBytes<BYTES> / (ldt * int64_t(sizeof(S))));
}
// Whether the minibatch rows' tiles of an output more than two tiles wide are gathered into
// scratch: only when they are read in more than two blocks (AVX2's larger blocks cover MNIST's 784
// inputs in two, and there the gather cost 8% of the weight gradient).
template <typename S, int BYTES>
FC_ALWAYS_INLINE bool gather_rows(const Args<S>& a, int64_t ldt) {
  return a.out > 2 * kTileCols<S, BYTES> && a.in > 2 * block_rows<S, BYTES>(ldt);
}
// Minibatch rows per chunk (their tile: 128 KiB for AVX-512 floats, in L2 with the weight tile).
constexpr int64_t kRowChunk = 256;

// b[i * ldb + j] (+)= a[i * lda + j] for i < rows, j < cols.
template <typename S>
FC_ALWAYS_INLINE void copy_rows(const S* a, int64_t lda, S* b, int64_t ldb, int64_t rows, int64_t cols, bool add) {
  for (int64_t i = 0; i < rows; ++i) {
    const S* ai = a + i * lda;
    S* bi = b + i * ldb;
    if (add)
      for (int64_t j = 0; j < cols; ++j) bi[j] += ai[j];
    else
      std::memcpy(bi, ai, sizeof(S) * cols);
  }
}

// The blocked loops over the minibatch rows [b0, b1) of replica r and nc <= TW columns.
// tile: rows indexed by input column (fwd: W^T, read; wgrad: the gradient of W^T, accumulated),
// stride ldt; rowt: one row per minibatch row (fwd: z, accumulated onto its initial values;
// wgrad: the output gradient, read), stride ldr.
// DENSE (fwd only): the values of row b0 + b are a.dense's row of that index, the pattern is that of
// CSR row rows[(b0 + b) / kd].
template <typename S, int BYTES, bool FWD, bool DENSE = false>
FC_ALWAYS_INLINE void blocked(const Args<S>& a, int64_t r, int64_t b0, int64_t b1, S* tile, int64_t ldt, S* rowt,
                              int64_t ldr, int64_t nc) {
  constexpr int W = FcLanes<S, BYTES>::kWidth;
  const int64_t BI = block_rows<S, BYTES>(ldt);
  const int64_t n = b1 - b0;
  int64_t* cur = fc_scratch<int64_t, 0>(2 * n);  // per row: next nonzero, end of the row
  auto csr_row = [&](int64_t b) FC_LAMBDA_INLINE { return a.rows[r * a.rs0 + (DENSE ? (b0 + b) / a.kd : b0 + b) * a.rs1]; };
  auto vals = [&](int64_t b) FC_LAMBDA_INLINE { return DENSE ? a.dense + r * a.dense_rs + (b0 + b) * a.in : a.X.values; };
  // NV vectors of LB bytes each (LB = BYTES, or narrower for the last columns) from column c
  auto run = [&](auto nv, auto lb, int64_t c) FC_LAMBDA_INLINE {
    constexpr int NV = decltype(nv)::value, LB = decltype(lb)::value;
    constexpr int LW = FcLanes<S, LB>::kWidth;
    for (int64_t b = 0; b < n; ++b) {
      const int64_t row = csr_row(b);
      cur[2 * b] = a.X.indptr[row], cur[2 * b + 1] = a.X.indptr[row + 1];
    }
    for (int64_t i1 = BI; i1 - BI < a.in; i1 += BI)
      for (int64_t b = 0; b < n; ++b) {
        // dense rows of one CSR row four at a time with AVX-512, two with AVX2, a tile in 4-vector
        // pieces (4 x 4 accumulators fit AVX-512's 32 registers, 2 x 4 AVX2's 16). Against one row
        // at a time: AVX-512 1.5x the multiply-add rate in a standalone loop on a 128 x 128 weight;
        // in the Hessian engine's K=8 matvec, the two masked products took 555 -> 330 ms on W2
        // (512 x 512 weights) and 95 -> 84 ms on W1 (128 x 128, whose operands stream from memory
        // at that speed). AVX2, the op alone on those weights: 1.15x and 1.85x.
        if constexpr (DENSE && LB >= 32) {
          constexpr int M = BYTES >= 64 ? 4 : 2;
          if (b + M <= n && (b0 + b) / a.kd == (b0 + b + M - 1) / a.kd) {
            // the next group's rows, dense in this block and z in this tile (a group reads its
            // rows back and forth, which the hardware prefetchers do not follow: cold, from memory,
            // the groups ran 1.5x slower than one row at a time without this, and as fast with it)
            if (b + 2 * M <= n) {
              constexpr int64_t line = 64 / sizeof(S);
              for (int m = M; m < 2 * M; ++m) {
                const S* dn = vals(b + m);
                for (int64_t e = i1 - BI; e < std::min(i1, a.in); e += line) __builtin_prefetch(dn + e);
                for (int64_t e = 0; e < NV * LW; e += line) __builtin_prefetch(rowt + (b + m) * ldr + c + e, 1);
              }
            }
            const int64_t k0 = cur[2 * b];
            int64_t k1 = k0;
            for (int h = 0; h < NV; h += 4)
              k1 = fwd_block_rows<S, LB, M, std::min(NV, 4)>(a.X.indices, vals(b), a.in, k0, cur[2 * b + 1], i1,
                                                             tile + c + h * LW, ldt, rowt + b * ldr + c + h * LW, ldr);
            for (int m = 0; m < M; ++m) cur[2 * (b + m)] = k1;
            b += M - 1;
            continue;
          }
        }
        if (FWD)
          fwd_block<S, LB, NV, DENSE>(a.X.indices, vals(b), cur[2 * b], cur[2 * b + 1], i1, tile + c, ldt, rowt + b * ldr + c);
        else
          wgrad_block<S, LB, NV>(a.X.indices, a.X.values, cur[2 * b], cur[2 * b + 1], i1, rowt + b * ldr + c, tile + c, ldt);
      }
  };
  // Every call of run passes over all the chunk's nonzeros, so the columns past the last 8-vector
  // tile run in as few passes as fit: 4, 2 and 1 vectors, then 32- and 16-byte vectors, then
  // scalars (fewer than 16 bytes' worth). Before, they ran one vector per pass and the rest as
  // scalars: in the Hessian engine (50 MLPs, 1000 MNIST images, AVX-512), hidden layers 96 / 100 /
  // 112 wide took K=1 matvecs 94 / 148 / 124 ms against 63 at 128 (now 50 / 73 / 81 against 59),
  // and 784-300-100-10 MLPs 352 -> 172 ms at K=1, 1.08 -> 0.84-0.87 s at K=8.
  using B_ = std::integral_constant<int, BYTES>;
  int64_t c = 0;
  for (; c + 8 * W <= nc; c += 8 * W) run(std::integral_constant<int, 8>{}, B_{}, c);
  if (c + 4 * W <= nc) run(std::integral_constant<int, 4>{}, B_{}, c), c += 4 * W;
  if (c + 2 * W <= nc) run(std::integral_constant<int, 2>{}, B_{}, c), c += 2 * W;
  if (c + W <= nc) run(std::integral_constant<int, 1>{}, B_{}, c), c += W;
  if constexpr (BYTES > 32)
    if (c + FcLanes<S, 32>::kWidth <= nc)
      run(std::integral_constant<int, 1>{}, std::integral_constant<int, 32>{}, c), c += FcLanes<S, 32>::kWidth;
  if constexpr (BYTES > 16)
    if (c + FcLanes<S, 16>::kWidth <= nc)
      run(std::integral_constant<int, 1>{}, std::integral_constant<int, 16>{}, c), c += FcLanes<S, 16>::kWidth;
  for (; c < nc; ++c)
    for (int64_t b = 0; b < n; ++b) {
      const int64_t row = csr_row(b);
      const int32_t* idx = a.X.indices;
      const S* val = vals(b);
      S* rc = rowt + b * ldr + c;
      for (int64_t k = a.X.indptr[row]; k < a.X.indptr[row + 1]; ++k) {
        if (FWD)
          *rc += (DENSE ? val[idx[k]] : val[k]) * tile[static_cast<int64_t>(idx[k]) * ldt + c];
        else
          tile[static_cast<int64_t>(idx[k]) * ldt + c] += val[k] * *rc;
      }
    }
}

// z's rows [s0, s1) of replica r, columns [c0, c0 + tw) (held at z, rows ldz apart), times a.mask.
template <typename S>
FC_ALWAYS_INLINE void apply_mask(const Args<S>& a, int64_t r, int64_t s0, int64_t s1, int64_t c0, int64_t tw, S* z,
                                 int64_t ldz) {
  for (int64_t b = s0; b < s1; ++b) {
    const S* m = a.mask + r * a.mask_rs + (b / a.mask_kd) * a.mask_ld;
    S* zb = z + (b - s0) * ldz - c0;
    for (int64_t c = c0; c < c0 + tw;) {
      const int64_t m0 = c % a.mask_cols, n = std::min(c0 + tw - c, a.mask_cols - m0);
      for (int64_t j = 0; j < n; ++j) zb[c + j] *= m[m0 + j];
      c += n;
    }
  }
}

// a.sums of replica r, columns [c0, c0 + tw): the sums of the a.in rows of the W^T tile wt (rows ldw
// apart), read while it is in cache.
template <typename S>
FC_ALWAYS_INLINE void weight_sums(const Args<S>& a, int64_t r, int64_t c0, int64_t tw, const S* wt, int64_t ldw) {
  S* t = fc_scratch<S, 2>(tw);
  std::memset(t, 0, sizeof(S) * tw);
  for (int64_t i = 0; i < a.in; ++i)
    for (int64_t j = 0; j < tw; ++j) t[j] += wt[i * ldw + j];
  a.sums_g.pieces(c0, tw, [&](int64_t c, int64_t n) FC_LAMBDA_INLINE {
    S* d = a.sums + r * a.sums_rs + a.sums_g.at(c, true);
    for (int64_t j = 0; j < n; ++j) d[j] = a.accumulate ? d[j] + t[c - c0 + j] : t[c - c0 + j];
  });
}

// z rows [b0, b1), columns [c_lo, c_hi), of replica r.
template <typename S, int BYTES, bool DENSE>
FC_ALWAYS_INLINE void fwd_rows(const Args<S>& a, int64_t r, int64_t b0, int64_t b1, int64_t c_lo, int64_t c_hi) {
  constexpr int64_t TW = kTileCols<S, BYTES>;
  S* w = const_cast<S*>(a.src + r * a.src_rs);  // only read
  const Groups& sg = a.src_g;
  // W^T rows at most two tiles wide, of one group: read in place
  const bool in_place = a.out <= 2 * TW && sg.size == a.out;
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += TW) {
    const int64_t tw = std::min(TW, c_hi - c0);
    S* wt = w + c0;
    int64_t ldw = sg.ld;
    if (!a.src_t || !in_place) {
      wt = fc_scratch<S, 0>(a.in * tw), ldw = tw;
      sg.pieces(c0, tw, [&](int64_t c, int64_t n) FC_LAMBDA_INLINE {
        if (a.src_t)
          copy_rows<S>(w + sg.at(c, true), sg.ld, wt + (c - c0), tw, a.in, n, false);
        else
          transpose<S>(w + sg.at(c, false), sg.ld, wt + (c - c0), tw, n, a.in, false);
      });
    }
    if (a.sums && b0 == 0) weight_sums<S>(a, r, c0, tw, wt, ldw);  // once per replica and tile
    // z^T is written through a row tile too, transposed from there
    const bool gather = a.dst_t || gather_rows<S, BYTES>(a, ldw);
    for (int64_t s0 = b0; s0 < b1; s0 += kRowChunk) {
      const int64_t s1 = std::min(b1, s0 + kRowChunk);
      S* z = a.dst_t ? nullptr : a.dst + r * a.dst_rs + s0 * a.out + c0;  // z^T: by groups below
      S* zt = gather ? fc_scratch<S, 1>(kRowChunk * tw) : z;
      const int64_t ldz = gather ? tw : a.out;
      const bool from_z = a.accumulate && !a.dst_t;  // z^T is added to in the transpose
      for (int64_t b = 0; b < s1 - s0; ++b) {
        if (from_z) {
          if (gather) std::memcpy(zt + b * ldz, z + b * a.out, sizeof(S) * tw);
        } else if (a.bias) {
          std::memcpy(zt + b * ldz, a.bias + r * a.out + c0, sizeof(S) * tw);
        } else {
          std::memset(zt + b * ldz, 0, sizeof(S) * tw);
        }
      }
      blocked<S, BYTES, true, DENSE>(a, r, s0, s1, wt, ldw, zt, ldz, tw);
      if (a.mask) apply_mask<S>(a, r, s0, s1, c0, tw, zt, ldz);
      if (a.dst_t)
        a.dst_g.pieces(c0, tw, [&](int64_t c, int64_t n) FC_LAMBDA_INLINE {
          transpose<S>(zt + (c - c0), tw, a.dst + r * a.dst_rs + a.dst_g.at(c, false) + s0, a.dst_g.ld, s1 - s0, n,
                       a.accumulate);
        });
      else if (gather)
        copy_rows<S>(zt, tw, z, a.out, s1 - s0, tw, false);
    }
  }
}

// Output columns per work item of the weight gradient: items (replica, column block) write disjoint
// parts of the gradient, so they run in parallel even for one replica (one K=8 replica in a chunk).
constexpr int64_t kWgradBlock = 128;

// Columns [c0, c0 + cw) of the weight gradient of replica r.
template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_item(const Args<S>& a, int64_t r, int64_t c0, int64_t cw) {
  constexpr int64_t TW = kTileCols<S, BYTES>;
  S* o = a.dst + r * a.dst_rs;
  const bool in_place = a.out <= 2 * TW;  // gradient rows at most two tiles wide: accumulated in place
  for (int64_t c = c0; c < c0 + cw; c += TW) {
    const int64_t tw = std::min(TW, c0 + cw - c);
    S* ot = o + c;  // the gradient of W^T, accumulated in place or in a zeroed scratch
    int64_t ldo = a.out;
    if (a.dst_t && in_place) {
      if (!a.accumulate)
        for (int64_t j = 0; j < a.in; ++j) std::memset(ot + j * ldo, 0, sizeof(S) * tw);
    } else {
      ot = fc_scratch<S, 0>(a.in * tw), ldo = tw;
      std::memset(ot, 0, sizeof(S) * a.in * tw);
    }
    const bool gather = gather_rows<S, BYTES>(a, ldo);
    for (int64_t s0 = 0; s0 < a.B; s0 += kRowChunk) {
      const int64_t s1 = std::min(a.B, s0 + kRowChunk);
      S* g = const_cast<S*>(a.src + (r * a.B + s0) * a.out + c);  // only read
      S* gt = g;
      int64_t ldg = a.out;
      if (gather) {
        gt = fc_scratch<S, 1>(kRowChunk * tw), ldg = tw;
        copy_rows<S>(g, a.out, gt, tw, s1 - s0, tw, false);
      }
      blocked<S, BYTES, false>(a, r, s0, s1, ot, ldo, gt, ldg, tw);
    }
    if (!a.dst_t)
      transpose<S>(ot, tw, o + c * a.in, a.in, a.in, tw, a.accumulate);
    else if (!in_place)
      copy_rows<S>(ot, tw, o + c, a.out, a.in, tw, a.accumulate);
  }
}

// Output columns per work item of the forward product split by columns (a multiple of every tile
// width, kTileCols).
constexpr int64_t kColBlock = 128;

// fwd: the rows p in [p0, p1) of the flattened R x B, replica by replica, or with by_blocks the work
// items (replica, kColBlock columns) p in [p0, p1); wgrad: the work items (replica, column block).
template <typename S, int BYTES, bool DENSE>
FC_ALWAYS_INLINE void fwd_range(const Args<S>& a, int64_t p0, int64_t p1) {
  if (a.by_blocks) {
    const int64_t nblk = (a.out + kColBlock - 1) / kColBlock;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t c0 = (q % nblk) * kColBlock;
      fwd_rows<S, BYTES, DENSE>(a, q / nblk, 0, a.B, c0, std::min(a.out, c0 + kColBlock));
    }
    return;
  }
  for (int64_t p = p0; p < p1;) {
    const int64_t r = p / a.B, b1 = std::min(a.B, p1 - r * a.B);
    fwd_rows<S, BYTES, DENSE>(a, r, p - r * a.B, b1, 0, a.out);
    p = r * a.B + b1;
  }
}

template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_range(const Args<S>& a, int64_t q0, int64_t q1) {
  const int64_t nblk = (a.out + kWgradBlock - 1) / kWgradBlock;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t c0 = (q % nblk) * kWgradBlock;
    wgrad_item<S, BYTES>(a, q / nblk, c0, std::min(kWgradBlock, a.out - c0));
  }
}

// The loops for AVX-512 (zmm), AVX2 + FMA (ymm) and the baseline, one picked at run time.
template <typename S>
using RangeFn = FcRangeFn<Args<S>>;
template <typename S, bool DENSE = false>
RangeFn<S> pick_fwd() {
  return fc_pick_range_widths<&fwd_range<S, 64, DENSE>, &fwd_range<S, 32, DENSE>, &fwd_range<S, 16, DENSE>, Args<S>>();
}
// Runs the forward product over threads: by (replica, column block) when there are at least
// kMinBlockItems such items (each weight tile is then transposed or gathered once, where splitting
// the rows of one replica among threads made every thread prepare every tile: for a K=8 probe block
// of the Hessian engine's first layer, 784 x 1024, that was 12% of the product), else by rows.
constexpr int64_t kMinBlockItems = 8;
template <typename S>
void run_fwd(RangeFn<S> fn, Args<S>& a, int64_t R) {
  const int64_t items = R * ((a.out + kColBlock - 1) / kColBlock);
  a.by_blocks = items >= kMinBlockItems;
  if (a.by_blocks)
    at::parallel_for(0, items, 1, [&](int64_t p0, int64_t p1) { fn(a, p0, p1); });
  else
    at::parallel_for(0, R * a.B, 16, [&](int64_t p0, int64_t p1) { fn(a, p0, p1); });
}

template <typename S>
RangeFn<S> pick_wgrad() {
  return fc_pick_range_widths<&wgrad_range<S, 64>, &wgrad_range<S, 32>, &wgrad_range<S, 16>, Args<S>>();
}

// Checks of the CSR pattern and the row table, shared by all ops (the column indices are validated
// once, where the CSR matrix is built); returns (R, B).
std::tuple<int64_t, int64_t> check_pattern(const char* op, const at::Tensor& indptr, const at::Tensor& indices,
                                           const at::Tensor& rows) {
  TORCH_CHECK(indptr.dim() == 1 && indptr.scalar_type() == at::kLong && indptr.is_contiguous() && indptr.numel() >= 1,
              op, ": indptr must be a contiguous int64 vector [N+1]");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kInt && indices.is_contiguous(), op,
              ": indices must be a contiguous int32 vector [nnz]");
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

// check_pattern and the values.
std::tuple<int64_t, int64_t> check_csr(const char* op, const at::Tensor& indptr, const at::Tensor& indices,
                                       const at::Tensor& values, const at::Tensor& rows) {
  auto rb = check_pattern(op, indptr, indices, rows);
  TORCH_CHECK(values.dim() == 1 && values.numel() == indices.numel() && values.is_contiguous(), op,
              ": values must be a contiguous vector with one entry per index, got ", values.sizes(), " for ",
              indices.numel(), " indices");
  return rb;
}

// The fields of Args that describe the data and the minibatch (values: null for a pattern).
template <typename S>
Args<S> data_args(const at::Tensor& indptr, const at::Tensor& indices, const S* values, const at::Tensor& rows,
                  int64_t in, int64_t out) {
  Args<S> a{};
  a.X = {indptr.data_ptr<int64_t>(), indices.data_ptr<int32_t>(), values};
  a.rows = rows.data_ptr<int64_t>();
  a.rs0 = rows.stride(0), a.rs1 = rows.stride(1), a.B = rows.size(1), a.in = in, a.out = out, a.kd = 1;
  return a;
}

// A weight-shaped [R, d1, d2] tensor whose rows are contiguous (any replica stride).
void check_weight(const char* op, const char* name, const at::Tensor& t, int64_t R, const at::Tensor& values) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == R, op, ": ", name, " must be [R = ", R, ", ., .], got ", t.sizes());
  TORCH_CHECK((t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2)), op, ": ", name,
              " must have contiguous rows (strides [any, ", t.size(2), ", 1]), got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but values are ",
              values.scalar_type());
}

// A matrix operand of the forward product (a weight, or z^T): [R, d1, d2] with contiguous rows (any
// replica stride), or its out index in groups (the K probe blocks of a [R, K, O, in] tensor): with
// `cols` (W^T [in, out]) [R, d1, G, d2 / G], else (W [out, in], z^T [out, B]) [R, G, d1 / G, d2]; the
// last dimension contiguous, the others of any stride.
struct Operand {
  int64_t d1, d2;
  Groups g;
};
Operand fwd_operand(const char* op, const char* name, const at::Tensor& t, int64_t R, const at::Tensor& values, bool cols) {
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but values are ",
              values.scalar_type());
  if (t.dim() == 3) {
    check_weight(op, name, t, R, values);
    return {t.size(1), t.size(2), {cols ? t.size(2) : t.size(1), 0, t.stride(1)}};
  }
  TORCH_CHECK(t.dim() == 4 && t.size(0) == R, op, ": ", name, " must be [R = ", R, ", ., .] or, in groups, [R = ", R,
              ", ., ., .], got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, op, ": ", name, "'s last dimension must be contiguous, got strides ",
              t.strides());
  if (cols) return {t.size(1), t.size(2) * t.size(3), {t.size(3), t.stride(2), t.stride(1)}};
  return {t.size(1) * t.size(2), t.size(3), {t.size(2), t.stride(1), t.stride(2)}};
}

// A result mask [R, rows, M] (last dimension contiguous), M dividing nout, into a's mask fields.
template <typename S>
void set_mask(Args<S>& a, const char* op, const std::optional<at::Tensor>& mask, int64_t R, int64_t rows, int64_t nout,
              int64_t kd, const at::Tensor& like) {
  if (!mask.has_value() || !mask->defined()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.dim() == 3 && m.size(0) == R && m.size(1) == rows && m.size(2) > 0 && nout % m.size(2) == 0, op,
              ": out_mask must be [R, B, M] = [", R, ", ", rows, ", M] with M dividing ", nout, ", got ", m.sizes());
  TORCH_CHECK(m.stride(2) == 1 || m.size(2) == 1, op, ": out_mask's last dimension must be contiguous, got strides ",
              m.strides());
  TORCH_CHECK(m.scalar_type() == like.scalar_type() && m.device().is_cpu(), op, ": out_mask must be a CPU tensor of ",
              like.scalar_type(), ", got ", m.scalar_type(), " on ", m.device());
  a.mask = m.data_ptr<S>(), a.mask_rs = m.stride(0), a.mask_ld = m.stride(1), a.mask_kd = kd, a.mask_cols = m.size(2);
}

// The weight sums' destination [R, nout] or [R, G, nout / G] (last dimension contiguous) into a's sums fields.
template <typename S>
void set_sums(Args<S>& a, const std::optional<at::Tensor>& sums, int64_t R, int64_t nout, const at::Tensor& like) {
  if (!sums.has_value() || !sums->defined()) return;
  const at::Tensor& t = *sums;
  const bool grouped = t.dim() == 3;
  TORCH_CHECK((t.dim() == 2 || grouped) && t.size(0) == R && (grouped ? t.size(1) * t.size(2) : t.size(1)) == nout &&
                  (t.stride(-1) == 1 || t.size(-1) <= 1) && t.scalar_type() == like.scalar_type(),
              "csr_linear: weight_sums must be [R, out] = [", R, ", ", nout, "] or [R, G, out / G] of the weight's ",
              "dtype, its last dimension contiguous, got ", t.scalar_type(), " ", t.sizes(), " strides ", t.strides());
  a.sums = t.data_ptr<S>(), a.sums_rs = t.stride(0);
  a.sums_g = grouped ? Groups{t.size(2), t.stride(1), 1} : Groups{nout, 0, 1};
}

// z = X[rows] W^T (+ bias) into out, or into a new [R, B, out] tensor; returns z.
at::Tensor csr_linear_into(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                           const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool weight_t, const std::optional<at::Tensor>& out, bool out_t, bool accumulate,
                           const std::optional<at::Tensor>& out_mask, const std::optional<at::Tensor>& weight_sums) {
  auto [R, B] = check_csr("csr_linear", indptr, indices, values, rows);
  const Operand w = fwd_operand("csr_linear", "weight", weight, R, values, weight_t);
  const int64_t in = weight_t ? w.d1 : w.d2, nout = weight_t ? w.d2 : w.d1;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == R && b.size(1) == nout && b.is_contiguous() &&
                    b.scalar_type() == weight.scalar_type(),
                "csr_linear: bias must be a contiguous [R, out] = [", R, ", ", nout, "] tensor of the weight's dtype, got ",
                b.sizes());
  }
  at::Tensor z;
  Groups zg{};
  if (out.has_value()) {
    z = *out;
    TORCH_CHECK(out_t || z.dim() == 3, "csr_linear: out must be [R, B, out], got ", z.sizes());
    const Operand o = fwd_operand("csr_linear", "out", z, R, values, false);
    TORCH_CHECK(o.d1 == (out_t ? nout : B) && o.d2 == (out_t ? B : nout), "csr_linear: out must be ",
                out_t ? "[R, out, B] = [" : "[R, B, out] = [", R, ", ", out_t ? nout : B, ", ", out_t ? B : nout,
                "] (or in groups of out), got ", z.sizes());
    TORCH_CHECK(!(accumulate && b.defined()), "csr_linear: a bias cannot be accumulated into out");
    zg = o.g;
  } else {
    z = at::empty({R, B, nout}, weight.options());
  }
  if (R * B == 0 || nout == 0) return z;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "csr_linear", [&] {
    const RangeFn<scalar_t> fn = pick_fwd<scalar_t>();
    Args<scalar_t> a = data_args<scalar_t>(indptr, indices, values.data_ptr<scalar_t>(), rows, in, nout);
    a.src = weight.data_ptr<scalar_t>(), a.src_rs = weight.stride(0), a.src_t = weight_t, a.src_g = w.g;
    a.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    a.dst = z.data_ptr<scalar_t>(), a.dst_rs = z.stride(0), a.dst_t = out_t, a.dst_g = zg, a.accumulate = accumulate;
    TORCH_CHECK(!(out_t && out_mask.has_value() && out_mask->defined()), "csr_linear: out_mask needs z, not z^T");
    set_mask<scalar_t>(a, "csr_linear", out_mask, R, B, nout, 1, weight);
    set_sums<scalar_t>(a, weight_sums, R, nout, weight);
    run_fwd<scalar_t>(fn, a, R);
  });
  return z;
}

at::Tensor csr_linear_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                          const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          bool weight_t, const std::optional<at::Tensor>& out_mask) {
  return csr_linear_into(indptr, indices, values, rows, weight, bias, weight_t, std::nullopt, false, false, out_mask,
                         std::nullopt);
}

void csr_linear_out_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                        const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool weight_t, at::Tensor& out, bool out_t, bool accumulate,
                        const std::optional<at::Tensor>& out_mask, const std::optional<at::Tensor>& weight_sums) {
  csr_linear_into(indptr, indices, values, rows, weight, bias, weight_t, out, out_t, accumulate, out_mask, weight_sums);
}

void csr_linear_wgrad_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                          const at::Tensor& rows, const at::Tensor& grad, const at::Tensor& out, bool out_t,
                          bool accumulate) {
  auto [R, B] = check_csr("csr_linear_wgrad", indptr, indices, values, rows);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == R && grad.size(1) == B && grad.is_contiguous(),
              "csr_linear_wgrad: grad must be a contiguous [R, B, out] = [", R, ", ", B, ", out] tensor, got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type(), "csr_linear_wgrad: grad is ", grad.scalar_type(),
              " but values are ", values.scalar_type());
  check_weight("csr_linear_wgrad", "out", out, R, values);
  const int64_t nout = grad.size(2), in = out.size(out_t ? 1 : 2);
  TORCH_CHECK(out.size(out_t ? 2 : 1) == nout, "csr_linear_wgrad: out must be ", out_t ? "[R, in, " : "[R, ", nout,
              out_t ? "]" : ", in]", " for grad ", grad.sizes(), ", got ", out.sizes());
  if (R == 0 || nout == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "csr_linear_wgrad", [&] {
    const RangeFn<scalar_t> fn = pick_wgrad<scalar_t>();
    Args<scalar_t> a = data_args<scalar_t>(indptr, indices, values.data_ptr<scalar_t>(), rows, in, nout);
    a.src = grad.data_ptr<scalar_t>();
    a.dst = out.data_ptr<scalar_t>(), a.dst_rs = out.stride(0), a.dst_t = out_t, a.accumulate = accumulate;
    const int64_t nblk = (nout + kWgradBlock - 1) / kWgradBlock;
    at::parallel_for(0, R * nblk, 1, [&](int64_t q0, int64_t q1) { fn(a, q0, q1); });
  });
}

// A [R, B, P, d] tensor whose last three dims are contiguous (any replica stride).
void check_rows4(const char* name, const at::Tensor& t, int64_t R, int64_t B, int64_t d, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == R && t.size(1) == B && t.size(3) == d, "csr_masked_linear: ", name,
              " must be [R = ", R, ", B = ", B, ", P, ", d, "], got ", t.sizes());
  TORCH_CHECK((d <= 1 || t.stride(3) == 1) && (t.size(2) <= 1 || t.stride(2) == d) &&
                  (t.size(1) <= 1 || t.stride(1) == t.size(2) * d),
              "csr_masked_linear: ", name, "'s last three dims must be contiguous, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "csr_masked_linear: ", name, " is ", t.scalar_type(),
              " but weight is ", like.scalar_type());
}

// out[r, b, p] (+)= dense[r, b, p] masked to the pattern of CSR row rows[r, b], times W[r]^T.
void csr_masked_linear_out_cpu(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& rows,
                               const at::Tensor& dense, const at::Tensor& weight, bool weight_t, at::Tensor& out,
                               bool accumulate, const std::optional<at::Tensor>& out_mask) {
  auto [R, B] = check_pattern("csr_masked_linear", indptr, indices, rows);
  check_weight("csr_masked_linear", "weight", weight, R, weight);
  const int64_t in = weight.size(weight_t ? 1 : 2), nout = weight.size(weight_t ? 2 : 1);
  check_rows4("dense", dense, R, B, in, weight);
  const int64_t P = dense.size(2);
  check_rows4("out", out, R, B, nout, weight);
  TORCH_CHECK(out.size(2) == P, "csr_masked_linear: out has ", out.size(2), " rows per minibatch row, dense ", P);
  if (R * B * P == 0 || nout == 0) return;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "csr_masked_linear", [&] {
    const RangeFn<scalar_t> fn = pick_fwd<scalar_t, true>();
    Args<scalar_t> a = data_args<scalar_t>(indptr, indices, nullptr, rows, in, nout);
    a.B = B * P, a.kd = P;
    a.dense = dense.data_ptr<scalar_t>(), a.dense_rs = dense.stride(0);
    a.src = weight.data_ptr<scalar_t>(), a.src_rs = weight.stride(0), a.src_t = weight_t;
    a.src_g = {nout, 0, weight.stride(1)};
    a.dst = out.data_ptr<scalar_t>(), a.dst_rs = out.stride(0), a.accumulate = accumulate;
    set_mask<scalar_t>(a, "csr_masked_linear", out_mask, R, B, nout, P, weight);
    TORCH_CHECK(!a.mask || a.mask_cols == nout, "csr_masked_linear: out_mask must be [R, B, out = ", nout, "], got ",
                out_mask->sizes());
    run_fwd<scalar_t>(fn, a, R);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("csr_masked_linear_out", &csr_masked_linear_out_cpu);
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_out", &csr_linear_out_cpu);
  m.impl("csr_linear_wgrad", &csr_linear_wgrad_cpu);
}
