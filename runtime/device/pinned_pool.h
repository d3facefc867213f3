// PinnedHostPool: page-locked host memory with a byte budget, from which staging buffers,
// NVMe I/O buffers and host-resident expert states are carved. The slab is mapped once
// (ArenaAllocator), locked with mlock, and registered with the device backend (CUDA:
// cudaHostRegister) so that copies from it are true DMA; the sim backend needs no
// registration. Alignment defaults to 4 KiB so that every block is usable for O_DIRECT.
// Thread-safe. REQUIRES: the backend that registered it outlives the pool.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "runtime/device/arena_allocator.h"

namespace ecss {

struct PinnedPoolOptions {
  std::string name = "pinned host pool";
  uint64_t capacity_bytes = 0;  // the budget; > 0 and at most the machine's memory
  size_t alignment = 4096;      // of every block; 4 KiB keeps blocks O_DIRECT-capable
  bool lock_pages = true;       // mlock; when refused the pool still works, unlocked
  // Fault every page in at creation, as cudaHostAlloc does: a first copy into fresh pinned
  // memory then never pays page faults (they cost more than the copy on a VM).
  bool populate = true;
};

// How a backend registers host memory for DMA. Either function may be empty.
struct HostRegistration {
  std::function<Status(void* base, size_t bytes)> register_memory;
  std::function<void(void* base)> unregister_memory;
};

class PinnedHostPool : public ArenaAllocator {
 public:
  static StatusOr<std::unique_ptr<PinnedHostPool>> Create(const PinnedPoolOptions& options,
                                                          HostRegistration registration = {});
  ~PinnedHostPool() override;

  // True when the backend registered the slab for DMA.
  bool registered() const { return registered_; }

 private:
  PinnedHostPool(const ArenaOptions& options, const MappedRegion& region,
                 HostRegistration registration);

  HostRegistration registration_;
  bool registered_ = false;
};

}  // namespace ecss
