#include "runtime/device/backend.h"

#include <utility>

#include "runtime/base/check.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {
std::atomic<uint32_t> g_next_backend_uid{1};
}  // namespace

BackendCapabilities AllocationRulesOf(DeviceKind kind) {
  BackendCapabilities caps;
  caps.device_alignment_bytes = 256;
  if (kind == DeviceKind::kCuda) {
    caps.device_alignment_bytes = 512;
    caps.device_large_block_bytes = uint64_t{1} << 20;
    caps.device_large_granularity_bytes = uint64_t{2} << 20;
  }
  return caps;
}

std::string_view CopyKindName(CopyKind kind) {
  switch (kind) {
    case CopyKind::kHostToDevice:
      return "h2d";
    case CopyKind::kDeviceToHost:
      return "d2h";
    case CopyKind::kDeviceToDevice:
      return "d2d";
  }
  return "invalid";
}

std::string_view KernelModeName(KernelMode mode) {
  return mode == KernelMode::kReal ? "real" : "timed";
}

StatusOr<KernelMode> ParseKernelMode(std::string_view name) {
  if (name == "real") return KernelMode::kReal;
  if (name == "timed") return KernelMode::kTimed;
  return InvalidArgumentError(StrCat("unknown kernel mode '", name, "' (expected real or timed)"));
}

Backend::Backend(BackendCapabilities capabilities, TraceRecorder* trace)
    : uid_(g_next_backend_uid.fetch_add(1)),
      capabilities_(std::move(capabilities)),
      trace_(trace),
      streams_(uid_, "stream"),
      events_(uid_, "event") {}

Backend::~Backend() = default;

void Backend::ShutdownHandles() {
  for (const StreamPtr& stream : streams_.Clear()) {
    Status status = DoDestroyStream(*stream);
    if (!status.ok()) {
      ECSS_LOG(Warning) << capabilities_.name << ": stream '" << stream->name
                        << "' had failed before shutdown: " << status;
    }
  }
  events_.Clear();
}

StatusOr<Stream> Backend::CreateStream(std::string_view name) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr stream, DoCreateStream(name));
  stream->name = std::string(name);
  return streams_.Insert(std::move(stream));
}

Status Backend::DestroyStream(Stream stream) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Remove(stream));
  return DoDestroyStream(*impl);
}

StatusOr<Event> Backend::CreateEvent() {
  ECSS_ASSIGN_OR_RETURN(EventPtr event, DoCreateEvent());
  return events_.Insert(std::move(event));
}

Status Backend::DestroyEvent(Event event) { return events_.Remove(event).status(); }

StatusOr<std::string> Backend::StreamName(Stream stream) const {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  return impl->name;
}

Status Backend::CheckDeviceRange(const void* ptr, size_t bytes, std::string_view what) {
  if (ptr == nullptr) return InvalidArgumentError(StrCat(what, " is null"));
  return device_memory().CheckRange(ptr, bytes, what);
}

Status Backend::CheckHostPointer(const void* ptr, std::string_view what) {
  if (ptr == nullptr) return InvalidArgumentError(StrCat(what, " is null"));
  if (device_memory().ContainsAddress(ptr)) {
    return InvalidArgumentError(StrCat(what, " ", ptr, " points into device memory of ",
                                       capabilities_.name, "; use a device-side copy kind"));
  }
  return Status::Ok();
}

Status Backend::CopyAsync(Stream stream, void* dst, const void* src, size_t bytes, CopyKind kind) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  if (bytes == 0) return Status::Ok();
  const std::string_view name = CopyKindName(kind);
  switch (kind) {
    case CopyKind::kHostToDevice:
      ECSS_RETURN_IF_ERROR(CheckDeviceRange(dst, bytes, StrCat(name, " copy destination")));
      ECSS_RETURN_IF_ERROR(CheckHostPointer(src, StrCat(name, " copy source")));
      break;
    case CopyKind::kDeviceToHost:
      ECSS_RETURN_IF_ERROR(CheckDeviceRange(src, bytes, StrCat(name, " copy source")));
      ECSS_RETURN_IF_ERROR(CheckHostPointer(dst, StrCat(name, " copy destination")));
      break;
    case CopyKind::kDeviceToDevice: {
      ECSS_RETURN_IF_ERROR(CheckDeviceRange(dst, bytes, StrCat(name, " copy destination")));
      ECSS_RETURN_IF_ERROR(CheckDeviceRange(src, bytes, StrCat(name, " copy source")));
      const auto d = reinterpret_cast<uintptr_t>(dst);
      const auto s = reinterpret_cast<uintptr_t>(src);
      if (d < s + bytes && s < d + bytes) {
        return InvalidArgumentError(
            StrCat("d2d copy of ", bytes, " bytes: source and destination overlap"));
      }
      break;
    }
    default:
      return InvalidArgumentError(StrCat("invalid copy kind ", static_cast<int>(kind)));
  }
  ECSS_RETURN_IF_ERROR(DoCopy(impl, dst, src, bytes, kind));
  copy_bytes_[static_cast<int>(kind)].fetch_add(bytes, std::memory_order_relaxed);
  copy_count_[static_cast<int>(kind)].fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

Status Backend::MemsetAsync(Stream stream, void* device_dst, uint8_t value, size_t bytes) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  if (bytes == 0) return Status::Ok();
  ECSS_RETURN_IF_ERROR(CheckDeviceRange(device_dst, bytes, "memset destination"));
  return DoMemset(impl, device_dst, value, bytes);
}

Status Backend::LaunchHostFunction(Stream stream, std::string name, std::function<Status()> fn) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  if (!fn) return InvalidArgumentError(StrCat("host function '", name, "' is empty"));
  return DoLaunchHostFunction(impl, std::move(name), std::move(fn));
}

