// The AVX2 + FMA path (8 lanes). Compiled for that target with a pragma, so the rest of the
// build stays generic; see update_impl.h for why the code is shared.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "optimizer/update_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

struct Avx2Vec {
  using T = __m256;
  static constexpr size_t kWidth = 8;
  static constexpr size_t kAlignBytes = 32;
  static T Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static void Stream(float* p, T v) { _mm256_stream_ps(p, v); }
  template <bool kBf16>
  static T LoadGrad(const void* grad, size_t i) {
    if constexpr (kBf16) {
      const __m128i bits =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(grad) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    } else {
      return _mm256_loadu_ps(static_cast<const float*>(grad) + i);
    }
  }
  static T Set1(float v) { return _mm256_set1_ps(v); }
  static T Add(T a, T b) { return _mm256_add_ps(a, b); }
  static T Mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T Div(T a, T b) { return _mm256_div_ps(a, b); }
  static T Sqrt(T a) { return _mm256_sqrt_ps(a); }
  static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T Fnma(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T Sign(T a) {
    const T zero = _mm256_setzero_ps();
    const T positive = _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
    const T negative = _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
    return _mm256_or_ps(positive, negative);
  }
  // Round to nearest even, NaN quieted: the integer form of FloatToBf16.
  static __m128i Bf16Bits(T v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
    const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
    const __m256i high = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0xD8));
  }
  static void StoreBf16(ecss::BFloat16* p, T v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), Bf16Bits(v));
  }
  static void StreamBf16(ecss::BFloat16* p, T v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), Bf16Bits(v));
  }
  static void Fence() { _mm_sfence(); }
  template <bool kBf16>
  static size_t SumSquares8(const void* grad, size_t i, size_t end, double* lanes) {
    __m256d low = _mm256_loadu_pd(lanes);
    __m256d high = _mm256_loadu_pd(lanes + 4);
    for (; i + 8 <= end; i += 8) {
      const T x = LoadGrad<kBf16>(grad, i);
      const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      low = _mm256_fmadd_pd(a, a, low);
      high = _mm256_fmadd_pd(b, b, high);
    }
    _mm256_storeu_pd(lanes, low);
    _mm256_storeu_pd(lanes + 4, high);
    return i;
  }
};

}  // namespace

#include "optimizer/simd/update_impl.h"

namespace ecss::simd_internal {

void UpdateRangeAvx2(const UpdateScalars& s, const ParamArrays& a, size_t begin, size_t end) {
  UpdateRangeImpl<Avx2Vec>(s, a, begin, end);
}

double SumSquaresAvx2(const void* grad, DType dtype, size_t begin, size_t end) {
  return GradSumOfSquaresImpl<Avx2Vec>(grad, dtype, begin, end);
}

}  // namespace ecss::simd_internal

#pragma GCC pop_options
