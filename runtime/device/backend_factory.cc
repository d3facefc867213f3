#include "runtime/device/backend_factory.h"

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

#if !ECSS_HAVE_CUDA
bool CudaBackendCompiled() { return false; }

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaOptions&) {
  return UnimplementedError(
      "this build of ECSS has no CUDA backend (configure with ECSS_CUDA=ON and a CUDA toolkit)");
}
#endif

}  // namespace ecss
