// Backend: the narrow interface between ECSS and a device (DESIGN.md section 5), in the spirit
// of ggml-backend. A backend creates streams and events, owns the device memory allocator,
// creates pinned host pools registered for DMA, and runs stream-ordered work: copies, memsets,
// host functions and (on backends that execute kernels on the host) KernelTasks.
//
// Public calls are non-virtual: they check their arguments once (handles, null pointers,
// ranges against live allocations, copy direction) and then call the backend's Do* method.
// Enqueueing calls never block; the first error that stream-ordered work hits on a stream is
// sticky: later work on that stream is skipped, events recorded after it carry the error to
// streams that wait on them, and SynchronizeStream returns it (as a CUDA stream would).
//
// Implementations: sim (sim/sim_backend.h), cuda (cuda/cuda_backend.h, built with ECSS_CUDA).
// Thread-safe: any thread may use any stream; work on one stream runs in enqueue order.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/device_id.h"
#include "runtime/base/status.h"
#include "runtime/base/trace.h"
#include "runtime/device/allocator.h"
#include "runtime/device/handle_table.h"
#include "runtime/device/handles.h"
#include "runtime/device/pinned_pool.h"

namespace ecss {

enum class CopyKind : uint8_t { kHostToDevice, kDeviceToHost, kDeviceToDevice };
std::string_view CopyKindName(CopyKind kind);  // "h2d", "d2h", "d2d"

// How the simulated device treats kernels (DESIGN.md section 5).
enum class KernelMode : uint8_t {
  kReal,   // run the computation on the CPU: for correctness
  kTimed,  // take the cost model's time and skip the numbers: for pipeline timing
};
std::string_view KernelModeName(KernelMode mode);
StatusOr<KernelMode> ParseKernelMode(std::string_view name);

// A kernel for backends that execute kernels on the host (capabilities().host_kernels).
struct KernelTask {
  std::string name;                 // shown in traces and errors
  std::function<Status()> compute;  // kReal: the computation (runs on the stream's worker)
  double modeled_seconds = 0;       // kTimed: the device time the cost model predicts (>= 0)
};

struct BackendCapabilities {
  std::string name;         // "sim", "cuda"
  std::string device_name;  // "simulated device", "NVIDIA H100 80GB HBM3"
  Device device;
  uint64_t device_memory_bytes = 0;  // the hard budget of device_memory()
  bool host_kernels = false;         // LaunchKernel accepts KernelTasks
  KernelMode kernel_mode = KernelMode::kReal;
  // How device_memory() reserves a block: a multiple of device_alignment_bytes, and blocks of
  // at least device_large_block_bytes (0: no such rule) rounded up to
  // device_large_granularity_bytes (CUDA's caching allocator: 512 B; 1 MiB and up to 2 MiB).
  uint64_t device_alignment_bytes = 256;
  uint64_t device_large_block_bytes = 0;
  uint64_t device_large_granularity_bytes = 0;
  double h2d_bandwidth_gbps = 0;  // modelled copy bandwidth; 0 = unthrottled / not modelled
  double d2h_bandwidth_gbps = 0;
  int runtime_version = 0;  // CUDA runtime version; 0 elsewhere
  int nccl_version = 0;     // NCCL version when built with it; 0 elsewhere
};

// How each kind of device's memory reserves blocks: the device_* fields of its backend's
// capabilities, the rest default. The sim's arena rounds to 256 B; CUDA's caching allocator to
// 512 B, and blocks of 1 MiB or more to 2 MiB (what PyTorch's does). For planning a device this
// machine does not have (tools/plan); the backends fill their capabilities from it.
BackendCapabilities AllocationRulesOf(DeviceKind kind);

// Busy time of the device's engines since the backend was created: the seconds in which each
// ran work (a copy engine per direction; the compute engine). What the engine measures as its
// resources' use. `measured` is false on a backend that does not keep them (then all are 0).
struct EngineBusyTimes {
  double h2d_busy_seconds = 0;
  double d2h_busy_seconds = 0;
  double compute_busy_seconds = 0;
  bool measured = false;
};

// One stretch in which a device engine was busy (the sim's modelled time).
enum class DeviceEngine : uint8_t { kCompute, kH2D, kD2H };
struct EngineInterval {
  DeviceEngine engine = DeviceEngine::kCompute;
  std::chrono::steady_clock::time_point start, end;
};

// Bytes and copies enqueued, per direction.
struct CopyStats {
  uint64_t bytes[3] = {0, 0, 0};  // indexed by CopyKind
  uint64_t copies[3] = {0, 0, 0};
};

class Backend {
 public:
  virtual ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  const BackendCapabilities& capabilities() const { return capabilities_; }
  Device device() const { return capabilities_.device; }
  uint32_t uid() const { return uid_; }
  // Device memory, with the hard budget capabilities().device_memory_bytes.
  virtual Allocator& device_memory() = 0;

