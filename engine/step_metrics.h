// StepMetrics: how one step used its resources, from when each was busy, and two figures that
// say whether the step ran at its bottleneck's speed. A pure function of intervals, so the
// figures are tested on constructed timelines.
//
// For each resource r (compute, h2d, d2h, optimizer): busy = the time within the step that r
// was busy (overlapping intervals of r count once), exposed = the time within the step that r
// was busy and no other resource was. For the step, with T its time, B_max the busiest
// resource's busy time and B_sum the sum over resources:
//   bound_ratio      = T / B_max: 1.0 = the step ran at its bottleneck's speed; 2.0 = it took
//                      twice what its busiest resource needed.
//   overlap_fraction = (B_sum - T) / (B_sum - B_max): 1.0 = every other resource's work was
//                      hidden behind the bottleneck, 0.0 = nothing overlapped (the resources
//                      took turns), below 0 when the step also had time in which no resource
//                      was busy (host work between them). Absent when B_sum - B_max is under
//                      5% of T: with so little besides the bottleneck, overlap cannot matter.
// A run without overlap scores bound_ratio >= B_sum / B_max and overlap_fraction <= 0, however
// busy its bottleneck is. UpdateIntervals collects the optimizer's intervals step by step.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/step_plan.h"

namespace ecss {

struct BusyInterval {
  std::chrono::steady_clock::time_point start, end;
};

struct ResourceBusy {
  std::string name;                     // "compute", "h2d", "d2h", "optimizer"
  std::vector<BusyInterval> intervals;  // any order, may overlap and reach outside the step
};

struct ResourceUse {
  std::string name;
  double busy_seconds = 0;
  double exposed_seconds = 0;
};

struct StepMetrics {
  double seconds = 0;                      // T
  std::vector<ResourceUse> resources;      // in the order given
  std::string bottleneck;                  // the busiest resource ("" when none was busy)
  double bound_ratio = 0;                  // T / B_max; 0 when no resource was busy
  std::optional<double> overlap_fraction;  // see above
  double overlap_denominator_seconds = 0;  // B_sum - B_max
};

// The metrics of the step [begin, end] (begin <= end).
StepMetrics ComputeStepMetrics(std::chrono::steady_clock::time_point begin,
                               std::chrono::steady_clock::time_point end,
                               const std::vector<ResourceBusy>& resources);
// The metrics of consecutive steps as one stretch: times summed per resource (by name), the
// ratios computed from the sums by the same rules.
StepMetrics SumStepMetrics(const std::vector<StepMetrics>& steps);

// The critical path of an executed step plan (StepPlan with start_s / end_s and seconds(),
// from Session::ExecutedPlan; a plan without seconds() ends at its last op): from the op that
// ended last within the step, back through what it waited for that ended last (its deps, and
// the op of the same resource that ended last before it started: stream order), to the
// step's start (an update carried in from the step before counts from there). Each op on the
// path counts its run time; the gaps between them, and before the first and after the last,
// are "host" (the driving thread issuing, or waiting). Shares of the step by op kind, largest
// first; they add up to 1 when the ops were observed.
//
// An update op still running when an op that waits for it (a dep), or an update after it on
// the optimizer, started counts as ended then: it is the union of its experts' updates, and
// the host issues what reads an expert once that expert's update has ended, as an optimizer
// thread takes the next update once it finished one, while the others run on. Per-expert
// ends are not in the plan, so an op that waited for something else while those updates ran
// (or, with several optimizer threads, an update that found a thread free) counts as waiting
// for them. A wait the plan has no edge for shows in the waiting op's own time (a backward's
// wait for the gradient region's last copy out is the backward's).
struct PathShare {
  std::string kind;  // OpKindName, or "host"
  double seconds = 0;
  double share = 0;
};
std::vector<PathShare> CriticalPath(const StepPlan& executed);

// The optimizer's busy intervals as consecutive step windows need them: Take(now) gives the
// updates that ended since the last Take and those still running, up to `now` (the next
// window clips the rest of a running one to its start, so an update that crosses EndStep
// counts in both steps, each for its own part). One update per expert at a time, as the
// updaters run them. Thread-safe: optimizer threads report, the driving thread takes.
class UpdateIntervals {
 public:
  using Clock = std::chrono::steady_clock;
  void Started(uint32_t expert, Clock::time_point start);
  void Ended(uint32_t expert, Clock::time_point start, Clock::time_point end);
  std::vector<BusyInterval> Take(Clock::time_point now);

 private:
  std::mutex mutex_;
  std::vector<BusyInterval> ended_;                // GUARDED_BY(mutex_)
  std::map<uint32_t, Clock::time_point> running_;  // GUARDED_BY(mutex_): expert -> start
};

}  // namespace ecss
