// Grouped stride-1 convolutions with few channels per group, and their weight gradients (CPU), with
// zero padding on each side and operands at any strides. See src/fastcurv/ops/group_conv.py.
//
// Each (sample, group) input block is copied once into zero-padded planes whose rows follow one
// another without gaps: output position (y, x) of a plane is flat index q = y * RS + x (RS the padded
// row length), and tap (ty, tx) reads flat index q + ty * RS + tx. A vector of consecutive q thus
// spans row ends (the kw - 1 columns past each row's end are computed and dropped), so 14x14 and 7x7
// maps fill 14 of 16 and 7 of 9 lanes where one vector per row would fill 14 and 7 of 16. The forward
// keeps 2 vectors x 8 output channels of accumulators (AVX2: 3 x 4) and reads each weight as a
// broadcast; the weight gradient keeps 8 output channels (AVX2: 4) x 3 taps of vector sums over the
// flat positions (the grad planes zero past each row's end), summed across lanes once per block.
#include <torch/library.h>
#include "common.h"

#include <cstring>

namespace {

// Blocks of accumulators sized to the vector registers: 32 with AVX-512 (64-byte vectors), 16 with
// AVX2 and the baseline (8 output channels there spilled: the AVX2 build lost to oneDNN at 8 channels).
template <int BYTES>
struct Blocks {
  static constexpr int OB = BYTES == 64 ? 8 : 4;  // output channels per block
  static constexpr int QB = BYTES == 64 ? 2 : 3;  // forward: vectors of positions per block
  static constexpr int TXB = 3;                   // weight gradient: taps of a kernel row per block
};

template <typename S>
struct GcArgs {
  const S* x;
  const S* w;     // forward: weight [G, O, C, kh, kw] contiguous
  const S* grad;  // weight gradient: [B, G, O1, O2, Ho, Wo]
  S* out;         // forward: [B, G, O1, O2, Ho, Wo]; weight gradient: [G, O1, O2, C1, C2, kh, kw]
  int64_t B, G, C1, C2, H, W, O1, O2, Ho, Wo, kh, kw;
  int64_t pt, pb, pl, pr;             // zero padding: top, bottom, left, right
  int64_t xb, xg, xc1, xc2, xh, xw;  // x strides
  int64_t yb, yg, yo1, yo2, yh, yw;  // forward out / weight-gradient grad strides
  int64_t wg, wo1, wo2, wc1, wc2, wty, wtx;  // weight-gradient out strides
  int64_t parts;                              // weight gradient: work items per group
  bool accumulate;
  int64_t C() const { return C1 * C2; }
  int64_t O() const { return O1 * O2; }
  int64_t RS() const { return W + pl + pr; }
};

// Flat geometry for vectors of VW lanes: nq vectors of positions (a multiple of QB), planes of PS entries.
template <int VW, int QB>
struct Flat {
  int64_t RS, nq, PS;
  template <typename A>
  explicit Flat(const A& a) {
    RS = a.RS();
    nq = (a.Ho * RS + VW - 1) / VW;
    nq += (QB - nq % QB) % QB;
    const int64_t need = nq * VW + (a.kh - 1) * RS + a.kw + Blocks<64>::TXB + VW;
    PS = (need + VW - 1) / VW * VW;
  }
};

// n entries from src at stride st to contiguous dst.
template <typename S>
FC_ALWAYS_INLINE void copy_row(S* dst, const S* src, int64_t n, int64_t st) {
  if (st == 1) {
    std::memcpy(dst, src, sizeof(S) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * st];
  }
}

// x[b, g] into C zero-padded flat planes of PS entries at dst.
template <typename S>
FC_ALWAYS_INLINE void pad_planes(const GcArgs<S>& a, int64_t b, int64_t g, int64_t RS, int64_t PS, S* dst) {
  std::memset(dst, 0, sizeof(S) * a.C() * PS);
  for (int64_t c1 = 0; c1 < a.C1; ++c1) {
    for (int64_t c2 = 0; c2 < a.C2; ++c2) {
      const S* src = a.x + b * a.xb + g * a.xg + c1 * a.xc1 + c2 * a.xc2;
      S* plane = dst + (c1 * a.C2 + c2) * PS + a.pt * RS + a.pl;
      for (int64_t y = 0; y < a.H; ++y) copy_row(plane + y * RS, src + y * a.xh, a.W, a.xw);
    }
  }
}

// Forward, work items q = g * B + b in [q0, q1):
// out[b, g, o, y, x] (+)= sum_{c, ty, tx} w[g, o, c, ty, tx] * xpad[b, g, c, y + ty, x + tx].
template <typename S, int BYTES>
FC_ALWAYS_INLINE void fwd_range(const GcArgs<S>& a, int64_t q0, int64_t q1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int VW = L::kWidth, OB = Blocks<BYTES>::OB, QB = Blocks<BYTES>::QB;
  const Flat<VW, QB> f(a);
  const int64_t C = a.C(), O = a.O(), T = a.kh * a.kw, nob = (O + OB - 1) / OB, RS = f.RS;
  S* xp = fc_scratch<S, 0>(C * f.PS);
  S* wp = fc_scratch<S, 1>(nob * C * T * OB);  // [ob][c][t][OB], zero past O
  S* res = fc_scratch<S, 2>(OB * f.nq * VW);   // one block's outputs, flat
  int64_t packed = -1;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t g = q / a.B, b = q % a.B;
    if (g != packed) {
      std::memset(wp, 0, sizeof(S) * nob * C * T * OB);
      const S* wg = a.w + g * O * C * T;
      for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < T; ++t) wp[(((o / OB) * C + c) * T + t) * OB + o % OB] = wg[(o * C + c) * T + t];
      packed = g;
    }
    pad_planes(a, b, g, RS, f.PS, xp);
    for (int64_t ob = 0; ob < nob; ++ob) {
      for (int64_t v0 = 0; v0 < f.nq; v0 += QB) {
        V acc[QB][OB];
        for (int i = 0; i < QB; ++i)
          for (int o = 0; o < OB; ++o) acc[i][o] = L::zero();
        for (int64_t c = 0; c < C; ++c) {
          const S* pl = xp + c * f.PS + v0 * VW;
          const S* wc = wp + (ob * C + c) * T * OB;
          for (int64_t ty = 0; ty < a.kh; ++ty) {
            for (int64_t tx = 0; tx < a.kw; ++tx, wc += OB) {
              const S* p = pl + ty * RS + tx;
              V xv[QB];
              for (int i = 0; i < QB; ++i) xv[i] = L::load(p + i * VW);
#pragma GCC unroll 8
              for (int o = 0; o < OB; ++o) {
                const V wv = L::splat(wc[o]);
                for (int i = 0; i < QB; ++i) acc[i][o] += xv[i] * wv;
              }
            }
          }
        }
        for (int o = 0; o < OB; ++o)
          for (int i = 0; i < QB; ++i) L::store(res + o * f.nq * VW + (v0 + i) * VW, acc[i][o]);
      }
      for (int64_t o = ob * OB; o < std::min(O, (ob + 1) * OB); ++o) {
        const S* src = res + (o - ob * OB) * f.nq * VW;
        S* dst = a.out + b * a.yb + g * a.yg + (o / a.O2) * a.yo1 + (o % a.O2) * a.yo2;
        for (int64_t y = 0; y < a.Ho; ++y) {
          const S* s = src + y * RS;
          S* d = dst + y * a.yh;
          if (a.accumulate) {
            for (int64_t x = 0; x < a.Wo; ++x) d[x * a.yw] += s[x];
          } else if (a.yw == 1) {
            std::memcpy(d, s, sizeof(S) * a.Wo);
          } else {
            for (int64_t x = 0; x < a.Wo; ++x) d[x * a.yw] = s[x];
          }
        }
      }
    }
  }
}

