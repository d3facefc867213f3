#include "runtime/device/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>

#include "runtime/base/check.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

#if ECSS_HAVE_NCCL
#include <nccl.h>
#endif

namespace ecss {

bool CudaBackendCompiled() { return true; }

namespace {

Status CudaError(cudaError_t error, std::string_view what) {
  const StatusCode code = (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ||
                           error == cudaErrorInitializationError)
                              ? StatusCode::kUnavailable
                          : error == cudaErrorMemoryAllocation ? StatusCode::kResourceExhausted
                          : error == cudaErrorInvalidValue     ? StatusCode::kInvalidArgument
                                                               : StatusCode::kInternal;
  return Status(code,
                StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

#define ECSS_CUDA_RETURN_IF_ERROR(call, what)     \
  do {                                            \
    cudaError_t ecss_cuda_error_ = (call);        \
    if (ecss_cuda_error_ != cudaSuccess) {        \
      return CudaError(ecss_cuda_error_, (what)); \
    }                                             \
  } while (0)

// Caches freed blocks by size class so that steady-state allocation never calls cudaMalloc,
// and keeps the bytes reserved from the driver (live + cached) within the budget: when a new
// block would exceed it, the cache is returned to the driver first.
class CudaCachingAllocator final : public Allocator {
 public:
  CudaCachingAllocator(int device, uint64_t budget)
      : Allocator(StrCat("cuda:", device, " device memory"), Device::Cuda(device), budget, 256),
        device_(device) {}

  ~CudaCachingAllocator() override {
    ReleaseAllForShutdown();
    ReleaseCache();
  }

  bool ContainsAddress(const void* ptr) const override {
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    std::lock_guard<std::mutex> lock(blocks_mutex_);
    auto it = blocks_.upper_bound(address);
    if (it == blocks_.begin()) return false;
    --it;
    return address < it->first + it->second;
  }

 protected:
  StatusOr<void*> DoAllocate(size_t bytes) override {
    const uint64_t size = SizeClass(bytes);
    auto cached = cache_.find(size);
    if (cached != cache_.end()) {
      void* ptr = cached->second;
      cache_.erase(cached);
      cached_bytes_ -= size;
      return ptr;
    }
    if (reserved_bytes_ + size > capacity_bytes()) ReleaseCache();
    if (reserved_bytes_ + size > capacity_bytes()) {
      return ResourceExhaustedError("the budget is reserved by live blocks");
    }
    cudaSetDevice(device_);
    void* ptr = nullptr;
    cudaError_t error = cudaMalloc(&ptr, size);
    if (error != cudaSuccess) {
      cudaGetLastError();  // clear the error so later calls do not see it
      return ResourceExhaustedError(StrCat("cudaMalloc: ", cudaGetErrorString(error)));
    }
    reserved_bytes_ += size;
    std::lock_guard<std::mutex> lock(blocks_mutex_);
    blocks_.emplace(reinterpret_cast<uintptr_t>(ptr), size);
    return ptr;
  }

  void DoFree(void* ptr, size_t bytes) override {
    const uint64_t size = SizeClass(bytes);
    cache_.emplace(size, ptr);
    cached_bytes_ += size;
  }

 private:
  // Small blocks round to 512 B, large ones to 2 MiB, so that freed blocks are reusable
  // (the backend's capabilities say so, for the engine's memory plan).
  static uint64_t SizeClass(uint64_t bytes) {
    const uint64_t granule = bytes < kLargeBlock ? kSmallGranule : kLargeGranule;
    return (bytes + granule - 1) / granule * granule;
  }

 public:
  static inline const BackendCapabilities kRules = AllocationRulesOf(DeviceKind::kCuda);
  static inline const uint64_t kSmallGranule = kRules.device_alignment_bytes;
  static inline const uint64_t kLargeBlock = kRules.device_large_block_bytes;
  static inline const uint64_t kLargeGranule = kRules.device_large_granularity_bytes;

 private:
  void ReleaseCache() {
    cudaSetDevice(device_);
    for (const auto& [size, ptr] : cache_) {
      cudaFree(ptr);
      reserved_bytes_ -= size;
      std::lock_guard<std::mutex> lock(blocks_mutex_);
      blocks_.erase(reinterpret_cast<uintptr_t>(ptr));
    }
    cache_.clear();
    cached_bytes_ = 0;
  }

  const int device_;
  // The following are guarded by Allocator's lock (Do* run under it), except blocks_.
  std::multimap<uint64_t, void*> cache_;  // size class -> free block
  uint64_t cached_bytes_ = 0;
  uint64_t reserved_bytes_ = 0;
  mutable std::mutex blocks_mutex_;
  std::map<uintptr_t, uint64_t> blocks_;  // GUARDED_BY(blocks_mutex_): every reserved block
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(BackendCapabilities caps, const CudaOptions& options)
      : Backend(std::move(caps), options.trace),
        device_(options.device),
        memory_(options.device, options.device_memory_bytes) {}

  ~CudaBackend() override { ShutdownHandles(); }

  Allocator& device_memory() override { return memory_; }

 private:
  struct CudaStream final : StreamImpl {
    cudaStream_t stream = nullptr;
    std::mutex mutex;
    Status host_error;  // GUARDED_BY(mutex): first error of a host function
    Status error() {
      std::lock_guard<std::mutex> lock(mutex);
      return host_error;
    }
  };
  struct CudaEvent final : EventImpl {
    cudaEvent_t event = nullptr;
    std::mutex mutex;
    std::weak_ptr<CudaStream> recorded_on;  // GUARDED_BY(mutex)
    ~CudaEvent() override {
      if (event) cudaEventDestroy(event);
    }
  };
  struct HostCall {
    std::function<Status()> fn;
    CudaStream* stream;
    std::string name;
  };

  static void CUDART_CB RunHostCall(void* data) {
    std::unique_ptr<HostCall> call(static_cast<HostCall*>(data));
    if (!call->stream->error().ok()) return;  // the stream already failed: skip, as on sim
    Status status = call->fn();
    if (!status.ok()) {
      std::lock_guard<std::mutex> lock(call->stream->mutex);
      if (call->stream->host_error.ok()) {
        call->stream->host_error =
            status.Annotate(StrCat("stream '", call->stream->name, "': ", call->name));
      }
    }
  }

  StatusOr<StreamPtr> DoCreateStream(std::string_view) override {
    ECSS_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
    auto stream = std::make_shared<CudaStream>();
    ECSS_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream->stream, cudaStreamNonBlocking),
                              "cudaStreamCreateWithFlags");
    return StreamPtr(std::move(stream));
  }

  Status DoDestroyStream(StreamImpl& impl) override {
    auto& stream = static_cast<CudaStream&>(impl);
    Status status = DoSynchronizeStream(stream);
    cudaStreamDestroy(stream.stream);
    stream.stream = nullptr;
    return status;
  }

  StatusOr<EventPtr> DoCreateEvent() override {
    ECSS_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
    auto event = std::make_shared<CudaEvent>();
    ECSS_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event->event, cudaEventDisableTiming),
                              "cudaEventCreateWithFlags");
    return EventPtr(std::move(event));
  }

