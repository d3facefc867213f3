// StepSimulator: runs the engine's step plans (engine/step_plan.h) in virtual time, a
// discrete-event simulation with nothing of the model allocated. Each op occupies its plan
// resource for a time priced from the hardware, the same cost model as the simulated device's
// timed mode: compute ops the cost of the kernels the executor enqueues
// (engine/plan_inputs.h ComputeOpSeconds), copies latency + bytes / bandwidth (one copy per
// expert), the CPU optimizer params / (params/s of the session's threads), NVMe reads and
// writes bytes / GB/s. An op starts once its dependencies ended and its resource is free
// (an op the host issues only after waiting for them, PlanOp::host_waits: the host's wait
// latency after they ended);
// each resource serves its ops in plan order (streams and queues are in order); NVMe reads
// and writes share one queue, the drives'. Updates are
// simulated per expert (a layer's update op is its experts' updates in turn, and with states
// on NVMe each expert's read, update and write form a pipeline), and, as the engine's
// optimizer does at BeginStep, the previous step's updates not yet started run in the new
// step's fetch order (Note [Updates in fetch order], host states only). A step that waits for
// its updates (host states) has the driving thread's help once its device work is done
// (Note [The driving thread helps]). Later micro-batches' gradient additions run one at a time
// on the host's add stream, bytes / GB/s each, at a lower rate where the optimizer updates
// beside them (Note [Additions beside the optimizer]); once a step's additions are known its
// updates, and the step before's that ran on beside them, are re-timed at a share of the
// optimizer's rate where they ran beside one (Note [The optimizer beside the additions]); and a
// gradient copy into one of the two pinned staging halves waits for that half's last addition (the
// whole copy op: the executor's copies of the op's experts without gradients yet go ahead of the
// wait).
//
// Steps follow each other: a step begins when the previous one's EndStep returned (its device
// work done, and its updates for the strategies whose step waits for them); its carried-in
// edges name the updates of the steps before, and a fetch waits only for its own expert's
// update of step t-1. Thread-compatible.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/session_options.h"
#include "engine/step_metrics.h"
#include "engine/step_plan.h"
#include "runtime/device/device_profile.h"

namespace ecss::plan {

// An expert's update or one of its NVMe state transfers: ops the simulator runs expert by
// expert and counts apart from the device work (a pass's device_end).
bool UpdateLike(OpKind kind);

// How fast each resource of one device's session works.
struct ResourceRates {
  DeviceProfile device;  // compute (the cost model) and the H2D / D2H bandwidth
  double copy_latency_us = 0;
  // Added to the ready time of an op the host waits for its dependencies to issue
  // (PlanOp::host_waits): from their end until the host has woken and issued it.
  double host_wait_latency_us = 0;
  double optimizer_params_per_s = 0;  // the session's optimizer threads together, > 0
  // The same with the driving thread helping (Note [The driving thread helps]); 0: one thread
  // more at the same rate per thread.
  double optimizer_helped_params_per_s = 0;
  // The optimizer's time before each update of host states beyond its busy time, on the
  // timeline of its threads together (Note [The optimizer's gap between updates]).
  double optimizer_update_gap_seconds = 0;
  // The driving thread's work at BeginStep before it issues anything (routing the step's
  // tokens, building its plan): no op of the step starts before it is done.
  double begin_step_seconds = 0;
  // ... and per op of the step's plan.
  double begin_step_seconds_per_op = 0;
  // A later micro-batch's gradients added into the accumulators (the host's additions, one
  // at a time on a host stream of their own), GB/s of gradients while the optimizer is idle;
  // 0: the additions take no time.
  double gradient_add_gbps = 0;
  // ... and while it updates (Note [Additions beside the optimizer]); 0: gradient_add_gbps.
  double gradient_add_beside_optimizer_gbps = 0;
  // The share of its rate the optimizer keeps while an addition runs beside it, (0, 1].
  double optimizer_rate_beside_additions = 1;
  double nvme_read_gbps = 0;  // > 0 with states on NVMe
  double nvme_write_gbps = 0;
  // The drives' time each expert's NVMe state update takes beside its bytes, half on its read
  // and half on its write (NvmeDrive::update_overhead_us).
  double nvme_update_overhead_seconds = 0;
  // Device time added to each forward / backward compute op: the model's dense layers, which
  // the engine does not run (the planner's simple model of them; 0 for the engine's own step).
  double dense_forward_seconds = 0;
  double dense_backward_seconds = 0;
  // Several nodes: the expert-parallel all-to-all of each compute op's tokens between nodes,
  // half before it (dispatch) and half after (combine), on the node's network (modelled only:
  // the engine does not run it yet). 0: none.
  double all_to_all_seconds = 0;
};

struct SimulatedStep {
  double begin_s = 0;       // on the simulator's clock
  double seconds = 0;       // from its begin to its EndStep
  double begin_work_s = 0;  // of them, its BeginStep's work before it issued anything
  StepMetrics metrics;      // per resource busy / exposed, bound ratio, overlap (step_metrics.h)
  // Busy seconds per plan resource (h2d, d2h, compute, cpu_optimizer, nvme_read, nvme_write)
  // within the step.
  std::array<double, kPlanResources> busy{};
  double network_busy = 0;  // the all-to-all's (modelled only)
};

// When work of `seconds` at the full rate, from `start`, ends where it runs at `share` (> 0) of
// that rate within `intervals` (sorted by start; they may overlap) and at the full rate outside.
double EndBeside(double start, double seconds,
                 const std::vector<std::pair<double, double>>& intervals, double share);

// The experts a step's plan gives gradients (its gradient copies'): the ones it updates.
std::set<ExpertId> TouchedExperts(const StepPlan& plan);

class StepSimulator {
 public:
  // InvalidArgument naming a rate that is not positive where the options need it.
  static StatusOr<StepSimulator> Create(const SessionOptions& options, const ResourceRates& rates);

