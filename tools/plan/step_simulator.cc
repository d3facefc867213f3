#include "tools/plan/step_simulator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>
#include <utility>

#include "engine/plan_inputs.h"
#include "runtime/base/str_cat.h"

namespace ecss::plan {

bool UpdateLike(OpKind kind) {
  return kind == OpKind::kStateRead || kind == OpKind::kUpdate || kind == OpKind::kStateWrite;
}

namespace {

size_t Index(PlanResource resource) { return static_cast<size_t>(resource); }

// The queue an op waits in: its resource's, except that NVMe reads and writes share the drives
// (a drive's bandwidth is shared by both directions: writes slow reads down and back).
size_t Queue(PlanResource resource) {
  return Index(resource == PlanResource::kNvmeWrite ? PlanResource::kNvmeRead : resource);
}

std::chrono::steady_clock::time_point At(double seconds) {
  return std::chrono::steady_clock::time_point() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
             std::chrono::duration<double>(seconds));
}

}  // namespace

double EndBeside(double start, double seconds,
                 const std::vector<std::pair<double, double>>& intervals, double share) {
  double t = start, left = seconds;
  for (const auto& [from, to] : intervals) {
    if (to <= t) continue;
    if (from > t) {  // the full rate until `from`
      if (from - t >= left) break;
      left -= from - t;
      t = from;
    }
    if ((to - t) * share >= left) return t + left / share;
    left -= (to - t) * share;
    t = to;
  }
  return t + left;
}

std::set<ExpertId> TouchedExperts(const StepPlan& plan) {
  std::set<ExpertId> touched;
  for (const PlanOp* copy : plan.Find(OpKind::kGradientCopy)) {
    for (uint32_t e : copy->experts) touched.insert({static_cast<uint32_t>(copy->layer), e});
  }
  return touched;
}

StatusOr<StepSimulator> StepSimulator::Create(const SessionOptions& options,
                                              const ResourceRates& rates) {
  ECSS_RETURN_IF_ERROR(options.Validate());
  ECSS_RETURN_IF_ERROR(ValidateDeviceProfile(rates.device));
  if (!(rates.optimizer_params_per_s > 0) || !std::isfinite(rates.optimizer_params_per_s)) {
    return InvalidArgumentError(StrCat("step simulator: optimizer_params_per_s must be > 0 (got ",
                                       rates.optimizer_params_per_s, ")"));
  }
  const std::pair<const char*, double> at_least_zero[] = {
      {"optimizer_helped_params_per_s (the optimizer with the driving thread's help)",
       rates.optimizer_helped_params_per_s},
      {"optimizer_update_gap_seconds (the optimizer's time between updates)",
       rates.optimizer_update_gap_seconds},
      {"copy_latency_us", rates.copy_latency_us},
      {"begin_step_seconds (the host's work at a step's begin)", rates.begin_step_seconds},
      {"begin_step_seconds_per_op (the host's work at a step's begin per op of its plan)",
       rates.begin_step_seconds_per_op},
      {"host_wait_latency_us", rates.host_wait_latency_us},
      {"gradient_add_gbps (the host's gradient additions)", rates.gradient_add_gbps},
      {"gradient_add_beside_optimizer_gbps (the host's gradient additions beside the optimizer)",
       rates.gradient_add_beside_optimizer_gbps},
      {"nvme_update_overhead_seconds (an NVMe state update's drive time beside its bytes)",
       rates.nvme_update_overhead_seconds},
  };
  for (const auto& [what, value] : at_least_zero) {
    if (!(value >= 0) || !std::isfinite(value)) {
      return InvalidArgumentError(
          StrCat("step simulator: ", what, " must be >= 0 (got ", value, ")"));
    }
  }
  if (!(rates.optimizer_rate_beside_additions > 0 && rates.optimizer_rate_beside_additions <= 1)) {
    return InvalidArgumentError(
        StrCat("step simulator: optimizer_rate_beside_additions (the optimizer's share of its "
               "rate beside the host's additions) must be in (0, 1] (got ",
               rates.optimizer_rate_beside_additions, ")"));
  }
  if (options.placement.states_on_nvme() &&
      !(rates.nvme_read_gbps > 0 && rates.nvme_write_gbps > 0)) {
    return InvalidArgumentError(
        "step simulator: states on NVMe need NVMe read and write GB/s > 0 (hardware.nvme)");
  }
  return StepSimulator(options, rates);
}

