// Builds without CUDA: the CUDA kernels are absent and say so.
#include "kernels/cuda/cuda_kernels.h"

namespace ecss {

bool CudaKernelsCompiled() { return false; }

StatusOr<std::unique_ptr<CudaKernels>> CudaKernels::Create(int) {
  return UnimplementedError("ECSS was built without CUDA (ECSS_CUDA=OFF or no toolkit)");
}

}  // namespace ecss
