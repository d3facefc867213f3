// GradientPool: the session's pinned gradient accumulators (internal to engine). The memory
// plan sizes it by the experts a step may give a gradient to (MemoryPlan::gradient_slots),
// not by the model, so host memory follows a step's working set whatever the model's size.
// An expert takes a slot at its first gradient of a step (Take) and gives it back when the
// step is done with it (Release: submitted to the updater, or dropped with a failed step);
// the slot is reused once the expert's update no longer reads it.
// Thread-compatible: the session's driving thread calls it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "engine/expert_updater.h"
#include "runtime/device/allocator.h"

namespace ecss {

class GradientPool {
 public:
  // `slots` accumulators of `bytes` each, carved from `memory`, for experts [0, experts) (the
  // updater's ids).
  static StatusOr<std::unique_ptr<GradientPool>> Create(Allocator& memory, uint32_t slots,
                                                        uint64_t bytes, uint32_t experts);

  // Expert `id`'s accumulator for step `step` (steps count up): the one it still holds (once
  // its update is done with it), else a free slot; when none is free, the slots whose updates
  // finished are reclaimed, and if none has, the one released first in an earlier step is,
  // after waiting for its update (which has started: a step's updates start by the next
  // step). ResourceExhausted when every slot belongs to this step's experts and those the
  // step holds back: more than the memory plan's limits allow.
  StatusOr<void*> Take(uint32_t id, uint64_t step, ExpertUpdater& updater);
  // Step `step` is done with `id`'s accumulator: only its update may read it now.
  void Release(uint32_t id, uint64_t step);
  // `id`'s accumulator while it holds one (from Take until the slot goes to another expert),
  // else null.
  void* Of(uint32_t id) const { return held_[id].slot; }
  bool released(uint32_t id) const { return held_[id].released; }
  uint32_t slots() const { return static_cast<uint32_t>(slots_.size()); }

 private:
  struct Held {
    void* slot = nullptr;
    bool released = false;
    uint64_t released_at = 0;  // the step that released it
  };
  // A release (id, step), oldest first; stale once the expert took its slot again.
  using Released = std::pair<uint32_t, uint64_t>;
  GradientPool() = default;
  bool Live(const Released& release) const;
  void GiveBack(uint32_t id);

  std::vector<Buffer> slots_;
  std::vector<void*> free_;
  std::vector<Held> held_;  // per expert
  std::deque<Released> releases_;
};

}  // namespace ecss