double StepSimulator::CopySeconds(uint64_t bytes, uint32_t copies, double gbps) const {
  return copies * rates_.copy_latency_us * 1e-6 + static_cast<double>(bytes) / (gbps * 1e9);
}

double StepSimulator::ExpertParams() const {
  return static_cast<double>(options_.model.expert_params());
}

double StepSimulator::Seconds(const PlanOp& op) const {
  switch (op.kind) {
    case OpKind::kPlanUpload:
    case OpKind::kFetch:
      return CopySeconds(op.bytes, 1, rates_.device.h2d_bandwidth_gbps);
    case OpKind::kGradientCopy:  // one copy per expert
      return CopySeconds(op.bytes, static_cast<uint32_t>(op.experts.size()),
                         rates_.device.d2h_bandwidth_gbps);
    case OpKind::kForward:
      return ComputeOpSeconds(options_, op, rates_.device) + rates_.dense_forward_seconds;
    case OpKind::kBackward:
      return ComputeOpSeconds(options_, op, rates_.device) + rates_.dense_backward_seconds;
    case OpKind::kStage:
      return static_cast<double>(op.bytes) / (rates_.nvme_read_gbps * 1e9);
    case OpKind::kStateRead:  // and half of each update's overhead
      return static_cast<double>(op.bytes) / (rates_.nvme_read_gbps * 1e9) +
             static_cast<double>(op.experts.size()) * rates_.nvme_update_overhead_seconds / 2;
    case OpKind::kStateWrite:
      return static_cast<double>(op.bytes) / (rates_.nvme_write_gbps * 1e9) +
             static_cast<double>(op.experts.size()) * rates_.nvme_update_overhead_seconds / 2;
    case OpKind::kUpdate:
      return static_cast<double>(op.experts.size()) * ExpertParams() /
             rates_.optimizer_params_per_s;
    case OpKind::kAccumulate:
      return rates_.gradient_add_gbps > 0
                 ? static_cast<double>(op.bytes) / (rates_.gradient_add_gbps * 1e9)
                 : 0;
    case OpKind::kEvict:
    case OpKind::kPublish:
      return 0;
  }
  return 0;
}

// Note [Additions beside the optimizer]: the host's gradient additions and the optimizer's
// updates both stream memory, and on the development VM (2 cores) an addition that ran while an
// update did took 1.9 ms where the ones before it took 1.0-1.3 (`small ecss-host-4x32k`,
// 2026-12-04, its steps then called with every micro-batch's forwards first: RunSampledSteps
// ran them so). An addition of `bytes` from `start` runs at gradient_add_gbps where the
// optimizer's timeline is idle and at gradient_add_beside_optimizer_gbps where it is busy, as
// far as the timeline is known: updates that come later in plan order are not seen, and
// neither is the optimizer's slowdown beside the additions, which comes after them (Note [The
// optimizer beside the additions]). `seconds`: the addition's time alone (Seconds()).
double StepSimulator::AdditionEnd(double start, double seconds) const {
  const double alone = rates_.gradient_add_gbps, beside = rates_.gradient_add_beside_optimizer_gbps;
  if (!(alone > 0 && beside > 0) || beside == alone) return start + seconds;
  std::vector<std::pair<double, double>> busy;
  for (const auto& interval : intervals_[Index(PlanResource::kCpuOptimizer)]) {
    if (interval.second > start) busy.push_back(interval);
  }
  std::sort(busy.begin(), busy.end());
  return EndBeside(start, seconds, busy, beside / alone);
}

