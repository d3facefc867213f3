// TraceRecorder: collects timed operations and writes them as Chrome trace JSON, which
// Perfetto (ui.perfetto.dev) and chrome://tracing open. Each lane (a device stream, a copy
// engine, the NVMe engine, an optimizer thread) is one "thread" row in the viewer.
// Thread-safe: any thread may record; recording takes a mutex and appends to a vector, so keep
// events coarse (one per operation, not per element). Timestamps are steady_clock, shown
// relative to the recorder's creation.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/base/status.h"

namespace ecss {

class TraceRecorder {
 public:
  using Clock = std::chrono::steady_clock;
  // Numeric arguments shown with an event ("bytes", "expert", ...).
  using Args = std::vector<std::pair<std::string, double>>;

  explicit TraceRecorder(std::string process_name = "ecss");
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // The lane named `name`, created on first use. Lane ids are small and stable.
  int Lane(std::string_view name);

  // An operation on `lane` that ran from `start` to `end`.
  void Complete(int lane, std::string_view name, std::string_view category, Clock::time_point start,
                Clock::time_point end, Args args = {});
  // A point in time on `lane`.
  void Instant(int lane, std::string_view name, std::string_view category, Clock::time_point when);

  size_t event_count() const;
  // The whole trace: {"traceEvents":[...],"displayTimeUnit":"ms"}.
  std::string ToJson() const;
  // ToJson() written atomically to `path`.
  Status WriteJson(const std::string& path) const;

 private:
  struct Event {
    std::string name;
    std::string category;
    char phase;  // 'X' complete, 'i' instant
    int lane;
    double start_us;
    double duration_us;
    Args args;
  };
  double Micros(Clock::time_point t) const;

  const std::string process_name_;
  const Clock::time_point origin_;
  mutable std::mutex mutex_;
  std::vector<std::string> lanes_;  // GUARDED_BY(mutex_)
  std::vector<Event> events_;       // GUARDED_BY(mutex_)
};

// Records one Complete event from construction to destruction; does nothing when `recorder`
// is null, so call sites need no branch.
class TraceScope {
 public:
  TraceScope(TraceRecorder* recorder, int lane, std::string_view name, std::string_view category,
             TraceRecorder::Args args = {});
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;
  ~TraceScope();

 private:
  TraceRecorder* recorder_;
  int lane_;
  std::string name_;
  std::string category_;
  TraceRecorder::Args args_;
  TraceRecorder::Clock::time_point start_;
};

}  // namespace ecss
