// The conformance suite on the CUDA backend (label gpu). Without a device or driver every test
// is skipped with the reason.
#include "runtime/device/cuda/cuda_backend.h"
#include "tests/device/conformance.h"

namespace ecss::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Cuda, BackendConformanceTest,
                         ::testing::Values(BackendUnderTest{"cuda",
                                                            [](uint64_t bytes) {
                                                              CudaOptions options;
                                                              options.device_memory_bytes = bytes;
                                                              return CreateCudaBackend(options);
                                                            }}),
                         BackendTestName);

}  // namespace
}  // namespace ecss::testing
