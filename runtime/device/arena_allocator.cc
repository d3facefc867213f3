#include "runtime/device/arena_allocator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

uint64_t PhysicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

Status CheckCapacityFitsMachine(uint64_t capacity_bytes, std::string_view what) {
  if (capacity_bytes == 0) return InvalidArgumentError(StrCat(what, ": capacity must be > 0"));
  const uint64_t physical = PhysicalMemoryBytes();
  if (physical != 0 && capacity_bytes > physical) {
    return InvalidArgumentError(StrCat(what, ": capacity ", HumanBytes(capacity_bytes),
                                       " exceeds this machine's memory of ", HumanBytes(physical)));
  }
  return Status::Ok();
}

void AdviseHugePages(void* base, uint64_t bytes) {
  ::madvise(base, bytes, MADV_HUGEPAGE);  // advice only: refused, the pages stay 4 KiB
}

namespace {

// Maps `bytes` of anonymous memory. With options.huge_pages and at least one huge page's worth,
// the mapping starts on a 2 MiB boundary and is marked MADV_HUGEPAGE before any page is
// touched, so the kernel backs it with transparent huge pages where it can: an O_DIRECT
// transfer into it is then a few physically contiguous segments instead of one per 4 KiB
// page (on the 2-core development VM's virtio disk, 1 MiB reads went from 0.98 to 1.43
// GB/s). Where the kernel declines (THP "never", no THP), the memory is ordinary pages and
// nothing else changes. The huge page size assumed is x86-64's.
StatusOr<void*> MapPages(uint64_t bytes, uint64_t page, const ArenaOptions& options) {
  const bool huge = options.huge_pages && bytes >= kHugePageBytes;
  const uint64_t mapped = huge ? bytes + kHugePageBytes : bytes;
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  // A huge mapping is populated after the advice: MAP_POPULATE would fault 4 KiB pages first.
  if (options.populate && !huge) flags |= MAP_POPULATE;
  void* raw = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (raw == MAP_FAILED) {
    const int error = errno;  // before HumanBytes allocates (see ErrnoError)
    return ErrnoError(error, options.name, ": cannot map ", HumanBytes(bytes));
  }
  if (!huge) return raw;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) & ~uintptr_t{kHugePageBytes - 1};
  // Unmapping the unused head and tail cannot fail for a range this call mapped; were it to,
  // only address space would be left behind.
  if (aligned > start) ::munmap(raw, aligned - start);
  const uintptr_t tail = start + mapped - (aligned + bytes);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* base = reinterpret_cast<void*>(aligned);
  AdviseHugePages(base, bytes);
  if (options.populate) {
    // Fresh anonymous memory reads as zeros, so writing a zero faults a page in unchanged.
    auto* bytes_of = static_cast<volatile char*>(base);
    for (uint64_t offset = 0; offset < bytes; offset += page) bytes_of[offset] = 0;
  }
  return base;
}

}  // namespace

StatusOr<MappedRegion> MapRegion(const ArenaOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckCapacityFitsMachine(options.capacity_bytes, options.name));
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (options.alignment == 0 || (options.alignment & (options.alignment - 1)) != 0 ||
      options.alignment > page) {
    return InvalidArgumentError(StrCat(options.name, ": alignment ", options.alignment,
                                       " must be a power of two no larger than the page (", page,
                                       ")"));
  }
  MappedRegion region;
  // Usable capacity is what was asked for, rounded up to the alignment so that every block
  // keeps it; the mapping is whole pages.
  region.capacity_bytes =
      (options.capacity_bytes + options.alignment - 1) & ~uint64_t{options.alignment - 1};
  region.bytes = (region.capacity_bytes + page - 1) & ~uint64_t{page - 1};
  ECSS_ASSIGN_OR_RETURN(region.base, MapPages(region.bytes, page, options));
  if (options.lock_pages) {
    region.locked = ::mlock(region.base, region.bytes) == 0;
    if (!region.locked) {
      ECSS_LOG(Warning) << options.name << ": mlock of " << HumanBytes(region.bytes)
                        << " failed (errno " << errno
                        << "); pages stay pageable (raise RLIMIT_MEMLOCK to lock them)";
    }
  }
  return region;
}

StatusOr<std::unique_ptr<ArenaAllocator>> ArenaAllocator::Create(const ArenaOptions& options) {
  ECSS_ASSIGN_OR_RETURN(MappedRegion region, MapRegion(options));
  return std::unique_ptr<ArenaAllocator>(new ArenaAllocator(options, region));
}

ArenaAllocator::ArenaAllocator(const ArenaOptions& options, const MappedRegion& region)
    : Allocator(options.name, options.device, region.capacity_bytes, options.alignment),
      region_(region.base),
      region_bytes_(region.bytes),
      pages_locked_(region.locked),
      ranges_(region.capacity_bytes, options.alignment) {}

ArenaAllocator::~ArenaAllocator() {
  ReleaseAllForShutdown();
  if (pages_locked_) ::munlock(region_, region_bytes_);
  ::munmap(region_, region_bytes_);
}

bool ArenaAllocator::ContainsAddress(const void* ptr) const {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  const auto start = reinterpret_cast<uintptr_t>(region_);
  return address >= start && address < start + region_bytes_;
}

StatusOr<void*> ArenaAllocator::DoAllocate(size_t bytes) {
  std::optional<uint64_t> offset = ranges_.Allocate(bytes);
  if (!offset) return ResourceExhaustedError("no free block is large enough (fragmentation)");
  return static_cast<void*>(static_cast<char*>(region_) + *offset);
}

void ArenaAllocator::DoFree(void* ptr, size_t bytes) {
  ranges_.Free(static_cast<uint64_t>(static_cast<char*>(ptr) - static_cast<char*>(region_)), bytes);
}

}  // namespace ecss
