#include "offload/prefetcher.h"

#include <algorithm>
#include <chrono>

namespace ecss {

std::string_view StallCauseName(StallCause cause) {
  switch (cause) {
    case StallCause::kUpdateFence:
      return "update_fence";
    case StallCause::kNvmeRead:
      return "nvme_read";
  }
  return "?";
}

Prefetcher::Prefetcher(DeviceCache& cache, Stream copy_stream, PrefetcherHooks hooks,
                       uint32_t window_experts, WeightStager* stager)
    : cache_(cache),
      copy_stream_(copy_stream),
      hooks_(std::move(hooks)),
      window_(window_experts == 0 ? cache.slots() : std::min(window_experts, cache.slots())),
      stager_(stager) {}

Prefetcher::~Prefetcher() = default;

void Prefetcher::StartStep(std::vector<ExpertId> sequence) {
  Clear();
  sequence_ = std::move(sequence);
  next_ = 0;
  stage_next_ = 0;
  stalls_.clear();
}

void Prefetcher::BeginStep(std::vector<ExpertId> sequence) {
  StartStep(std::move(sequence));
  reactive_ = false;
  cache_base_ = 0;
  cache_.SetPolicy(MakeBeladyPolicy(sequence_));
}

void Prefetcher::BeginReactiveStep() {
  // LRU needs recency across steps: one policy, and positions that keep increasing.
  if (reactive_) {
    cache_base_ += sequence_.size();
  } else {
    cache_.SetPolicy(MakeLruPolicy());
  }
  reactive_ = true;
  StartStep({});
}

uint64_t Prefetcher::Append(const std::vector<ExpertId>& keys) {
  const uint64_t first = sequence_.size();
  sequence_.insert(sequence_.end(), keys.begin(), keys.end());
  return first;
}

void Prefetcher::Clear() {
  held_.clear();
  if (stager_ != nullptr) stager_->Clear();
}

bool Prefetcher::NeedsCopy(ExpertId key) { return cache_.residency(key) == Residency::kAbsent; }

Status Prefetcher::AcquireStaged(ExpertId key, const void* block, uint64_t position, Lease* out) {
  StatusOr<Lease> lease = cache_.Acquire(key, block, copy_stream_, cache_base_ + position);
  if (!lease.ok()) {
    stager_->Drop(key);
    return lease.status();
  }
  *out = std::move(*lease);
  if (hooks_.on_staged) {
    if (std::optional<WeightStager::ReadTimes> read = stager_->read_times(key)) {
      hooks_.on_staged(position, read->start, read->end);
    }
  }
  if (hooks_.on_copy) hooks_.on_copy(position);
  // The copy is queued on copy_stream_ now: the block is reused once the stream passed it.
  return stager_->Release(key, copy_stream_);
}

double Prefetcher::stall_seconds() const {
  double total = 0;
  for (const StallRecord& s : stalls_) total += s.seconds;
  return total;
}

Status Prefetcher::Fetch(uint64_t position, Lease* out) {
  const ExpertId key = sequence_[position];
  if (cache_.residency(key) == Residency::kAbsent && hooks_.fence_pending(key)) {
    const auto start = std::chrono::steady_clock::now();
    Status waited = hooks_.wait_fence(key);
    stalls_.push_back(
        {position, key, StallCause::kUpdateFence,
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()});
    ECSS_RETURN_IF_ERROR(waited);
  }
  if (stager_ == nullptr) {
    const bool miss = NeedsCopy(key);
    ECSS_ASSIGN_OR_RETURN(
        *out, cache_.Acquire(key, hooks_.host_weights(key), copy_stream_, cache_base_ + position));
    if (miss && hooks_.on_copy) hooks_.on_copy(position);
    return Status::Ok();
  }
  if (!NeedsCopy(key)) {
    stager_->Drop(key);  // staged while it was evicted, or not needed after all
    ECSS_ASSIGN_OR_RETURN(*out, cache_.Acquire(key, nullptr, copy_stream_, cache_base_ + position));
    return Status::Ok();
  }
  const bool waits = !stager_->Ready(key);
  const auto start = std::chrono::steady_clock::now();
  StatusOr<const void*> block = stager_->Wait(key);
  if (waits) {
    stalls_.push_back(
        {position, key, StallCause::kNvmeRead,
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()});
  }
  ECSS_RETURN_IF_ERROR(block.status());
  return AcquireStaged(key, *block, position, out);
}

Status Prefetcher::StageAhead() {
  stage_next_ = std::max(stage_next_, next_);
  while (stage_next_ < sequence_.size()) {
    const ExpertId key = sequence_[stage_next_];
    if (NeedsCopy(key)) {
      // An expert being updated gets new weights: reading them now would stage the old ones.
      if (hooks_.fence_pending(key)) break;
      ECSS_ASSIGN_OR_RETURN(bool started, stager_->TryStart(key));
      if (!started) break;  // every block is taken: the pinned budget bounds the window
    }
    ++stage_next_;
  }
  return Status::Ok();
}

Status Prefetcher::Advance() {
  // Held leases never exceed the slots, so an Acquire always finds an unleased slot: a
  // key held twice shares one slot, which only leaves more free.
  while (next_ < sequence_.size() && held_.size() < window_) {
    const ExpertId key = sequence_[next_];
    if (cache_.residency(key) == Residency::kAbsent && hooks_.fence_pending(key)) break;
    Lease lease;
    if (stager_ != nullptr && NeedsCopy(key)) {
      // Never wait on NVMe here: lease once the weights are staged. (Staged once for an
      // earlier position, then evicted: stage it again.)
      if (!stager_->Started(key)) {
        ECSS_ASSIGN_OR_RETURN(bool started, stager_->TryStart(key));
        if (!started) break;
      }
      if (!stager_->Ready(key)) break;
      ECSS_ASSIGN_OR_RETURN(const void* block, stager_->Wait(key));
      ECSS_RETURN_IF_ERROR(AcquireStaged(key, block, next_, &lease));
    } else {
      ECSS_RETURN_IF_ERROR(Fetch(next_, &lease));
    }
    held_.emplace_back(next_, std::move(lease));
    ++next_;
  }
  return stager_ != nullptr ? StageAhead() : Status::Ok();
}

StatusOr<std::vector<Lease>> Prefetcher::Take(uint64_t first, size_t count) {
  if (first + count > sequence_.size()) {
    return OutOfRangeError("prefetcher: positions past the step's sequence");
  }
  std::vector<Lease> leases(count);
  while (!held_.empty() && held_.front().first < first + count) {
    const uint64_t position = held_.front().first;
    if (position >= first) leases[position - first] = std::move(held_.front().second);
    held_.pop_front();
  }
  next_ = std::max(next_, first);
  for (size_t i = 0; i < count; ++i) {
    if (leases[i].weights() != nullptr) continue;
    Status fetched = Fetch(first + i, &leases[i]);
    while (fetched.code() == StatusCode::kResourceExhausted &&
           YieldAhead(first + i, first + count)) {
      fetched = Fetch(first + i, &leases[i]);
    }
    ECSS_RETURN_IF_ERROR(fetched);
    next_ = std::max(next_, first + i + 1);
  }
  return leases;
}

// Note [Work ahead yields]: slots leased and blocks staged ahead are speculative. When the
// caller needs a position they did not cover (the caller went out of order, or an expert
// staged for an earlier position was evicted before a later one), a full cache or a full
// stager must not fail a valid step: what was taken for the farthest position after the need
// is dropped, one at a time until the fetch fits, and redone later.
bool Prefetcher::YieldAhead(uint64_t position, uint64_t end) {
  if (!held_.empty() && held_.back().first >= end) {
    next_ = std::min(next_, held_.back().first);
    held_.pop_back();  // its lease goes back unused
    return true;
  }
  if (stager_ == nullptr) return false;
  const ExpertId needed = sequence_[position];
  for (uint64_t p = stage_next_; p-- > position + 1;) {
    const ExpertId key = sequence_[p];
    if (key == needed || !stager_->Started(key)) continue;
    stager_->Drop(key);
    stage_next_ = std::min(stage_next_, p);
    return true;
  }
  return false;
}

}  // namespace ecss
