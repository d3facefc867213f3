// RangeAllocator: best-fit bookkeeping of [offset, offset + size) ranges inside a fixed
// capacity, with coalescing of neighbouring free ranges. It owns no memory: the arena
// allocators (sim device memory, pinned host pool) map offsets onto their region with it.
// Every size is rounded up to the alignment, so offsets stay aligned.
// Not thread-safe: its owner serialises calls.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>

namespace ecss {

class RangeAllocator {
 public:
  // REQUIRES: alignment is a power of two; capacity is a multiple of it (checked).
  RangeAllocator(uint64_t capacity, uint64_t alignment);

  // The offset of a free range of at least `bytes` (rounded up), the smallest that fits, or
  // nullopt when none does. `bytes` > 0.
  std::optional<uint64_t> Allocate(uint64_t bytes);
  // REQUIRES: [offset, offset + RoundUp(bytes)) was returned by Allocate and not freed
  // (checked: a range that overlaps free space aborts, as it means corrupted bookkeeping).
  void Free(uint64_t offset, uint64_t bytes);

  uint64_t RoundUp(uint64_t bytes) const { return (bytes + alignment_ - 1) & ~(alignment_ - 1); }
  uint64_t capacity() const { return capacity_; }
  uint64_t free_bytes() const { return free_bytes_; }
  uint64_t largest_free_range() const;
  size_t free_range_count() const { return by_offset_.size(); }

 private:
  void Insert(uint64_t offset, uint64_t size);
  void Erase(std::map<uint64_t, uint64_t>::iterator it);

  const uint64_t capacity_;
  const uint64_t alignment_;
  uint64_t free_bytes_;
  std::map<uint64_t, uint64_t> by_offset_;           // free ranges: offset -> size
  std::set<std::pair<uint64_t, uint64_t>> by_size_;  // free ranges: (size, offset)
};

}  // namespace ecss
