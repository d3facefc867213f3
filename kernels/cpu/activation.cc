#include "kernels/cpu/activation.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// Each loop is compiled for three ISAs; the dynamic loader picks one (GCC target_clones).
// Not under sanitizers: the ifunc resolvers run before ThreadSanitizer's runtime is up and
// crash the process at load.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ECSS_SANITIZED)
#define ECSS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ECSS_SIMD_CLONES
#endif

namespace ecss::cpu {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 split so that n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// exp(x) for x in [-87, 88] (clamped outside): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6
// polynomial, 2^n by building the exponent bits. Relative error about 2 ulp.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round to nearest with the 1.5 * 2^23 trick: exact for |x log2e| < 2^22, and vectorises.
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = static_cast<int32_t>(n) + 127;
  return p * std::bit_cast<float>(static_cast<uint32_t>(exponent) << 23);
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7), odd-extended.
inline float Erf(float x) {
  const float ax = std::abs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * Exp(-ax * ax);
  return std::copysign(y, x);
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }

}  // namespace

float ExpApprox(float x) { return Exp(x); }
float ErfApprox(float x) { return Erf(x); }

ECSS_SIMD_CLONES void GeluForward(const float* h, float* a, size_t n) {
  for (size_t i = 0; i < n; ++i) a[i] = 0.5f * h[i] * (1.0f + Erf(h[i] * kInvSqrt2));
}

ECSS_SIMD_CLONES void GeluBackward(const float* h, float* grad, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float x = h[i];
    const float cdf = 0.5f * (1.0f + Erf(x * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * Exp(-0.5f * x * x);
    grad[i] *= cdf + x * pdf;
  }
}

ECSS_SIMD_CLONES void SwiGluForward(const float* ha, const float* hb, float* a, size_t n) {
  for (size_t i = 0; i < n; ++i) a[i] = ha[i] * Sigmoid(ha[i]) * hb[i];
}

ECSS_SIMD_CLONES void SwiGluBackward(const float* ha, const float* hb, float* grad_a, float* grad_b,
                                     size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float s = Sigmoid(ha[i]);
    const float silu = ha[i] * s;
    const float dsilu = s * (1.0f + ha[i] * (1.0f - s));
    const float da = grad_a[i];
    grad_b[i] = da * silu;
    grad_a[i] = da * hb[i] * dsilu;
  }
}

ECSS_SIMD_CLONES void RoundToBf16(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(x[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    // NaN: keep it a (quiet) NaN rather than letting the carry turn it into infinity.
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    x[i] = std::bit_cast<float>(nan ? (bits | 0x00400000u) & 0xFFFF0000u : rounded);
  }
}

}  // namespace ecss::cpu
