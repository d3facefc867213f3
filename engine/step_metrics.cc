#include "engine/step_metrics.h"

#include <algorithm>
#include <map>
#include <set>

namespace ecss {

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The resource's intervals clipped to [begin, end], sorted and merged.
std::vector<BusyInterval> Merged(std::vector<BusyInterval> intervals, Clock::time_point begin,
                                 Clock::time_point end) {
  std::vector<BusyInterval> merged;
  std::sort(intervals.begin(), intervals.end(),
            [](const BusyInterval& a, const BusyInterval& b) { return a.start < b.start; });
  for (BusyInterval each : intervals) {
    each.start = std::max(each.start, begin);
    each.end = std::min(each.end, end);
    if (each.end <= each.start) continue;
    if (!merged.empty() && each.start <= merged.back().end) {
      merged.back().end = std::max(merged.back().end, each.end);
    } else {
      merged.push_back(each);
    }
  }
  return merged;
}

// The bottleneck, bound_ratio and overlap_fraction of `metrics`' seconds and busy times.
void SetRatios(StepMetrics* metrics) {
  double sum = 0, most = 0;
  for (const ResourceUse& use : metrics->resources) {
    sum += use.busy_seconds;
    if (use.busy_seconds > most) {
      most = use.busy_seconds;
      metrics->bottleneck = use.name;
    }
  }
  if (most <= 0) return;
  metrics->bound_ratio = metrics->seconds / most;
  metrics->overlap_denominator_seconds = sum - most;
  if (metrics->overlap_denominator_seconds >= 0.05 * metrics->seconds) {
    metrics->overlap_fraction = (sum - metrics->seconds) / metrics->overlap_denominator_seconds;
  }
}

}  // namespace

StepMetrics ComputeStepMetrics(Clock::time_point begin, Clock::time_point end,
                               const std::vector<ResourceBusy>& resources) {
  StepMetrics metrics;
  metrics.seconds = Seconds(end - begin);
  // Sweep the step's timeline: between two consecutive boundaries the set of busy resources
  // is constant; a stretch where exactly one is busy is exposed time of that one.
  struct Boundary {
    Clock::time_point at;
    int delta;  // +1 start, -1 end
    size_t resource;
  };
  std::vector<Boundary> boundaries;
  for (size_t r = 0; r < resources.size(); ++r) {
    ResourceUse use;
    use.name = resources[r].name;
    for (const BusyInterval& each : Merged(resources[r].intervals, begin, end)) {
      use.busy_seconds += Seconds(each.end - each.start);
      boundaries.push_back({each.start, +1, r});
      boundaries.push_back({each.end, -1, r});
    }
    metrics.resources.push_back(use);
  }
  std::sort(boundaries.begin(), boundaries.end(),
            [](const Boundary& a, const Boundary& b) { return a.at < b.at; });
  std::vector<int> busy(resources.size(), 0);
  int busy_count = 0;
  for (size_t i = 0; i < boundaries.size(); ++i) {
    const Boundary& here = boundaries[i];
    busy[here.resource] += here.delta;
    busy_count += here.delta;
    if (busy_count != 1 || i + 1 == boundaries.size()) continue;
    const auto alone = static_cast<size_t>(
        std::find_if(busy.begin(), busy.end(), [](int b) { return b > 0; }) - busy.begin());
    metrics.resources[alone].exposed_seconds += Seconds(boundaries[i + 1].at - here.at);
  }

  SetRatios(&metrics);
  return metrics;
}

