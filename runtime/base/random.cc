#include "runtime/base/random.h"

namespace ecss {

namespace {
constexpr uint32_t kMultiplier0 = 0xD2511F53u;
constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
}  // namespace

PhiloxCounter Philox4x32(PhiloxCounter counter, PhiloxKey key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += kWeyl0;
      key[1] += kWeyl1;
    }
    const uint64_t product0 = uint64_t{kMultiplier0} * counter[0];
    const uint64_t product1 = uint64_t{kMultiplier1} * counter[2];
    const auto hi0 = static_cast<uint32_t>(product0 >> 32);
    const auto lo0 = static_cast<uint32_t>(product0);
    const auto hi1 = static_cast<uint32_t>(product1 >> 32);
    const auto lo1 = static_cast<uint32_t>(product1);
    counter = {hi1 ^ counter[1] ^ key[0], lo1, hi0 ^ counter[3] ^ key[1], lo0};
  }
  return counter;
}

uint32_t CounterRng::Next32() {
  if (used_ == 4) {
    buffer_ = Philox4x32({block_index_++, stream_lo_, stream_hi_, 0}, key_);
    used_ = 0;
  }
  return buffer_[used_++];
}

void CounterRng::FillBytes(void* dst, size_t bytes) {
  auto* out = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < bytes; i += 4) {
    const uint32_t word = Next32();
    for (size_t b = 0; b < 4 && i + b < bytes; ++b) {
      out[i + b] = static_cast<unsigned char>(word >> (8 * b));
    }
  }
}

uint32_t CounterRng::Uniform(uint32_t bound) {
  // Lemire, "Fast random integer generation in an interval" (2019).
  uint64_t product = uint64_t{Next32()} * bound;
  auto low = static_cast<uint32_t>(product);
  if (low < bound) {
    const uint32_t threshold = static_cast<uint32_t>(-bound) % bound;
    while (low < threshold) {
      product = uint64_t{Next32()} * bound;
      low = static_cast<uint32_t>(product);
    }
  }
  return static_cast<uint32_t>(product >> 32);
}

uint64_t MixBits(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace ecss
