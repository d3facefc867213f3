// The conformance suite on the simulated device: unthrottled, throttled (so that the copy
// engines' pacing path is covered too) and in timed kernel mode.
#include "runtime/device/sim/sim_backend.h"
#include "tests/device/conformance.h"

namespace ecss::testing {
namespace {

BackendUnderTest Sim(std::string name, SimOptions base) {
  return {std::move(name), [base](uint64_t bytes) {
            SimOptions options = base;
            options.device_memory_bytes = bytes;
            return CreateSimBackend(options);
          }};
}

SimOptions Throttled() {
  SimOptions options;
  options.h2d_bandwidth_gbps = 25;
  options.d2h_bandwidth_gbps = 25;
  options.copy_latency_us = 5;
  return options;
}

SimOptions Timed() {
  SimOptions options;
  options.kernel_mode = KernelMode::kTimed;
  return options;
}

INSTANTIATE_TEST_SUITE_P(Sim, BackendConformanceTest,
                         ::testing::Values(Sim("sim", SimOptions{}),
                                           Sim("sim_throttled", Throttled()),
                                           Sim("sim_timed", Timed())),
                         BackendTestName);

}  // namespace
}  // namespace ecss::testing