std::vector<PathShare> CriticalPath(const StepPlan& executed) {
  const std::vector<PlanOp>& ops = executed.ops();
  double seconds = executed.seconds();
  if (seconds < 0) {  // not ended: up to its last op
    seconds = 0;
    for (const PlanOp& op : ops) seconds = std::max(seconds, op.end_s);
  }
  // Ran, and ended by `by` within the step (an update carried in from the step before may
  // have started before it: counted from the step's start).
  auto observed = [&](const PlanOp& op, double by) {
    return op.end_s >= 0 && op.end_s >= op.start_s && op.end_s <= by;
  };
  // When `op` ended as something an op that started at `by` waited for: its end, when it
  // ended by then; `by` for an update still running then (the union of its experts' updates,
  // step_metrics.h); -1 otherwise.
  auto ended_by = [&](const PlanOp& op, double by) {
    if (observed(op, by)) return op.end_s;
    const bool running = op.start_s >= 0 && op.start_s <= by && op.end_s > by;
    return op.kind == OpKind::kUpdate && running ? by : -1.0;
  };
  std::map<std::string, double> on_path;
  auto count = [&](std::string_view kind, double time) {
    if (time > 0) on_path[std::string(kind)] += time;
  };
  // The last op to end within the step.
  const PlanOp* current = nullptr;
  for (const PlanOp& op : ops) {
    if (observed(op, seconds) && (current == nullptr || op.end_s > current->end_s)) current = &op;
  }
  double end = current != nullptr ? current->end_s : 0;  // current's, as the path counts it
  double t = seconds;
  std::set<uint32_t> visited;  // ops of zero length at one time must not loop
  while (current != nullptr && visited.insert(current->id).second) {
    count("host", t - end);
    t = std::max(current->start_s, 0.0);
    count(OpKindName(current->kind), end - t);
    const PlanOp* before = nullptr;
    end = -1;
    for (uint32_t dep : current->deps) {
      const double ended = ended_by(ops[dep], t);
      if (ended >= 0 && !visited.count(dep) && (before == nullptr || ended > end)) {
        before = &ops[dep];
        end = ended;
      }
    }
    // Stream order: the same resource's op that ended last before (an op waits for its deps
    // and for its resource), or an update still running (see ended_by).
    for (const PlanOp& op : ops) {
      if (visited.count(op.id) || op.resource != current->resource ||
          op.resource == PlanResource::kNone) {
        continue;
      }
      const double ended = ended_by(op, t);
      if (ended >= 0 && (before == nullptr || ended > end)) {
        before = &op;
        end = ended;
      }
    }
    current = before;
  }
  count("host", t);
  std::vector<PathShare> path;
  path.reserve(on_path.size());
  for (const auto& [kind, time] : on_path) {
    path.push_back({kind, time, seconds > 0 ? time / seconds : 0});
  }
  std::sort(path.begin(), path.end(),
            [](const PathShare& a, const PathShare& b) { return a.seconds > b.seconds; });
  return path;
}

StepMetrics SumStepMetrics(const std::vector<StepMetrics>& steps) {
  StepMetrics total;
  for (const StepMetrics& step : steps) {
    total.seconds += step.seconds;
    for (const ResourceUse& use : step.resources) {
      auto same = std::find_if(total.resources.begin(), total.resources.end(),
                               [&](const ResourceUse& r) { return r.name == use.name; });
      if (same == total.resources.end()) same = total.resources.insert(same, {use.name, 0, 0});
      same->busy_seconds += use.busy_seconds;
      same->exposed_seconds += use.exposed_seconds;
    }
  }
  SetRatios(&total);
  return total;
}

void UpdateIntervals::Started(uint32_t expert, Clock::time_point start) {
  std::lock_guard<std::mutex> lock(mutex_);
  running_[expert] = start;
}

void UpdateIntervals::Ended(uint32_t expert, Clock::time_point start, Clock::time_point end) {
  std::lock_guard<std::mutex> lock(mutex_);
  running_.erase(expert);
  ended_.push_back({start, end});
}

std::vector<BusyInterval> UpdateIntervals::Take(Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<BusyInterval> taken;
  taken.swap(ended_);
  for (const auto& [expert, since] : running_) taken.push_back({since, std::max(since, now)});
  return taken;
}

}  // namespace ecss