// Note [The optimizer beside the additions]: the other side of Note [Additions beside the
// optimizer]: one optimizer thread beside the additions of `small ecss-host-4x32k` updated at
// 0.69-0.77 of its calibrated rate (2026-12-04, every forward first, as above). Once a step's
// additions are all known (its Finish), the updates with host states that ran beside them are
// re-timed in the order they ran, each at optimizer_rate_beside_additions of its rate while an
// addition runs: the step before's that ran on past the step's first addition (from there:
// the step before's own additions all ended before it, on the one add stream), then the
// step's own. The step before's are the ones the additions mostly run beside (ecss: its
// updates overlap the step after's device work), as in the calibration that measures the
// share (MeasureGradientAdditions: its busy time against its work, whichever step's updates
// they were), which re-timing the step's own alone left short: over the 8 rounds of
// `small ecss-host-4x32k` of 2026-12-05's plan-vs-run, the optimizer's busy time moved from
// 8.4% to 6.6% short of the runs' (its step, bound by the add stream, did not move). The
// additions keep the times they were given (beside the updates as first timed), and this
// step's fetches the times they waited for the step before's updates as first timed.
bool StepSimulator::SlowBesideAdditions(const Pass& pass) {
  UpdateRecord& record = updates_[pass.step];
  const double share = rates_.optimizer_rate_beside_additions;
  if (!(share < 1) || additions_.empty()) return false;
  UpdateRecord* before = pass.policy.delayed_update ? nullptr : UpdatesOf(pass, -1);
  const double from = pass.first_addition;
  const bool before_ran_on =
      before != nullptr && !before->queue.empty() && from >= 0 && before->all_end > from;
  if (!before_ran_on && record.queue.empty()) return false;
  // The optimizer's timeline is rewritten from the first update re-timed on: the step
  // before's first addition, else the step's first update (the queue is in the order they ran).
  double free =
      before_ran_on ? from : record.queue.front().second.start - record.queue.front().second.lead;
  auto& cpu = intervals_[Index(PlanResource::kCpuOptimizer)];
  for (auto& interval : cpu)
    interval.second = std::min(interval.second, std::max(interval.first, free));
  cpu.erase(std::remove_if(cpu.begin(), cpu.end(),
                           [](const auto& interval) { return interval.first >= interval.second; }),
            cpu.end());
  if (before_ran_on) {
    std::vector<std::pair<ExpertId, Task*>> ran;  // those that ran on past `from`, in run order
    for (auto& [expert, task] : before->queue) {
      if (task.end > from) ran.emplace_back(expert, &task);
    }
    std::stable_sort(ran.begin(), ran.end(), [](const auto& a, const auto& b) {
      return a.second->start < b.second->start;
    });
    for (auto& [expert, task] : ran) {
      if (task->start < from) {  // under way: the rest of it ran at the full rate
        task->end = EndBeside(from, task->end - from, additions_, share);
      } else if (task->start - task->lead < from) {  // in its gap: it starts as it did
        task->end = EndBeside(task->start, task->seconds, additions_, share);
      } else {
        StartTask(*task, free, 1);
        task->end = EndBeside(task->start, task->seconds, additions_, share);
      }
      cpu.emplace_back(std::max(task->start, from), task->end);
      free = task->end;
      before->expert_end[expert] = task->end;
      before->all_end = std::max(before->all_end, task->end);
    }
  }
  for (auto& [expert, task] : record.queue) {
    StartTask(task, free, 1);
    task.end = EndBeside(task.start, task.seconds, additions_, share);
    free = task.end;
    record.expert_end[expert] = task.end;
    cpu.emplace_back(task.start, task.end);
  }
  // Slowed, never sooner: the optimizer is next free no earlier than first timed.
  double& optimizer_free = free_[Index(PlanResource::kCpuOptimizer)];
  optimizer_free = std::max(optimizer_free, free);
  return true;
}

