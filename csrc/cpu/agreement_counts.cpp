// Exact pairwise agreement counts between integer predictions (CPU).
//
// out[i, j] = #{m : preds[i, m] == preds[j, m]} for preds[R, M] of any integer dtype.
//
// Algorithm: bit-sliced class codes. Each replica's predictions, shifted by the global minimum,
// are written as B = bit_length(max - min) bit planes of M bits (64 examples per uint64 word).
// Two replicas disagree at example m iff some plane differs there, so
//   disagree(i, j) = sum_w popcount( OR_b (X[i, b, w] ^ X[j, b, w]) ),   agree = M - disagree.
// The cost is R^2/2 * B * M/64 word operations: C = 10 classes need 4 planes, C = 1000 need 10,
// against R^2 * M * C multiply-adds for the one-hot matmul. Padding bits are zero in every
// plane, so they never count as a disagreement. The pair loop is tiled over (replica block,
// replica block, word block) so that a tile's planes stay in L2, and the tiles of the upper
// triangle are spread over threads with at::parallel_for. On x86-64 the inner loop is compiled
// a second time for AVX-512 VPOPCNTDQ and chosen at run time.
#include <torch/library.h>
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 32;  // words of a pair processed per inner step (W is padded to it)
constexpr int64_t kTile = 32;   // replicas per tile side

#if defined(__GNUC__)
#define FC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FC_ALWAYS_INLINE inline
#endif

inline int64_t fc_popcount(uint64_t x) {
#if defined(__GNUC__)
  return __builtin_popcountll(x);
#else
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int64_t>((x * 0x0101010101010101ULL) >> 56);
#endif
}

struct Planes {
  const uint64_t* data;  // [R][B][W]
  int64_t B, W;
  const uint64_t* at(int64_t r, int64_t b) const { return data + (r * B + b) * W; }
};

// Disagreement counts of replicas [i0, i1) x [j0, j1) (only j > i) over words [w0, w1),
// added to acc[(i - i0) * kTile + (j - j0)].
FC_ALWAYS_INLINE void fc_tile(const Planes& P, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t w0,
                              int64_t w1, int64_t* acc) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
      int64_t cnt = 0;
      for (int64_t w = w0; w < w1; w += kChunk) {
        uint64_t diff[kChunk];
        for (int64_t t = 0; t < kChunk; ++t) diff[t] = 0;
        for (int64_t b = 0; b < P.B; ++b) {
          const uint64_t* xi = P.at(i, b) + w;
          const uint64_t* xj = P.at(j, b) + w;
          for (int64_t t = 0; t < kChunk; ++t) diff[t] |= xi[t] ^ xj[t];
        }
        for (int64_t t = 0; t < kChunk; ++t) cnt += fc_popcount(diff[t]);
      }
      acc[(i - i0) * kTile + (j - j0)] += cnt;
    }
  }
}

void fc_tile_default(const Planes& P, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t w0, int64_t w1,
                     int64_t* acc) {
  fc_tile(P, i0, i1, j0, j1, w0, w1, acc);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define FC_HAVE_X86_VARIANTS 1
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt"))) void fc_tile_vpopcnt(
    const Planes& P, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t w0, int64_t w1, int64_t* acc) {
  fc_tile(P, i0, i1, j0, j1, w0, w1, acc);
}
__attribute__((target("avx2,popcnt"))) void fc_tile_avx2(const Planes& P, int64_t i0, int64_t i1, int64_t j0,
                                                         int64_t j1, int64_t w0, int64_t w1, int64_t* acc) {
  fc_tile(P, i0, i1, j0, j1, w0, w1, acc);
}
#endif

using TileFn = void (*)(const Planes&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*);

TileFn fc_pick_tile_fn() {
#ifdef FC_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return &fc_tile_vpopcnt;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return &fc_tile_avx2;
#endif
  return &fc_tile_default;
}

// Write replica r's predictions (minus `lo`) as B bit planes of W words (zero padded).
template <typename scalar_t>
void fc_pack(const scalar_t* p, int64_t M, int64_t lo, int64_t B, int64_t W, uint64_t* planes) {
  uint64_t buf[64];
  for (int64_t w = 0; w * 64 < M; ++w) {
    const int64_t base = w * 64, n = std::min<int64_t>(64, M - base);
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<uint64_t>(static_cast<int64_t>(p[base + k])) - static_cast<uint64_t>(lo);
    for (int64_t k = n; k < 64; ++k) buf[k] = 0;
    for (int64_t b = 0; b < B; ++b) {
      uint64_t word = 0;
      for (int64_t k = 0; k < 64; ++k) word |= ((buf[k] >> b) & 1ULL) << k;
      planes[b * W + w] = word;
    }
  }
}

at::Tensor agreement_counts_cpu(const at::Tensor& preds_in) {
  TORCH_CHECK(preds_in.dim() == 2, "agreement_counts: preds must be [R, M] (replicas x examples), got shape ",
              preds_in.sizes());
  at::Tensor preds = preds_in;
  if (preds.scalar_type() == at::kBool) preds = preds.to(at::kByte);
  TORCH_CHECK(at::isIntegralType(preds.scalar_type(), /*includeBool=*/false),
              "agreement_counts: preds must hold integer class indices, got dtype ", preds_in.scalar_type());
  preds = preds.contiguous();
  const int64_t R = preds.size(0), M = preds.size(1);
  at::Tensor out = at::empty({R, R}, preds.options().dtype(at::kLong));
  if (R == 0) return out;
  if (M == 0) return out.zero_();

  auto mm = at::aminmax(preds);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  int64_t B = 0;
  while (B < 64 && (span >> B) != 0) ++B;
  if (B == 0) return out.fill_(M);  // every prediction is the same class

  const int64_t W = ((M + 63) / 64 + kChunk - 1) / kChunk * kChunk;
  std::vector<uint64_t> planes(static_cast<size_t>(R * B * W), 0);
  AT_DISPATCH_INTEGRAL_TYPES(preds.scalar_type(), "agreement_counts_pack", [&] {
    const scalar_t* pp = preds.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) fc_pack<scalar_t>(pp + r * M, M, lo, B, W, planes.data() + r * B * W);
    });
  });

  const Planes P{planes.data(), B, W};
  // Word block: the planes of two replica tiles over one block fill about 256 KiB (L2).
  const int64_t wb = std::max<int64_t>(kChunk, ((int64_t(1) << 18) / (2 * kTile * B * 8)) / kChunk * kChunk);
  const int64_t T = (R + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = a; b < T; ++b) tiles.emplace_back(a, b);
  static const TileFn tile_fn = fc_pick_tile_fn();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> acc(kTile * kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = tiles[t].first * kTile, j0 = tiles[t].second * kTile;
      const int64_t i1 = std::min(R, i0 + kTile), j1 = std::min(R, j0 + kTile);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t w0 = 0; w0 < W; w0 += wb) tile_fn(P, i0, i1, j0, j1, w0, std::min(W, w0 + wb), acc.data());
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
          const int64_t agree = M - acc[(i - i0) * kTile + (j - j0)];
          o[i * R + j] = agree;
          o[j * R + i] = agree;
        }
      }
    }
  });
  for (int64_t i = 0; i < R; ++i) o[i * R + i] = M;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) { m.impl("agreement_counts", &agreement_counts_cpu); }
