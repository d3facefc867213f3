// Allocators: RangeAllocator bookkeeping against a brute-force model, and the Allocator
// contract (capacity, accounting, bad input) on every host-side implementation.
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/device/arena_allocator.h"
#include "runtime/device/host_allocator.h"
#include "runtime/device/pinned_pool.h"
#include "runtime/device/range_allocator.h"

namespace ecss {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

TEST(RangeAllocatorTest, BestFitAndCoalescing) {
  RangeAllocator ranges(1024, 64);
  auto a = ranges.Allocate(100);  // 128
  auto b = ranges.Allocate(64);
  auto c = ranges.Allocate(256);
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ(*a, 0u);
  EXPECT_EQ(*b, 128u);
  EXPECT_EQ(*c, 192u);
  EXPECT_EQ(ranges.free_bytes(), 1024u - 448u);
  ranges.Free(*b, 64);  // hole of 64 at 128
  auto small = ranges.Allocate(60);
  ASSERT_TRUE(small);
  EXPECT_EQ(*small, 128u) << "best fit takes the exact hole, not the tail";
  ranges.Free(*small, 60);
  ranges.Free(*a, 100);
  ranges.Free(*c, 256);
  EXPECT_EQ(ranges.free_range_count(), 1u) << "everything coalesces back";
  EXPECT_EQ(ranges.largest_free_range(), 1024u);
  EXPECT_FALSE(ranges.Allocate(1025));
}

TEST(RangeAllocatorTest, RandomOperationsMatchModel) {
  constexpr uint64_t kCapacity = 64 * 1024;
  constexpr uint64_t kAlign = 256;
  RangeAllocator ranges(kCapacity, kAlign);
  std::vector<bool> used(kCapacity / kAlign, false);
  std::vector<std::pair<uint64_t, uint64_t>> live;
  std::mt19937 rng(7);
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const uint64_t bytes = 1 + rng() % 4096;
      auto offset = ranges.Allocate(bytes);
      const uint64_t units = ranges.RoundUp(bytes) / kAlign;
      if (!offset) {
        // Refusal is only allowed when no run of free units is long enough.
        uint64_t run = 0, best = 0;
        for (bool u : used) best = std::max(best, run = u ? 0 : run + 1);
        ASSERT_LT(best, units);
        continue;
      }
      ASSERT_EQ(*offset % kAlign, 0u);
      for (uint64_t u = *offset / kAlign; u < *offset / kAlign + units; ++u) {
        ASSERT_FALSE(used[u]) << "overlapping allocation at unit " << u;
        used[u] = true;
      }
      live.emplace_back(*offset, bytes);
    } else {
      const size_t pick = rng() % live.size();
      auto [offset, bytes] = live[pick];
      live.erase(live.begin() + static_cast<long>(pick));
      ranges.Free(offset, bytes);
      for (uint64_t u = offset / kAlign; u < (offset + ranges.RoundUp(bytes)) / kAlign; ++u) {
        used[u] = false;
      }
    }
    uint64_t free_units = 0;
    for (bool u : used) free_units += u ? 0 : 1;
    ASSERT_EQ(ranges.free_bytes(), free_units * kAlign);
  }
}

TEST(RangeAllocatorDeathTest, DoubleFreeOfARangeAborts) {
  RangeAllocator ranges(4096, 256);
  auto offset = ranges.Allocate(256);
  ASSERT_TRUE(offset);
  ranges.Free(*offset, 256);
  EXPECT_DEATH(ranges.Free(*offset, 256), "overlaps free range");
}

ArenaOptions Arena(uint64_t capacity) {
  ArenaOptions options;
  options.name = "test arena";
  options.capacity_bytes = capacity;
  return options;
}