double StepSimulator::Exchange(double ready) {
  const double start = std::max(ready, network_free_);
  network_free_ = start + rates_.all_to_all_seconds / 2;
  network_.emplace_back(start, network_free_);
  return network_free_;
}

void StepSimulator::Occupy(const PlanOp& op, double start, double end) {
  if (op.resource == PlanResource::kNone || end <= start) return;
  (op.kind == OpKind::kStage ? stages_ : intervals_[Index(op.resource)]).emplace_back(start, end);
}

// Note [Updates in fetch order] (engine/step_executor.cc): at BeginStep, once step t-2's
// updates are done (`begin`), the optimizer runs step t-1's updates that have not started in
// the order the new step fetches their experts. Host states only: the NVMe updater keeps its
// order.
void StepSimulator::Expedite(const StepPlan& plan, double begin) {
  if (updates_.empty() || options_.placement.states_on_nvme() || options_.delayed_update ||
      !plan.fetches_ahead()) {
    return;
  }
  UpdateRecord& last = updates_.back();
  std::map<ExpertId, size_t> order;
  for (const PlanOp* fetch : plan.Find(OpKind::kFetch)) {
    order.emplace(ExpertId{static_cast<uint32_t>(fetch->layer), fetch->experts.at(0)},
                  order.size());
  }
  std::vector<size_t> waiting;  // queue positions of the updates not started by `begin`
  double free = begin;
  for (size_t i = 0; i < last.queue.size(); ++i) {
    const Task& task = last.queue[i].second;
    if (task.start - task.lead >= begin) {
      waiting.push_back(i);
    } else {  // started (its gap at least)
      free = std::max(free, task.end);
    }
  }
  if (waiting.empty()) return;
  auto rank = [&](size_t i) {
    auto it = order.find(last.queue[i].first);
    return it == order.end() ? order.size() : it->second;
  };
  std::stable_sort(waiting.begin(), waiting.end(),
                   [&](size_t a, size_t b) { return rank(a) < rank(b); });
  // Their intervals are the optimizer's last ones, after the started ones': rewrite them in
  // the new order.
  auto& cpu = intervals_[Index(PlanResource::kCpuOptimizer)];
  cpu.erase(std::remove_if(cpu.begin(), cpu.end(),
                           [&](const auto& interval) { return interval.first >= free; }),
            cpu.end());
  free = Requeue(last, waiting, free, /*speedup=*/1);
  last.all_end = std::max(last.all_end, free);
  free_[Index(PlanResource::kCpuOptimizer)] = free;
}

// Runs the record's updates at these queue positions in turn from `free`, each as soon as it
// is ready, at `speedup` times its rate, on the optimizer's timeline; returns when the last
// ends.
double StepSimulator::Requeue(UpdateRecord& record, const std::vector<size_t>& positions,
                              double free, double speedup) {
  auto& cpu = intervals_[Index(PlanResource::kCpuOptimizer)];
  for (size_t i : positions) {
    Task& task = record.queue[i].second;
    StartTask(task, free, speedup);
    task.end = task.start + task.seconds / speedup;
    free = task.end;
    record.expert_end[record.queue[i].first] = task.end;
    cpu.emplace_back(task.start, task.end);
  }
  return free;
}

