// One entry point that creates any backend from a kind and its options, so that tools, tests
// and the engine choose a backend with a setting ("sim" or "cuda").
// Thread-safe; creation may block (CUDA initialisation).
#pragma once

#include <memory>
#include <string_view>

#include "runtime/device/backend.h"
#include "runtime/device/cuda/cuda_backend.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss {

enum class BackendKind : uint8_t { kSim, kCuda };
std::string_view BackendKindName(BackendKind kind);
StatusOr<BackendKind> ParseBackendKind(std::string_view name);

struct BackendOptions {
  BackendKind kind = BackendKind::kSim;
  SimOptions sim;    // used when kind == kSim
  CudaOptions cuda;  // used when kind == kCuda
};

StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

}  // namespace ecss
