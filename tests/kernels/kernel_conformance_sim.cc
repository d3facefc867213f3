// The kernel conformance suite on the simulated device (real mode), plus what only the sim
// has: timed mode, which takes the cost model's time and computes nothing.
#include <chrono>
#include <vector>

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
  const void* weights[] = {w->data(), w->data()};
  ASSERT_TRUE((*runner)
                  ->FfnForward(stream->get(), p, {x->data(), weights, weights, y->data(), nullptr},
                               {ws->data(), ws->size()})
                  .ok());
  ASSERT_TRUE((*sim)->SynchronizeStream(stream->get()).ok());
  const double want = ModeledSeconds(FfnForwardCost(p), (*runner)->profile());
  EXPECT_GT(want, 0);
  EXPECT_NEAR((*runner)->modeled_seconds(), want, 1e-9);
  // The sim's compute engine ran one op, for exactly the modelled time.
  const auto modelled =
      std::chrono::duration_cast<SimBackend::Clock::duration>(std::chrono::duration<double>(want));
  std::vector<SimEngineOp> ops = (*sim)->EngineOps();
  ASSERT_EQ(ops.size(), 1u);
  EXPECT_EQ(ops[0].engine, DeviceEngine::kCompute);
  EXPECT_EQ(ops[0].end - ops[0].start, modelled);
  EXPECT_EQ((*sim)->busy_times().compute_busy_seconds,
            static_cast<double>(std::chrono::nanoseconds(modelled).count()) * 1e-9);
}

// A group without rows costs what the CUDA kernels spend on it (kernels/cuda/cuda_kernels.cu):
// no launch in the forward; in the backward, the two memsets that zero its weight gradients,
// none when accumulating. A micro-batch without rows launches nothing forward.
TEST(CostModelTest, GroupsWithoutRowsCostWhatTheCudaKernelsSpend) {
  const uint32_t offsets[] = {0, 3, 3, 8};  // rows 3, 0, 5
  GroupedFfnProblem p;
  p.d_model = 64;
  p.d_ff = 128;
  p.num_groups = 3;
  p.group_offsets = offsets;
  p.rows = 8;
  EXPECT_EQ(FfnForwardCost(p).launches, 2u * 2 + 1);       // 2 GEMMs per busy group + activation
  EXPECT_EQ(FfnBackwardCost(p).launches, 4u * 2 + 2 + 2);  // + activation, its grad, 2 memsets
  EXPECT_EQ(FfnBackwardCost(p, /*accumulate=*/true).launches, 4u * 2 + 2);
  p.saved = SavedActivation::kRecompute;
  EXPECT_EQ(FfnBackwardCost(p).launches, 4u * 2 + 2 + 2 + 2);  // h again per busy group
  // The idle group's weights are not read.
  GroupedFfnProblem busy_only = p;
  const uint32_t two[] = {0, 3, 8};
  busy_only.num_groups = 2;
  busy_only.group_offsets = two;
  EXPECT_DOUBLE_EQ(FfnForwardCost(p).bytes, FfnForwardCost(busy_only).bytes);
  const uint32_t none[] = {0, 0, 0};
  GroupedFfnProblem empty = p;
  empty.num_groups = 2;
  empty.group_offsets = none;
  empty.rows = 0;
  EXPECT_EQ(FfnForwardCost(empty).launches, 0u);
  EXPECT_EQ(ModeledSeconds(FfnForwardCost(empty), *FindDeviceProfile("h100-sxm")), 0.0);
  EXPECT_EQ(FfnBackwardCost(empty, /*accumulate=*/true).launches, 0u);
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
