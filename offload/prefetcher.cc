#include "offload/prefetcher.h"

#include <algorithm>
#include <chrono>

namespace ecss {

std::string_view StallCauseName(StallCause cause) {
  switch (cause) {
    case StallCause::kUpdateFence:
      return "update_fence";
  }
  return "?";
}

Prefetcher::Prefetcher(DeviceCache& cache, Stream copy_stream, PrefetcherHooks hooks,
                       uint32_t window_experts)
    : cache_(cache),
      copy_stream_(copy_stream),
      hooks_(std::move(hooks)),
      window_(window_experts == 0 ? cache.slots() : std::min(window_experts, cache.slots())) {}

Prefetcher::~Prefetcher() = default;

void Prefetcher::BeginStep(std::vector<ExpertKey> sequence) {
  Clear();
  sequence_ = std::move(sequence);
  next_ = 0;
  stalls_.clear();
  cache_.SetPolicy(MakeBeladyPolicy(sequence_));
}

void Prefetcher::Clear() { held_.clear(); }

double Prefetcher::stall_seconds() const {
  double total = 0;
  for (const StallRecord& s : stalls_) total += s.seconds;
  return total;
}

Status Prefetcher::Fetch(uint64_t position, Lease* out) {
  const ExpertKey key = sequence_[position];
  if (cache_.residency(key) == Residency::kAbsent && hooks_.fence_pending(key)) {
    const auto start = std::chrono::steady_clock::now();
    Status waited = hooks_.wait_fence(key);
    stalls_.push_back(
        {position, key, StallCause::kUpdateFence,
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()});
    ECSS_RETURN_IF_ERROR(waited);
  }
  ECSS_ASSIGN_OR_RETURN(*out,
                        cache_.Acquire(key, hooks_.host_weights(key), copy_stream_, position));
  return Status::Ok();
}

Status Prefetcher::Advance() {
  // Held leases never exceed the slots, so an Acquire always finds an unleased slot: a
  // key held twice shares one slot, which only leaves more free.
  while (next_ < sequence_.size() && held_.size() < window_) {
    const ExpertKey key = sequence_[next_];
    if (cache_.residency(key) == Residency::kAbsent && hooks_.fence_pending(key)) break;
    Lease lease;
    ECSS_RETURN_IF_ERROR(Fetch(next_, &lease));
    held_.emplace_back(next_, std::move(lease));
    ++next_;
  }
  return Status::Ok();
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
    ECSS_RETURN_IF_ERROR(Fetch(first + i, &leases[i]));
    next_ = std::max(next_, first + i + 1);
  }
  return leases;
}

}  // namespace ecss
