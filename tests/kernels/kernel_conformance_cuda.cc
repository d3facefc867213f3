// The kernel conformance suite on CUDA (label gpu): compares cuBLAS and our CUDA kernels with
// the CPU implementation. Without a device or driver every test is skipped with the reason.
#include "runtime/device/cuda/cuda_backend.h"
#include "tests/kernels/kernel_conformance.h"

namespace ecss::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Cuda, KernelConformanceTest,
                         ::testing::Values(BackendUnderTest{"cuda",
                                                            [](uint64_t bytes) {
                                                              CudaOptions options;
                                                              options.device_memory_bytes = bytes;
                                                              return CreateCudaBackend(options);
                                                            }}),
                         BackendTestName);

}  // namespace
}  // namespace ecss::testing