// Note [The driving thread helps] (optimizer/cpu_optimizer.cc Synchronize): a step that
// waits for its updates, with host states, waits inside the optimizer's arena, so from its
// device work's end (`from`) the driving thread runs queued updates too: the optimizer then
// has one thread more, at the rate the hardware gives that many threads (two threads that
// share a memory bus update less than twice as fast as one). Re-times this step's updates
// that end after `from`; returns when the last one ends (`from` when none does).
double StepSimulator::DrivingThreadHelps(UpdateRecord& record, double from) {
  const double threads = std::max(1, options_.optimizer.threads);
  // Never slower: a measured table may dip (this VM's rates drift), but a waiting thread that
  // helps takes nothing away.
  const double speedup =
      rates_.optimizer_helped_params_per_s > 0
          ? std::max(1.0, rates_.optimizer_helped_params_per_s / rates_.optimizer_params_per_s)
          : (threads + 1) / threads;
  auto& cpu = intervals_[Index(PlanResource::kCpuOptimizer)];
  cpu.erase(std::remove_if(cpu.begin(), cpu.end(),
                           [&](const auto& interval) { return interval.second > from; }),
            cpu.end());
  double free = from;
  std::vector<size_t> waiting;  // queue positions of the updates not started by `from`
  for (size_t i = 0; i < record.queue.size(); ++i) {
    auto& [expert, task] = record.queue[i];
    if (task.end <= from) continue;
    if (task.start - task.lead >= from) {
      waiting.push_back(i);
      continue;
    }
    if (task.start < from) {  // under way: the rest of its work at the faster rate
      cpu.emplace_back(task.start, from);
      task.end = from + (task.end - from) / speedup;
      cpu.emplace_back(from, task.end);
    } else {  // in its gap: the rest of it and its work at the faster rate
      task.start = from + (task.start - from) / speedup;
      task.end = task.start + task.seconds / speedup;
      cpu.emplace_back(task.start, task.end);
    }
    free = task.end;
    record.expert_end[expert] = task.end;
  }
  free = Requeue(record, waiting, free, speedup);
  free_[Index(PlanResource::kCpuOptimizer)] = free;
  return free;
}

// When the updates of the step `offset` steps back from this pass's ended (with the delayed
// update, of that step's gradients, which the step after it ran); null before the first.
StepSimulator::UpdateRecord* StepSimulator::UpdatesOf(const Pass& pass, int32_t offset) {
  const auto index = static_cast<int64_t>(pass.step) + offset;
  return index >= 0 && index < static_cast<int64_t>(updates_.size()) ? &updates_[index] : nullptr;
}

// When `dep` lets `op` (or its expert `e`'s part, e >= 0) start. A fetch or stage waits for
// its expert's update of step t-1, not all of them (the carried-in op that stands for them).
double StepSimulator::DepEnd(const Pass& pass, const PlanOp& op, uint32_t dep, int64_t e) {
  if (static_cast<int64_t>(dep) == pass.fetch_gate && !op.experts.empty() &&
      (op.kind == OpKind::kFetch || op.kind == OpKind::kStage)) {
    const UpdateRecord* last = UpdatesOf(pass, -1);
    if (last == nullptr) return pass.floor;
    auto it = last->expert_end.find({static_cast<uint32_t>(op.layer), op.experts[0]});
    return it == last->expert_end.end() ? pass.floor : std::max(pass.floor, it->second);
  }
  auto per_expert = pass.expert_end.find(dep);
  if (e >= 0 && per_expert != pass.expert_end.end()) {
    auto it = per_expert->second.find(static_cast<uint32_t>(e));
    if (it != per_expert->second.end()) return it->second;
  }
  return pass.end[dep];
}

// Note [The optimizer's gap between updates]: an optimizer thread that ends one update of host
// states and takes the next, already queued, starts it some microseconds later (TBB's hand-over
// of the next task, its queue's lock), outside the busy time the session counts
// (StepStats::optimizer_busy_seconds: each update from its start to its end's hand-over, its
// waiters woken and its stamps recorded) and the calibration's rates are of. Where one thread
// bounds ecss steps, that is their time it is not updating: 3.3-3.5 us an update in the
// calibrations on the AMD EPYC VM of 2026-12-06 (the calibration model's 32 updates a step, 0.1
// ms of its 22-24), which the planner had at 0, so every step bound by the optimizer was
// planned short by it. So an update of host states that was ready while the optimizer was still
// busy starts that long after the optimizer was free, on the optimizer's timeline but not in its
// busy intervals; where the driving thread helps, at the helped speedup, as the updates' work
// is. An update that becomes ready once the optimizer idles starts when it is ready: the
// thread's wake-up is not modelled there, and where the host issues it after a wait (no-overlap,
// naive) the host's wait latency, measured to the update's start, holds it. Where a timeline is
// re-timed from a moment (the next step's begin, the driving thread's help, the additions
// beside), an update whose gap had begun by then has started. Not with states on NVMe: their
// pipeline's time per update, its overhead included, is calibrated whole
// (NvmeDrive::update_overhead_us); nor for the delayed update's held update, timed whole.
void StepSimulator::StartTask(Task& task, double free, double speedup) {
  task.lead = task.ready < free ? task.gap / speedup : 0;
  task.start = std::max(task.ready, free) + task.lead;
}