// Weight gradient, work items q in [q0, q1): group g = q / parts, its part q % parts of the output
// channel blocks (parts > 1 where there are fewer groups than threads):
// out[g, o, c, ty, tx] (+)= sum_{b, y, x} grad[b, g, o, y, x] * xpad[b, g, c, y + ty, x + tx].
template <typename S, int BYTES>
FC_ALWAYS_INLINE void wgrad_range(const GcArgs<S>& a, int64_t q0, int64_t q1) {
  using L = FcLanes<S, BYTES>;
  using V = typename L::V;
  constexpr int VW = L::kWidth, OB = Blocks<BYTES>::OB, TXB = Blocks<BYTES>::TXB;
  const Flat<VW, 1> f(a);
  const int64_t B = a.B, C = a.C(), O = a.O(), T = a.kh * a.kw, nob = (O + OB - 1) / OB, RS = f.RS;
  const int64_t QS = f.nq * VW;  // a grad plane's entries
  S* xp = fc_scratch<S, 0>(B * C * f.PS);
  S* gp = fc_scratch<S, 1>(B * nob * OB * QS);  // [b][o][QS], zero past each row's end and past O
  S* res = fc_scratch<S, 2>(nob * OB * C * T);  // [o][c][t]
  int64_t padded = -1;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t g = q / a.parts, part = q % a.parts;
    const int64_t ob0 = part * nob / a.parts, ob1 = (part + 1) * nob / a.parts;
    const int64_t o0 = ob0 * OB, o1 = std::min(O, ob1 * OB);
    if (g != padded) {
      for (int64_t b = 0; b < B; ++b) pad_planes(a, b, g, RS, f.PS, xp + b * C * f.PS);
      padded = g;
    }
    for (int64_t b = 0; b < B; ++b) {
      std::memset(gp + (b * nob + ob0) * OB * QS, 0, sizeof(S) * (ob1 - ob0) * OB * QS);  // this part's blocks
      for (int64_t o = o0; o < o1; ++o) {
        const S* src = a.grad + b * a.yb + g * a.yg + (o / a.O2) * a.yo1 + (o % a.O2) * a.yo2;
        S* dst = gp + (b * nob * OB + o) * QS;
        for (int64_t y = 0; y < a.Ho; ++y) copy_row(dst + y * RS, src + y * a.yh, a.Wo, a.yw);
      }
    }
    for (int64_t ob = ob0; ob < ob1; ++ob) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t ty = 0; ty < a.kh; ++ty) {
          for (int64_t tx0 = 0; tx0 < a.kw; tx0 += TXB) {
            V acc[OB][TXB];
            for (int o = 0; o < OB; ++o)
              for (int j = 0; j < TXB; ++j) acc[o][j] = L::zero();
            for (int64_t b = 0; b < B; ++b) {
              const S* xq = xp + (b * C + c) * f.PS + ty * RS + tx0;
              const S* gq = gp + (b * nob + ob) * OB * QS;
              for (int64_t v = 0; v < f.nq; ++v) {
                V xv[TXB];
                for (int j = 0; j < TXB; ++j) xv[j] = L::load(xq + v * VW + j);
#pragma GCC unroll 8
                for (int o = 0; o < OB; ++o) {
                  const V gv = L::load(gq + o * QS + v * VW);
                  for (int j = 0; j < TXB; ++j) acc[o][j] += gv * xv[j];
                }
              }
            }
            for (int o = 0; o < OB; ++o) {
              for (int j = 0; j < TXB && tx0 + j < a.kw; ++j) {
                S s = 0;
                for (int l = 0; l < VW; ++l) s += acc[o][j][l];
                res[((ob * OB + o) * C + c) * T + ty * a.kw + tx0 + j] = s;
              }
            }
          }
        }
      }
    }
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t c = 0; c < C; ++c) {
        S* d = a.out + g * a.wg + (o / a.O2) * a.wo1 + (o % a.O2) * a.wo2 + (c / a.C2) * a.wc1 + (c % a.C2) * a.wc2;
        const S* s = res + (o * C + c) * T;
        for (int64_t ty = 0; ty < a.kh; ++ty)
          for (int64_t tx = 0; tx < a.kw; ++tx) {
            S& e = d[ty * a.wty + tx * a.wtx];
            e = a.accumulate ? e + s[ty * a.kw + tx] : s[ty * a.kw + tx];
          }
      }
    }
  }
}

