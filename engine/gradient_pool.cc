#include "engine/gradient_pool.h"

#include <algorithm>

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<std::unique_ptr<GradientPool>> GradientPool::Create(Allocator& memory, uint32_t slots,
                                                             uint64_t bytes, uint32_t experts) {
  std::unique_ptr<GradientPool> pool(new GradientPool());
  for (uint32_t i = 0; i < slots; ++i) {
    ECSS_ASSIGN_OR_RETURN(Buffer slot, memory.Allocate(bytes, MemoryTag::kGradients));
    pool->free_.push_back(slot.data());
    pool->slots_.push_back(std::move(slot));
  }
  pool->held_.resize(experts);
  return pool;
}

bool GradientPool::Live(const Released& release) const {
  const Held& h = held_[release.first];
  return h.slot != nullptr && h.released && h.released_at == release.second;
}

void GradientPool::GiveBack(uint32_t id) {
  free_.push_back(held_[id].slot);
  held_[id] = Held{};
}

void GradientPool::Release(uint32_t id, uint64_t step) {
  Held& h = held_[id];
  if (h.slot == nullptr) return;
  h.released = true;
  h.released_at = step;
  releases_.emplace_back(id, step);
  if (releases_.size() > 2 * slots_.size()) {  // drop the stale entries
    std::erase_if(releases_, [this](const Released& r) { return !Live(r); });
  }
}

StatusOr<void*> GradientPool::Take(uint32_t id, uint64_t step, ExpertUpdater& updater) {
  Held& h = held_[id];
  if (h.slot != nullptr) {  // its own, from an earlier step
    if (h.released) ECSS_RETURN_IF_ERROR(updater.Wait(id));
    h.released = false;
    return h.slot;
  }
  if (free_.empty()) {  // the slots whose updates finished
    std::deque<Released> pending;
    for (const Released& r : releases_) {
      if (!Live(r)) continue;
      if (updater.Pending(r.first)) {
        pending.push_back(r);
      } else {
        GiveBack(r.first);
      }
    }
    releases_.swap(pending);
  }
  if (free_.empty()) {
    if (releases_.empty() || releases_.front().second >= step) {
      return ResourceExhaustedError(
          StrCat("no gradient accumulator is free: all ", slots_.size(), " hold gradients of step ",
                 step, " or that it holds back (more experts than the session's limits allow)"));
    }
    const uint32_t oldest = releases_.front().first;
    ECSS_RETURN_IF_ERROR(updater.Wait(oldest));
    releases_.pop_front();
    GiveBack(oldest);
  }
  held_[id].slot = free_.back();
  free_.pop_back();
  return held_[id].slot;
}

}  // namespace ecss
