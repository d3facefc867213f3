#include "runtime/device/sim/sim_backend.h"

#include <sys/prctl.h>

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

// The ops the engines ran, most recent last: the last kKeptOps, and every op that ended
// after the `since` of the last engine_intervals query (a caller that queries step by step,
// each step from where the last began or later, loses none however many ops a step has).
struct SimBackend::OpLog {
  void Add(SimEngineOp op) {
    std::lock_guard<std::mutex> lock(mutex);
    if (ops.size() >= kKeptOps && ops.front().end <= keep_after) ops.pop_front();
    ops.push_back(std::move(op));
  }
  mutable std::mutex mutex;
  std::deque<SimEngineOp> ops;                              // GUARDED_BY(mutex)
  Clock::time_point keep_after = Clock::time_point::max();  // GUARDED_BY(mutex)
};

// A resource that serialises the work given to it (a copy engine, the compute units) and
// accounts its busy time (see "Time" in the header).
struct SimBackend::Engine {
  Engine(DeviceEngine engine_kind, std::string engine_name, double gbps, double latency_us,
         TraceRecorder* recorder, OpLog* op_log)
      : kind(engine_kind),
        name(std::move(engine_name)),
        bytes_per_second(gbps * 1e9),
        latency_seconds(latency_us * 1e-6),
        trace(recorder),
        lane(recorder ? recorder->Lane(name) : 0),
        log(op_log) {}

  bool throttled() const { return bytes_per_second > 0; }

  // Runs one op that is ready at `ready`; its end goes to `*end`. Without `work` the op is
  // modelled: it holds the engine for exactly `modelled` from when it is ready and the engine
  // is free, and the thread sleeps until then. With `work`, the work runs holding the engine,
  // which stays busy for at least `modelled`. `bytes` < 0: not a transfer.
  Status Run(std::string_view op, double bytes, Clock::time_point ready, Clock::duration modelled,
             const std::function<Status()>* work, Clock::time_point* end) {
    Clock::time_point start;
    Status status;
    if (work == nullptr) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        start = std::max(free_at, ready);
        *end = start + modelled;
        free_at = *end;
      }
      std::this_thread::sleep_until(*end);
    } else {
      std::lock_guard<std::mutex> lock(mutex);
      start = std::max({free_at, ready, Clock::now()});
      std::this_thread::sleep_until(start);
      status = (*work)();
      *end = std::max(start + modelled, Clock::now());
      std::this_thread::sleep_until(*end);
      free_at = *end;
    }
    const Clock::time_point woke = Clock::now();
    busy_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(*end - start).count(),
                      std::memory_order_relaxed);
    if (trace) {
      TraceRecorder::Args args;
      if (bytes >= 0) args.emplace_back("bytes", bytes);
      trace->Complete(lane, op, name, start, *end, std::move(args));
    }
    log->Add({kind, std::string(op), bytes, ready, start, *end, modelled, woke});
    return status;
  }

  // The time a throttled engine needs for `bytes`: latency + bytes / bandwidth.
  Clock::duration CopyTime(size_t bytes) const {
    if (!throttled()) return Clock::duration::zero();
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
        latency_seconds + static_cast<double>(bytes) / bytes_per_second));
  }

  const DeviceEngine kind;
  const std::string name;
  const double bytes_per_second;  // 0: unthrottled
  const double latency_seconds;
  TraceRecorder* const trace;
  const int lane;
  OpLog* const log;
  std::mutex mutex;
  Clock::time_point free_at;  // GUARDED_BY(mutex): when the engine's last op ends
  std::atomic<int64_t> busy_ns{0};
};

// One in-order queue and the worker thread that drains it.
class SimBackend::SimStream final : public StreamImpl {
 public:
  // Runs the task, which became ready at `ready`; sets `*end` (ready on entry) to when it ended.
  using Run = std::function<Status(Clock::time_point ready, Clock::time_point* end)>;
  struct Task {
    std::string name;
    std::string_view category;
    Run run;
    // Runs even after the stream failed (event records, which must propagate the failure).
    bool runs_after_error = false;
    Clock::time_point enqueued{};  // set by Enqueue
  };

