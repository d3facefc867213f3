#include "engine/plan_recorder.h"

#include <algorithm>

#include "runtime/base/str_cat.h"

namespace ecss {

PlanRecorder::Record* PlanRecorder::Find(uint64_t step) {
  for (auto& [number, record] : steps_) {
    if (number == step) return &record;
  }
  return nullptr;
}

void PlanRecorder::BeginStep(uint64_t step, Clock::time_point begin) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) {  // a step begun again after a refused BeginStep
    *record = Record{};
    record->begin = begin;
    return;
  }
  steps_.emplace_back(step, Record{});
  steps_.back().second.begin = begin;
  while (steps_.size() > kKeptSteps) steps_.pop_front();
}

void PlanRecorder::SetPlan(uint64_t step, const StepPlan& plan) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) record->plan = plan;
}

void PlanRecorder::EndStep(uint64_t step, Clock::time_point end) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) record->end = end;
}

void PlanRecorder::Issued(uint64_t step, uint32_t op) {
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) record->issued.emplace(op, now);
}

void PlanRecorder::Ended(uint64_t step, uint32_t op) {
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) record->ended[op] = now;
}

void PlanRecorder::Ran(uint64_t step, uint32_t op, Clock::time_point start, Clock::time_point end) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) {
    record->issued[op] = start;
    record->ended[op] = end;
  }
}

void PlanRecorder::MapUpdaterStep(uint64_t updater_step, uint64_t step, int32_t step_offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (Record* record = Find(step)) record->updater_steps[step_offset] = updater_step;
}

void PlanRecorder::UpdateRan(uint64_t updater_step, uint32_t layer, Clock::time_point start,
                             Clock::time_point end) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto [window, added] = updates_[updater_step].try_emplace(layer, Window{start, end});
  if (!added) {
    window->second.start = std::min(window->second.start, start);
    window->second.end = std::max(window->second.end, end);
  }
  while (updates_.size() > 2 * kKeptSteps + 2) updates_.erase(updates_.begin());
}

StatusOr<StepPlan> PlanRecorder::ExecutedPlan(uint64_t step) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Record* record = const_cast<PlanRecorder*>(this)->Find(step);
  if (record == nullptr) {
    return NotFoundError(
        StrCat("no executed plan of step ", step, " (the last ", kKeptSteps, " steps are kept)"));
  }
  StepPlan plan = record->plan;
  const auto seconds = [&](Clock::time_point t) {
    return std::max(0.0, std::chrono::duration<double>(t - record->begin).count());
  };
  if (record->end) plan.set_seconds(seconds(*record->end));
  std::map<PlanResource, double> stream_free;  // device ops run in order per resource
  double additions_free = 0;  // and the host's additions on their stream (no plan resource)
  for (PlanOp& op : plan.mutable_ops()) {
    if (op.kind == OpKind::kUpdate) {  // the union of its experts' update windows
      static const std::map<uint32_t, Window> kNone;
      auto mapped = record->updater_steps.find(op.step_offset);
      auto updates =
          mapped == record->updater_steps.end() ? updates_.end() : updates_.find(mapped->second);
      const std::map<uint32_t, Window>& windows =
          updates == updates_.end() ? kNone : updates->second;
      bool ran = false;
      Window whole{};
      for (const auto& [layer, window] : windows) {
        if (op.layer >= 0 && layer != static_cast<uint32_t>(op.layer)) continue;
        whole = ran ? Window{std::min(whole.start, window.start), std::max(whole.end, window.end)}
                    : window;
        ran = true;
      }
      if (ran) {
        op.start_s = seconds(whole.start);
        op.end_s = seconds(whole.end);
      }
      continue;
    }
    auto issued = record->issued.find(op.id);
    if (issued != record->issued.end()) op.issued_s = seconds(issued->second);
    auto ended = record->ended.find(op.id);
    if (ended == record->ended.end()) continue;
    op.end_s = seconds(ended->second);
    double start = std::max(0.0, op.issued_s);
    for (uint32_t dep : op.deps) {
      // The host waits for updates before it issues what reads their experts (issued_s has
      // it); an update op is the union of many experts', which may end after this op.
      if (plan.ops()[dep].kind != OpKind::kUpdate) {
        start = std::max(start, std::max(0.0, plan.ops()[dep].end_s));
      }
    }
    if (op.resource != PlanResource::kNone) start = std::max(start, stream_free[op.resource]);
    if (op.kind == OpKind::kAccumulate) start = std::max(start, additions_free);
    op.start_s = std::min(start, op.end_s);
    if (op.resource != PlanResource::kNone) {
      stream_free[op.resource] = std::max(stream_free[op.resource], op.end_s);
    }
    if (op.kind == OpKind::kAccumulate) additions_free = std::max(additions_free, op.end_s);
  }
  return plan;
}

}  // namespace ecss
