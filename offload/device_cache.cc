#include "offload/device_cache.h"

#include <algorithm>
#include <limits>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

class BeladyPolicy final : public EvictionPolicy {
 public:
  BeladyPolicy(const std::vector<ExpertId>& sequence, uint64_t lookahead)
      : lookahead_(lookahead), sequence_(sequence) {
    for (uint64_t position = 0; position < sequence.size(); ++position)
      uses_[sequence[position]].push_back(position);
  }
  void OnResident(ExpertId key) override {
    if (expected_ != 0) stale_ = true;  // its record says "unused since the step began"
    Place(key, UseFrom(key, 0));
  }
  void OnAccess(ExpertId key, uint64_t position) override {
    if (position != expected_ || position >= sequence_.size() || sequence_[position] != key)
      stale_ = true;
    expected_ = position + 1;
    Place(key, UseFrom(key, position + 1));
  }
  void OnEvict(ExpertId key) override {
    auto it = next_.find(key);
    if (it == next_.end()) return;
    if (it->second == kNever) never_.erase(key);
    next_.erase(it);
  }
  std::unique_ptr<EvictionPolicy> Clone() const override {
    return std::make_unique<BeladyPolicy>(*this);
  }
  std::optional<ExpertId> ChooseVictim(uint64_t position,
                                       const std::function<bool(ExpertId)>& evictable) override {
    Refresh(position);
    // Those never used again tie, lowest key first; so do those used past the lookahead.
    // Otherwise the farthest next use.
    std::optional<ExpertId> victim;
    for (ExpertId key : never_) {
      if (evictable(key)) {
        victim = key;
        break;
      }
    }
    std::vector<Entry> passed;
    while (!heap_.empty()) {
      const Entry top = heap_.front();
      auto live = next_.find(top.key);
      if (live == next_.end() || live->second != top.next) {  // evicted or used since
        Pop();
        continue;
      }
      const bool far = top.next - position > lookahead_;
      if (!far && victim) break;
      if (evictable(top.key) && (!victim || top.key < *victim)) {
        victim = top.key;
        if (!far) break;
      }
      passed.push_back(top);
      Pop();
    }
    for (const Entry& entry : passed) Push(entry);
    return victim;
  }

 private:
  static constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();
  struct Entry {
    uint64_t next;
    ExpertId key;
  };
  // The heap's order: the farthest next use on top.
  static bool Nearer(const Entry& a, const Entry& b) {
    return a.next != b.next ? a.next < b.next : b.key < a.key;
  }
  void Push(const Entry& entry) {
    heap_.push_back(entry);
    std::push_heap(heap_.begin(), heap_.end(), Nearer);
  }
  void Pop() {
    std::pop_heap(heap_.begin(), heap_.end(), Nearer);
    heap_.pop_back();
  }
  // The first use of `key` at or after `from`.
  uint64_t UseFrom(ExpertId key, uint64_t from) const {
    auto it = uses_.find(key);
    if (it == uses_.end()) return kNever;
    auto next = std::lower_bound(it->second.begin(), it->second.end(), from);
    return next == it->second.end() ? kNever : *next;
  }
  // Records `key`'s next use. The heap keeps an old entry, skipped once it no longer matches;
  // it is rebuilt from the records when stale entries outnumber live ones.
  void Place(ExpertId key, uint64_t next) {
    auto [it, added] = next_.try_emplace(key, next);
    if (!added) {
      if (it->second == kNever && next != kNever) never_.erase(key);
      it->second = next;
    }
    if (next == kNever) {
      never_.insert(key);
      return;
    }
    Push({next, key});
    if (heap_.size() > 2 * next_.size() + 64) Rebuild();
  }
  void Rebuild() {
    heap_.clear();
    never_.clear();
    for (const auto& [key, next] : next_) {
      if (next == kNever) {
        never_.insert(key);
      } else {
        heap_.push_back({next, key});
      }
    }
    std::make_heap(heap_.begin(), heap_.end(), Nearer);
  }
  // Makes every resident's record its first use after `position`. While each access came at
  // the position after the one before, with the expert the sequence has there, every record
  // (the first use after the resident's last access, or from the step's start) is that
  // already, with one exception: when the expert the sequence has at `position` is resident,
  // the caller is acquiring another there, and that expert's record is `position` itself.
  // Once an access came elsewhere (a prefetcher that skipped ahead or went back), any record
  // may be late, and all are redone.
  void Refresh(uint64_t position) {
    if (stale_ || position != expected_) {
      for (auto& [key, next] : next_) next = UseFrom(key, position + 1);
      Rebuild();
      stale_ = false;
      expected_ = position;
    } else if (position < sequence_.size()) {
      const ExpertId due = sequence_[position];
      if (next_.count(due) != 0) Place(due, UseFrom(due, position + 1));
    }
  }

