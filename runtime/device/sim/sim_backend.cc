#include "runtime/device/sim/sim_backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

// Every block of the simulated device's memory: cudaMalloc's alignment guarantee.
constexpr size_t kSimAlignment = 256;

using Clock = std::chrono::steady_clock;

// A resource that serialises the work given to it (a copy engine, the compute units) and
// accounts its busy time.
struct SimBackend::Engine {
  Engine(std::string engine_name, double gbps, double latency_us, TraceRecorder* recorder)
      : name(std::move(engine_name)),
        bytes_per_second(gbps * 1e9),
        latency(std::chrono::duration<double, std::micro>(latency_us)),
        trace(recorder),
        lane(recorder ? recorder->Lane(name) : 0) {}

  bool throttled() const { return bytes_per_second > 0; }

  // Runs `work` holding the engine; the engine stays busy until at least `min_duration`
  // after the start.
  template <typename Work>
  // `bytes` < 0: not a transfer.
  Status Run(std::string_view op, Clock::duration min_duration, double bytes, Work&& work) {
    std::lock_guard<std::mutex> lock(mutex);
    const Clock::time_point start = Clock::now();
    Status status = work();
    if (min_duration > Clock::duration::zero()) std::this_thread::sleep_until(start + min_duration);
    const Clock::time_point end = Clock::now();
    busy_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count(),
                      std::memory_order_relaxed);
    if (trace) {
      TraceRecorder::Args args;
      if (bytes >= 0) args.emplace_back("bytes", bytes);
      trace->Complete(lane, op, name, start, end, std::move(args));
    }
    return status;
  }

  // The time a throttled engine needs for `bytes`.
  Clock::duration CopyTime(size_t bytes) const {
    if (!throttled()) return Clock::duration::zero();
    const auto transfer =
        std::chrono::duration<double>(static_cast<double>(bytes) / bytes_per_second);
    return std::chrono::duration_cast<Clock::duration>(latency + transfer);
  }

  const std::string name;
  const double bytes_per_second;  // 0: unthrottled
  const std::chrono::duration<double, std::micro> latency;
  TraceRecorder* const trace;
  const int lane;
  std::mutex mutex;
  std::atomic<int64_t> busy_ns{0};
};

// One in-order queue and the worker thread that drains it.
class SimBackend::SimStream final : public StreamImpl {
 public:
  struct Task {
    std::string name;
    std::string_view category;
    std::function<Status()> run;
    // Runs even after the stream failed (event records, which must propagate the failure).
    bool runs_after_error = false;
  };

  SimStream(std::string_view stream_name, TraceRecorder* trace)
      : trace_(trace), lane_(trace ? trace->Lane(StrCat("stream:", stream_name)) : 0) {
    worker_ = std::thread([this] { Work(); });
  }

  ~SimStream() override { StopAndJoin().IgnoreError(); }

  Status Enqueue(Task task) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return FailedPreconditionError(StrCat("stream '", name, "' is shutting down"));
    queue_.push_back(std::move(task));
    ++enqueued_;
    work_cv_.notify_one();
    return Status::Ok();
  }

  Status Synchronize() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t target = enqueued_;
    done_cv_.wait(lock, [&] { return completed_ >= target; });
    return error_;
  }

  // The stream's sticky error as of now.
  Status error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

  Status StopAndJoin() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return error_;
      stopping_ = true;
      work_cv_.notify_one();
    }
    worker_.join();
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

 private:
  void Work() {
    while (true) {
      Task task;
      bool skip;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and everything before the stop has run
        task = std::move(queue_.front());
        queue_.pop_front();
        skip = !error_.ok() && !task.runs_after_error;
      }
      if (!skip) {
        const Clock::time_point start = Clock::now();
        Status status = task.run();
        if (trace_) trace_->Complete(lane_, task.name, task.category, start, Clock::now());
        if (!status.ok()) {
          std::lock_guard<std::mutex> lock(mutex_);
          if (error_.ok()) error_ = status.Annotate(StrCat("stream '", name, "': ", task.name));
        }
      }
      std::lock_guard<std::mutex> lock(mutex_);
      ++completed_;
      done_cv_.notify_all();
    }
  }

  TraceRecorder* const trace_;
  const int lane_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Task> queue_;  // GUARDED_BY(mutex_)
  uint64_t enqueued_ = 0;   // GUARDED_BY(mutex_)
  uint64_t completed_ = 0;  // GUARDED_BY(mutex_)
  bool stopping_ = false;   // GUARDED_BY(mutex_)
  Status error_;            // GUARDED_BY(mutex_); written by the worker only
  std::thread worker_;
};

