// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11): the value at a counter is
// a pure function of (key, counter), so a table built from it is the same on every platform,
// compiler and thread count, and any element can be generated independently of the others.
// std::uniform_int_distribution is implementation-defined and is never used for anything that
// must be reproducible. Thread-safe (pure functions); C++17.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace ecss {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// The Philox4x32 block function with 10 rounds.
PhiloxCounter Philox4x32(PhiloxCounter counter, PhiloxKey key);

// A reproducible stream: block i of the stream with key (seed, stream_id) is Philox4x32 at
// counter (i, stream_id low, stream_id high, 0). Distinct stream ids give independent streams
// (e.g. one per (layer, domain)).
class CounterRng {
 public:
  CounterRng(uint64_t seed, uint64_t stream_id)
      : key_{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
        stream_lo_(static_cast<uint32_t>(stream_id)),
        stream_hi_(static_cast<uint32_t>(stream_id >> 32)) {}

  uint32_t Next32();
  uint64_t Next64() {
    const uint64_t high = Next32();
    return (high << 32) | Next32();
  }
  // Uniform in [0, bound) for bound > 0, without modulo bias (Lemire's multiply-and-reject),
  // using only this stream: identical everywhere.
  uint32_t Uniform(uint32_t bound);
  // Uniform in [0, 1) with 24 bits of precision.
  float UniformFloat() { return static_cast<float>(Next32() >> 8) * (1.0f / 16777216.0f); }
  // The stream's next `bytes` bytes into `dst`, each word little end first (a tail takes a
  // whole word): the same bytes on every platform, and data no storage layer can compress
  // (what an I/O rate measurement writes, as fio does).
  void FillBytes(void* dst, size_t bytes);

 private:
  PhiloxKey key_;
  uint32_t stream_lo_;
  uint32_t stream_hi_;
  uint32_t block_index_ = 0;
  PhiloxCounter buffer_{};
  int used_ = 4;  // words of buffer_ already handed out
};

// A 64-bit mix of the inputs (SplitMix64 finaliser): for hashing ids into seeds and streams.
uint64_t MixBits(uint64_t a, uint64_t b);

}  // namespace ecss
