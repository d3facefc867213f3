// A plain double-precision grouped FFN (forward and backward) that the kernel tests compare
// every implementation with, and helpers to build random problems.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/expert_ops.h"
#include "runtime/base/dtype.h"
#include "runtime/base/random.h"

namespace ecss::testing {

// Random values in [-scale, scale), exactly representable in bf16 when `bf16` (so that the
// f32 and bf16 paths see the same numbers).
inline std::vector<float> RandomValues(uint64_t count, uint64_t stream, float scale, bool bf16) {
  CounterRng rng(1234, stream);
  std::vector<float> values(count);
  for (float& v : values) {
    v = (rng.UniformFloat() * 2 - 1) * scale;
    if (bf16) v = Bf16ToFloat(FloatToBf16(v));
  }
  return values;
}

inline std::vector<BFloat16> ToBf16(const std::vector<float>& values) {
  std::vector<BFloat16> out(values.size());
  ConvertF32ToBf16(values.data(), out.data(), values.size());
  return out;
}

inline std::vector<float> ToF32(const std::vector<BFloat16>& values) {
  std::vector<float> out(values.size());
  ConvertBf16ToF32(values.data(), out.data(), values.size());
  return out;
}

struct ReferenceFfn {
  uint32_t d_model, d_ff;
  Activation activation;
  std::vector<uint32_t> offsets;
  // fp32 inputs (already bf16-representable for bf16 tests)
  std::vector<float> x, dy;
  std::vector<std::vector<float>> w_in, w_out;

  uint32_t d_in() const { return activation == Activation::kSwiGlu ? 2 * d_ff : d_ff; }
  uint32_t rows() const { return offsets.back(); }
  uint32_t groups() const { return static_cast<uint32_t>(offsets.size() - 1); }

  static double Act(Activation act, double a, double b) {
    if (act == Activation::kGelu) return 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
    return a / (1 + std::exp(-a)) * b;
  }

  // y [rows, d_model]
  std::vector<double> Forward() const {
    std::vector<double> y(uint64_t{rows()} * d_model, 0);
    std::vector<double> h(d_in()), a(d_ff);
    for (uint32_t g = 0; g < groups(); ++g) {
      for (uint32_t r = offsets[g]; r < offsets[g + 1]; ++r) {
        Hidden(g, r, h, a);
        for (uint32_t o = 0; o < d_model; ++o) {
          double sum = 0;
          for (uint32_t f = 0; f < d_ff; ++f) sum += a[f] * w_out[g][uint64_t{f} * d_model + o];
          y[uint64_t{r} * d_model + o] = sum;
        }
      }
    }
    return y;
  }

  // Gradients of L = sum(y * dy).
  struct Grads {
    std::vector<double> dx;
    std::vector<std::vector<double>> dw_in, dw_out;
  };
  Grads Backward() const {
    Grads grads;
    grads.dx.assign(uint64_t{rows()} * d_model, 0);
    std::vector<double> h(d_in()), a(d_ff), da(d_ff), dh(d_in());
    for (uint32_t g = 0; g < groups(); ++g) {
      std::vector<double> dw_in(uint64_t{d_model} * d_in(), 0), dw_out(uint64_t{d_ff} * d_model, 0);
      for (uint32_t r = offsets[g]; r < offsets[g + 1]; ++r) {
        Hidden(g, r, h, a);
        const float* dyr = &dy[uint64_t{r} * d_model];
        for (uint32_t f = 0; f < d_ff; ++f) {
          double sum = 0;
          for (uint32_t o = 0; o < d_model; ++o) {
            sum += dyr[o] * double{w_out[g][uint64_t{f} * d_model + o]};
            dw_out[uint64_t{f} * d_model + o] += a[f] * dyr[o];
          }
          da[f] = sum;
        }
        for (uint32_t f = 0; f < d_ff; ++f) {
          if (activation == Activation::kGelu) {
            const double z = h[f];
            const double cdf = 0.5 * (1 + std::erf(z / std::sqrt(2.0)));
            const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
            dh[f] = da[f] * (cdf + z * pdf);
          } else {
            const double z = h[f], b = h[d_ff + f];
            const double s = 1 / (1 + std::exp(-z));
            dh[f] = da[f] * b * s * (1 + z * (1 - s));
            dh[d_ff + f] = da[f] * z * s;
          }
        }
        for (uint32_t i = 0; i < d_model; ++i) {
          double sum = 0;
          for (uint32_t j = 0; j < d_in(); ++j) {
            sum += dh[j] * double{w_in[g][uint64_t{i} * d_in() + j]};
            dw_in[uint64_t{i} * d_in() + j] += double{x[uint64_t{r} * d_model + i]} * dh[j];
          }
          grads.dx[uint64_t{r} * d_model + i] = sum;
        }
      }
      grads.dw_in.push_back(std::move(dw_in));
      grads.dw_out.push_back(std::move(dw_out));
    }
    return grads;
  }

  void Hidden(uint32_t g, uint32_t r, std::vector<double>& h, std::vector<double>& a) const {
    for (uint32_t j = 0; j < d_in(); ++j) {
      double sum = 0;
      for (uint32_t i = 0; i < d_model; ++i) {
        sum += double{x[uint64_t{r} * d_model + i]} * w_in[g][uint64_t{i} * d_in() + j];
      }
      h[j] = sum;
    }
    for (uint32_t f = 0; f < d_ff; ++f) {
      a[f] = Act(activation, h[f], activation == Activation::kSwiGlu ? h[d_ff + f] : 0);
    }
  }
};

inline ReferenceFfn MakeReference(uint32_t d_model, uint32_t d_ff, Activation activation,
                                  const std::vector<uint32_t>& counts, bool bf16) {
  ReferenceFfn ref{d_model, d_ff, activation, {0}, {}, {}, {}, {}};
  for (uint32_t count : counts) ref.offsets.push_back(ref.offsets.back() + count);
  ref.x = RandomValues(uint64_t{ref.rows()} * d_model, 1, 1.0f, bf16);
  ref.dy = RandomValues(uint64_t{ref.rows()} * d_model, 2, 1.0f, bf16);
  const float w_scale = 1.0f / std::sqrt(static_cast<float>(d_model));
  for (uint32_t g = 0; g < counts.size(); ++g) {
    ref.w_in.push_back(RandomValues(uint64_t{d_model} * ref.d_in(), 10 + g, w_scale, bf16));
    ref.w_out.push_back(RandomValues(uint64_t{d_ff} * d_model, 100 + g, w_scale, bf16));
  }
  return ref;
}

// max |got - want| / max(1, max |want|)
inline double MaxRelativeError(const std::vector<float>& got, const std::vector<double>& want) {
  double max_want = 1, max_err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_want = std::max(max_want, std::abs(want[i]));
    max_err = std::max(max_err, std::abs(double{got[i]} - want[i]));
  }
  return max_err / max_want;
}

}  // namespace ecss::testing
