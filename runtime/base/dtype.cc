#include "runtime/base/dtype.h"

#include <cstring>

#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
  }
  return "invalid";
}

StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "f32" || name == "fp32" || name == "float32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "f16" || name == "fp16" || name == "float16") return DType::kF16;
  return InvalidArgumentError(StrCat("unknown dtype '", name, "' (expected f32, bf16 or f16)"));
}

float HalfToFloat(Float16 value) {
  const uint32_t sign = uint32_t{value.bits & 0x8000u} << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1fu;
  uint32_t mantissa = value.bits & 0x3ffu;
  if (exponent == 0x1f) {  // infinity or NaN: keep the payload
    return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    // Subnormal half: normalise. value = mantissa * 2^-24.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    const uint32_t f32_exponent = static_cast<uint32_t>(127 - 15 + 1 - shift);
    return BitsToFloat(sign | (f32_exponent << 23) | (mantissa << 13));
  }
  return BitsToFloat(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

Float16 FloatToHalf(float value) {
  const uint32_t bits = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;

  if (magnitude > 0x7f800000u) {  // NaN: quiet it, keep the top of the payload
    return Float16{static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
  }
  // 65520 is halfway between the largest half (65504) and 65536; ties go to even, which is
  // 65536: infinity. So everything from 65520 up, and infinity itself, becomes infinity.
  if (magnitude >= 0x477ff000u) return Float16{static_cast<uint16_t>(sign | 0x7c00u)};

  if (magnitude >= 0x38800000u) {  // normal half (>= 2^-14)
    // Re-bias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    const uint32_t odd = (magnitude >> 13) & 1u;
    const uint32_t rounded = magnitude - 0x38000000u + 0x0fffu + odd;
    return Float16{static_cast<uint16_t>(sign | (rounded >> 13))};
  }

  // Subnormal half or zero: the result is round(value / 2^-24) in integer arithmetic.
  const uint32_t exponent = magnitude >> 23;
  if (exponent == 0) return Float16{sign};  // f32 zero or subnormal: far below 2^-25
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // value / 2^-24 = mantissa >> shift
  if (shift > 24) return Float16{sign};   // below half of the smallest subnormal
  const uint32_t kept = mantissa >> shift;
  const uint32_t remainder = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rounded =
      kept + ((remainder > half || (remainder == half && (kept & 1u))) ? 1 : 0);
  return Float16{static_cast<uint16_t>(sign | rounded)};
}

void ConvertF32ToBf16(const float* src, BFloat16* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

void ConvertBf16ToF32(const BFloat16* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

void ConvertF32ToF16(const float* src, Float16* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i]);
}

void ConvertF16ToF32(const Float16* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

void ConvertToF32(const void* src, DType src_dtype, float* dst, size_t n) {
  switch (src_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16:
      ConvertBf16ToF32(static_cast<const BFloat16*>(src), dst, n);
      return;
    case DType::kF16:
      ConvertF16ToF32(static_cast<const Float16*>(src), dst, n);
      return;
  }
}

void ConvertFromF32(const float* src, void* dst, DType dst_dtype, size_t n) {
  switch (dst_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16:
      ConvertF32ToBf16(src, static_cast<BFloat16*>(dst), n);
      return;
    case DType::kF16:
      ConvertF32ToF16(src, static_cast<Float16*>(dst), n);
      return;
  }
}

}  // namespace ecss
