#include "runtime/base/trace.h"

#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"

namespace ecss {

TraceRecorder::TraceRecorder(std::string process_name)
    : process_name_(std::move(process_name)), origin_(Clock::now()) {}

int TraceRecorder::Lane(std::string_view name) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < lanes_.size(); ++i) {
    if (lanes_[i] == name) return static_cast<int>(i);
  }
  lanes_.emplace_back(name);
  return static_cast<int>(lanes_.size() - 1);
}

double TraceRecorder::Micros(Clock::time_point t) const {
  return std::chrono::duration<double, std::micro>(t - origin_).count();
}

void TraceRecorder::Complete(int lane, std::string_view name, std::string_view category,
                             Clock::time_point start, Clock::time_point end, Args args) {
  Event event{std::string(name),
              std::string(category),
              'X',
              lane,
              Micros(start),
              std::chrono::duration<double, std::micro>(end - start).count(),
              std::move(args)};
  std::lock_guard<std::mutex> lock(mutex_);
  events_.push_back(std::move(event));
}

void TraceRecorder::Instant(int lane, std::string_view name, std::string_view category,
                            Clock::time_point when) {
  Event event{std::string(name), std::string(category), 'i', lane, Micros(when), 0.0, {}};
  std::lock_guard<std::mutex> lock(mutex_);
  events_.push_back(std::move(event));
}

size_t TraceRecorder::event_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

std::string TraceRecorder::ToJson() const {
  constexpr int kPid = 1;
  std::lock_guard<std::mutex> lock(mutex_);
  JsonWriter json;
  json.BeginObject().Key("traceEvents").BeginArray();
  // Metadata: the process name and one named row per lane, in lane order.
  json.BeginObject()
      .Field("name", "process_name")
      .Field("ph", "M")
      .Field("pid", kPid)
      .Field("tid", 0)
      .Key("args")
      .BeginObject()
      .Field("name", process_name_)
      .EndObject()
      .EndObject();
  for (size_t lane = 0; lane < lanes_.size(); ++lane) {
    const int tid = static_cast<int>(lane) + 1;
    json.BeginObject()
        .Field("name", "thread_name")
        .Field("ph", "M")
        .Field("pid", kPid)
        .Field("tid", tid)
        .Key("args")
        .BeginObject()
        .Field("name", lanes_[lane])
        .EndObject()
        .EndObject();
    json.BeginObject()
        .Field("name", "thread_sort_index")
        .Field("ph", "M")
        .Field("pid", kPid)
        .Field("tid", tid)
        .Key("args")
        .BeginObject()
        .Field("sort_index", tid)
        .EndObject()
        .EndObject();
  }
  for (const Event& event : events_) {
    json.BeginObject()
        .Field("name", event.name)
        .Field("cat", event.category)
        .Field("ph", std::string_view(&event.phase, 1))
        .Field("pid", kPid)
        .Field("tid", event.lane + 1)
        .Field("ts", event.start_us);
    if (event.phase == 'X') json.Field("dur", event.duration_us);
    if (event.phase == 'i') json.Field("s", "t");
    if (!event.args.empty()) {
      json.Key("args").BeginObject();
      for (const auto& [key, value] : event.args) json.Field(key, value);
      json.EndObject();
    }
    json.EndObject();
  }
  json.EndArray().Field("displayTimeUnit", "ms").EndObject();
  return json.str();
}

Status TraceRecorder::WriteJson(const std::string& path) const {
  return WriteFileAtomically(path, ToJson());
}

TraceScope::TraceScope(TraceRecorder* recorder, int lane, std::string_view name,
                       std::string_view category, TraceRecorder::Args args)
    : recorder_(recorder), lane_(lane) {
  if (recorder_ == nullptr) return;
  name_ = name;
  category_ = category;
  args_ = std::move(args);
  start_ = TraceRecorder::Clock::now();
}

TraceScope::~TraceScope() {
  if (recorder_ == nullptr) return;
  recorder_->Complete(lane_, name_, category_, start_, TraceRecorder::Clock::now(),
                      std::move(args_));
}

}  // namespace ecss
