#include "runtime/base/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace ecss {
namespace {

bool IsNanBits16(uint16_t bits, int exponent_bits) {
  const int mantissa_bits = 15 - exponent_bits;
  const uint16_t exponent_mask =
      static_cast<uint16_t>(((1u << exponent_bits) - 1) << mantissa_bits);
  return (bits & exponent_mask) == exponent_mask && (bits & ((1u << mantissa_bits) - 1)) != 0;
}

TEST(DTypeTest, NamesSizesAndParsing) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    StatusOr<DType> parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, dtype);
  }
  StatusOr<DType> bad = ParseDType("int8");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("int8"), std::string_view::npos);
}

// Every one of the 65,536 bf16 values survives bf16 -> f32 -> bf16 unchanged; NaNs stay NaN.
TEST(Bf16Test, ExhaustiveRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const BFloat16 value{static_cast<uint16_t>(bits)};
    const float widened = Bf16ToFloat(value);
    const BFloat16 back = FloatToBf16(widened);
    if (IsNanBits16(value.bits, 8)) {
      ASSERT_TRUE(std::isnan(widened)) << std::hex << bits;
      ASSERT_TRUE(IsNanBits16(back.bits, 8)) << std::hex << bits;
      ASSERT_EQ(back.bits & 0x8000, value.bits & 0x8000) << "sign of NaN " << std::hex << bits;
    } else {
      ASSERT_EQ(back.bits, value.bits) << std::hex << bits;
      ASSERT_EQ(FloatBits(widened) & 0xffff, 0u);
    }
  }
}

// The correctly rounded bf16 of f, computed independently: pick the nearer of the two
// neighbours by exact double arithmetic, ties to the even mantissa.
uint16_t ReferenceBf16(float f) {
  const uint32_t bits = FloatBits(f);
  const uint16_t down = static_cast<uint16_t>(bits >> 16);  // toward zero
  if ((bits & 0xffff) == 0) return down;
  const uint16_t up = static_cast<uint16_t>(down + 1);  // away from zero (may become inf)
  const double x = std::fabs(static_cast<double>(f));
  const double low = std::fabs(static_cast<double>(Bf16ToFloat(BFloat16{down})));
  // One bf16 step above `down` (exact in double; 2^128 when `up` is infinity).
  const int exponent = static_cast<int>((bits >> 23) & 0xff);
  const double high = low + std::ldexp(1.0, std::max(exponent, 1) - 127 - 7);
  const double to_low = x - low;
  const double to_high = high - x;
  if (to_low < to_high) return down;
  if (to_high < to_low) return up;
  return (down & 1) ? up : down;
}

TEST(Bf16Test, RoundingMatchesReference) {
  std::mt19937 rng(1234);
  std::vector<uint32_t> samples = {
      0x00000000, 0x80000000, 0x00000001, 0x00008000, 0x00018000, 0x00008001, 0x007fffff,
      0x00800000, 0x3f800000, 0x3f808000, 0x3f818000, 0x3f808001, 0x3f80ffff, 0x7f7f7fff,
      0x7f7f8000, 0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000, 0x477ff000, 0xc0490fdb};
  for (int i = 0; i < 2'000'000; ++i) samples.push_back(rng());
  for (uint32_t bits : samples) {
    const float f = BitsToFloat(bits);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f).bits, ReferenceBf16(f)) << std::hex << bits;
  }
}

TEST(Bf16Test, EdgeCases) {
  // Ties go to even.
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808000)).bits, 0x3f80);  // 1 + 2^-8: even is down
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f818000)).bits, 0x3f82);  // odd: up
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808001)).bits, 0x3f81);  // above the tie: up
  // The largest float rounds to infinity; the largest bf16 stays.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()).bits, 0x7f80);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x7f7f0000)).bits, 0x7f7f);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()).bits, 0xff80);
  // Signed zero and subnormals are kept, not flushed.
  EXPECT_EQ(FloatToBf16(-0.0f).bits, 0x8000);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00010000)).bits, 0x0001);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00008000)).bits, 0x0000);  // tie to even (zero)
  // A NaN whose payload is only in the dropped bits must not become infinity.
  const BFloat16 nan = FloatToBf16(BitsToFloat(0x7f800001));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(nan)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(-std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(FloatToBf16(BitsToFloat(0xff800001)).bits & 0x8000, 0x8000);
}