// Recordings are numbered 1, 2, ... on the host when RecordEvent is called; a stream waiting
// on the event waits for the recording that was latest when it called WaitEvent.
class SimBackend::SimEvent final : public EventImpl {
 public:
  uint64_t BeginRecord() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++recorded_;
    pending_.push_back(recorded_);
    return recorded_;
  }

  void Complete(uint64_t recording, Status error) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::erase(pending_, recording);
    if (!error.ok()) failed_[recording] = std::move(error);
    cv_.notify_all();
  }

  uint64_t latest() {
    std::lock_guard<std::mutex> lock(mutex_);
    return recorded_;
  }

  // Waits until `recording` completed; returns the error of the stream it was recorded on.
  Status WaitFor(uint64_t recording) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] {
      return std::find(pending_.begin(), pending_.end(), recording) == pending_.end();
    });
    auto failed = failed_.find(recording);
    return failed == failed_.end() ? Status::Ok() : failed->second;
  }

  bool Done(uint64_t recording) {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::find(pending_.begin(), pending_.end(), recording) == pending_.end();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  uint64_t recorded_ = 0;              // GUARDED_BY(mutex_)
  std::vector<uint64_t> pending_;      // GUARDED_BY(mutex_): recorded, not yet completed
  std::map<uint64_t, Status> failed_;  // GUARDED_BY(mutex_): recordings made after a failure
};

namespace {

Status CheckRate(double value, std::string_view field) {
  if (!std::isfinite(value) || value < 0) {
    return InvalidArgumentError(
        StrCat("sim option ", field, " = ", value, " must be finite and >= 0"));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<SimBackend>> SimBackend::Create(const SimOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckRate(options.h2d_bandwidth_gbps, "h2d_bandwidth_gbps"));
  ECSS_RETURN_IF_ERROR(CheckRate(options.d2h_bandwidth_gbps, "d2h_bandwidth_gbps"));
  ECSS_RETURN_IF_ERROR(CheckRate(options.copy_latency_us, "copy_latency_us"));
  if (options.device_index < 0) {
    return InvalidArgumentError(
        StrCat("sim option device_index = ", options.device_index, " must be >= 0"));
  }
  ArenaOptions arena;
  arena.name = StrCat("sim:", options.device_index, " device memory");
  arena.device = Device::Sim(options.device_index);
  arena.capacity_bytes = options.device_memory_bytes;
  arena.alignment = kSimAlignment;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ArenaAllocator> memory, ArenaAllocator::Create(arena));
  return std::unique_ptr<SimBackend>(new SimBackend(options, std::move(memory)));
}

StatusOr<std::unique_ptr<Backend>> CreateSimBackend(const SimOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> backend, SimBackend::Create(options));
  return std::unique_ptr<Backend>(std::move(backend));
}

namespace {
BackendCapabilities SimCapabilities(const SimOptions& options, uint64_t capacity) {
  BackendCapabilities caps;
  caps.name = "sim";
  caps.device_name = "simulated device";
  caps.device = Device::Sim(options.device_index);
  caps.device_memory_bytes = capacity;
  caps.host_kernels = true;
  caps.device_alignment_bytes = kSimAlignment;  // an arena: no other rounding
  caps.kernel_mode = options.kernel_mode;
  caps.h2d_bandwidth_gbps = options.h2d_bandwidth_gbps;
  caps.d2h_bandwidth_gbps = options.d2h_bandwidth_gbps;
  return caps;
}
}  // namespace

SimBackend::SimBackend(const SimOptions& options, std::unique_ptr<ArenaAllocator> memory)
    : Backend(SimCapabilities(options, memory->capacity_bytes()), options.trace),
      options_(options),
      memory_(std::move(memory)),
      h2d_(std::make_unique<Engine>("H2D", options.h2d_bandwidth_gbps, options.copy_latency_us,
                                    options.trace)),
      d2h_(std::make_unique<Engine>("D2H", options.d2h_bandwidth_gbps, options.copy_latency_us,
                                    options.trace)),
      compute_(std::make_unique<Engine>("compute", 0, 0, options.trace)) {}

SimBackend::~SimBackend() { ShutdownHandles(); }

EngineBusyTimes SimBackend::DoBusyTimes() const {
  auto seconds = [](const Engine& engine) {
    return static_cast<double>(engine.busy_ns.load(std::memory_order_relaxed)) * 1e-9;
  };
  return EngineBusyTimes{seconds(*h2d_), seconds(*d2h_), seconds(*compute_), true};
}

StatusOr<Backend::StreamPtr> SimBackend::DoCreateStream(std::string_view name) {
  auto stream = std::make_shared<SimStream>(name, options_.trace);
  stream->name = std::string(name);
  return StreamPtr(std::move(stream));
}

