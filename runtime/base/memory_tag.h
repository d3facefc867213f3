// Memory tags and per-tag accounting. Every allocation in ECSS carries a tag saying what it
// holds, so that a budget report can say where each byte lives (DESIGN.md section 6).
// MemoryAccounting is lock-free and thread-safe; nothing blocks.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

#include "runtime/base/status.h"

namespace ecss {

enum class MemoryTag : uint8_t {
  kExpertWeights = 0,     // compute weights (bf16) of experts
  kMasterWeights = 1,     // fp32 master weights
  kOptimizerMoments = 2,  // optimizer state (Adam m and v, ...)
  kGradients = 3,         // gradient accumulators
  kStaging = 4,           // transfer staging buffers (pinned)
  kActivations = 5,       // activations and their gradients
  kWorkspace = 6,         // scratch space of kernels
  kOther = 7,
};
inline constexpr int kNumMemoryTags = 8;

std::string_view MemoryTagName(MemoryTag tag);  // "expert_weights", ...
StatusOr<MemoryTag> ParseMemoryTag(std::string_view name);

struct MemoryUsage {
  uint64_t bytes = 0;        // live now
  uint64_t peak_bytes = 0;   // highest `bytes` ever seen
  uint64_t allocations = 0;  // live allocations now
};

class MemoryAccounting {
 public:
  MemoryAccounting() = default;
  MemoryAccounting(const MemoryAccounting&) = delete;
  MemoryAccounting& operator=(const MemoryAccounting&) = delete;

  void Charge(MemoryTag tag, uint64_t bytes);
  // REQUIRES: the same bytes were charged to the same tag (checked).
  void Release(MemoryTag tag, uint64_t bytes);

  MemoryUsage Usage(MemoryTag tag) const;
  MemoryUsage Total() const;
  // "expert_weights 1.00 GiB (peak 1.50 GiB, 12 live), ..." listing only tags ever used.
  std::string Summary() const;

 private:
  struct Counter {
    std::atomic<uint64_t> bytes{0};
    std::atomic<uint64_t> peak_bytes{0};
    std::atomic<uint64_t> allocations{0};
  };
  static void Add(Counter& counter, uint64_t bytes);
  static void Subtract(Counter& counter, uint64_t bytes, std::string_view what);
  static MemoryUsage Read(const Counter& counter);

  std::array<Counter, kNumMemoryTags> per_tag_;
  Counter total_;
};

}  // namespace ecss
