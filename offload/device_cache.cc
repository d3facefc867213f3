#include "offload/device_cache.h"

#include <algorithm>
#include <limits>
#include <map>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

class BeladyPolicy final : public EvictionPolicy {
 public:
  BeladyPolicy(const std::vector<ExpertId>& sequence, uint64_t lookahead) : lookahead_(lookahead) {
    for (uint64_t position = 0; position < sequence.size(); ++position)
      uses_[sequence[position]].push_back(position);
  }
  void OnAccess(ExpertId, uint64_t) override {}
  ExpertId ChooseVictim(const std::vector<ExpertId>& candidates, uint64_t position) override {
    ExpertId victim = candidates.front();
    uint64_t farthest = 0;
    for (ExpertId key : candidates) {
      const uint64_t next = NextUse(key, position);
      if (next > farthest || (next == farthest && key < victim)) {
        farthest = next;
        victim = key;
      }
    }
    return victim;
  }

 private:
  uint64_t NextUse(ExpertId key, uint64_t position) const {
    auto it = uses_.find(key);
    if (it == uses_.end()) return std::numeric_limits<uint64_t>::max();
    auto next = std::upper_bound(it->second.begin(), it->second.end(), position);
    if (next == it->second.end() || *next - position > lookahead_)
      return std::numeric_limits<uint64_t>::max();
    return *next;
  }
  uint64_t lookahead_;
  std::unordered_map<ExpertId, std::vector<uint64_t>> uses_;
};

class LruPolicy final : public EvictionPolicy {
 public:
  void OnAccess(ExpertId key, uint64_t position) override { last_[key] = position; }
  ExpertId ChooseVictim(const std::vector<ExpertId>& candidates, uint64_t) override {
    return *std::min_element(candidates.begin(), candidates.end(), [&](ExpertId a, ExpertId b) {
      const uint64_t la = last_[a], lb = last_[b];
      return la != lb ? la < lb : a < b;
    });
  }

