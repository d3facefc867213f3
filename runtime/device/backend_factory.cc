#include "runtime/device/backend_factory.h"

#include <algorithm>
#include <charconv>

#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view BackendKindName(BackendKind kind) {
  return kind == BackendKind::kSim ? "sim" : "cuda";
}

StatusOr<BackendKind> ParseBackendKind(std::string_view name) {
  if (name == "sim") return BackendKind::kSim;
  if (name == "cuda") return BackendKind::kCuda;
  return InvalidArgumentError(StrCat("unknown backend '", name, "' (expected sim or cuda)"));
}

StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  if (options.kind == BackendKind::kCuda) return CreateCudaBackend(options.cuda);
  return CreateSimBackend(options.sim);
}

StatusOr<BackendOptions> ParseDeviceSetting(std::string_view setting) {
  BackendOptions options;
  if (setting == "sim") return options;
  if (setting == "sim-timed") {
    options.sim.kernel_mode = KernelMode::kTimed;
    return options;
  }
  if (setting.substr(0, 4) == "cuda") {
    options.kind = BackendKind::kCuda;
    if (setting.size() == 4) return options;
    const std::string_view ordinal = setting.substr(5);
    int device = 0;
    const auto [end, error] =
        std::from_chars(ordinal.data(), ordinal.data() + ordinal.size(), device);
    const bool digits =
        std::all_of(ordinal.begin(), ordinal.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (setting[4] == ':' && !ordinal.empty() && digits && error == std::errc() &&
        end == ordinal.data() + ordinal.size() && device >= 0) {
      options.cuda.device = device;
      return options;
    }
  }
  return InvalidArgumentError(
      StrCat("unknown device '", setting, "' (expected ", kDeviceSettingHelp, ")"));
}

#if !ECSS_HAVE_CUDA
bool CudaBackendCompiled() { return false; }

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaOptions&) {
  return UnimplementedError(
      "this build of ECSS has no CUDA backend (configure with ECSS_CUDA=ON and a CUDA toolkit)");
}
#endif

}  // namespace ecss