double StepSimulator::UpdateGap(const PlanOp& op) const {
  return op.kind == OpKind::kUpdate && !options_.placement.states_on_nvme()
             ? rates_.optimizer_update_gap_seconds
             : 0;
}

// An update-like op of this step, one expert at a time; with states on NVMe, a pipeline of
// reads, updates and writes. Its last part (the update, or the state write) ends the expert's
// update in this step's record.
void StepSimulator::RunExperts(Pass& pass, PlanOp& op, double seconds, double wait) {
  const bool states_on_nvme = pass.policy.states_on_nvme;
  const size_t r = Queue(op.resource);
  const double each = seconds / static_cast<double>(op.experts.size());
  const double gap = UpdateGap(op);
  UpdateRecord& mine = updates_[pass.step];
  double first = -1, last = pass.floor;
  for (uint32_t e : op.experts) {
    double ready = pass.floor;
    for (uint32_t dep : op.deps) ready = std::max(ready, DepEnd(pass, op, dep, e) + wait);
    Task task{.ready = ready, .seconds = each, .op = op.id, .gap = gap};
    StartTask(task, free_[r], 1);
    const double start = task.start;
    const double finish = task.end = start + each;
    free_[r] = finish;
    Occupy(op, start, finish);
    pass.expert_end[op.id][e] = finish;
    if (first < 0) first = start;
    last = std::max(last, finish);
    const bool final_part =
        states_on_nvme ? op.kind == OpKind::kStateWrite : op.kind == OpKind::kUpdate;
    if (final_part) {
      const ExpertId key{static_cast<uint32_t>(op.layer), e};
      mine.expert_end[key] = finish;
      if (!states_on_nvme) mine.queue.push_back({key, task});
    }
  }
  pass.end[op.id] = last;
  pass.update_end = std::max(pass.update_end, last);
  op.start_s = first - pass.begin;
  op.end_s = last - pass.begin;
}

// Any other op of this step, whole, on its resource (compute ops between the halves of their
// all-to-all where one is modelled); `held`: the delayed update's update of step t-1's
// gradients.
void StepSimulator::RunWhole(Pass& pass, PlanOp& op, double seconds, double wait, bool held) {
  double ready = pass.floor;
  for (uint32_t dep : op.deps) ready = std::max(ready, DepEnd(pass, op, dep, -1) + wait);
  const bool exchanges = rates_.all_to_all_seconds > 0 && op.resource == PlanResource::kCompute;
  if (exchanges) ready = Exchange(ready);  // the tokens' dispatch to their experts' devices
  const size_t r = Queue(op.resource);
  double start = op.resource == PlanResource::kNone ? ready : std::max(ready, free_[r]);
  // Later micro-batches' gradient additions run one at a time on the host's add stream (a
  // copy into a staging half depends on the addition two before it: the plan's edge).
  double finish = start + seconds;
  if (op.kind == OpKind::kAccumulate) {
    if (!additions_.empty()) start = std::max(start, additions_.back().second);
    finish = AdditionEnd(start, seconds);
    additions_.emplace_back(start, finish);
    if (pass.first_addition < 0) pass.first_addition = start;
  }
  if (op.resource != PlanResource::kNone) {
    free_[r] = finish;
    Occupy(op, start, finish);
  }
  pass.end[op.id] = exchanges ? Exchange(finish) : finish;  // and the outputs' combine
  op.start_s = start - pass.begin;
  op.end_s = finish - pass.begin;
  if (held) {
    if (UpdateRecord* last = UpdatesOf(pass, -1); last != nullptr) last->all_end = finish;
    pass.update_end = std::max(pass.update_end, finish);
  } else if (op.kind != OpKind::kPublish) {
    pass.device_end = std::max(pass.device_end, finish);
  }
}

