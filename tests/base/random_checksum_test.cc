#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/checksum.h"
#include "runtime/base/checksum_paths.h"
#include "runtime/base/random.h"

namespace ecss {
namespace {

// Known-answer vectors of Random123's philox4x32-10 (counter, key -> output).
TEST(PhiloxTest, KnownAnswers) {
  EXPECT_EQ(Philox4x32({0, 0, 0, 0}, {0, 0}),
            (PhiloxCounter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(Philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (PhiloxCounter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(Philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (PhiloxCounter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(CounterRngTest, ReproducibleAndStreamsDiffer) {
  CounterRng a(42, 7), b(42, 7), c(42, 8), d(43, 7);
  bool differs_c = false, differs_d = false;
  for (int i = 0; i < 100; ++i) {
    const uint32_t x = a.Next32();
    EXPECT_EQ(x, b.Next32());
    differs_c |= x != c.Next32();
    differs_d |= x != d.Next32();
  }
  EXPECT_TRUE(differs_c);
  EXPECT_TRUE(differs_d);
  // The first word of a stream is Philox at block 0 of that stream: pinned for all platforms.
  CounterRng pinned(0, 0);
  EXPECT_EQ(pinned.Next32(), 0x6627e8d5u);
}

// FillBytes is the stream's words, little end first, the last one cut at the tail.
TEST(CounterRngTest, FillBytesIsTheStreamsWords) {
  std::vector<unsigned char> bytes(1 << 16 | 3);
  CounterRng fill(5, 1), words(5, 1);
  fill.FillBytes(bytes.data(), bytes.size());
  for (size_t i = 0; i < bytes.size(); i += 4) {
    const uint32_t word = words.Next32();
    for (size_t b = 0; b < 4 && i + b < bytes.size(); ++b) {
      ASSERT_EQ(bytes[i + b], static_cast<unsigned char>(word >> (8 * b))) << i + b;
    }
  }
  EXPECT_EQ(fill.Next32(), words.Next32()) << "the tail took one whole word";
}

TEST(CounterRngTest, UniformIsInRangeAndUnbiased) {
  CounterRng rng(1, 2);
  std::map<uint32_t, int> counts;
  for (int i = 0; i < 70000; ++i) {
    const uint32_t x = rng.Uniform(7);
    ASSERT_LT(x, 7u);
    ++counts[x];
  }
  for (const auto& [value, count] : counts) EXPECT_NEAR(count, 10000, 500) << value;
  EXPECT_EQ(rng.Uniform(1), 0u);
  for (int i = 0; i < 1000; ++i) {
    const float f = rng.UniformFloat();
    ASSERT_GE(f, 0.0f);
    ASSERT_LT(f, 1.0f);
  }
}

TEST(Crc32cTest, KnownValuesAndIncremental) {
  const std::string check = "123456789";
  EXPECT_EQ(Crc32c(check.data(), check.size()), 0xE3069283u);
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(Crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);  // RFC 3720 B.4
  // Incremental over any split equals one pass, including odd lengths and offsets.
  std::vector<uint8_t> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31 + 7);
  const uint32_t whole = Crc32c(data.data(), data.size());
  for (size_t split : {0, 1, 7, 8, 9, 500, 999, 1000}) {
    const uint32_t first = Crc32c(data.data(), split);
    EXPECT_EQ(Crc32c(data.data() + split, data.size() - split, first), whole) << split;
  }
  data[500] ^= 1;
  EXPECT_NE(Crc32c(data.data(), data.size()), whole);
}

TEST(Crc32cTest, CombinedPartsEqualTheWhole) {
  std::vector<uint8_t> data(3 << 20);
  CounterRng rng(11, 0);
  rng.FillBytes(data.data(), data.size());
  const uint32_t whole = Crc32c(data.data(), data.size());
  // Two parts at any split, the empty ones included.
  for (size_t split : {size_t{0}, size_t{1}, size_t{7}, size_t{4096}, size_t{65537},
                       size_t{1} << 20, data.size() - 3, data.size()}) {
    const uint32_t first = Crc32c(data.data(), split);
    const uint32_t second = Crc32c(data.data() + split, data.size() - split);
    EXPECT_EQ(Crc32cCombine(first, second, data.size() - split), whole) << split;
  }
  // Many parts of uneven sizes, joined left to right.
  uint32_t joined = 0;
  for (size_t at = 0, size = 1; at < data.size(); at += size, size = size * 3 + 5) {
    const size_t part = std::min(size, data.size() - at);
    joined = Crc32cCombine(joined, Crc32c(data.data() + at, part), part);
  }
  EXPECT_EQ(joined, whole);
  // A flipped bit in the second part changes the combination.
  const uint32_t first = Crc32c(data.data(), 1000);
  data[2000] ^= 4;
  EXPECT_NE(
      Crc32cCombine(first, Crc32c(data.data() + 1000, data.size() - 1000), data.size() - 1000),
      whole);
}

// CRC-32C one bit at a time, straight from the polynomial: the reference for the fast paths.
uint32_t BitwiseCrc32c(const uint8_t* data, size_t bytes, uint32_t crc) {
  crc = ~crc;
  for (size_t i = 0; i < bytes; ++i) {
    crc ^= data[i];
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) != 0 ? 0x82F63B78u : 0u);
  }
  return ~crc;
}

TEST(Crc32cTest, LargeBuffersEqualTheBitwiseDefinitionAtEverySizeAndStart) {
  // Crc32c as callers reach it (on this CPU's way; Crc32cPathTest checks each): sizes around
  // where three interleaved lanes start without the fold, tails of several lengths, a nonzero
  // starting value, and unaligned starts.
  std::vector<uint8_t> data((1u << 20) + 64);
  CounterRng rng(11, 3);
  for (uint8_t& byte : data) byte = static_cast<uint8_t>(rng.Uniform(256));
  for (size_t bytes : {size_t{65535}, size_t{65536}, size_t{65537}, size_t{65543},
                       size_t{3 * 65536 + 5}, size_t{1u << 20}, (size_t{1} << 20) + 23}) {
    for (size_t start : {size_t{0}, size_t{3}}) {
      for (uint32_t initial : {0u, 0xDEADBEEFu}) {
        EXPECT_EQ(Crc32c(data.data() + start, bytes, initial),
                  BitwiseCrc32c(data.data() + start, bytes, initial))
            << bytes << " bytes from " << start << ", starting at " << initial;
      }
    }
  }
  // A flipped bit in any lane changes it.
  const uint32_t whole = Crc32c(data.data(), 1u << 20);
  for (size_t at : {size_t{10}, size_t{400000}, size_t{800000}, (size_t{1} << 20) - 1}) {
    data[at] ^= 0x10;
    EXPECT_NE(Crc32c(data.data(), 1u << 20), whole) << at;
    data[at] ^= 0x10;
  }
}

// Every way Crc32c computes, against the definition: sizes below, at and around each path's
// block sizes (8 bytes; 16, 64 and 256 for the fold) and where Crc32c starts using it,
// unaligned starts and a nonzero starting value. A path this CPU does not run is skipped
// (and reported as skipped).
struct Crc32cCase {
  size_t bytes, start;
  uint32_t initial, expected;
};

class Crc32cPathTest : public ::testing::TestWithParam<checksum_internal::Crc32cPath> {
 protected:
  // The data, and each case's value by the definition (computed once for every path).
  static const std::vector<uint8_t>& Data() {
    static const std::vector<uint8_t> data = [] {
      std::vector<uint8_t> bytes((1u << 17) + 64);
      CounterRng rng(5, 9);
      for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng.Uniform(256));
      return bytes;
    }();
    return data;
  }
  static const std::vector<Crc32cCase>& Cases() {
    static const std::vector<Crc32cCase> cases = [] {
      std::vector<size_t> sizes = {0,
                                   1,
                                   7,
                                   8,
                                   15,
                                   16,
                                   17,
                                   63,
                                   64,
                                   65,
                                   255,
                                   256,
                                   257,
                                   271,
                                   319,
                                   320,
                                   383,
                                   384,
                                   511,
                                   512,
                                   513,
                                   575,
                                   1000,
                                   4096,
                                   4099,
                                   65535,
                                   65536,
                                   65537,
                                   (1u << 17) + 23};
      CounterRng rng(6, 1);
      for (size_t i = 0; i < 40; ++i) sizes.push_back(rng.Uniform(1u << 17));
      std::vector<Crc32cCase> all;
      for (size_t bytes : sizes) {
        for (size_t start : {size_t{0}, size_t{1}, size_t{13}}) {
          for (uint32_t initial : {0u, 0xDEADBEEFu}) {
            all.push_back(
                {bytes, start, initial, BitwiseCrc32c(Data().data() + start, bytes, initial)});
          }
        }
      }
      return all;
    }();
    return cases;
  }
};

TEST_P(Crc32cPathTest, EqualsTheBitwiseDefinition) {
  const checksum_internal::Crc32cPath path = GetParam();
  if (!checksum_internal::Crc32cPathRuns(path)) {
    GTEST_SKIP() << "this CPU does not run " << checksum_internal::Crc32cPathName(path);
  }
  for (const Crc32cCase& c : Cases()) {
    ASSERT_EQ(checksum_internal::Crc32cWith(path, Data().data() + c.start, c.bytes, c.initial),
              c.expected)
        << c.bytes << " bytes from " << c.start << ", starting at " << c.initial;
  }
}

INSTANTIATE_TEST_SUITE_P(EveryPath, Crc32cPathTest,
                         ::testing::ValuesIn(checksum_internal::kCrc32cPaths),
                         [](const ::testing::TestParamInfo<checksum_internal::Crc32cPath>& param) {
                           std::string name(checksum_internal::Crc32cPathName(param.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace ecss
