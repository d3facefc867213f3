#include "runtime/device/range_allocator.h"

#include "runtime/base/check.h"

namespace ecss {

RangeAllocator::RangeAllocator(uint64_t capacity, uint64_t alignment)
    : capacity_(capacity), alignment_(alignment), free_bytes_(capacity) {
  ECSS_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0) << "alignment " << alignment;
  ECSS_CHECK(capacity % alignment == 0) << "capacity " << capacity << " alignment " << alignment;
  if (capacity > 0) Insert(0, capacity);
}

void RangeAllocator::Insert(uint64_t offset, uint64_t size) {
  by_offset_.emplace(offset, size);
  by_size_.emplace(size, offset);
}

void RangeAllocator::Erase(std::map<uint64_t, uint64_t>::iterator it) {
  by_size_.erase({it->second, it->first});
  by_offset_.erase(it);
}

std::optional<uint64_t> RangeAllocator::Allocate(uint64_t bytes) {
  ECSS_CHECK(bytes > 0);
  const uint64_t size = RoundUp(bytes);
  if (size < bytes) return std::nullopt;  // rounding overflowed: cannot fit
  auto fit = by_size_.lower_bound({size, 0});
  if (fit == by_size_.end()) return std::nullopt;
  const uint64_t range_size = fit->first;
  const uint64_t offset = fit->second;
  Erase(by_offset_.find(offset));
  if (range_size > size) Insert(offset + size, range_size - size);
  free_bytes_ -= size;
  return offset;
}

void RangeAllocator::Free(uint64_t offset, uint64_t bytes) {
  uint64_t size = RoundUp(bytes);
  ECSS_CHECK(offset % alignment_ == 0 && offset + size <= capacity_)
      << "freeing [" << offset << ", +" << size << ") outside the arena of " << capacity_;
  auto next = by_offset_.lower_bound(offset);
  ECSS_CHECK(next == by_offset_.end() || next->first >= offset + size)
      << "freeing [" << offset << ", +" << size << ") overlaps free range at " << next->first;
  if (next != by_offset_.begin()) {
    auto previous = std::prev(next);
    ECSS_CHECK(previous->first + previous->second <= offset)
        << "freeing [" << offset << ", +" << size << ") overlaps free range at " << previous->first;
    if (previous->first + previous->second == offset) {  // merge with the range before
      offset = previous->first;
      size += previous->second;
      Erase(previous);
    }
  }
  free_bytes_ += RoundUp(bytes);
  next = by_offset_.lower_bound(offset);
  if (next != by_offset_.end() && next->first == offset + size) {  // merge with the range after
    size += next->second;
    Erase(next);
  }
  Insert(offset, size);
}

uint64_t RangeAllocator::largest_free_range() const {
  return by_size_.empty() ? 0 : by_size_.rbegin()->first;
}

}  // namespace ecss