  uint64_t lookahead_;
  std::vector<ExpertId> sequence_;
  std::unordered_map<ExpertId, std::vector<uint64_t>> uses_;
  std::unordered_map<ExpertId, uint64_t> next_;  // resident -> its next use
  std::set<ExpertId> never_;                     // residents not used again
  std::vector<Entry> heap_;                      // (next use, resident) of the others, some stale
  uint64_t expected_ = 0;                        // the position the next access should have
  bool stale_ = false;                           // a record may be late
};

class LruPolicy final : public EvictionPolicy {
 public:
  void OnResident(ExpertId key) override { Place(key, 0); }
  void OnAccess(ExpertId key, uint64_t position) override { Place(key, position); }
  void OnEvict(ExpertId key) override {
    auto it = last_.find(key);
    if (it == last_.end()) return;
    order_.erase({it->second, key});
    last_.erase(it);
  }
  std::unique_ptr<EvictionPolicy> Clone() const override {
    return std::make_unique<LruPolicy>(*this);
  }
  std::optional<ExpertId> ChooseVictim(uint64_t,
                                       const std::function<bool(ExpertId)>& evictable) override {
    for (const auto& [last, key] : order_) {
      if (evictable(key)) return key;
    }
    return std::nullopt;
  }

 private:
  void Place(ExpertId key, uint64_t last) {
    OnEvict(key);
    last_[key] = last;
    order_.insert({last, key});
  }
  std::unordered_map<ExpertId, uint64_t> last_;    // resident -> its last use
  std::set<std::pair<uint64_t, ExpertId>> order_;  // least recently used first
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
  for (uint32_t s = 0; s < options.slots; ++s) {
    Slot& slot = cache->slots_[s];
    ECSS_ASSIGN_OR_RETURN(slot.memory, backend.device_memory().Allocate(options.expert_bytes,
                                                                        MemoryTag::kExpertWeights));
    ECSS_ASSIGN_OR_RETURN(slot.ready, CreateOwnedEvent(backend));
    ECSS_ASSIGN_OR_RETURN(slot.last_use, CreateOwnedEvent(backend));
    cache->free_.insert(cache->free_.end(), s);
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
  uint32_t index;
  auto found = where_.find(key);
  if (found != where_.end()) {
    ++stats_.hits;
    index = found->second;
  } else {
    if (host_weights == nullptr)
      return InvalidArgumentError("device cache: a miss needs the host weights");
    // A free slot, or the policy's victim among those not leased.
    if (free_.empty()) {
      const std::optional<ExpertId> victim = policy_->ChooseVictim(position, [&](ExpertId k) {
        auto at = where_.find(k);
        return at != where_.end() && slots_[at->second].leases == 0;
      });
      if (!victim) {
        return ResourceExhaustedError(
            StrCat("device cache: all ", slots_.size(),
                   " slots are leased; release a lease before acquiring more"));
      }
      Evict(*victim);
      ++stats_.evictions;
    }
    index = *free_.begin();
    Slot& slot = slots_[index];
    // The new copy must not overwrite weights a kernel may still be reading.
    if (slot.used) ECSS_RETURN_IF_ERROR(backend_.WaitEvent(copy_stream, slot.last_use.get()));
    ECSS_RETURN_IF_ERROR(backend_.CopyAsync(copy_stream, slot.memory.data(), host_weights,
                                            options_.expert_bytes, CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(backend_.RecordEvent(slot.ready.get(), copy_stream));
    free_.erase(index);
    slot.key = key;
    slot.occupied = true;
    where_[key] = index;
    ++stats_.misses;
    stats_.bytes_moved += options_.expert_bytes;
  }
  policy_->OnAccess(key, position);
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

void DeviceCache::SetPolicy(std::unique_ptr<EvictionPolicy> policy) {
  policy_ = std::move(policy);
  for (const Slot& slot : slots_) {
    if (slot.occupied) policy_->OnResident(slot.key);
  }
}

void DeviceCache::Evict(ExpertId key) {
  auto found = where_.find(key);
  // The slot keeps its last_use event, so the next copy into it still waits for that kernel.
  slots_[found->second].occupied = false;
  free_.insert(found->second);
  where_.erase(found);
  policy_->OnEvict(key);
}

Status DeviceCache::Invalidate(ExpertId key) {
  auto found = where_.find(key);
  if (found == where_.end()) return Status::Ok();
  Slot& slot = slots_[found->second];
  if (slot.leases > 0) {
    return FailedPreconditionError(StrCat("device cache: expert (", key.layer, ", ", key.expert,
                                          ") is leased; cannot invalidate"));
  }
  Evict(key);
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