void check_6d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 6, op, ": ", name, " must be 6-d [B, G, C1, C2, H, W], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

template <typename S>
GcArgs<S> args_of(const at::Tensor& x, const at::Tensor& y, int64_t kh, int64_t kw, at::IntArrayRef padding, bool accumulate) {
  GcArgs<S> h{};
  h.x = x.data_ptr<S>();
  h.B = x.size(0), h.G = x.size(1), h.C1 = x.size(2), h.C2 = x.size(3), h.H = x.size(4), h.W = x.size(5);
  h.xb = x.stride(0), h.xg = x.stride(1), h.xc1 = x.stride(2), h.xc2 = x.stride(3), h.xh = x.stride(4), h.xw = x.stride(5);
  h.O1 = y.size(2), h.O2 = y.size(3), h.Ho = y.size(4), h.Wo = y.size(5);
  h.yb = y.stride(0), h.yg = y.stride(1), h.yo1 = y.stride(2), h.yo2 = y.stride(3), h.yh = y.stride(4), h.yw = y.stride(5);
  h.kh = kh, h.kw = kw, h.pt = padding[0], h.pb = padding[1], h.pl = padding[2], h.pr = padding[3];
  h.accumulate = accumulate;
  return h;
}

// y: the output of the forward, the output gradient of the weight gradient (named y_name)
void check_geometry(const char* op, const at::Tensor& x, const char* y_name, const at::Tensor& y, int64_t kh, int64_t kw,
                    at::IntArrayRef padding) {
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0, op,
              ": padding must be four non-negative ints (top, bottom, left, right), got ", padding);
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": the kernel must be at least 1x1, got ", kh, "x", kw);
  const int64_t Ho = x.size(4) + padding[0] + padding[1] - kh + 1, Wo = x.size(5) + padding[2] + padding[3] - kw + 1;
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == x.size(1) && y.size(4) == Ho && y.size(5) == Wo, op,
              ": ", y_name, " must be [B, G, O1, O2, H_out, W_out] = [", x.size(0), ", ", x.size(1), ", O1, O2, ", Ho, ", ", Wo,
              "] for x ", x.sizes(), ", a ", kh, "x", kw, " kernel and padding ", padding, ", got ", y.sizes());
  fc_check_operand(op, "x", x, y_name, y, y.sizes());
}

