// The kernel conformance suite on the simulated device (real mode), plus what only the sim
// has: timed mode, which takes the cost model's time and computes nothing.
#include <gtest/gtest.h>

#include "kernels/kernel_runner.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/kernels/kernel_conformance.h"

namespace ecss::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Sim, KernelConformanceTest,
                         ::testing::Values(BackendUnderTest{"sim",
                                                            [](uint64_t bytes) {
                                                              SimOptions options;
                                                              options.device_memory_bytes = bytes;
                                                              return CreateSimBackend(options);
                                                            }}),
                         BackendTestName);

TEST(KernelRunnerTimedTest, TimedModeChargesTheCostModelAndSkipsTheNumbers) {
  SimOptions options;
  options.device_memory_bytes = 64 << 20;
  options.kernel_mode = KernelMode::kTimed;
  auto sim = SimBackend::Create(options);
  ASSERT_TRUE(sim.ok());
  auto runner = KernelRunner::Create(**sim);
  ASSERT_TRUE(runner.ok());
  auto stream = CreateOwnedStream(**sim, "compute");
  ASSERT_TRUE(stream.ok());
  const uint32_t offsets[] = {0, 100, 228};
  GroupedFfnProblem p;
  p.d_model = 64;
  p.d_ff = 256;
  p.num_groups = 2;
  p.group_offsets = offsets;
  p.rows = 228;
  p.saved = SavedActivation::kRecompute;
  auto x = (*sim)->device_memory().Allocate(228 * 64 * 4, MemoryTag::kActivations);
  auto y = (*sim)->device_memory().Allocate(228 * 64 * 4, MemoryTag::kActivations);
  auto w = (*sim)->device_memory().Allocate(64 * 256 * 4, MemoryTag::kExpertWeights);
  auto ws = (*sim)->device_memory().Allocate((*runner)->FfnForwardWorkspaceBytes(p),
                                             MemoryTag::kWorkspace);
  ASSERT_TRUE(x.ok() && y.ok() && w.ok() && ws.ok());
  ASSERT_TRUE((*sim)->MemsetAsync(stream->get(), y->data(), 0x7F, y->size()).ok());
  const void* weights[] = {w->data(), w->data()};
  ASSERT_TRUE((*runner)
                  ->FfnForward(stream->get(), p, {x->data(), weights, weights, y->data(), nullptr},
                               {ws->data(), ws->size()})
                  .ok());
  ASSERT_TRUE((*sim)->SynchronizeStream(stream->get()).ok());
  const double want = ModeledSeconds(FfnForwardCost(p), (*runner)->profile());
  EXPECT_GT(want, 0);
  EXPECT_NEAR((*runner)->modeled_seconds(), want, 1e-9);
  // The sim's compute engine was busy for at least the modelled time.
  EXPECT_GE((*sim)->busy_times().compute_busy_seconds, want * 0.999);
  // Nothing was computed: y still holds the memset pattern.
  std::vector<uint8_t> host(y->size());
  ASSERT_TRUE(
      (*sim)
          ->CopyAsync(stream->get(), host.data(), y->data(), y->size(), CopyKind::kDeviceToHost)
          .ok());
  ASSERT_TRUE((*sim)->SynchronizeStream(stream->get()).ok());
  EXPECT_EQ(host[0], 0x7F);
  EXPECT_EQ(host.back(), 0x7F);
}

TEST(CostModelTest, CountsTheGemmFlopsAndRefusesBadProfiles) {
  const uint32_t offsets[] = {0, 512};
  GroupedFfnProblem p;
  p.d_model = 1024;
  p.d_ff = 4096;
  p.num_groups = 1;
  p.group_offsets = offsets;
  p.rows = 512;
  EXPECT_DOUBLE_EQ(FfnForwardGemmFlops(p), 2.0 * 512 * 1024 * 4096 * 2);
  EXPECT_DOUBLE_EQ(FfnBackwardGemmFlops(p), 2.0 * FfnForwardGemmFlops(p));
  p.saved = SavedActivation::kRecompute;
  EXPECT_DOUBLE_EQ(FfnBackwardGemmFlops(p), 2.5 * FfnForwardGemmFlops(p));
  auto h100 = FindDeviceProfile("h100-sxm");
  ASSERT_TRUE(h100.ok());
  // bf16 runs on tensor cores: faster than fp32 for the same GEMMs.
  GroupedFfnProblem bf16 = p;
  bf16.dtype = DType::kBF16;
  EXPECT_LT(ModeledSeconds(FfnForwardCost(bf16), *h100), ModeledSeconds(FfnForwardCost(p), *h100));
  DeviceProfile bad = *h100;
  bad.memory_bandwidth_gbps = 0;
  EXPECT_EQ(ValidateDeviceProfile(bad).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(FindDeviceProfile("tpu").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss::testing
