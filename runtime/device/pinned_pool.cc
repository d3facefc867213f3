#include "runtime/device/pinned_pool.h"

namespace ecss {

namespace {
ArenaOptions ToArenaOptions(const PinnedPoolOptions& options) {
  ArenaOptions arena;
  arena.name = options.name;
  arena.device = Device::Host();
  arena.capacity_bytes = options.capacity_bytes;
  arena.alignment = options.alignment;
  arena.lock_pages = options.lock_pages;
  arena.populate = options.populate;
  arena.huge_pages = true;  // staging for O_DIRECT and DMA: contiguous runs move faster
  return arena;
}
}  // namespace

StatusOr<std::unique_ptr<PinnedHostPool>> PinnedHostPool::Create(const PinnedPoolOptions& options,
                                                                 HostRegistration registration) {
  const ArenaOptions arena = ToArenaOptions(options);
  ECSS_ASSIGN_OR_RETURN(MappedRegion region, MapRegion(arena));
  // From here the pool owns the region: its destructor unmaps it on every path.
  std::unique_ptr<PinnedHostPool> pool(new PinnedHostPool(arena, region, std::move(registration)));
  if (pool->registration_.register_memory) {
    Status registered = pool->registration_.register_memory(region.base, region.bytes);
    if (!registered.ok()) return registered.Annotate(options.name);
    pool->registered_ = true;
  }
  return pool;
}

PinnedHostPool::PinnedHostPool(const ArenaOptions& options, const MappedRegion& region,
                               HostRegistration registration)
    : ArenaAllocator(options, region), registration_(std::move(registration)) {}

PinnedHostPool::~PinnedHostPool() {
  if (registered_ && registration_.unregister_memory) registration_.unregister_memory(region());
}

}  // namespace ecss
