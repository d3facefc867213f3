// HostAllocator: pageable host memory with a byte budget, for the host tier (master weights
// and optimizer moments that live in DRAM, not pinned). Built with jemalloc it allocates from
// a dedicated jemalloc arena, so that the large, long-lived expert states do not fragment the
// process heap and their pages are returned on free; without jemalloc (sanitizer builds) it
// uses aligned_alloc. Thread-safe (Allocator's lock).
#pragma once

#include <memory>
#include <string>

#include "runtime/device/allocator.h"

namespace ecss {

struct HostAllocatorOptions {
  std::string name = "host memory";
  uint64_t capacity_bytes = 0;  // the budget; > 0 and at most the machine's memory
  size_t alignment = 64;        // of every block (power of two)
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

  unsigned arena_;  // jemalloc arena index (unused without jemalloc)
};

}  // namespace ecss
