// The simulated device: the same Backend interface as CUDA, on the host, so that every path of
// the runtime is testable on a machine without a GPU (DESIGN.md section 5).
//  - Device memory is an ArenaAllocator with a hard capacity: over-allocation returns
//    ResourceExhausted and leaves the arena intact, as cudaMalloc would.
//  - Each stream is an in-order queue on its own worker thread; events order streams.
//  - One H2D and one D2H copy engine, shared by all streams, each serialising its copies and
//    modelling bandwidth and latency: a throttled copy of B bytes occupies its engine for at
//    least latency + B / bandwidth (1 GB/s = 1e9 bytes/s). Unthrottled by default.
//  - Kernels run on one compute engine shared by all streams, in `real` mode (the CPU
//    computes the numbers) or `timed` mode (the engine is busy for the task's modelled time
//    and the numbers are skipped).
// Thread-safe, like every Backend. Calls that enqueue never block; synchronise calls do.
#pragma once

#include <memory>

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

class SimBackend final : public Backend {
 public:
  // InvalidArgument naming the field for a zero or absurd capacity (above the machine's
  // memory), or a negative or non-finite bandwidth or latency.
  static StatusOr<std::unique_ptr<SimBackend>> Create(const SimOptions& options);
  ~SimBackend() override;

  Allocator& device_memory() override { return *memory_; }

 private:
  EngineBusyTimes DoBusyTimes() const override;  // each simulated engine's, measured
  class SimStream;
  class SimEvent;
  struct Engine;

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
  std::unique_ptr<Engine> h2d_;
  std::unique_ptr<Engine> d2h_;
  std::unique_ptr<Engine> compute_;
};

StatusOr<std::unique_ptr<Backend>> CreateSimBackend(const SimOptions& options);

}  // namespace ecss