  SimStream(std::string_view stream_name, TraceRecorder* trace)
      : trace_(trace), lane_(trace ? trace->Lane(StrCat("stream:", stream_name)) : 0) {
    worker_ = std::thread([this] { Work(); });
  }

  ~SimStream() override { StopAndJoin().IgnoreError(); }

  Status Enqueue(Task task) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return FailedPreconditionError(StrCat("stream '", name, "' is shutting down"));
    task.enqueued = Clock::now();
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
    // Sleeps end within 1 us of their deadline instead of Linux's default 50 us of slack: the
    // worker wakes at an op's modelled end (see "Time" in the header).
    ::prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
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
        // Ready once enqueued and the previous op on the stream ended (modelled time).
        const Clock::time_point ready = std::max(task.enqueued, ready_at_);
        Clock::time_point end = ready;
        Status status = task.run(ready, &end);
        ready_at_ = std::max(ready, end);
        if (trace_) trace_->Complete(lane_, task.name, task.category, ready, ready_at_);
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
  std::deque<Task> queue_;        // GUARDED_BY(mutex_)
  uint64_t enqueued_ = 0;         // GUARDED_BY(mutex_)
  uint64_t completed_ = 0;        // GUARDED_BY(mutex_)
  bool stopping_ = false;         // GUARDED_BY(mutex_)
  Status error_;                  // GUARDED_BY(mutex_); written by the worker only
  Clock::time_point ready_at_{};  // the worker's own: when the stream's last op ended
  std::thread worker_;
};

// Each RecordEvent makes a recording, which the record task completes with its stream's
// error and time; a stream waiting on the event waits for the recording that was latest when
// it called WaitEvent, and is ready no earlier than that recording's time.
class SimBackend::SimEvent final : public EventImpl {
 public:
  struct Recording {
    bool done = false;       // GUARDED_BY(SimEvent::mutex_)
    Status error;            // GUARDED_BY(SimEvent::mutex_)
    Clock::time_point at{};  // GUARDED_BY(SimEvent::mutex_)
  };

  std::shared_ptr<Recording> BeginRecord() {
    std::lock_guard<std::mutex> lock(mutex_);
    latest_ = std::make_shared<Recording>();
    return latest_;
  }

  void Complete(Recording& recording, Status error, Clock::time_point at) {
    std::lock_guard<std::mutex> lock(mutex_);
    recording.done = true;
    recording.error = std::move(error);
    recording.at = at;
    cv_.notify_all();
  }

  // Null when never recorded.
  std::shared_ptr<Recording> latest() {
    std::lock_guard<std::mutex> lock(mutex_);
    return latest_;
  }

  // Waits until `recording` completed; returns the error of the stream it was recorded on
  // and (when asked) its time.
  Status WaitFor(const Recording& recording, Clock::time_point* at = nullptr) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return recording.done; });
    if (at != nullptr) *at = recording.at;
    return recording.error;
  }

  bool Done(const Recording& recording) {
    std::lock_guard<std::mutex> lock(mutex_);
    return recording.done;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::shared_ptr<Recording> latest_;  // GUARDED_BY(mutex_)
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
  arena.alignment = AllocationRulesOf(DeviceKind::kSim).device_alignment_bytes;  // cudaMalloc's
  // A GPU's memory is there when the context is: faulted in now, so that no copy or kernel
  // of a step pays the host's page faults.
  arena.populate = true;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ArenaAllocator> memory, ArenaAllocator::Create(arena));
  return std::unique_ptr<SimBackend>(new SimBackend(options, std::move(memory)));
}

StatusOr<std::unique_ptr<Backend>> CreateSimBackend(const SimOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> backend, SimBackend::Create(options));
  return std::unique_ptr<Backend>(std::move(backend));
}

