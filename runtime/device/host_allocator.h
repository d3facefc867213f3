// HostAllocator: pageable host memory with a byte budget, for the host tier (master weights
// and optimizer moments that live in DRAM, not pinned). Built with jemalloc it allocates from
// a dedicated jemalloc arena, so that the large, long-lived expert states do not fragment the
// process heap and their pages are returned on free; without jemalloc (sanitizer builds) it
// uses aligned_alloc. Large blocks may be asked for transparent huge pages (huge_pages).
// Thread-safe (Allocator's lock).
#pragma once

#include <memory>
#include <string>

#include "runtime/device/allocator.h"

namespace ecss {

struct HostAllocatorOptions {
  std::string name = "host memory";
  uint64_t capacity_bytes = 0;  // the budget; > 0 and at most the machine's memory
  size_t alignment = 64;        // of every block (power of two)
  // Blocks of 2 MiB or more start on a 2 MiB boundary and are asked for transparent huge pages
  // before they are touched (AdviseHugePages): an update's pass over gigabytes of states then
  // walks a 512th of the page-table entries, and faulting them in costs a fraction of the
  // time (figures: bench/README.md, "Host states on huge pages"). The expert store's host
  // states set it. Advice only: jemalloc may hand back an extent touched before, and the
  // kernel may decline. The accounting counts the bytes asked for; the memory behind a huge
  // block may exceed them by up to a huge page (alignment and size classes).
  bool huge_pages = false;
};

class HostAllocator : public Allocator {
 public:
  static StatusOr<std::unique_ptr<HostAllocator>> Create(const HostAllocatorOptions& options);
  ~HostAllocator() override;

  // Pageable memory has no single region; the live-allocation table answers instead.
  bool ContainsAddress(const void*) const override { return false; }
  // "jemalloc arena 3" or "aligned_alloc".
  std::string backing() const;

 protected:
  StatusOr<void*> DoAllocate(size_t bytes) override;
  void DoFree(void* ptr, size_t bytes) override;

 private:
  HostAllocator(const HostAllocatorOptions& options, unsigned arena);

  const bool huge_pages_;
  unsigned arena_;  // jemalloc arena index (unused without jemalloc)
};

}  // namespace ecss