void group_conv_cpu(const at::Tensor& x, const at::Tensor& weight_in, at::Tensor& out, at::IntArrayRef padding, bool accumulate) {
  check_6d("group_conv", "x", x);
  check_6d("group_conv", "out", out);
  TORCH_CHECK(weight_in.dim() == 5, "group_conv: weight must be [G, O, C, kh, kw], got ", weight_in.sizes());
  const int64_t kh = weight_in.size(3), kw = weight_in.size(4);
  check_geometry("group_conv", x, "out", out, kh, kw, padding);
  const int64_t G = x.size(1), C = x.size(2) * x.size(3), O = out.size(2) * out.size(3);
  TORCH_CHECK(weight_in.size(0) == G && weight_in.size(1) == O && weight_in.size(2) == C, "group_conv: weight must be [G, O, C, kh, kw] = [",
              G, ", ", O, ", ", C, ", kh, kw], got ", weight_in.sizes());
  fc_check_operand("group_conv", "x", x, "weight", weight_in, weight_in.sizes());
  const at::Tensor weight = weight_in.contiguous();
  if (out.numel() == 0) return;
  if (C == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_conv", [&] {
    using S = scalar_t;
    GcArgs<S> h = args_of<S>(x, out, kh, kw, padding, accumulate);
    h.w = weight.data_ptr<S>(), h.out = out.data_ptr<S>();
    const auto fn = fc_pick_range_widths<fwd_range<S, 64>, fwd_range<S, 32>, fwd_range<S, 16>, GcArgs<S>>();
    at::parallel_for(0, h.G * h.B, 1, [&](int64_t q0, int64_t q1) { fn(h, q0, q1); });
  });
}

void group_conv_wgrad_cpu(const at::Tensor& x, const at::Tensor& grad, at::Tensor& out, at::IntArrayRef padding, bool accumulate) {
  check_6d("group_conv_wgrad", "x", x);
  check_6d("group_conv_wgrad", "grad", grad);
  TORCH_CHECK(out.dim() == 7, "group_conv_wgrad: out must be 7-d [G, O1, O2, C1, C2, kh, kw], got ", out.sizes());
  const int64_t kh = out.size(5), kw = out.size(6);
  check_geometry("group_conv_wgrad", x, "grad", grad, kh, kw, padding);
  TORCH_CHECK(out.size(0) == x.size(1) && out.size(1) == grad.size(2) && out.size(2) == grad.size(3) && out.size(3) == x.size(2) &&
                  out.size(4) == x.size(3),
              "group_conv_wgrad: out must be [G, O1, O2, C1, C2, kh, kw] = [", x.size(1), ", ", grad.size(2), ", ", grad.size(3), ", ",
              x.size(2), ", ", x.size(3), ", kh, kw], got ", out.sizes());
  fc_check_operand("group_conv_wgrad", "x", x, "out", out, out.sizes());
  if (out.numel() == 0) return;
  if (x.size(0) == 0 || grad.size(4) == 0 || grad.size(5) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_conv_wgrad", [&] {
    using S = scalar_t;
    GcArgs<S> h = args_of<S>(x, grad, kh, kw, padding, accumulate);
    h.grad = grad.data_ptr<S>(), h.out = out.data_ptr<S>();
    h.wg = out.stride(0), h.wo1 = out.stride(1), h.wo2 = out.stride(2), h.wc1 = out.stride(3), h.wc2 = out.stride(4);
    h.wty = out.stride(5), h.wtx = out.stride(6);
    // fewer groups than threads (one replica, say): each group's output channel blocks split too (in
    // at most as many parts as the widest blocks make, so that every variant's parts hold blocks)
    const int64_t nob = (h.O() + Blocks<64>::OB - 1) / Blocks<64>::OB, threads = at::get_num_threads();
    h.parts = h.G >= threads ? 1 : std::min(nob, (threads + h.G - 1) / h.G);
    const auto fn = fc_pick_range_widths<wgrad_range<S, 64>, wgrad_range<S, 32>, wgrad_range<S, 16>, GcArgs<S>>();
    at::parallel_for(0, h.G * h.parts, 1, [&](int64_t q0, int64_t q1) { fn(h, q0, q1); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("group_conv", &group_conv_cpu);
  m.impl("group_conv_wgrad", &group_conv_wgrad_cpu);
}
