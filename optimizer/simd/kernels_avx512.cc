// The AVX-512 path (16 lanes; F + BW + VL). Compiled for that target with a pragma, so the
// rest of the build stays generic; see update_impl.h for why the code is shared.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "optimizer/update_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

namespace {

struct Avx512Vec {
  using T = __m512;
  static constexpr size_t kWidth = 16;
  static constexpr size_t kAlignBytes = 64;
  static T Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void Stream(float* p, T v) { _mm512_stream_ps(p, v); }
  template <bool kBf16>
  static T LoadGrad(const void* grad, size_t i) {
    if constexpr (kBf16) {
      const __m256i bits = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(grad) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_loadu_ps(static_cast<const float*>(grad) + i);
    }
  }
  static T Set1(float v) { return _mm512_set1_ps(v); }
  static T Add(T a, T b) { return _mm512_add_ps(a, b); }
  static T Mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T Div(T a, T b) { return _mm512_div_ps(a, b); }
  static T Sqrt(T a) { return _mm512_sqrt_ps(a); }
  static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T Fnma(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T Sign(T a) {
    const T zero = _mm512_setzero_ps();
    const __mmask16 positive = _mm512_cmp_ps_mask(a, zero, _CMP_GT_OQ);
    const __mmask16 negative = _mm512_cmp_ps_mask(a, zero, _CMP_LT_OQ);
    return _mm512_mask_mov_ps(_mm512_mask_mov_ps(zero, positive, _mm512_set1_ps(1.0f)), negative,
                              _mm512_set1_ps(-1.0f));
  }
  // Round to nearest even, NaN quieted: the integer form of FloatToBf16 (not vcvtneps2bf16,
  // which flushes subnormals).
  static __m256i Bf16Bits(T v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, quiet), 16));
  }
  static void StoreBf16(ecss::BFloat16* p, T v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), Bf16Bits(v));
  }
  static void StreamBf16(ecss::BFloat16* p, T v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), Bf16Bits(v));
  }
  static void Fence() { _mm_sfence(); }
  template <bool kBf16>
  static size_t SumSquares8(const void* grad, size_t i, size_t end, double* lanes) {
    __m512d acc = _mm512_loadu_pd(lanes);
    for (; i + 16 <= end; i += 16) {
      const T x = LoadGrad<kBf16>(grad, i);
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      const __m512d b =
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      acc = _mm512_fmadd_pd(a, a, acc);
      acc = _mm512_fmadd_pd(b, b, acc);
    }
    _mm512_storeu_pd(lanes, acc);
    return i;
  }
};

}  // namespace

#include "optimizer/simd/update_impl.h"

namespace ecss::simd_internal {

void UpdateRangeAvx512(const UpdateScalars& s, const ParamArrays& a, size_t begin, size_t end) {
  UpdateRangeImpl<Avx512Vec>(s, a, begin, end);
}

double SumSquaresAvx512(const void* grad, DType dtype, size_t begin, size_t end) {
  return GradSumOfSquaresImpl<Avx512Vec>(grad, dtype, begin, end);
}

}  // namespace ecss::simd_internal

#pragma GCC pop_options
