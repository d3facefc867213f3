// ArenaAllocator: an Allocator over one mmap'd region with a hard capacity, sub-allocated
// best-fit (RangeAllocator). It is the simulated device's memory, and the slab behind the
// pinned host pool (pinned_pool.h). A failed allocation leaves the arena exactly as it was.
// Thread-safe (Allocator's lock). The region is reserved lazily unless `populate` is set.
#pragma once

#include <memory>
#include <string>

#include "runtime/device/allocator.h"
#include "runtime/device/range_allocator.h"

namespace ecss {

struct ArenaOptions {
  std::string name = "arena";  // used in every error message
  Device device = Device::Host();
  uint64_t capacity_bytes = 0;  // hard capacity; > 0 and at most the machine's memory
  size_t alignment = 256;       // of every block (power of two, at most the page size)
  bool populate = false;        // pre-fault the pages at creation
  bool lock_pages = false;      // mlock the region; failure is reported by pages_locked()
  // Ask for transparent huge pages (madvise; x86-64's 2 MiB) for a region of 2 MiB or more:
  // O_DIRECT and DMA transfers then move physically contiguous runs. Advice only; the kernel
  // may decline. The pinned pools' memory sets it (pinned_pool.h), device arenas do not.
  bool huge_pages = false;
};

// One mapped region, before an allocator owns it.
struct MappedRegion {
  void* base = nullptr;
  uint64_t bytes = 0;           // whole pages
  uint64_t capacity_bytes = 0;  // usable: the request rounded up to the alignment
  bool locked = false;
};
// Maps the region an ArenaOptions asks for (validated as Create documents).
StatusOr<MappedRegion> MapRegion(const ArenaOptions& options);

class ArenaAllocator : public Allocator {
 public:
  // InvalidArgument for a zero capacity, a capacity above the machine's physical memory, or a
  // bad alignment; ResourceExhausted when the region cannot be mapped.
  static StatusOr<std::unique_ptr<ArenaAllocator>> Create(const ArenaOptions& options);
  ~ArenaAllocator() override;

  bool ContainsAddress(const void* ptr) const override;
  void* region() const { return region_; }
  uint64_t region_bytes() const { return region_bytes_; }
  bool pages_locked() const { return pages_locked_; }

 protected:
  // Takes ownership of `region` (unmapped on destruction).
  ArenaAllocator(const ArenaOptions& options, const MappedRegion& region);

  StatusOr<void*> DoAllocate(size_t bytes) override;
  void DoFree(void* ptr, size_t bytes) override;
  std::optional<uint64_t> LargestFreeBlock() const override { return ranges_.largest_free_range(); }

 private:
  void* const region_;
  const uint64_t region_bytes_;
  const bool pages_locked_;
  RangeAllocator ranges_;  // GUARDED_BY(Allocator's lock)
};

// x86-64's transparent huge page: the size that ArenaOptions::huge_pages and
// HostAllocatorOptions::huge_pages assume.
inline constexpr uint64_t kHugePageBytes = uint64_t{2} << 20;

// Asks the kernel to back [base, base + bytes) with transparent huge pages (madvise
// MADV_HUGEPAGE), best before any of it is touched. REQUIRES: `base` on a 2 MiB boundary. Advice
// only: where the kernel declines (THP "never", none built in, no free huge page) the pages stay 4
// KiB and nothing else changes.
void AdviseHugePages(void* base, uint64_t bytes);

// Validates a capacity request against the machine: > 0 and at most its physical memory.
// `what` names the thing in the message ("sim device memory").
Status CheckCapacityFitsMachine(uint64_t capacity_bytes, std::string_view what);
uint64_t PhysicalMemoryBytes();

}  // namespace ecss
