// Element types and their exact conversions.
// f32 <-> bf16 and f32 <-> f16 round to nearest, ties to even; NaN stays NaN (quieted, sign
// kept); overflow rounds to infinity as IEEE 754 requires; subnormals are kept, never flushed.
// The conversions are pure functions of their bits: they ignore the FPU rounding mode and
// FTZ/DAZ, so every thread, SIMD path and machine gets the same answer.
// Thread-safe; C++17 (nvcc sees this header).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "runtime/base/status.h"

namespace ecss {

enum class DType : uint8_t {
  kF32 = 0,
  kBF16 = 1,
  kF16 = 2,
};

constexpr size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }
std::string_view DTypeName(DType dtype);  // "f32", "bf16", "f16"
StatusOr<DType> ParseDType(std::string_view name);

// Storage types: the bits, no arithmetic (convert to float to compute).
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float Bf16ToFloat(BFloat16 value) { return BitsToFloat(uint32_t{value.bits} << 16); }

inline BFloat16 FloatToBf16(float value) {
  uint32_t bits = FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    // NaN: truncating could clear every payload bit left and make it infinity; set the quiet
    // bit instead.
    return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  }
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. A carry out of
  // the mantissa bumps the exponent, which is exactly right (including overflow to infinity).
  uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

float HalfToFloat(Float16 value);
Float16 FloatToHalf(float value);

// Bulk conversions over n elements (src and dst must not overlap).
void ConvertF32ToBf16(const float* src, BFloat16* dst, size_t n);
void ConvertBf16ToF32(const BFloat16* src, float* dst, size_t n);
void ConvertF32ToF16(const float* src, Float16* dst, size_t n);
void ConvertF16ToF32(const Float16* src, float* dst, size_t n);
// n elements of any dtype to or from fp32 (f32 is a copy), e.g. activations at a boundary.
void ConvertToF32(const void* src, DType src_dtype, float* dst, size_t n);
void ConvertFromF32(const float* src, void* dst, DType dst_dtype, size_t n);

}  // namespace ecss
