// PlanRecorder: when the ops of the engine's step plans ran, as the executor observes them,
// so that an executed plan (StepPlan with start_s / end_s) can be written after its step. The
// driving thread stamps an op's issue; the thread that sees it end (a stream's worker through
// a host function, an optimizer thread) stamps its end; the weight stager times its reads (a
// stage op's issue is when its read began). An op starts when it was issued, its
// deps had ended and (device ops) the op before it on its stream had ended: stream order,
// which is how a device schedules it. The stamps are the host's clock: a device op's end is
// when its stream's worker ran the stamp, after the op's end by that worker's wake-up (on the
// simulated device in timed mode the next op starts at the modelled end, not at the stamp), so
// each device op's times here are late by about one wake-up (50-150 us on the development VM).
// Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>

#include "engine/step_plan.h"

namespace ecss {

class PlanRecorder {
 public:
  using Clock = std::chrono::steady_clock;
  // Plans kept for ExecutedPlan after their step (a long run keeps no more than this).
  static constexpr size_t kKeptSteps = 8;

  // A step begins: its plan (updates of it that end later are stamped onto it until it is
  // dropped, kKeptSteps steps on).
  void BeginStep(uint64_t step, Clock::time_point begin);
  // The step's plan, once it is whole (at EndStep).
  void SetPlan(uint64_t step, const StepPlan& plan);
  // The step ended (EndStep, after what it waits for at its end): its executed plan's
  // seconds().
  void EndStep(uint64_t step, Clock::time_point end);
  void Issued(uint64_t step, uint32_t op);
  void Ended(uint64_t step, uint32_t op);
  // An op timed by another component (a weight stage: its NVMe read), issued at `start`.
  void Ran(uint64_t step, uint32_t op, Clock::time_point start, Clock::time_point end);
  // `step`'s plan's update ops with this step_offset stand for the optimizer's step
  // `updater_step` (0: the step's own updates; -1, -2: those carried in, which the step's
  // fetches and uploads wait for; the delayed update: -1, the held gradients updated now).
  // Optimizer steps, not the session's: evaluations have steps with no updates.
  void MapUpdaterStep(uint64_t updater_step, uint64_t step, int32_t step_offset);
  // An optimizer update of one expert of `layer` in `updater_step` ran in [start, end]: the
  // update ops that stand for that step (of that layer, or of every layer) widen to cover it.
  // Called from optimizer threads.
  void UpdateRan(uint64_t updater_step, uint32_t layer, Clock::time_point start,
                 Clock::time_point end);
  // The plan of `step` with every observed time, in seconds since it began (clipped at 0: an
  // update carried in, which may have started before the step, counts from its start). An
  // op's start: when it was issued and its deps had ended, and the op before it on its stream
  // (a device resource's, or the host's additions') too. NotFound when the step is older than
  // the kept ones or did not run.
  StatusOr<StepPlan> ExecutedPlan(uint64_t step) const;

 private:
  struct Window {
    Clock::time_point start, end;
  };
  struct Record {
    StepPlan plan;
    Clock::time_point begin;
    std::optional<Clock::time_point> end;
    std::map<uint32_t, Clock::time_point> issued, ended;
    std::map<int32_t, uint64_t> updater_steps;  // step_offset -> the optimizer's step
  };
  Record* Find(uint64_t step);  // REQUIRES: mutex_ held
  mutable std::mutex mutex_;
  std::deque<std::pair<uint64_t, Record>> steps_;  // GUARDED_BY(mutex_), oldest first
  // GUARDED_BY(mutex_): optimizer step -> layer -> when its experts' updates ran, matched to
  // the plans' update ops when they are read (a plan may not list them yet when they run:
  // learned gates). The last 2 kKeptSteps + 2 optimizer steps: those the kept plans name.
  std::map<uint64_t, std::map<uint32_t, Window>> updates_;
};

}  // namespace ecss