StatusOr<SimulatedStep> StepSimulator::Run(StepPlan& plan) {
  const PlanPolicy& policy = plan.policy();
  Pass pass(policy, steps_.size(), clock_);
  // BeginStep routes the step and builds its plan, waits for step t-2's updates before it
  // issues anything, then re-orders step t-1's queued ones.
  pass.begin_work = rates_.begin_step_seconds +
                    rates_.begin_step_seconds_per_op * static_cast<double>(plan.ops().size());
  pass.floor = pass.begin + pass.begin_work;
  if (UpdateRecord* two = UpdatesOf(pass, -2); two != nullptr && !policy.evaluation) {
    pass.floor = std::max(pass.floor, two->all_end);
  }
  Expedite(plan, pass.floor);
  // Only what can still reach into this step is kept.
  auto ended = [&](const std::pair<double, double>& interval) {
    return interval.second <= pass.begin;
  };
  for (auto& list : intervals_)
    list.erase(std::remove_if(list.begin(), list.end(), ended), list.end());
  stages_.erase(std::remove_if(stages_.begin(), stages_.end(), ended), stages_.end());
  network_.erase(std::remove_if(network_.begin(), network_.end(), ended), network_.end());
  additions_.erase(std::remove_if(additions_.begin(), additions_.end(), ended), additions_.end());
  updates_.emplace_back();
  pass.end.assign(plan.ops().size(), pass.floor);
  pass.device_end = pass.update_end = pass.floor;

  for (PlanOp& op : plan.mutable_ops()) {
    const bool held = policy.delayed_update && op.kind == OpKind::kUpdate && op.step_offset == -1;
    if (op.step_offset < 0 && !held) {  // carried in: the updates of an earlier step
      const UpdateRecord* earlier = UpdatesOf(pass, op.step_offset);
      pass.end[op.id] = std::max(pass.floor, earlier != nullptr ? earlier->all_end : pass.floor);
      if (op.step_offset == -1 && !policy.delayed_update && !policy.evaluation) {
        pass.fetch_gate = op.id;
      }
      op.start_s = op.end_s = pass.end[op.id] - pass.begin;
      continue;
    }
    const double seconds =
        held ? static_cast<double>(held_experts_) * ExpertParams() / rates_.optimizer_params_per_s
             : Seconds(op);
    // The host issues a host-waiting op once it woke after its dependencies ended.
    const double wait = op.host_waits ? rates_.host_wait_latency_us * 1e-6 : 0;
    if (UpdateLike(op.kind) && op.step_offset == 0 && !op.experts.empty()) {
      RunExperts(pass, op, seconds, wait);
    } else {
      RunWhole(pass, op, seconds, wait, held);
    }
  }
  return Finish(pass, plan);
}

