// The CUDA backend: the Backend interface on CUDA streams and events, a caching device
// allocator that never reserves more than the budget, and pinned host pools registered with
// cudaHostRegister. CUDA errors become Status (Unavailable when no device or driver exists).
// Kernels are launched by kernels/cuda on the stream's native handle; LaunchKernel (host
// KernelTasks) is Unimplemented here.
// On CUDA, an error returned by a host function is sticky for later host functions and for
// SynchronizeStream; device work already enqueued behind it still runs (CUDA cannot be told
// to skip it).
// This header never includes CUDA headers; it is usable in every build, and
// CreateCudaBackend returns Unimplemented when ECSS was built without CUDA.
// Thread-safe, like every Backend.
#pragma once

#include <memory>

#include "runtime/device/backend.h"

namespace ecss {

struct CudaOptions {
  int device = 0;                    // CUDA device ordinal
  uint64_t device_memory_bytes = 0;  // budget of the caching allocator; > 0, at most the device's
  TraceRecorder* trace = nullptr;    // optional, not owned; must outlive the backend
};

// True when this build contains the CUDA backend.
bool CudaBackendCompiled();

// Unavailable when no CUDA device or driver is present (tests skip on it); InvalidArgument for
// a bad device ordinal or budget.
StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaOptions& options);

}  // namespace ecss
