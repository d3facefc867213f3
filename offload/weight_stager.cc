#include "offload/weight_stager.h"

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<std::unique_ptr<WeightStager>> WeightStager::Create(ExpertStore& store,
                                                             uint32_t max_slots) {
  if (store.placement(ExpertState::kWeights) != Tier::kNvme) {
    return FailedPreconditionError(StrCat("weight stager: the store keeps its weights in ",
                                          TierName(store.placement(ExpertState::kWeights)),
                                          " memory, not on NVMe"));
  }
  const uint64_t block = store.BlockBytes(ExpertState::kWeights);
  const AllocatorStats pool = store.pinned_pool().stats();
  const uint64_t left = pool.capacity_bytes - pool.used_bytes;
  uint64_t fit = left / block;
  if (max_slots != 0) fit = std::min<uint64_t>(fit, max_slots);
  if (fit == 0) {
    return ResourceExhaustedError(StrCat("weight stager: the pinned budget has ", left,
                                         " bytes left; one staging block needs ", block));
  }
  std::unique_ptr<WeightStager> stager(new WeightStager(store));
  stager->slots_.resize(fit);
  for (Slot& slot : stager->slots_) {
    ECSS_ASSIGN_OR_RETURN(slot.block, store.pinned_pool().Allocate(block, MemoryTag::kStaging));
    ECSS_ASSIGN_OR_RETURN(slot.copied, CreateOwnedEvent(stager->backend_));
  }
  WeightStager* raw = stager.get();
  stager->worker_ = std::thread([raw] { raw->Work(); });
  return stager;
}

WeightStager::~WeightStager() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  worker_.join();
  // Blocks whose copies may still read them must outlive those copies.
  for (Slot& slot : slots_) {
    if (slot.state == SlotState::kReleased)
      backend_.SynchronizeEvent(slot.copied.get()).IgnoreError();
  }
}

void WeightStager::Work() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Slot& slot = slots_[queue_.front()];
    queue_.pop_front();
    const ExpertId key = slot.key;
    lock.unlock();
    const auto start = std::chrono::steady_clock::now();
    Status read = store_.ReadBlock(ExpertState::kWeights, key, slot.block.data());
    const auto end = std::chrono::steady_clock::now();
    lock.lock();
    slot.read = {start, end};
    if (read.ok()) bytes_read_ += store_.StateBytes(ExpertState::kWeights);
    if (slot.dropped) {
      slot.dropped = false;
      slot.state = SlotState::kFree;
    } else {
      slot.status = std::move(read);
      slot.state = SlotState::kReady;
    }
    cv_.notify_all();
  }
}

int WeightStager::FreeSlot() {
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].state == SlotState::kFree) return static_cast<int>(i);
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& slot = slots_[i];
    if (slot.state != SlotState::kReleased) continue;
    StatusOr<bool> passed = backend_.QueryEvent(slot.copied.get());
    // An error of the copy's stream surfaces where the copy is used; the block is free.
    if (!passed.ok() || *passed) {
      slot.state = SlotState::kFree;
      return static_cast<int>(i);
    }
  }
  return -1;
}

void WeightStager::StartLocked(ExpertId key, int slot) {
  slots_[slot].state = SlotState::kReading;
  slots_[slot].key = key;
  slots_[slot].status = Status::Ok();
  where_[key] = slot;
  queue_.push_back(slot);
  cv_.notify_all();
}

StatusOr<bool> WeightStager::TryStart(ExpertId key) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (where_.count(key) != 0) return true;
  const int slot = FreeSlot();
  if (slot < 0) return false;
  StartLocked(key, slot);
  return true;
}

bool WeightStager::Started(ExpertId key) {
  std::lock_guard<std::mutex> lock(mutex_);
  return where_.count(key) != 0;
}

bool WeightStager::Ready(ExpertId key) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = where_.find(key);
  return it != where_.end() && slots_[it->second].state == SlotState::kReady;
}

StatusOr<const void*> WeightStager::Wait(ExpertId key) {
  std::unique_lock<std::mutex> lock(mutex_);
  while (where_.count(key) == 0) {
    const int slot = FreeSlot();
    if (slot >= 0) {
      StartLocked(key, slot);
      break;
    }
    // Wait for the oldest released block's copy to pass; a block being read frees itself
    // when dropped, so wait for the worker otherwise.
    int oldest = -1;
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].state == SlotState::kReleased &&
          (oldest < 0 || slots_[i].released < slots_[oldest].released)) {
        oldest = static_cast<int>(i);
      }
    }
    if (oldest >= 0) {
      const Event copied = slots_[oldest].copied.get();
      lock.unlock();
      backend_.SynchronizeEvent(copied).IgnoreError();  // FreeSlot then reclaims it
      lock.lock();
      continue;
    }
    bool reading = false;
    for (const Slot& s : slots_) reading |= s.state == SlotState::kReading;
    if (!reading) {
      return ResourceExhaustedError(StrCat("weight stager: all ", slots_.size(),
                                           " staging blocks are held; none frees for layer ",
                                           key.layer, " expert ", key.expert));
    }
    cv_.wait(lock);
  }
  const int index = where_[key];
  Slot& slot = slots_[index];
  cv_.wait(lock, [&] { return slot.state == SlotState::kReady; });
  if (!slot.status.ok()) {
    Status failed = std::move(slot.status);
    slot.status = Status::Ok();
    slot.state = SlotState::kFree;
    where_.erase(key);
    return failed;
  }
  return static_cast<const void*>(slot.block.data());
}

Status WeightStager::Release(ExpertId key, Stream stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = where_.find(key);
  if (it == where_.end() || slots_[it->second].state != SlotState::kReady) {
    return FailedPreconditionError(StrCat("weight stager: layer ", key.layer, " expert ",
                                          key.expert, " has no staged block to release"));
  }
  Slot& slot = slots_[it->second];
  ECSS_RETURN_IF_ERROR(backend_.RecordEvent(slot.copied.get(), stream));
  slot.state = SlotState::kReleased;
  slot.released = ++releases_;
  where_.erase(it);
  return Status::Ok();
}

void WeightStager::Drop(ExpertId key) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = where_.find(key);
  if (it == where_.end()) return;
  Slot& slot = slots_[it->second];
  if (slot.state == SlotState::kReading) {
    slot.dropped = true;
  } else {
    slot.state = SlotState::kFree;
    slot.status = Status::Ok();
  }
  where_.erase(it);
}

void WeightStager::Clear() {
  std::vector<ExpertId> keys;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [key, slot] : where_) keys.push_back(key);
  }
  for (ExpertId key : keys) Drop(key);
}

uint64_t WeightStager::bytes_read() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_read_;
}

std::optional<WeightStager::ReadTimes> WeightStager::read_times(ExpertId key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto slot = where_.find(key);
  if (slot == where_.end() || slots_[slot->second].state != SlotState::kReady) return std::nullopt;
  return slots_[slot->second].read;
}

}  // namespace ecss
