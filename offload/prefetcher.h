// Prefetcher: brings a step's experts to the device ahead of use. Given the step's expert
// access sequence (router/'s StepAccessSequence, as ExpertIds), it leases experts from the
// DeviceCache in sequence order, so that their host-to-device copies run while the device
// computes earlier positions. The window is bounded by the device budget (the cache's slots:
// it never holds more leases than slots) and by `window_experts`.
//
// Compute weights live in pinned host memory (hooks.host_weights), or on NVMe behind a
// WeightStager: then every expert the cache will have to copy is first read NVMe -> pinned,
// ahead of the lease window, in a window bounded by the stager's blocks (the pinned budget);
// a block goes to one host-to-device copy and is reused after it.
//
// Fences: an expert whose host weights are being rewritten (its update runs) is not fetched
// ahead: prefetching stops at it, never blocking. Take() fetches what is missing, waiting on
// such a fence, and records every wait as a StallRecord (who waited, on what, how long).
// The cache's eviction policy is set to Belady over the step's sequence.
// Not thread-safe: the step's driving thread calls everything (like DeviceCache).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <string_view>
#include <vector>

#include "offload/device_cache.h"
#include "offload/stall_record.h"
#include "offload/weight_stager.h"

namespace ecss {

struct PrefetcherHooks {
  // The expert's host weights (what a miss copies from); unused with a WeightStager.
  std::function<const void*(ExpertId)> host_weights;
  // True while the expert's host weights are being rewritten.
  std::function<bool(ExpertId)> fence_pending;
  // Blocks until they are not.
  std::function<Status(ExpertId)> wait_fence;
  // Optional: a miss's copy for sequence position `position` was just enqueued on the copy
  // stream (the caller may enqueue work after it there, e.g. to see when it ended).
  std::function<void(uint64_t position)> on_copy;
  // Optional, with a WeightStager: the weights that copy reads were read from NVMe in
  // [start, end] (called before on_copy).
  std::function<void(uint64_t position, std::chrono::steady_clock::time_point start,
                     std::chrono::steady_clock::time_point end)>
      on_staged;
};

class Prefetcher {
 public:
  // `cache` (and `stager`, when given) must outlive the prefetcher; copies go to
  // `copy_stream`. window_experts: 0 = the cache's slots.
  Prefetcher(DeviceCache& cache, Stream copy_stream, PrefetcherHooks hooks, uint32_t window_experts,
             WeightStager* stager = nullptr);
  ~Prefetcher();

  // Starts a step: drops leases still held, sets the cache's policy to Belady over `sequence`.
  void BeginStep(std::vector<ExpertId> sequence);
  // Starts a step whose accesses are not known ahead (learned gates: a layer's experts are
  // known once its gate ran): an empty sequence that Append extends, and LRU eviction.
  void BeginReactiveStep();
  // Appends accesses (reactive steps); returns the position of the first.
  uint64_t Append(const std::vector<ExpertId>& keys);
  // Leases ahead, in order, while the window and the cache allow, and stages from NVMe
  // ahead of that while the stager's blocks allow; never blocks.
  Status Advance();
  // The leases of positions [first, first + count), prefetched or fetched now (waiting on
  // fences, recorded as stalls). Positions before `first` still held were skipped by the
  // caller: their leases are dropped unused. Leases and staged blocks taken ahead for later
  // positions yield when these need the room (Note [Work ahead yields] in the .cc), so any
  // order of calls works within the budget. The caller waits on each lease's ready() event.
  StatusOr<std::vector<Lease>> Take(uint64_t first, size_t count);
  // Drops every held lease (their kernels, if any, were never enqueued).
  void Clear();

  size_t held() const { return held_.size(); }
  const std::vector<StallRecord>& stalls() const { return stalls_; }  // since BeginStep
  double stall_seconds() const;

 private:
  // Drops what the last step held and starts over at position 0 of `sequence`.
  void StartStep(std::vector<ExpertId> sequence);
  Status Fetch(uint64_t position, Lease* out);
  // True when `key`'s lease would copy it (it is not on the device).
  bool NeedsCopy(ExpertId key);
  // Leases `key` from the staged block and hands the block to its copy.
  Status AcquireStaged(ExpertId key, const void* block, uint64_t position, Lease* out);
  Status StageAhead();
  // Drops the leases held for positions >= end and the blocks staged for positions after
  // `position`, for a fetch at `position` that found no room. True when anything was dropped.
  bool YieldAhead(uint64_t position, uint64_t end);

  DeviceCache& cache_;
  const Stream copy_stream_;
  const PrefetcherHooks hooks_;
  const uint32_t window_;
  WeightStager* const stager_;
  std::vector<ExpertId> sequence_;
  std::deque<std::pair<uint64_t, Lease>> held_;  // by position, ascending
  uint64_t next_ = 0;                            // next position to lease ahead
  uint64_t stage_next_ = 0;                      // next position to stage ahead
  bool reactive_ = false;                        // the step began with BeginReactiveStep
  uint64_t cache_base_ = 0;  // reactive: added to positions, so LRU's clock never restarts
  std::vector<StallRecord> stalls_;
};

}  // namespace ecss