TEST(F16Test, ExhaustiveRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const Float16 value{static_cast<uint16_t>(bits)};
    const float widened = HalfToFloat(value);
    const Float16 back = FloatToHalf(widened);
    if (IsNanBits16(value.bits, 5)) {
      ASSERT_TRUE(std::isnan(widened)) << std::hex << bits;
      ASSERT_TRUE(IsNanBits16(back.bits, 5)) << std::hex << bits;
    } else {
      ASSERT_EQ(back.bits, value.bits) << std::hex << bits;
    }
  }
}

// Correct rounding to half, by search over every finite positive half value.
TEST(F16Test, RoundingMatchesReference) {
  std::vector<double> halves;  // index == bits for 0x0000..0x7bff
  for (uint32_t bits = 0; bits <= 0x7bff; ++bits) {
    halves.push_back(HalfToFloat(Float16{static_cast<uint16_t>(bits)}));
  }
  ASSERT_TRUE(std::is_sorted(halves.begin(), halves.end()));
  auto reference = [&](float f) -> uint16_t {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double x = std::fabs(static_cast<double>(f));
    if (x >= 65520.0) return sign | 0x7c00;
    auto above = std::lower_bound(halves.begin(), halves.end(), x);
    size_t hi = static_cast<size_t>(above - halves.begin());
    if (hi < halves.size() && halves[hi] == x) return static_cast<uint16_t>(sign | hi);
    if (hi == halves.size()) return sign | 0x7bff;  // between 65504 and 65520
    const size_t lo = hi - 1;
    const double to_low = x - halves[lo];
    const double to_high = halves[hi] - x;
    size_t pick = to_low < to_high ? lo : to_high < to_low ? hi : ((lo & 1) ? hi : lo);
    return static_cast<uint16_t>(sign | pick);
  };
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> exponent(-27.0f, 17.0f);
  for (int i = 0; i < 500'000; ++i) {
    // Log-uniform magnitudes cover subnormal, normal and overflow ranges evenly.
    float f = std::exp2(exponent(rng)) * ((rng() & 1) ? -1.0f : 1.0f);
    ASSERT_EQ(FloatToHalf(f).bits, reference(f)) << f;
  }
  for (float f : {65504.0f, 65519.99f, 65520.0f, 5.9604645e-8f, 2.9802322e-8f, 2.98023259e-8f,
                  6.1035156e-5f, 1.0009765625f, 1.00048828125f}) {
    EXPECT_EQ(FloatToHalf(f).bits, reference(f)) << f;
  }
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()).bits, 0x7c00);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DTypeTest, BulkConversionsMatchScalar) {
  std::vector<float> values = {0.0f, -1.5f, 3.14159f, 1e-30f, 1e30f, 65519.0f};
  std::vector<BFloat16> bf16(values.size());
  std::vector<Float16> f16(values.size());
  std::vector<float> back(values.size());
  ConvertF32ToBf16(values.data(), bf16.data(), values.size());
  ConvertBf16ToF32(bf16.data(), back.data(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(bf16[i].bits, FloatToBf16(values[i]).bits);
    EXPECT_EQ(FloatBits(back[i]), FloatBits(Bf16ToFloat(bf16[i])));
  }
  ConvertF32ToF16(values.data(), f16.data(), values.size());
  ConvertF16ToF32(f16.data(), back.data(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(f16[i].bits, FloatToHalf(values[i]).bits);
    EXPECT_EQ(FloatBits(back[i]), FloatBits(HalfToFloat(f16[i])));
  }
}

TEST(DTypeTest, AnyDtypeToAndFromF32MatchesTheElementConversions) {
  const std::vector<float> values = {0.0f, -1.5f, 3.14159f, 1e-20f, 65504.0f, -2.5e5f};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> packed(values.size() * DTypeSize(dtype));
    ConvertFromF32(values.data(), packed.data(), dtype, values.size());
    std::vector<float> back(values.size());
    ConvertToF32(packed.data(), dtype, back.data(), values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      float want = values[i];
      if (dtype == DType::kBF16) want = Bf16ToFloat(FloatToBf16(values[i]));
      if (dtype == DType::kF16) want = HalfToFloat(FloatToHalf(values[i]));
      EXPECT_EQ(back[i], want) << DTypeName(dtype) << " " << values[i];
    }
  }
}

}  // namespace
}  // namespace ecss
