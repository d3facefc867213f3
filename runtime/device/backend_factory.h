// One entry point that creates any backend from a kind and its options, so that tools, tests
// and the engine choose a backend with a setting (ParseDeviceSetting: sim, sim-timed, cuda:N).
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

// The device setting every tool and example takes (`--device`), as backend options:
//   sim        the simulated device running the real (CPU) kernels: results are computed;
//   sim-timed  the simulated device in timed mode: kernels and copies take the modelled time
//              and compute nothing (benchmarks of the schedule);
//   cuda, cuda:N  CUDA device N (default 0).
// Only the kind, the sim's kernel mode and the CUDA ordinal are set; budgets and the rest
// stay the defaults for the caller to fill. InvalidArgument naming the setting otherwise.
StatusOr<BackendOptions> ParseDeviceSetting(std::string_view setting);
inline constexpr std::string_view kDeviceSettingHelp = "sim, sim-timed, cuda or cuda:N";

}  // namespace ecss