namespace {
BackendCapabilities SimCapabilities(const SimOptions& options, uint64_t capacity) {
  BackendCapabilities caps = AllocationRulesOf(DeviceKind::kSim);  // an arena: no other rounding
  caps.name = "sim";
  caps.device_name = "simulated device";
  caps.device = Device::Sim(options.device_index);
  caps.device_memory_bytes = capacity;
  caps.host_kernels = true;
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
      ops_(std::make_unique<OpLog>()),
      h2d_(std::make_unique<Engine>(DeviceEngine::kH2D, "H2D", options.h2d_bandwidth_gbps,
                                    options.copy_latency_us, options.trace, ops_.get())),
      d2h_(std::make_unique<Engine>(DeviceEngine::kD2H, "D2H", options.d2h_bandwidth_gbps,
                                    options.copy_latency_us, options.trace, ops_.get())),
      compute_(std::make_unique<Engine>(DeviceEngine::kCompute, "compute", 0, 0, options.trace,
                                        ops_.get())) {}

SimBackend::~SimBackend() { ShutdownHandles(); }

std::vector<SimEngineOp> SimBackend::EngineOps() const {
  std::lock_guard<std::mutex> lock(ops_->mutex);
  return {ops_->ops.begin(), ops_->ops.end()};
}

std::vector<EngineInterval> SimBackend::DoEngineIntervals(Clock::time_point since) const {
  std::vector<EngineInterval> intervals;
  std::lock_guard<std::mutex> lock(ops_->mutex);
  ops_->keep_after = since;
  // The log is in the order the engines' threads woke, which may differ from the order of
  // the ops' ends by a thread's wake-up: stop a second before `since`.
  for (auto op = ops_->ops.rbegin();
       op != ops_->ops.rend() && op->end + std::chrono::seconds(1) > since; ++op) {
    if (op->end <= since) continue;
    intervals.push_back({op->engine, op->start, op->end});
  }
  return intervals;
}

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

namespace {

// The host's clock: when real work on a stream's worker ends (and when a timed host function
// began and ended its run).
SimBackend::Clock::time_point Now() { return std::chrono::steady_clock::now(); }

}  // namespace

Status SimBackend::DoCopy(const StreamPtr& stream, void* dst, const void* src, size_t bytes,
                          CopyKind kind) {
  Engine* engine = kind == CopyKind::kHostToDevice   ? h2d_.get()
                   : kind == CopyKind::kDeviceToHost ? d2h_.get()
                                                     : nullptr;
  const bool timed = options_.kernel_mode == KernelMode::kTimed;
  SimStream::Run run;
  if (engine == nullptr) {  // device-to-device runs on the device itself, not a copy engine
    run = [dst, src, bytes, timed](Clock::time_point, Clock::time_point* end) {
      if (!timed) std::memcpy(dst, src, bytes);
      if (!timed) *end = Now();
      return Status::Ok();
    };
  } else {
    run = [engine, dst, src, bytes, kind, timed](Clock::time_point ready, Clock::time_point* end) {
      const std::function<Status()> copy = [dst, src, bytes] {
        std::memcpy(dst, src, bytes);
        return Status::Ok();
      };
      return engine->Run(CopyKindName(kind), static_cast<double>(bytes), ready,
                         engine->CopyTime(bytes), timed ? nullptr : &copy, end);
    };
  }
  // Short literal names (no formatting on the hot path); the engine lane's event carries
  // the byte count.
  return static_cast<SimStream&>(*stream).Enqueue(
      {std::string(CopyKindName(kind)), "copy", std::move(run)});
}

Status SimBackend::DoMemset(const StreamPtr& stream, void* dst, uint8_t value, size_t bytes) {
  const bool timed = options_.kernel_mode == KernelMode::kTimed;
  return static_cast<SimStream&>(*stream).Enqueue(
      {"memset", "memset", [dst, value, bytes, timed](Clock::time_point, Clock::time_point* end) {
         if (timed) return Status::Ok();
         std::memset(dst, value, bytes);
         *end = Now();
         return Status::Ok();
       }});
}

Status SimBackend::DoLaunchHostFunction(const StreamPtr& stream, std::string name,
                                        std::function<Status()> fn) {
  const bool timed = options_.kernel_mode == KernelMode::kTimed;
  return static_cast<SimStream&>(*stream).Enqueue(
      {std::move(name), "host",
       [timed, fn = std::move(fn)](Clock::time_point ready, Clock::time_point* end) {
         const Clock::time_point began = Now();
         Status status = fn();
         // Timed: the stream is held for the function's run from when it was ready, not from
         // when this worker woke to run it (see "Time" in the header).
         *end = timed ? ready + (Now() - began) : Now();
         return status;
       }});
}

Status SimBackend::DoLaunchKernel(const StreamPtr& stream, KernelTask&& task) {
  Engine* engine = compute_.get();
  const bool timed = options_.kernel_mode == KernelMode::kTimed;
  std::string name = task.name;
  auto run = [engine, timed, task = std::move(task)](Clock::time_point ready,
                                                     Clock::time_point* end) {
    const Clock::duration modelled = timed
                                         ? std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(task.modeled_seconds))
                                         : Clock::duration::zero();
    return engine->Run(task.name, -1, ready, modelled, timed ? nullptr : &task.compute, end);
  };
  return static_cast<SimStream&>(*stream).Enqueue({std::move(name), "kernel", std::move(run)});
}

Status SimBackend::DoRecordEvent(const EventPtr& event, const StreamPtr& stream) {
  auto sim_event = std::static_pointer_cast<SimEvent>(event);
  auto sim_stream = std::static_pointer_cast<SimStream>(stream);
  std::shared_ptr<SimEvent::Recording> recording = sim_event->BeginRecord();
  // The task runs on the stream's own worker, so the stream outlives it: a raw pointer
  // (a shared_ptr here could make the worker destroy, and join, itself).
  SimStream* owner = sim_stream.get();
  Status enqueued = sim_stream->Enqueue(
      {"record event", "event",
       [sim_event, owner, recording](Clock::time_point ready, Clock::time_point*) {
         sim_event->Complete(*recording, owner->error(), ready);
         return Status::Ok();
       },
       /*runs_after_error=*/true});
  if (!enqueued.ok()) sim_event->Complete(*recording, enqueued, Now());
  return enqueued;
}

Status SimBackend::DoWaitEvent(const StreamPtr& stream, const EventPtr& event) {
  auto sim_event = std::static_pointer_cast<SimEvent>(event);
  std::shared_ptr<SimEvent::Recording> recording = sim_event->latest();
  if (recording == nullptr) return Status::Ok();  // never recorded: nothing to wait for
  return static_cast<SimStream&>(*stream).Enqueue(
      {"wait event", "event",
       [sim_event, recording](Clock::time_point ready, Clock::time_point* end) {
         Clock::time_point recorded;
         Status status = sim_event->WaitFor(*recording, &recorded);
         *end = std::max(ready, recorded);
         return status.ok() ? status : status.Annotate("waited on an event recorded after it");
       }});
}

Status SimBackend::DoSynchronizeStream(StreamImpl& stream) {
  return static_cast<SimStream&>(stream).Synchronize();
}

Status SimBackend::DoSynchronizeEvent(EventImpl& event) {
  std::shared_ptr<SimEvent::Recording> recording = static_cast<SimEvent&>(event).latest();
  if (recording == nullptr) return Status::Ok();
  return static_cast<SimEvent&>(event).WaitFor(*recording);
}

bool SimBackend::DoQueryEvent(EventImpl& event) {
  std::shared_ptr<SimEvent::Recording> recording = static_cast<SimEvent&>(event).latest();
  return recording == nullptr || static_cast<SimEvent&>(event).Done(*recording);
}

}  // namespace ecss