  // Simulates the next step: fills each op's start_s / end_s (seconds since the step began;
  // carried-in ops: when the updates they stand for ended, relative to it) and the plan's
  // seconds(). The plan must be the next step's, built from this session's cache contents.
  StatusOr<SimulatedStep> Run(StepPlan& plan);
  const std::vector<SimulatedStep>& steps() const { return steps_; }

 private:
  StepSimulator(const SessionOptions& options, const ResourceRates& rates)
      : options_(options), rates_(rates) {}

  struct Task {  // one expert's part of an update op (its id in the step's plan)
    double ready = 0, start = 0, end = 0, seconds = 0;
    uint32_t op = 0;
    // Its gap (UpdateGap) and the part of it before `start` as last timed (StartTask): it began
    // to run at start - lead.
    double gap = 0, lead = 0;
  };
  // Times `task` to start once it is ready and the optimizer is `free`, after its gap (at
  // `speedup`) where the optimizer was still busy when it became ready (Note [The optimizer's
  // gap between updates]).
  static void StartTask(Task& task, double free, double speedup);
  // Per step: when each expert's update (with its state write) ended, and when all did.
  struct UpdateRecord {
    std::map<ExpertId, double> expert_end;
    double all_end = 0;
    // The updates of the step, per expert in queue order (host states), for re-ordering.
    std::vector<std::pair<ExpertId, Task>> queue;
  };

  // One Run's state: the step's clock and when each of its ops (and expert parts) ended.
  struct Pass {
    Pass(const PlanPolicy& p, size_t s, double b) : policy(p), step(s), begin(b) {}
    const PlanPolicy& policy;
    size_t step = 0;        // the step's index, and its record's in updates_
    double begin = 0;       // its begin on the simulator's clock
    double begin_work = 0;  // its BeginStep's work: routing and planning
    double floor = 0;       // before which none of its ops starts (that work, the wait for t-2)
    std::vector<double> end;
    std::map<uint32_t, std::map<uint32_t, double>> expert_end;  // update-like op -> expert -> end
    int64_t fetch_gate = -1;  // the carried-in op that stands for step t-1's updates, per expert
    double device_end = 0, update_end = 0;
    double first_addition = -1;  // when its first gradient addition started (none: -1)
  };

  UpdateRecord* UpdatesOf(const Pass& pass, int32_t offset);
  double DepEnd(const Pass& pass, const PlanOp& op, uint32_t dep, int64_t e);
  void RunExperts(Pass& pass, PlanOp& op, double seconds, double wait);
  void RunWhole(Pass& pass, PlanOp& op, double seconds, double wait, bool held);
  SimulatedStep Finish(Pass& pass, StepPlan& plan);
  double ExpertParams() const;
  SimulatedStep Measure(double begin, double finish) const;
  double Seconds(const PlanOp& op) const;
  // The optimizer's time before each of `op`'s updates beyond their busy time (0 but for
  // updates of host states).
  double UpdateGap(const PlanOp& op) const;
  double AdditionEnd(double start, double seconds) const;
  // Re-times the pass's updates beside the additions, and the step before's that ran on beside
  // the pass's; false where nothing changed.
  bool SlowBesideAdditions(const Pass& pass);
  double CopySeconds(uint64_t bytes, uint32_t copies, double gbps) const;
  void Expedite(const StepPlan& plan, double begin);
  double Requeue(UpdateRecord& record, const std::vector<size_t>& positions, double free,
                 double speedup);
  double DrivingThreadHelps(UpdateRecord& record, double from);
  // Records `op`'s busy [start, end) on its resource (a stage: in stages_).
  void Occupy(const PlanOp& op, double start, double end);
  // Half of an all-to-all on the network from `ready`; returns when it ends.
  double Exchange(double ready);

  SessionOptions options_;
  ResourceRates rates_;
  std::array<double, kPlanResources> free_{};  // when each queue is next free (Queue())
  // Each resource's busy intervals (kNvmeRead: the states' reads only) ...
  std::array<std::vector<std::pair<double, double>>, kPlanResources> intervals_;
  // ... and the weights' stages, the drives' other reads: not the optimizer's work (Measure).
  std::vector<std::pair<double, double>> stages_;
  double network_free_ = 0;  // the all-to-all's, modelled only
  std::vector<std::pair<double, double>> network_;
  // The add stream's intervals, in time order (the last: when it is next free), as far back
  // as they can reach into the current step.
  std::vector<std::pair<double, double>> additions_;
  std::vector<UpdateRecord> updates_;  // per step
  std::vector<SimulatedStep> steps_;
  double clock_ = 0;           // when the next step begins
  uint64_t held_experts_ = 0;  // delayed update: experts with gradients of the last step
};

}  // namespace ecss::plan
