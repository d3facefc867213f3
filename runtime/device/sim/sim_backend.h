// The simulated device: the same Backend interface as CUDA, on the host, so that every path of
// the runtime is testable on a machine without a GPU (DESIGN.md section 5).
//  - Device memory is an ArenaAllocator with a hard capacity, faulted in at creation (a GPU's
//    memory is resident): over-allocation returns ResourceExhausted and leaves the arena
//    intact, as cudaMalloc would.
//  - Each stream is an in-order queue on its own worker thread; events order streams.
//  - One H2D and one D2H copy engine, shared by all streams, each serialising its copies and
//    modelling bandwidth and latency: a throttled copy of B bytes occupies its engine for
//    latency + B / bandwidth (1 GB/s = 1e9 bytes/s). Unthrottled by default.
//  - Kernels run on one compute engine shared by all streams, in `real` mode (the CPU
//    computes the numbers) or `timed` mode (the engine is busy for the task's modelled time
//    and the numbers are skipped).
//  - Time. An op is ready when it was enqueued, the op before it on its stream ended and the
//    events it waits for were recorded; its engine starts it when it is also free. A modelled
//    op (timed mode's kernels and host<->device copies) then ends exactly its modelled
//    duration later: it does no work (a timed copy moves no bytes, as a timed kernel computes
//    nothing: timed mode's data does not matter), and the engine's thread sleeps until that
//    end, taking no CPU from the host's own work. So in timed mode the device keeps the
//    device's time, not the host's: every op's start and end, and each engine's busy time, are
//    the model's figures (EngineOps), and the wall clock follows them as closely as the host
//    wakes its threads (`ecss-bench device --timed`). Device-to-device copies and memsets are
//    instantaneous and move nothing in timed mode. A host function holds its stream for as
//    long as its function ran, counted in timed mode from when it was ready, not from when the
//    stream's worker woke to run it: the host's wake-up (50-150 us on the 2-core development
//    VM, on every op the executor stamps) stays out of the device's time. In real mode an op's
//    work runs holding its engine, which stays busy for at least the modelled duration
//    (throttled copies).
// Thread-safe, like every Backend. Calls that enqueue never block; synchronise calls do.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "runtime/device/arena_allocator.h"
#include "runtime/device/backend.h"

namespace ecss {

struct SimOptions {
  uint64_t device_memory_bytes = uint64_t{1} << 30;  // hard capacity (default 1 GiB)
  double h2d_bandwidth_gbps = 0;                     // host-to-device engine, GB/s; 0 = unthrottled
  double d2h_bandwidth_gbps = 0;                     // device-to-host engine, GB/s; 0 = unthrottled
  double copy_latency_us = 0;  // added to every copy on a throttled engine, microseconds
  KernelMode kernel_mode = KernelMode::kReal;
  int device_index = 0;            // the N of "sim:N"
  TraceRecorder* trace = nullptr;  // optional, not owned; must outlive the backend
};

// One op a simulated engine ran (see "Time" above). Times are on std::chrono::steady_clock.
struct SimEngineOp {
  using Clock = std::chrono::steady_clock;
  DeviceEngine engine = DeviceEngine::kCompute;
  std::string name;
  double bytes = -1;        // a copy's bytes; -1 for a kernel
  Clock::time_point ready;  // enqueued, its stream's previous op ended, its events recorded
  Clock::time_point start;  // max(ready, the engine free); real work: not before the host got to it
  Clock::time_point end;  // modelled: start + modelled exactly; real: when the work ended, if later
  Clock::duration modelled{};  // latency + bytes / bandwidth, or the kernel's modelled seconds
  Clock::time_point woke;      // when the engine's thread saw the end on the host's clock
};

class SimBackend final : public Backend {
 public:
  using Clock = std::chrono::steady_clock;
  // EngineOps keeps this many of the most recent ops, and more while engine_intervals needs
  // them (the ops that ended after the `since` of its last query).
  static constexpr size_t kKeptOps = size_t{1} << 15;

  // InvalidArgument naming the field for a zero or absurd capacity (above the machine's
  // memory), or a negative or non-finite bandwidth or latency.
  static StatusOr<std::unique_ptr<SimBackend>> Create(const SimOptions& options);
  ~SimBackend() override;

  Allocator& device_memory() override { return *memory_; }
  // The most recent ops of every engine (kKeptOps, or more; see there), in the order they ended.
  std::vector<SimEngineOp> EngineOps() const;

 private:
  EngineBusyTimes DoBusyTimes() const override;  // each engine's sum of end - start
  std::vector<EngineInterval> DoEngineIntervals(Clock::time_point since) const override;
  class SimStream;
  class SimEvent;
  struct Engine;
  struct OpLog;

  SimBackend(const SimOptions& options, std::unique_ptr<ArenaAllocator> memory);

  StatusOr<StreamPtr> DoCreateStream(std::string_view name) override;
  Status DoDestroyStream(StreamImpl& stream) override;
  StatusOr<EventPtr> DoCreateEvent() override;
  Status DoCopy(const StreamPtr& stream, void* dst, const void* src, size_t bytes,
                CopyKind kind) override;
  Status DoMemset(const StreamPtr& stream, void* dst, uint8_t value, size_t bytes) override;
  Status DoLaunchHostFunction(const StreamPtr& stream, std::string name,
                              std::function<Status()> fn) override;
  Status DoLaunchKernel(const StreamPtr& stream, KernelTask&& task) override;
  Status DoRecordEvent(const EventPtr& event, const StreamPtr& stream) override;
  Status DoWaitEvent(const StreamPtr& stream, const EventPtr& event) override;
  Status DoSynchronizeStream(StreamImpl& stream) override;
  Status DoSynchronizeEvent(EventImpl& event) override;
  bool DoQueryEvent(EventImpl& event) override;

  const SimOptions options_;
  std::unique_ptr<ArenaAllocator> memory_;
  std::unique_ptr<OpLog> ops_;
  std::unique_ptr<Engine> h2d_;
  std::unique_ptr<Engine> d2h_;
  std::unique_ptr<Engine> compute_;
};

StatusOr<std::unique_ptr<Backend>> CreateSimBackend(const SimOptions& options);

}  // namespace ecss