  // ---- Streams and events -----------------------------------------------------------------
  StatusOr<Stream> CreateStream(std::string_view name);
  // Waits for the stream's queued work, then destroys it; returns its sticky error, if any.
  Status DestroyStream(Stream stream);
  StatusOr<Event> CreateEvent();
  Status DestroyEvent(Event event);
  StatusOr<std::string> StreamName(Stream stream) const;

  // ---- Stream-ordered work (never blocks) ---------------------------------------------------
  // Copies `bytes` from src to dst. Device-side ranges must lie inside live allocations of
  // device_memory(); host-side pointers must not point into device memory; a device-to-device
  // copy's ranges must not overlap. Zero bytes is a no-op.
  Status CopyAsync(Stream stream, void* dst, const void* src, size_t bytes, CopyKind kind);
  Status MemsetAsync(Stream stream, void* device_dst, uint8_t value, size_t bytes);
  // Runs `fn` on the host after the work before it on `stream`; an error it returns becomes
  // the stream's sticky error. `fn` must not enqueue work on or synchronise this backend.
  Status LaunchHostFunction(Stream stream, std::string name, std::function<Status()> fn);
  // Unimplemented on backends without host_kernels.
  Status LaunchKernel(Stream stream, KernelTask task);
  // The backend's own handle of `stream` (a cudaStream_t on CUDA), for kernels/ to launch
  // device code on; Unimplemented on backends that have none (sim).
  StatusOr<void*> NativeStream(Stream stream);
  // The event completes when the work enqueued on `stream` before this call has completed.
  Status RecordEvent(Event event, Stream stream);
  // Work enqueued on `stream` after this call waits for the event's latest recording (as of
  // this call); waiting on a never-recorded event is a no-op, as in CUDA.
  Status WaitEvent(Stream stream, Event event);

  // ---- Host synchronisation (blocks) ------------------------------------------------------
  Status SynchronizeStream(Stream stream);
  // Waits for the event's latest recording; returns the error its stream had hit, if any.
  Status SynchronizeEvent(Event event);
  // True when the event's latest recording has completed (or it was never recorded).
  StatusOr<bool> QueryEvent(Event event);
  // Synchronises every stream; returns the first sticky error found.
  Status SynchronizeAll();

  // ---- Host memory ------------------------------------------------------------------------
  // A pinned host pool registered with this backend for DMA.
  StatusOr<std::unique_ptr<PinnedHostPool>> CreatePinnedPool(const PinnedPoolOptions& options);

  CopyStats copy_stats() const;
  EngineBusyTimes busy_times() const { return DoBusyTimes(); }
  // When the engines were busy, for the stretches that ended after `since`; empty where the
  // backend keeps none (CUDA). The sim keeps every op that ended after the last query's
  // `since`, so querying step by step (each `since` at or after the one before) loses none.
  std::vector<EngineInterval> engine_intervals(std::chrono::steady_clock::time_point since) const {
    return DoEngineIntervals(since);
  }
  TraceRecorder* trace() const { return trace_; }

