// DeviceCache: expert compute weights in fixed-size slots of device memory, never above the
// device budget. An expert is absent, loading (its H2D copy is queued), resident, leased (a
// kernel uses it) or evicting (its slot was given to another expert while the last kernel
// using it may still run: the new copy waits for that kernel's stream). Leases are RAII and
// record the stream that used the weights, so a slot is overwritten only after that stream
// passed. Which expert leaves is an EvictionPolicy: Belady (exact next use: RRE knows the
// step's access sequence before it starts) or LRU (learned gates, whose future is unknown).
// Not thread-safe: the step's driving thread acquires and releases.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <unordered_map>
#include <vector>

#include "offload/expert_index.h"
#include "runtime/device/backend.h"

namespace ecss {

// Which resident expert leaves. The policy keeps its own order of the residents it is told of
// (OnResident, OnAccess, OnEvict: the cache's slots, or a plan builder's), so that a victim
// costs a logarithm of the slots, not a pass over them.
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  // `key` was already resident when the policy took over, unused since.
  virtual void OnResident(ExpertId key) = 0;
  // `key`, resident, is used at access `position` (positions increase along the step; a
  // caller that goes back or skips ahead costs Belady a rebuild of its order).
  virtual void OnAccess(ExpertId key, uint64_t position) = 0;
  // `key` left (evicted, invalidated).
  virtual void OnEvict(ExpertId key) = 0;
  // The resident to evict before `position`: the first in the policy's order that `evictable`
  // accepts (a leased one it does not); nullopt when it accepts none.
  virtual std::optional<ExpertId> ChooseVictim(uint64_t position,
                                               const std::function<bool(ExpertId)>& evictable) = 0;
  // The policy as it stands, to go on separately (a copied plan's).
  virtual std::unique_ptr<EvictionPolicy> Clone() const = 0;
};

// Evicts the resident whose next use is farthest (or never; of several, the lowest key):
// optimal for a known sequence. Uses further than `lookahead` positions ahead count as never
// (what the runtime knows: RRE gives the current step's sequence, not the whole run's); with
// a finite lookahead, each choice passes over every resident used past it. A victim is always
// the one a pass over the residents would choose, whatever order the accesses come in.
std::unique_ptr<EvictionPolicy> MakeBeladyPolicy(const std::vector<ExpertId>& sequence,
                                                 uint64_t lookahead = UINT64_MAX);
// Evicts the least recently used resident. Those resident before the policy took over
// (OnResident) count as used at position 0, ties going to the lowest key.
std::unique_ptr<EvictionPolicy> MakeLruPolicy();

enum class Residency : uint8_t { kAbsent, kLoading, kResident, kLeased, kEvicting };

struct CacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  uint64_t bytes_moved = 0;  // host -> device
  double hit_rate() const {
    return hits + misses ? static_cast<double>(hits) / (hits + misses) : 0;
  }
};

class DeviceCache;

// Keeps an expert resident while a kernel uses it. Release(stream) records that the weights
// were used on `stream`; the destructor releases without a stream (the caller synchronised).
class Lease {
 public:
  Lease() = default;
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();

  void* weights() const { return weights_; }
  // Compute must wait for this event (the expert's H2D copy).
  Event ready() const { return ready_; }
  Status Release(Stream used_on);

 private:
  friend class DeviceCache;
  DeviceCache* cache_ = nullptr;
  uint32_t slot_ = 0;
  void* weights_ = nullptr;
  Event ready_;
};

class DeviceCache {
 public:
  struct Options {
    uint64_t expert_bytes = 0;  // one slot
    uint32_t slots = 0;         // slots carved from the backend's device memory
  };
  // ResourceExhausted when the device budget cannot hold the slots (it names the bytes needed),
  // InvalidArgument for zero sizes.
  static StatusOr<std::unique_ptr<DeviceCache>> Create(Backend& backend, const Options& options,
                                                       std::unique_ptr<EvictionPolicy> policy);
  ~DeviceCache();

  // Makes `key` resident (enqueuing its copy from `host_weights` on `copy_stream` when absent,
  // after any evicted occupant's last use) and leases it. ResourceExhausted when every slot is
  // leased.
  StatusOr<Lease> Acquire(ExpertId key, const void* host_weights, Stream copy_stream,
                          uint64_t position);
  // Drops `key`'s device copy (its host weights changed: an update). No-op when absent;
  // FailedPrecondition while leased. A later Acquire copies it again.
  Status Invalidate(ExpertId key);
  // Replaces the policy (the engine gives Belady each step's sequence; positions restart),
  // telling it the residents.
  void SetPolicy(std::unique_ptr<EvictionPolicy> policy);
  Residency residency(ExpertId key);
  // The experts whose weights are on the device, in slot order.
  std::vector<ExpertId> ResidentKeys() const;
  const CacheStats& stats() const { return stats_; }
  uint32_t slots() const { return static_cast<uint32_t>(slots_.size()); }

 private:
  friend class Lease;
  struct Slot {
    Buffer memory;
    ExpertId key;
    bool occupied = false;
    uint32_t leases = 0;
    OwnedEvent ready;     // recorded after the slot's H2D copy
    OwnedEvent last_use;  // recorded on the stream of the latest release
    bool used = false;    // last_use has been recorded
  };
  DeviceCache(Backend& backend, const Options& options, std::unique_ptr<EvictionPolicy> policy)
      : backend_(backend), options_(options), policy_(std::move(policy)) {}
  Status ReleaseSlot(uint32_t slot, const Stream* used_on);
  // Frees `key`'s slot (resident) and tells the policy.
  void Evict(ExpertId key);

  Backend& backend_;
  Options options_;
  std::unique_ptr<EvictionPolicy> policy_;
  std::vector<Slot> slots_;
  std::unordered_map<ExpertId, uint32_t> where_;  // resident key -> slot
  std::set<uint32_t> free_;                       // unoccupied slots; the lowest is filled first
  CacheStats stats_;
};

}  // namespace ecss
