// Allocator: the one interface for every memory ECSS allocates (device memory, the pinned
// host pool, pageable host memory). It enforces a hard byte capacity (a request that would
// exceed it fails with ResourceExhausted and changes nothing), charges every allocation to a
// MemoryTag, keeps a table of live allocations so that a double free, a foreign pointer or an
// out-of-bounds range is an error instead of corruption, and hands out RAII Buffers.
// Thread-safe: one mutex per allocator; DoAllocate/DoFree of subclasses run under it.
// REQUIRES: an allocator outlives every Buffer it handed out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "runtime/base/device_id.h"
#include "runtime/base/memory_tag.h"
#include "runtime/base/status.h"

namespace ecss {

class Allocator;

// Owns one allocation; frees it on destruction. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return bytes_; }
  Allocator* allocator() const { return allocator_; }
  explicit operator bool() const { return data_ != nullptr; }

  // Frees now (no-op when empty).
  void Reset();

 private:
  friend class Allocator;
  Buffer(Allocator* allocator, void* data, size_t bytes)
      : allocator_(allocator), data_(data), bytes_(bytes) {}

  Allocator* allocator_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

struct AllocatorStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;  // live, rounded to the alignment
  uint64_t peak_used_bytes = 0;
  uint64_t live_allocations = 0;
  uint64_t failed_allocations = 0;  // requests refused for lack of capacity
};

class Allocator {
 public:
  virtual ~Allocator();
  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  // `bytes` > 0. Fails with ResourceExhausted (naming the request, the tag, what is in use and
  // the largest free block) when it cannot be satisfied within the capacity.
  StatusOr<Buffer> Allocate(size_t bytes, MemoryTag tag);
  // The same without RAII; pair with FreeRaw.
  StatusOr<void*> AllocateRaw(size_t bytes, MemoryTag tag);
  // InvalidArgument when `ptr` is not the start of a live allocation of this allocator (a
  // double free, or a pointer from elsewhere); nothing changes then.
  Status FreeRaw(void* ptr);

  // OK when [ptr, ptr + bytes) lies inside one live allocation; OutOfRange naming the
  // allocation otherwise. `what` names the range in the message ("copy destination").
  Status CheckRange(const void* ptr, size_t bytes, std::string_view what) const;
  // True when `ptr` points into memory this allocator manages (live or not).
  virtual bool ContainsAddress(const void* ptr) const = 0;

  const std::string& name() const { return name_; }
  Device device() const { return device_; }
  uint64_t capacity_bytes() const { return capacity_bytes_; }
  size_t alignment() const { return alignment_; }
  AllocatorStats stats() const;
  const MemoryAccounting& accounting() const { return accounting_; }

 protected:
  // REQUIRES: alignment is a power of two.
  Allocator(std::string name, Device device, uint64_t capacity_bytes, size_t alignment);

  // Storage for `bytes` (a multiple of alignment()), or ResourceExhausted. Called under the
  // allocator's lock, after the capacity check.
  virtual StatusOr<void*> DoAllocate(size_t bytes) = 0;
  virtual void DoFree(void* ptr, size_t bytes) = 0;
  // For error messages: the largest request that could succeed now; nullopt when the
  // allocator does not fragment (then it is capacity minus use). Called under the lock.
  virtual std::optional<uint64_t> LargestFreeBlock() const { return std::nullopt; }

  // Subclasses call this first in their destructor, while their storage still exists: frees
  // whatever is still live and logs it as a leak.
  void ReleaseAllForShutdown();

 private:
  struct Block {
    size_t bytes;
    MemoryTag tag;
  };

  const std::string name_;
  const Device device_;
  const uint64_t capacity_bytes_;
  const size_t alignment_;
  mutable std::mutex mutex_;
  std::map<uintptr_t, Block> live_;  // GUARDED_BY(mutex_)
  uint64_t used_bytes_ = 0;          // GUARDED_BY(mutex_)
  uint64_t peak_used_bytes_ = 0;     // GUARDED_BY(mutex_)
  uint64_t failed_allocations_ = 0;  // GUARDED_BY(mutex_)
  MemoryAccounting accounting_;
};

}  // namespace ecss