TEST(ArenaAllocatorTest, CapacityIsHardAndFailureChangesNothing) {
  auto arena = ArenaAllocator::Create(Arena(4 * kMiB));
  ASSERT_TRUE(arena.ok()) << arena.status();
  Allocator& memory = **arena;
  StatusOr<Buffer> first = memory.Allocate(3 * kMiB, MemoryTag::kExpertWeights);
  ASSERT_TRUE(first.ok());
  std::memset(first->data(), 0x5a, first->size());
  const AllocatorStats before = memory.stats();

  StatusOr<Buffer> second = memory.Allocate(2 * kMiB, MemoryTag::kStaging);
  ASSERT_EQ(second.status().code(), StatusCode::kResourceExhausted);
  const std::string message(second.status().message());
  EXPECT_NE(message.find("test arena"), std::string::npos) << message;
  EXPECT_NE(message.find("staging"), std::string::npos) << message;
  EXPECT_NE(message.find("2.00 MiB"), std::string::npos) << message;

  const AllocatorStats after = memory.stats();
  EXPECT_EQ(after.used_bytes, before.used_bytes);
  EXPECT_EQ(after.live_allocations, 1u);
  EXPECT_EQ(after.failed_allocations, 1u);
  for (size_t i = 0; i < first->size(); ++i) ASSERT_EQ(first->as<uint8_t>()[i], 0x5a);

  first->Reset();  // recovery: the space is usable again
  StatusOr<Buffer> retry = memory.Allocate(4 * kMiB, MemoryTag::kStaging);
  EXPECT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(memory.Allocate(1, MemoryTag::kOther).status().code(), StatusCode::kResourceExhausted);
}

TEST(ArenaAllocatorTest, AlignmentAccountingAndRaii) {
  auto arena = ArenaAllocator::Create(Arena(kMiB));
  ASSERT_TRUE(arena.ok());
  Allocator& memory = **arena;
  {
    std::vector<Buffer> buffers;
    for (size_t bytes : {1, 255, 256, 257, 1000}) {
      StatusOr<Buffer> buffer = memory.Allocate(bytes, MemoryTag::kGradients);
      ASSERT_TRUE(buffer.ok());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer->data()) % 256, 0u);
      EXPECT_EQ(buffer->size(), bytes);
      buffers.push_back(std::move(*buffer));
    }
    EXPECT_EQ(memory.accounting().Usage(MemoryTag::kGradients).bytes,
              256u + 256 + 256 + 512 + 1024);
    EXPECT_EQ(memory.stats().live_allocations, 5u);
    Buffer moved = std::move(buffers[0]);
    EXPECT_FALSE(buffers[0]);
    EXPECT_TRUE(moved);
  }
  EXPECT_EQ(memory.stats().used_bytes, 0u);
  EXPECT_EQ(memory.stats().live_allocations, 0u);
  EXPECT_EQ(memory.accounting().Usage(MemoryTag::kGradients).peak_bytes, 2304u);
}

