#include "runtime/device/allocator.h"

#include <algorithm>
#include <utility>

#include "runtime/base/check.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

Buffer::Buffer(Buffer&& other) noexcept
    : allocator_(std::exchange(other.allocator_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Reset();
    allocator_ = std::exchange(other.allocator_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void Buffer::Reset() {
  if (data_ == nullptr) return;
  ECSS_CHECK_OK(allocator_->FreeRaw(data_));
  allocator_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

Allocator::Allocator(std::string name, Device device, uint64_t capacity_bytes, size_t alignment)
    : name_(std::move(name)),
      device_(device),
      capacity_bytes_(capacity_bytes),
      alignment_(alignment) {
  ECSS_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0) << "alignment " << alignment;
}

Allocator::~Allocator() {
  ECSS_CHECK(live_.empty()) << name_ << ": subclass did not call ReleaseAllForShutdown";
}

StatusOr<Buffer> Allocator::Allocate(size_t bytes, MemoryTag tag) {
  ECSS_ASSIGN_OR_RETURN(void* data, AllocateRaw(bytes, tag));
  return Buffer(this, data, bytes);
}

StatusOr<void*> Allocator::AllocateRaw(size_t bytes, MemoryTag tag) {
  if (bytes == 0) {
    return InvalidArgumentError(
        StrCat(name_, ": zero-byte allocation requested for ", MemoryTagName(tag)));
  }
  const uint64_t rounded = (static_cast<uint64_t>(bytes) + alignment_ - 1) & ~(alignment_ - 1);
  std::lock_guard<std::mutex> lock(mutex_);
  auto refuse = [&](std::string_view why) {
    ++failed_allocations_;
    return ResourceExhaustedError(
        StrCat(name_, ": cannot allocate ", HumanBytes(bytes), " for ", MemoryTagName(tag), ": ",
               why, " (", HumanBytes(used_bytes_), " of ", HumanBytes(capacity_bytes_),
               " in use, largest free block ",
               HumanBytes(LargestFreeBlock().value_or(capacity_bytes_ - used_bytes_)), ")"));
  };
  if (rounded < bytes || rounded > capacity_bytes_) return refuse("larger than the capacity");
  if (used_bytes_ + rounded > capacity_bytes_) return refuse("the capacity would be exceeded");
  StatusOr<void*> data = DoAllocate(rounded);
  if (!data.ok()) {
    if (data.status().code() == StatusCode::kResourceExhausted) {
      return refuse(data.status().message()).WithErrno(data.status().sys_errno());
    }
    return data.status().Annotate(name_);
  }
  live_.emplace(reinterpret_cast<uintptr_t>(*data), Block{rounded, tag});
  used_bytes_ += rounded;
  peak_used_bytes_ = std::max(peak_used_bytes_, used_bytes_);
  accounting_.Charge(tag, rounded);
  return *data;
}

Status Allocator::FreeRaw(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == live_.end()) {
    return InvalidArgumentError(
        StrCat(name_, ": free of ", ptr, " which is not a live allocation of this allocator (",
               ContainsAddress(ptr) ? "already freed, or not the start of a block"
                                    : "not from this allocator, or already freed",
               ")"));
  }
  DoFree(ptr, it->second.bytes);
  used_bytes_ -= it->second.bytes;
  accounting_.Release(it->second.tag, it->second.bytes);
  live_.erase(it);
  return Status::Ok();
}

Status Allocator::CheckRange(const void* ptr, size_t bytes, std::string_view what) const {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_.upper_bound(address);
  if (it == live_.begin()) {
    return OutOfRangeError(StrCat(what, " ", ptr, " is not inside any live allocation of ", name_));
  }
  --it;
  const uintptr_t start = it->first;
  const uintptr_t end = start + it->second.bytes;
  if (address >= end) {
    return OutOfRangeError(StrCat(what, " ", ptr, " is not inside any live allocation of ", name_));
  }
  if (bytes > end - address) {
    return OutOfRangeError(StrCat(what, " of ", bytes, " bytes at offset ", address - start,
                                  " runs past the end of its ", it->second.bytes,
                                  "-byte allocation in ", name_));
  }
  return Status::Ok();
}

AllocatorStats Allocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return AllocatorStats{capacity_bytes_, used_bytes_, peak_used_bytes_, live_.size(),
                        failed_allocations_};
}

void Allocator::ReleaseAllForShutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!live_.empty()) {
    ECSS_LOG(Warning) << name_ << ": " << live_.size() << " allocations ("
                      << HumanBytes(used_bytes_)
                      << ") still live at shutdown: " << accounting_.Summary();
  }
  for (const auto& [address, block] : live_) {
    DoFree(reinterpret_cast<void*>(address), block.bytes);
    accounting_.Release(block.tag, block.bytes);
  }
  live_.clear();
  used_bytes_ = 0;
}

}  // namespace ecss