// The step's end: its device work's, and its updates' where it waits for them (host states:
// re-timed with the driving thread's help); the simulator's clock moves to it.
SimulatedStep StepSimulator::Finish(Pass& pass, StepPlan& plan) {
  const PlanPolicy& policy = pass.policy;
  UpdateRecord& mine = updates_[pass.step];
  const bool slowed = SlowBesideAdditions(pass);  // host states only: their queues
  if (slowed) {
    for (const auto& [expert, task] : mine.queue) {
      pass.update_end = std::max(pass.update_end, task.end);
    }
  }
  const bool helped =
      plan.step_waits_for_updates() && !policy.states_on_nvme && !policy.delayed_update;
  if (helped) {
    // Re-timed: the updates that ran on after the device work now end sooner.
    pass.update_end = DrivingThreadHelps(mine, pass.device_end);
  }
  if (slowed && !policy.delayed_update) {  // the carried-in op that stands for the step before's
    const UpdateRecord* before = UpdatesOf(pass, -1);
    for (PlanOp& op : plan.mutable_ops()) {
      if (before != nullptr && op.kind == OpKind::kUpdate && op.step_offset == -1) {
        op.start_s = op.end_s = std::max(op.end_s, before->all_end - pass.begin);  // a point
      }
    }
  }
  if (slowed || helped) {                                 // and so do their ops
    std::map<uint32_t, std::pair<double, double>> spans;  // update op -> its experts' first, last
    for (const auto& [expert, task] : mine.queue) {
      auto it = spans.try_emplace(task.op, task.start, task.end).first;
      it->second.first = std::min(it->second.first, task.start);
      it->second.second = std::max(it->second.second, task.end);
    }
    for (const auto& [id, span] : spans) {
      plan.mutable_ops()[id].start_s = span.first - pass.begin;
      plan.mutable_ops()[id].end_s = span.second - pass.begin;
    }
  }
  mine.all_end = policy.delayed_update ? pass.floor : pass.update_end;
  if (policy.delayed_update) held_experts_ = TouchedExperts(plan).size();  // the next updates
  double finish = pass.device_end;
  if (plan.step_waits_for_updates()) finish = std::max(finish, pass.update_end);
  plan.set_seconds(finish - pass.begin);
  clock_ = finish;
  SimulatedStep out = Measure(pass.begin, finish);
  out.begin_work_s = pass.begin_work;
  steps_.push_back(out);
  return out;
}

// The step [begin, finish]: each resource's busy time within it, and the metrics of the
// bench's four resources (step_metrics.h; the optimizer's work includes its states' NVMe
// reads and writes, as the updaters report an update from its read to its write, and not the
// weights' stages, which the drives serve beside it for the stager: a session's optimizer is
// its updates, Session::Impl::MetricsOf), with the network when it is modelled.
SimulatedStep StepSimulator::Measure(double begin, double finish) const {
  SimulatedStep out;
  out.begin_s = begin;
  out.seconds = finish - begin;
  auto within = [&](const std::pair<double, double>& interval) {
    return std::max(0.0, std::min(interval.second, finish) - std::max(interval.first, begin));
  };
  for (size_t i = 0; i < kPlanResources; ++i) {
    for (const auto& interval : intervals_[i]) out.busy[i] += within(interval);
  }
  for (const auto& interval : stages_) out.busy[Index(PlanResource::kNvmeRead)] += within(interval);
  for (const auto& interval : network_) out.network_busy += within(interval);
  std::vector<ResourceBusy> resources = {
      {"compute", {}}, {"h2d", {}}, {"d2h", {}}, {"optimizer", {}}};
  auto add = [&](size_t to, PlanResource from) {
    for (const auto& [start, stop] : intervals_[Index(from)]) {
      resources[to].intervals.push_back({At(start), At(stop)});
    }
  };
  add(0, PlanResource::kCompute);
  add(1, PlanResource::kH2d);
  add(2, PlanResource::kD2h);
  add(3, PlanResource::kCpuOptimizer);
  add(3, PlanResource::kNvmeRead);
  add(3, PlanResource::kNvmeWrite);
  if (rates_.all_to_all_seconds > 0) {  // modelled only, but it takes the step's time
    resources.push_back({"network", {}});
    for (const auto& [start, stop] : network_) {
      resources.back().intervals.push_back({At(start), At(stop)});
    }
  }
  out.metrics = ComputeStepMetrics(At(begin), At(finish), resources);
  return out;
}

}  // namespace ecss::plan