TEST(ArenaAllocatorTest, BadCapacityAndAlignment) {
  StatusOr<std::unique_ptr<ArenaAllocator>> zero = ArenaAllocator::Create(Arena(0));
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(zero.status().message().find("test arena"), std::string_view::npos);
  StatusOr<std::unique_ptr<ArenaAllocator>> absurd =
      ArenaAllocator::Create(Arena(uint64_t{1} << 60));
  EXPECT_EQ(absurd.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(absurd.status().message().find("exceeds this machine's memory"),
            std::string_view::npos);
  ArenaOptions bad = Arena(kMiB);
  bad.alignment = 48;
  EXPECT_EQ(ArenaAllocator::Create(bad).status().code(), StatusCode::kInvalidArgument);
}

TEST(ArenaAllocatorTest, DoubleFreeForeignPointerAndZeroBytes) {
  auto arena = ArenaAllocator::Create(Arena(kMiB));
  auto other = ArenaAllocator::Create(Arena(kMiB));
  ASSERT_TRUE(arena.ok() && other.ok());
  StatusOr<void*> raw = (*arena)->AllocateRaw(1000, MemoryTag::kOther);
  ASSERT_TRUE(raw.ok());
  StatusOr<void*> foreign = (*other)->AllocateRaw(1000, MemoryTag::kOther);
  ASSERT_TRUE(foreign.ok());

  EXPECT_TRUE((*arena)->FreeRaw(*raw).ok());
  Status twice = (*arena)->FreeRaw(*raw);
  EXPECT_EQ(twice.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(twice.message().find("already freed"), std::string_view::npos) << twice;
  Status wrong = (*arena)->FreeRaw(*foreign);
  EXPECT_EQ(wrong.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find("not from this allocator"), std::string_view::npos) << wrong;
  int on_stack = 0;
  EXPECT_EQ((*arena)->FreeRaw(&on_stack).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*arena)->AllocateRaw(0, MemoryTag::kOther).status().code(),
            StatusCode::kInvalidArgument);
  // The failed frees changed nothing: the foreign block is still live in its own allocator.
  EXPECT_EQ((*other)->stats().live_allocations, 1u);
  EXPECT_TRUE((*other)->FreeRaw(*foreign).ok());
  EXPECT_EQ((*arena)->stats().used_bytes, 0u);
}

TEST(ArenaAllocatorTest, CheckRange) {
  auto arena = ArenaAllocator::Create(Arena(kMiB));
  ASSERT_TRUE(arena.ok());
  StatusOr<Buffer> buffer = (*arena)->Allocate(1000, MemoryTag::kOther);
  ASSERT_TRUE(buffer.ok());
  char* base = buffer->as<char>();
  EXPECT_TRUE((*arena)->CheckRange(base, 1024, "copy").ok());  // the rounded block
  EXPECT_TRUE((*arena)->CheckRange(base + 1000, 24, "copy").ok());
  Status past = (*arena)->CheckRange(base + 1000, 25, "copy destination");
  EXPECT_EQ(past.code(), StatusCode::kOutOfRange);
  EXPECT_NE(past.message().find("copy destination of 25 bytes at offset 1000"),
            std::string_view::npos)
      << past;
  EXPECT_EQ((*arena)->CheckRange(base + 4096, 1, "copy").code(), StatusCode::kOutOfRange);
}

TEST(HostAllocatorTest, BudgetAndAccounting) {
  HostAllocatorOptions options;
  options.capacity_bytes = 2 * kMiB;
  auto host = HostAllocator::Create(options);
  ASSERT_TRUE(host.ok()) << host.status();
  StatusOr<Buffer> a = (*host)->Allocate(kMiB, MemoryTag::kMasterWeights);
  StatusOr<Buffer> b = (*host)->Allocate(kMiB, MemoryTag::kOptimizerMoments);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % 64, 0u);
  std::memset(a->data(), 1, a->size());
  EXPECT_EQ((*host)->Allocate(64, MemoryTag::kOther).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ((*host)->accounting().Usage(MemoryTag::kOptimizerMoments).bytes, kMiB);
  void* raw = a->data();
  a->Reset();
  EXPECT_EQ((*host)->FreeRaw(raw).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE((*host)->backing().empty());
  options.capacity_bytes = 0;
  EXPECT_EQ(HostAllocator::Create(options).status().code(), StatusCode::kInvalidArgument);
}

// The VmFlags of the mapping that holds `address` in /proc/self/smaps ("" when none does).
std::string MappingFlags(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    // A mapping's first line starts "begin-end " in hex; its fields' lines start with a name.
    uintptr_t begin = 0, end = 0;
    const bool mapping_line =
        line.find(' ') != std::string::npos && line.find('-') < line.find(' ') &&
        std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR, &begin, &end) == 2;
    if (mapping_line) {
      inside = begin <= at && at < end;
    } else if (inside && line.starts_with("VmFlags:")) {
      return line;
    }
  }
  return "";
}

