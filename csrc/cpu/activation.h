#pragma once
#include <cmath>

// Activation kinds shared by every implementation; keep in sync with src/fastcurv/ops/activation.py.
enum FcActivation : int64_t { FC_IDENTITY = 0, FC_RELU = 1, FC_LEAKY_RELU = 2, FC_TANH = 3, FC_SIGMOID = 4, FC_GELU = 5 };

// First and second derivative of the activation at z.
template <typename T>
inline void fc_act_derivs(int64_t kind, T z, T slope, T& d1, T& d2) {
  switch (kind) {
    case FC_RELU: d1 = z > T(0) ? T(1) : T(0); d2 = T(0); break;
    case FC_LEAKY_RELU: d1 = z > T(0) ? T(1) : slope; d2 = T(0); break;
    case FC_TANH: { T t = std::tanh(z); d1 = T(1) - t * t; d2 = T(-2) * t * d1; break; }
    case FC_SIGMOID: { T s = T(1) / (T(1) + std::exp(-z)); d1 = s * (T(1) - s); d2 = d1 * (T(1) - T(2) * s); break; }
    case FC_GELU: {
      const T phi = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.7071067811865476)));
      d1 = cdf + z * phi; d2 = phi * (T(2) - z * z); break;
    }
    default: d1 = T(1); d2 = T(0);
  }
}