Status Backend::LaunchKernel(Stream stream, KernelTask task) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  if (!capabilities_.host_kernels) {
    return UnimplementedError(StrCat(capabilities_.name, " backend does not run host kernels ('",
                                     task.name, "'); launch its device implementation"));
  }
  if (capabilities_.kernel_mode == KernelMode::kReal && !task.compute) {
    return InvalidArgumentError(
        StrCat("kernel '", task.name, "' has no computation for real mode"));
  }
  if (!(task.modeled_seconds >= 0)) {  // also rejects NaN
    return InvalidArgumentError(
        StrCat("kernel '", task.name, "' modeled time ", task.modeled_seconds, " s is not >= 0"));
  }
  return DoLaunchKernel(impl, std::move(task));
}

// Unreached: LaunchKernel refuses first when capabilities().host_kernels is false.
Status Backend::DoLaunchKernel(const StreamPtr&, KernelTask&&) {
  return UnimplementedError("this backend does not run host kernels");
}

StatusOr<void*> Backend::NativeStream(Stream stream) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  return DoNativeStream(*impl);
}

StatusOr<void*> Backend::DoNativeStream(StreamImpl&) {
  return UnimplementedError(StrCat(capabilities_.name, " backend has no native streams"));
}

Status Backend::RecordEvent(Event event, Stream stream) {
  ECSS_ASSIGN_OR_RETURN(EventPtr event_impl, events_.Get(event));
  ECSS_ASSIGN_OR_RETURN(StreamPtr stream_impl, streams_.Get(stream));
  return DoRecordEvent(event_impl, stream_impl);
}

Status Backend::WaitEvent(Stream stream, Event event) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr stream_impl, streams_.Get(stream));
  ECSS_ASSIGN_OR_RETURN(EventPtr event_impl, events_.Get(event));
  return DoWaitEvent(stream_impl, event_impl);
}

Status Backend::SynchronizeStream(Stream stream) {
  ECSS_ASSIGN_OR_RETURN(StreamPtr impl, streams_.Get(stream));
  return DoSynchronizeStream(*impl);
}

Status Backend::SynchronizeEvent(Event event) {
  ECSS_ASSIGN_OR_RETURN(EventPtr impl, events_.Get(event));
  return DoSynchronizeEvent(*impl);
}

StatusOr<bool> Backend::QueryEvent(Event event) {
  ECSS_ASSIGN_OR_RETURN(EventPtr impl, events_.Get(event));
  return DoQueryEvent(*impl);
}

Status Backend::SynchronizeAll() {
  Status first;
  for (const StreamPtr& stream : streams_.Live()) {
    Status status = DoSynchronizeStream(*stream);
    if (first.ok() && !status.ok()) first = status.Annotate(StrCat("stream '", stream->name, "'"));
  }
  return first;
}

StatusOr<std::unique_ptr<PinnedHostPool>> Backend::CreatePinnedPool(
    const PinnedPoolOptions& options) {
  return PinnedHostPool::Create(options, DoHostRegistration());
}

CopyStats Backend::copy_stats() const {
  CopyStats stats;
  for (int i = 0; i < 3; ++i) {
    stats.bytes[i] = copy_bytes_[i].load(std::memory_order_relaxed);
    stats.copies[i] = copy_count_[i].load(std::memory_order_relaxed);
  }
  return stats;
}

// ---- RAII owners ------------------------------------------------------------------------

OwnedStream::OwnedStream(OwnedStream&& other) noexcept
    : backend_(std::exchange(other.backend_, nullptr)), stream_(std::exchange(other.stream_, {})) {}

OwnedStream& OwnedStream::operator=(OwnedStream&& other) noexcept {
  if (this != &other) {
    Destroy().IgnoreError();
    backend_ = std::exchange(other.backend_, nullptr);
    stream_ = std::exchange(other.stream_, {});
  }
  return *this;
}

OwnedStream::~OwnedStream() {
  Status status = Destroy();
  if (!status.ok()) ECSS_LOG(Warning) << "stream destroyed with an error: " << status;
}

Status OwnedStream::Destroy() {
  if (backend_ == nullptr) return Status::Ok();
  Status status = backend_->DestroyStream(stream_);
  backend_ = nullptr;
  stream_ = {};
  return status;
}

OwnedEvent::OwnedEvent(OwnedEvent&& other) noexcept
    : backend_(std::exchange(other.backend_, nullptr)), event_(std::exchange(other.event_, {})) {}

OwnedEvent& OwnedEvent::operator=(OwnedEvent&& other) noexcept {
  if (this != &other) {
    Destroy().IgnoreError();
    backend_ = std::exchange(other.backend_, nullptr);
    event_ = std::exchange(other.event_, {});
  }
  return *this;
}

OwnedEvent::~OwnedEvent() { Destroy().IgnoreError(); }

Status OwnedEvent::Destroy() {
  if (backend_ == nullptr) return Status::Ok();
  Status status = backend_->DestroyEvent(event_);
  backend_ = nullptr;
  event_ = {};
  return status;
}

StatusOr<OwnedStream> CreateOwnedStream(Backend& backend, std::string_view name) {
  ECSS_ASSIGN_OR_RETURN(Stream stream, backend.CreateStream(name));
  return OwnedStream(&backend, stream);
}

StatusOr<OwnedEvent> CreateOwnedEvent(Backend& backend) {
  ECSS_ASSIGN_OR_RETURN(Event event, backend.CreateEvent());
  return OwnedEvent(&backend, event);
}

}  // namespace ecss