TEST(HostAllocatorTest, LargeBlocksAskForHugePagesFromAHugePageBoundary) {
  // With huge_pages a block of 2 MiB or more starts on a 2 MiB boundary and its mapping
  // carries the advice (VmFlags "hg", whether or not the kernel found huge pages for it); an
  // allocator without the option does not advise. The accounting counts the bytes asked for.
  HostAllocatorOptions options;
  options.capacity_bytes = 32 * kMiB;
  options.huge_pages = true;
  auto huge = HostAllocator::Create(options);
  ASSERT_TRUE(huge.ok()) << huge.status();
  options.huge_pages = false;
  auto plain = HostAllocator::Create(options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  const uint64_t large = 6 * kMiB + 4096;
  StatusOr<Buffer> a = (*huge)->Allocate(large, MemoryTag::kMasterWeights);
  StatusOr<Buffer> b = (*plain)->Allocate(large, MemoryTag::kMasterWeights);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % kHugePageBytes, 0u);
  EXPECT_EQ((*huge)->accounting().Usage(MemoryTag::kMasterWeights).bytes, large);
  std::memset(a->data(), 0x5a, large);
  EXPECT_EQ(a->as<uint8_t>()[large - 1], 0x5a);
  if (!std::filesystem::exists("/sys/kernel/mm/transparent_hugepage") ||
      MappingFlags(a->data()).empty()) {
    GTEST_SKIP() << "this kernel has no transparent huge pages to ask for, or no VmFlags";
  }
  const auto advised = [](const void* p) {
    return MappingFlags(p).find(" hg") != std::string::npos;
  };
  EXPECT_TRUE(advised(a->data())) << MappingFlags(a->data());
  EXPECT_TRUE(advised(a->as<uint8_t>() + large - 1)) << MappingFlags(a->as<uint8_t>() + large - 1);
  EXPECT_FALSE(advised(b->data())) << MappingFlags(b->data());
}

TEST(PinnedPoolTest, ItsRegionStartsOnAHugePageAndHoldsItsWholeCapacity) {
  // A pool's memory is asked for transparent huge pages (whole 2 MiB pages from a 2 MiB
  // boundary); an arena that does not ask keeps the mapping mmap gave. Either way every byte
  // of the capacity is usable and unmapped exactly once at destruction (ASan and the next
  // mapping would see otherwise).
  for (uint64_t capacity : {uint64_t{6} << 20, (uint64_t{5} << 20) + 4096}) {
    PinnedPoolOptions options;
    options.capacity_bytes = capacity;
    options.populate = true;
    auto pool = PinnedHostPool::Create(options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ(reinterpret_cast<uintptr_t>((*pool)->region()) % (uintptr_t{2} << 20), 0u);
    auto all = (*pool)->Allocate(capacity, MemoryTag::kStaging);
    ASSERT_TRUE(all.ok()) << all.status();
    std::memset(all->data(), 0x3c, capacity);
    EXPECT_EQ(all->as<uint8_t>()[capacity - 1], 0x3c);
  }
  ArenaOptions plain;
  plain.capacity_bytes = uint64_t{4} << 20;
  auto arena = ArenaAllocator::Create(plain);
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto block = (*arena)->Allocate(plain.capacity_bytes, MemoryTag::kOther);
  ASSERT_TRUE(block.ok());
  std::memset(block->data(), 1, plain.capacity_bytes);
}

TEST(PinnedPoolTest, RegistersOnceAndUnregistersOnDestruction) {
  int registered = 0;
  int unregistered = 0;
  size_t registered_bytes = 0;
  HostRegistration registration;
  registration.register_memory = [&](void*, size_t bytes) {
    ++registered;
    registered_bytes = bytes;
    return Status::Ok();
  };
  registration.unregister_memory = [&](void*) { ++unregistered; };
  PinnedPoolOptions options;
  options.capacity_bytes = 3 * kMiB + 5;
  {
    auto pool = PinnedHostPool::Create(options, registration);
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_TRUE((*pool)->registered());
    EXPECT_EQ(registered, 1);
    EXPECT_GE(registered_bytes, 3 * kMiB + 5);
    StatusOr<Buffer> block = (*pool)->Allocate(10, MemoryTag::kStaging);
    ASSERT_TRUE(block.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(block->data()) % 4096, 0u) << "O_DIRECT alignment";
    EXPECT_EQ(unregistered, 0);
  }
  EXPECT_EQ(unregistered, 1);
}

TEST(PinnedPoolTest, RegistrationFailureIsReported) {
  HostRegistration registration;
  registration.register_memory = [](void*, size_t) {
    return ResourceExhaustedError("cudaHostRegister: out of memory");
  };
  PinnedPoolOptions options;
  options.name = "staging pool";
  options.capacity_bytes = kMiB;
  auto pool = PinnedHostPool::Create(options, registration);
  EXPECT_EQ(pool.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(pool.status().message().find("staging pool"), std::string_view::npos);
}

}  // namespace
}  // namespace ecss