Status SimBackend::DoDestroyStream(StreamImpl& stream) {
  return static_cast<SimStream&>(stream).StopAndJoin();
}

StatusOr<Backend::EventPtr> SimBackend::DoCreateEvent() {
  return EventPtr(std::make_shared<SimEvent>());
}

Status SimBackend::DoCopy(const StreamPtr& stream, void* dst, const void* src, size_t bytes,
                          CopyKind kind) {
  Engine* engine = kind == CopyKind::kHostToDevice   ? h2d_.get()
                   : kind == CopyKind::kDeviceToHost ? d2h_.get()
                                                     : nullptr;
  auto copy = [dst, src, bytes] {
    std::memcpy(dst, src, bytes);
    return Status::Ok();
  };
  std::function<Status()> run;
  if (engine == nullptr) {
    run = copy;  // device-to-device runs on the device itself, not a copy engine
  } else {
    run = [engine, bytes, copy, kind] {
      return engine->Run(CopyKindName(kind), engine->CopyTime(bytes), static_cast<double>(bytes),
                         copy);
    };
  }
  // Short literal names (no formatting on the hot path); the engine lane's event carries
  // the byte count.
  return static_cast<SimStream&>(*stream).Enqueue(
      {std::string(CopyKindName(kind)), "copy", std::move(run)});
}

Status SimBackend::DoMemset(const StreamPtr& stream, void* dst, uint8_t value, size_t bytes) {
  return static_cast<SimStream&>(*stream).Enqueue({"memset", "memset", [dst, value, bytes] {
                                                     std::memset(dst, value, bytes);
                                                     return Status::Ok();
                                                   }});
}

Status SimBackend::DoLaunchHostFunction(const StreamPtr& stream, std::string name,
                                        std::function<Status()> fn) {
  return static_cast<SimStream&>(*stream).Enqueue({std::move(name), "host", std::move(fn)});
}

Status SimBackend::DoLaunchKernel(const StreamPtr& stream, KernelTask&& task) {
  Engine* engine = compute_.get();
  const KernelMode mode = options_.kernel_mode;
  std::string name = task.name;
  auto run = [engine, mode, task = std::move(task)] {
    if (mode == KernelMode::kReal) {
      return engine->Run(task.name, Clock::duration::zero(), -1, task.compute);
    }
    const auto modeled = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(task.modeled_seconds));
    return engine->Run(task.name, modeled, -1, [] { return Status::Ok(); });
  };
  return static_cast<SimStream&>(*stream).Enqueue({std::move(name), "kernel", std::move(run)});
}

Status SimBackend::DoRecordEvent(const EventPtr& event, const StreamPtr& stream) {
  auto sim_event = std::static_pointer_cast<SimEvent>(event);
  auto sim_stream = std::static_pointer_cast<SimStream>(stream);
  const uint64_t recording = sim_event->BeginRecord();
  // The task runs on the stream's own worker, so the stream outlives it: a raw pointer
  // (a shared_ptr here could make the worker destroy, and join, itself).
  SimStream* owner = sim_stream.get();
  Status enqueued = sim_stream->Enqueue({"record event", "event",
                                         [sim_event, owner, recording] {
                                           sim_event->Complete(recording, owner->error());
                                           return Status::Ok();
                                         },
                                         /*runs_after_error=*/true});
  if (!enqueued.ok()) sim_event->Complete(recording, enqueued);
  return enqueued;
}

Status SimBackend::DoWaitEvent(const StreamPtr& stream, const EventPtr& event) {
  auto sim_event = std::static_pointer_cast<SimEvent>(event);
  const uint64_t recording = sim_event->latest();
  if (recording == 0) return Status::Ok();  // never recorded: nothing to wait for
  return static_cast<SimStream&>(*stream).Enqueue(
      {"wait event", "event", [sim_event, recording] {
         Status status = sim_event->WaitFor(recording);
         return status.ok() ? status : status.Annotate("waited on an event recorded after it");
       }});
}

Status SimBackend::DoSynchronizeStream(StreamImpl& stream) {
  return static_cast<SimStream&>(stream).Synchronize();
}

Status SimBackend::DoSynchronizeEvent(EventImpl& event) {
  auto& sim_event = static_cast<SimEvent&>(event);
  const uint64_t recording = sim_event.latest();
  if (recording == 0) return Status::Ok();
  return sim_event.WaitFor(recording);
}

bool SimBackend::DoQueryEvent(EventImpl& event) {
  auto& sim_event = static_cast<SimEvent&>(event);
  const uint64_t recording = sim_event.latest();
  return recording == 0 || sim_event.Done(recording);
}

}  // namespace ecss
