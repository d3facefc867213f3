// WeightStager: the NVMe -> pinned stage in front of the device cache, for compute weights
// that the ExpertStore keeps on NVMe. It owns a fixed number of pinned blocks carved from
// what is left of the store's pinned budget (so the prefetch window it allows is bounded by
// that budget), reads experts' weights into them on its own thread (the checksum is verified
// there: a bad block is an error, never staged), and hands each block to one host-to-device
// copy. A block is reused only after the stream of that copy passed it (an event), as a
// device slot is after the kernel that used it.
//
// Slot life: free -> reading -> ready -> released (the copy is queued) -> free. Dropped
// slots (staged, then not needed: the expert was still on the device) go back to free.
// Thread-safe; normally one driving thread (the prefetcher's) calls it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "offload/device_cache.h"
#include "offload/expert_store.h"

namespace ecss {

class WeightStager {
 public:
  // max_slots: at most this many blocks (0: as many as the pool's remaining budget holds).
  // ResourceExhausted naming the bytes of one block when the budget holds none;
  // FailedPrecondition when the store's weights are not on NVMe.
  static StatusOr<std::unique_ptr<WeightStager>> Create(ExpertStore& store, uint32_t max_slots);
  ~WeightStager();  // finishes the read in progress

  // Starts reading `key`'s weights into a free block; never blocks. True when the key is
  // being read or ready now (also when it already was); false when every block is taken.
  StatusOr<bool> TryStart(ExpertId key);
  bool Started(ExpertId key);  // being read or ready
  bool Ready(ExpertId key);    // its read finished (successfully or not)
  // Starts the read if needed (waiting for a released block's copy to pass) and waits for
  // it. Returns the block, or the read's error (naming layer, expert and state; the block is
  // freed). ResourceExhausted when every block is held ready and none was released.
  StatusOr<const void*> Wait(ExpertId key);
  // The block's copy was enqueued on `stream`; the block is reused once the stream passed it.
  Status Release(ExpertId key, Stream stream);
  // Frees `key`'s block without a copy (a read in progress is discarded when it ends).
  void Drop(ExpertId key);
  // Drops every block not released.
  void Clear();

  uint32_t slots() const { return static_cast<uint32_t>(slots_.size()); }
  uint64_t bytes_read() const;

  // When `key`'s read ran, on the stager's thread; nullopt unless it is ready (Wait returned
  // its block and it was not released yet).
  struct ReadTimes {
    std::chrono::steady_clock::time_point start, end;
  };
  std::optional<ReadTimes> read_times(ExpertId key) const;

 private:
  enum class SlotState : uint8_t { kFree, kReading, kReady, kReleased };
  struct Slot {
    Buffer block;
    OwnedEvent copied;  // recorded after the block's copy
    SlotState state = SlotState::kFree;
    ExpertId key;
    Status status;
    bool dropped = false;   // reading, but no longer wanted
    uint64_t released = 0;  // order of release, to wait for the oldest copy first
    ReadTimes read;         // the last read's
  };
  explicit WeightStager(ExpertStore& store) : store_(store) {}
  void Work();
  // A free block, reclaiming released ones whose copy passed; -1 when none. Lock held.
  int FreeSlot();
  void StartLocked(ExpertId key, int slot);

  ExpertStore& store_;
  Backend& backend_ = store_.backend();
  std::vector<Slot> slots_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::unordered_map<ExpertId, int> where_;  // key -> slot (reading or ready)
  std::deque<int> queue_;                    // slots to read, in order
  uint64_t releases_ = 0;
  uint64_t bytes_read_ = 0;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace ecss
