// HandleTable: the slot table behind Stream and Event handles (handles.h). Maps a handle to
// the backend's object, and turns every misuse (a default handle, another backend's handle, a
// destroyed object) into a Status that says which. Objects are held by shared_ptr so that work
// already queued keeps them alive after their handle is destroyed.
// Thread-safe (one mutex); never blocks beyond it.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/base/str_cat.h"
#include "runtime/device/handles.h"

namespace ecss {

template <typename Tag, typename Object>
class HandleTable {
 public:
  HandleTable(uint32_t backend_uid, std::string kind)
      : backend_uid_(backend_uid), kind_(std::move(kind)) {}

  Handle<Tag> Insert(std::shared_ptr<Object> object) {
    std::lock_guard<std::mutex> lock(mutex_);
    uint32_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      slot = static_cast<uint32_t>(slots_.size());
      slots_.push_back(Slot{nullptr, 0});
    }
    Slot& entry = slots_[slot];
    entry.object = std::move(object);
    entry.generation += 1;  // generations start at 1: 0 marks a default handle
    return Handle<Tag>{backend_uid_, slot, entry.generation};
  }

  StatusOr<std::shared_ptr<Object>> Get(Handle<Tag> handle) const {
    std::lock_guard<std::mutex> lock(mutex_);
    ECSS_RETURN_IF_ERROR(Validate(handle));
    return slots_[handle.slot].object;
  }

  StatusOr<std::shared_ptr<Object>> Remove(Handle<Tag> handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    ECSS_RETURN_IF_ERROR(Validate(handle));
    Slot& entry = slots_[handle.slot];
    std::shared_ptr<Object> object = std::move(entry.object);
    entry.object = nullptr;
    free_slots_.push_back(handle.slot);
    return object;
  }

  // Every live object, e.g. to synchronise or shut down all of them.
  std::vector<std::shared_ptr<Object>> Live() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::shared_ptr<Object>> live;
    for (const Slot& entry : slots_) {
      if (entry.object) live.push_back(entry.object);
    }
    return live;
  }

  // Removes every live object (backend shutdown) and returns them.
  std::vector<std::shared_ptr<Object>> Clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::shared_ptr<Object>> live;
    for (uint32_t slot = 0; slot < slots_.size(); ++slot) {
      if (!slots_[slot].object) continue;
      live.push_back(std::move(slots_[slot].object));
      slots_[slot].object = nullptr;
      free_slots_.push_back(slot);
    }
    return live;
  }

 private:
  struct Slot {
    std::shared_ptr<Object> object;
    uint32_t generation;
  };

  Status Validate(Handle<Tag> handle) const {
    if (!handle.valid()) {
      return InvalidArgumentError(StrCat("a default-constructed ", kind_, " handle was used"));
    }
    if (handle.backend_uid != backend_uid_) {
      return InvalidArgumentError(StrCat(kind_, " ", handle.slot, " belongs to backend #",
                                         handle.backend_uid, ", not to backend #", backend_uid_));
    }
    if (handle.slot >= slots_.size() || slots_[handle.slot].generation != handle.generation ||
        !slots_[handle.slot].object) {
      return FailedPreconditionError(StrCat(kind_, " ", handle.slot, " (generation ",
                                            handle.generation,
                                            ") was destroyed; the handle is stale"));
    }
    return Status::Ok();
  }

  const uint32_t backend_uid_;
  const std::string kind_;
  mutable std::mutex mutex_;
  std::vector<Slot> slots_;           // GUARDED_BY(mutex_)
  std::vector<uint32_t> free_slots_;  // GUARDED_BY(mutex_)
};

}  // namespace ecss