 protected:
  struct StreamImpl {
    virtual ~StreamImpl() = default;
    std::string name;
  };
  struct EventImpl {
    virtual ~EventImpl() = default;
  };
  using StreamPtr = std::shared_ptr<StreamImpl>;
  using EventPtr = std::shared_ptr<EventImpl>;

  // `trace` may be null; it must outlive the backend.
  Backend(BackendCapabilities capabilities, TraceRecorder* trace);

  virtual StatusOr<StreamPtr> DoCreateStream(std::string_view name) = 0;
  // Drains and releases the stream; returns its sticky error.
  virtual Status DoDestroyStream(StreamImpl& stream) = 0;
  virtual StatusOr<EventPtr> DoCreateEvent() = 0;
  virtual Status DoCopy(const StreamPtr& stream, void* dst, const void* src, size_t bytes,
                        CopyKind kind) = 0;
  virtual Status DoMemset(const StreamPtr& stream, void* dst, uint8_t value, size_t bytes) = 0;
  virtual Status DoLaunchHostFunction(const StreamPtr& stream, std::string name,
                                      std::function<Status()> fn) = 0;
  virtual Status DoLaunchKernel(const StreamPtr& stream, KernelTask&& task);
  virtual StatusOr<void*> DoNativeStream(StreamImpl& stream);
  virtual Status DoRecordEvent(const EventPtr& event, const StreamPtr& stream) = 0;
  virtual Status DoWaitEvent(const StreamPtr& stream, const EventPtr& event) = 0;
  virtual Status DoSynchronizeStream(StreamImpl& stream) = 0;
  virtual Status DoSynchronizeEvent(EventImpl& event) = 0;
  virtual bool DoQueryEvent(EventImpl& event) = 0;
  virtual EngineBusyTimes DoBusyTimes() const { return {}; }
  virtual std::vector<EngineInterval> DoEngineIntervals(
      std::chrono::steady_clock::time_point /*since*/) const {
    return {};
  }
  // How this backend registers host memory for DMA (empty functions: nothing to do).
  virtual HostRegistration DoHostRegistration() { return {}; }

  // Subclasses call this first in their destructor: destroys every stream and event still
  // alive (draining their work) while the subclass's state still exists.
  void ShutdownHandles();

 private:
  Status CheckDeviceRange(const void* ptr, size_t bytes, std::string_view what);
  Status CheckHostPointer(const void* ptr, std::string_view what);

  const uint32_t uid_;
  BackendCapabilities capabilities_;
  TraceRecorder* const trace_;
  HandleTable<StreamTag, StreamImpl> streams_;
  HandleTable<EventTag, EventImpl> events_;
  std::atomic<uint64_t> copy_bytes_[3] = {0, 0, 0};
  std::atomic<uint64_t> copy_count_[3] = {0, 0, 0};
};

// RAII owners of a stream / event: destroy it when they go out of scope. Move-only.
class OwnedStream {
 public:
  OwnedStream() = default;
  OwnedStream(Backend* backend, Stream stream) : backend_(backend), stream_(stream) {}
  OwnedStream(OwnedStream&& other) noexcept;
  OwnedStream& operator=(OwnedStream&& other) noexcept;
  ~OwnedStream();
  Stream get() const { return stream_; }
  // Destroys now and returns the stream's sticky error.
  Status Destroy();

 private:
  Backend* backend_ = nullptr;
  Stream stream_;
};

class OwnedEvent {
 public:
  OwnedEvent() = default;
  OwnedEvent(Backend* backend, Event event) : backend_(backend), event_(event) {}
  OwnedEvent(OwnedEvent&& other) noexcept;
  OwnedEvent& operator=(OwnedEvent&& other) noexcept;
  ~OwnedEvent();
  Event get() const { return event_; }
  Status Destroy();

 private:
  Backend* backend_ = nullptr;
  Event event_;
};

StatusOr<OwnedStream> CreateOwnedStream(Backend& backend, std::string_view name);
StatusOr<OwnedEvent> CreateOwnedEvent(Backend& backend);

}  // namespace ecss