  Status DoCopy(const StreamPtr& impl, void* dst, const void* src, size_t bytes,
                CopyKind kind) override {
    const cudaMemcpyKind cuda_kind = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                                     : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                                       : cudaMemcpyDeviceToDevice;
    ECSS_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst, src, bytes, cuda_kind, static_cast<CudaStream&>(*impl).stream),
        StrCat("cudaMemcpyAsync ", CopyKindName(kind), " of ", bytes, " bytes"));
    return Status::Ok();
  }

  Status DoMemset(const StreamPtr& impl, void* dst, uint8_t value, size_t bytes) override {
    ECSS_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(dst, value, bytes, static_cast<CudaStream&>(*impl).stream),
        "cudaMemsetAsync");
    return Status::Ok();
  }

  Status DoLaunchHostFunction(const StreamPtr& impl, std::string name,
                              std::function<Status()> fn) override {
    auto& stream = static_cast<CudaStream&>(*impl);
    auto call = std::make_unique<HostCall>(HostCall{std::move(fn), &stream, std::move(name)});
    ECSS_CUDA_RETURN_IF_ERROR(cudaLaunchHostFunc(stream.stream, &RunHostCall, call.get()),
                              "cudaLaunchHostFunc");
    static_cast<void>(call.release());  // RunHostCall owns and deletes it now
    return Status::Ok();
  }

  StatusOr<void*> DoNativeStream(StreamImpl& impl) override {
    return static_cast<void*>(static_cast<CudaStream&>(impl).stream);
  }

  Status DoRecordEvent(const EventPtr& event_impl, const StreamPtr& stream_impl) override {
    auto& event = static_cast<CudaEvent&>(*event_impl);
    auto stream = std::static_pointer_cast<CudaStream>(stream_impl);
    ECSS_CUDA_RETURN_IF_ERROR(cudaEventRecord(event.event, stream->stream), "cudaEventRecord");
    std::lock_guard<std::mutex> lock(event.mutex);
    event.recorded_on = stream;
    return Status::Ok();
  }

  Status DoWaitEvent(const StreamPtr& stream_impl, const EventPtr& event_impl) override {
    ECSS_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(static_cast<CudaStream&>(*stream_impl).stream,
                                                  static_cast<CudaEvent&>(*event_impl).event, 0),
                              "cudaStreamWaitEvent");
    return Status::Ok();
  }

  Status DoSynchronizeStream(StreamImpl& impl) override {
    auto& stream = static_cast<CudaStream&>(impl);
    ECSS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.stream),
                              StrCat("cudaStreamSynchronize of '", stream.name, "'"));
    return stream.error();
  }

  Status DoSynchronizeEvent(EventImpl& impl) override {
    auto& event = static_cast<CudaEvent&>(impl);
    ECSS_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event.event), "cudaEventSynchronize");
    std::lock_guard<std::mutex> lock(event.mutex);
    auto stream = event.recorded_on.lock();
    return stream ? stream->error() : Status::Ok();
  }

  bool DoQueryEvent(EventImpl& impl) override {
    cudaError_t result = cudaEventQuery(static_cast<CudaEvent&>(impl).event);
    if (result == cudaErrorNotReady) return false;
    if (result != cudaSuccess) cudaGetLastError();
    return true;
  }

  HostRegistration DoHostRegistration() override {
    const int device = device_;
    HostRegistration registration;
    registration.register_memory = [device](void* base, size_t bytes) -> Status {
      ECSS_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
      ECSS_CUDA_RETURN_IF_ERROR(cudaHostRegister(base, bytes, cudaHostRegisterDefault),
                                StrCat("cudaHostRegister of ", HumanBytes(bytes)));
      return Status::Ok();
    };
    registration.unregister_memory = [](void* base) { cudaHostUnregister(base); };
    return registration;
  }

  const int device_;
  CudaCachingAllocator memory_;
};

}  // namespace

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaOptions& options) {
  int count = 0;
  ECSS_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count), "no usable CUDA device");
  if (options.device < 0 || options.device >= count) {
    return InvalidArgumentError(
        StrCat("cuda option device = ", options.device, " but ", count, " device(s) exist"));
  }
  ECSS_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device), "cudaSetDevice");
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  ECSS_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (options.device_memory_bytes == 0 || options.device_memory_bytes > total_bytes) {
    return InvalidArgumentError(
        StrCat("cuda option device_memory_bytes = ", options.device_memory_bytes,
               " must be in (0, ", total_bytes, "] (the device's memory)"));
  }
  cudaDeviceProp properties{};
  ECSS_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, options.device),
                            "cudaGetDeviceProperties");
  BackendCapabilities caps = AllocationRulesOf(DeviceKind::kCuda);
  caps.name = "cuda";
  caps.device_name = properties.name;
  caps.device = Device::Cuda(options.device);
  caps.device_memory_bytes = options.device_memory_bytes;
  caps.host_kernels = false;
  cudaRuntimeGetVersion(&caps.runtime_version);
#if ECSS_HAVE_NCCL
  ncclGetVersion(&caps.nccl_version);
#endif
  return std::unique_ptr<Backend>(new CudaBackend(std::move(caps), options));
}

}  // namespace ecss