 private:
  std::unordered_map<ExpertId, uint64_t> last_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeBeladyPolicy(const std::vector<ExpertId>& sequence,
                                                 uint64_t lookahead) {
  return std::make_unique<BeladyPolicy>(sequence, lookahead);
}
std::unique_ptr<EvictionPolicy> MakeLruPolicy() { return std::make_unique<LruPolicy>(); }

StatusOr<std::unique_ptr<DeviceCache>> DeviceCache::Create(Backend& backend, const Options& options,
                                                           std::unique_ptr<EvictionPolicy> policy) {
  if (options.expert_bytes == 0 || options.slots == 0 || policy == nullptr) {
    return InvalidArgumentError("device cache needs expert_bytes, slots and a policy");
  }
  const uint64_t needed = options.expert_bytes * options.slots;
  if (needed > backend.device_memory().capacity_bytes()) {
    return ResourceExhaustedError(StrCat("device cache: ", options.slots, " slots of ",
                                         HumanBytes(options.expert_bytes), " need ",
                                         HumanBytes(needed), "; the device budget is ",
                                         HumanBytes(backend.device_memory().capacity_bytes())));
  }
  std::unique_ptr<DeviceCache> cache(new DeviceCache(backend, options, std::move(policy)));
  cache->slots_.resize(options.slots);
  for (Slot& slot : cache->slots_) {
    ECSS_ASSIGN_OR_RETURN(slot.memory, backend.device_memory().Allocate(options.expert_bytes,
                                                                        MemoryTag::kExpertWeights));
    ECSS_ASSIGN_OR_RETURN(slot.ready, CreateOwnedEvent(backend));
    ECSS_ASSIGN_OR_RETURN(slot.last_use, CreateOwnedEvent(backend));
  }
  return cache;
}

DeviceCache::~DeviceCache() {
  for (const Slot& slot : slots_) {
    ECSS_CHECK(slot.leases == 0) << "device cache destroyed while an expert is leased";
  }
}

std::vector<ExpertId> DeviceCache::ResidentKeys() const {
  std::vector<ExpertId> keys;
  for (const Slot& slot : slots_) {
    if (slot.occupied) keys.push_back(slot.key);
  }
  return keys;
}

StatusOr<Lease> DeviceCache::Acquire(ExpertId key, const void* host_weights, Stream copy_stream,
                                     uint64_t position) {
  policy_->OnAccess(key, position);
  uint32_t index;
  auto found = where_.find(key);
  if (found != where_.end()) {
    ++stats_.hits;
    index = found->second;
  } else {
    if (host_weights == nullptr)
      return InvalidArgumentError("device cache: a miss needs the host weights");
    // A free slot, or the policy's victim among those not leased.
    std::vector<ExpertId> candidates;
    int free_slot = -1;
    for (uint32_t s = 0; s < slots_.size(); ++s) {
      if (!slots_[s].occupied) {
        free_slot = static_cast<int>(s);
        break;
      }
      if (slots_[s].leases == 0) candidates.push_back(slots_[s].key);
    }
    if (free_slot < 0) {
      if (candidates.empty()) {
        return ResourceExhaustedError(
            StrCat("device cache: all ", slots_.size(),
                   " slots are leased; release a lease before acquiring more"));
      }
      const ExpertId victim = policy_->ChooseVictim(candidates, position);
      free_slot = static_cast<int>(where_.at(victim));
      where_.erase(victim);
      ++stats_.evictions;
    }
    index = static_cast<uint32_t>(free_slot);
    Slot& slot = slots_[index];
    // The new copy must not overwrite weights a kernel may still be reading.
    if (slot.used) ECSS_RETURN_IF_ERROR(backend_.WaitEvent(copy_stream, slot.last_use.get()));
    ECSS_RETURN_IF_ERROR(backend_.CopyAsync(copy_stream, slot.memory.data(), host_weights,
                                            options_.expert_bytes, CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(backend_.RecordEvent(slot.ready.get(), copy_stream));
    slot.key = key;
    slot.occupied = true;
    where_[key] = index;
    ++stats_.misses;
    stats_.bytes_moved += options_.expert_bytes;
  }
  Slot& slot = slots_[index];
  ++slot.leases;
  Lease lease;
  lease.cache_ = this;
  lease.slot_ = index;
  lease.weights_ = slot.memory.data();
  lease.ready_ = slot.ready.get();
  return lease;
}

Status DeviceCache::ReleaseSlot(uint32_t index, const Stream* used_on) {
  Slot& slot = slots_[index];
  ECSS_CHECK(slot.leases > 0);
  --slot.leases;
  if (used_on != nullptr) {
    ECSS_RETURN_IF_ERROR(backend_.RecordEvent(slot.last_use.get(), *used_on));
    slot.used = true;
  }
  return Status::Ok();
}

void DeviceCache::SetPolicy(std::unique_ptr<EvictionPolicy> policy) { policy_ = std::move(policy); }

Status DeviceCache::Invalidate(ExpertId key) {
  auto found = where_.find(key);
  if (found == where_.end()) return Status::Ok();
  Slot& slot = slots_[found->second];
  if (slot.leases > 0) {
    return FailedPreconditionError(StrCat("device cache: expert (", key.layer, ", ", key.expert,
                                          ") is leased; cannot invalidate"));
  }
  // The slot keeps its last_use event, so the next copy into it still waits for that kernel.
  slot.occupied = false;
  where_.erase(found);
  return Status::Ok();
}

Residency DeviceCache::residency(ExpertId key) {
  auto found = where_.find(key);
  if (found == where_.end()) return Residency::kAbsent;
  const Slot& slot = slots_[found->second];
  if (slot.leases > 0) return Residency::kLeased;
  StatusOr<bool> ready = backend_.QueryEvent(slot.ready.get());
  if (ready.ok() && !*ready) return Residency::kLoading;
  if (slot.used) {
    StatusOr<bool> done = backend_.QueryEvent(slot.last_use.get());
    if (done.ok() && !*done)
      return Residency::kEvicting;  // resident, but its last kernel is still running
  }
  return Residency::kResident;
}

Lease::Lease(Lease&& other) noexcept
    : cache_(std::exchange(other.cache_, nullptr)),
      slot_(other.slot_),
      weights_(other.weights_),
      ready_(other.ready_) {}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    if (cache_ != nullptr) cache_->ReleaseSlot(slot_, nullptr).IgnoreError();
    cache_ = std::exchange(other.cache_, nullptr);
    slot_ = other.slot_;
    weights_ = other.weights_;
    ready_ = other.ready_;
  }
  return *this;
}

Lease::~Lease() {
  if (cache_ != nullptr) cache_->ReleaseSlot(slot_, nullptr).IgnoreError();
}

Status Lease::Release(Stream used_on) {
  if (cache_ == nullptr) return FailedPreconditionError("lease already released");
  DeviceCache* cache = std::exchange(cache_, nullptr);
  return cache->ReleaseSlot(slot_, &used_on);
}

}  // namespace ecss
