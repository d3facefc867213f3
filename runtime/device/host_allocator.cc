#include "runtime/device/host_allocator.h"

#include <algorithm>
#include <cstdlib>

#include "runtime/base/str_cat.h"
#include "runtime/device/arena_allocator.h"

#if ECSS_HAVE_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

namespace ecss {

StatusOr<std::unique_ptr<HostAllocator>> HostAllocator::Create(
    const HostAllocatorOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckCapacityFitsMachine(options.capacity_bytes, options.name));
  if (options.alignment == 0 || (options.alignment & (options.alignment - 1)) != 0) {
    return InvalidArgumentError(
        StrCat(options.name, ": alignment ", options.alignment, " is not a power of two"));
  }
  unsigned arena = 0;
#if ECSS_HAVE_JEMALLOC
  size_t size = sizeof(arena);
  if (int error = mallctl("arenas.create", &arena, &size, nullptr, 0); error != 0) {
    return ErrnoError(error, StrCat(options.name, ": cannot create a jemalloc arena"));
  }
#endif
  return std::unique_ptr<HostAllocator>(new HostAllocator(options, arena));
}

HostAllocator::HostAllocator(const HostAllocatorOptions& options, unsigned arena)
    : Allocator(options.name, Device::Host(), options.capacity_bytes, options.alignment),
      huge_pages_(options.huge_pages),
      arena_(arena) {}

HostAllocator::~HostAllocator() {
  ReleaseAllForShutdown();
#if ECSS_HAVE_JEMALLOC
  const std::string destroy = StrCat("arena.", arena_, ".destroy");
  mallctl(destroy.c_str(), nullptr, nullptr, nullptr, 0);
#endif
}

std::string HostAllocator::backing() const {
#if ECSS_HAVE_JEMALLOC
  return StrCat("jemalloc arena ", arena_);
#else
  return "aligned_alloc";
#endif
}

StatusOr<void*> HostAllocator::DoAllocate(size_t bytes) {
  const bool huge = huge_pages_ && bytes >= kHugePageBytes;
  const size_t align = huge ? std::max<size_t>(alignment(), kHugePageBytes) : alignment();
#if ECSS_HAVE_JEMALLOC
  void* data = mallocx(bytes, MALLOCX_ARENA(arena_) | MALLOCX_ALIGN(align) | MALLOCX_TCACHE_NONE);
#else
  // aligned_alloc takes a multiple of the alignment: bytes is a multiple of alignment(), and
  // a huge block is rounded up to whole huge pages.
  void* data = std::aligned_alloc(align, (bytes + align - 1) / align * align);
#endif
  if (data == nullptr) return ResourceExhaustedError("the operating system refused the memory");
  if (huge) AdviseHugePages(data, bytes);
  return data;
}

void HostAllocator::DoFree(void* ptr, size_t) {
#if ECSS_HAVE_JEMALLOC
  dallocx(ptr, MALLOCX_TCACHE_NONE);
#else
  std::free(ptr);
#endif
}

}  // namespace ecss
