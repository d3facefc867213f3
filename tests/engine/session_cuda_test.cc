// The session on a GPU (label gpu): the same training through a session on CUDA and on the
// simulated device running the real CPU kernels. Skipped, with the reason, where no CUDA device
// or driver exists.
//
// Equal on both devices: the initial weights (made on the host) and each step's figures that
// follow from the routing and the budgets (tokens, bytes each way, cache hits and misses,
// experts and parameters updated). Close: the trained weights. cuBLAS sums in another order
// than the CPU kernels (kernel conformance: relative 1e-4 in f32, 2e-2 in bf16 per op), so the
// weights' changes over the run are compared relative to their largest magnitude: within 1e-4
// in f32 and 1e-3 in bf16 (an H200 gave at most 3.5e-6 and 1.8e-7, 2026-11-30). The
// optimizer is AdamW with eps 1, where an update is a smooth function of its gradient (with a
// tiny eps it is the gradient's sign, and a near-zero gradient rounded the other way would
// flip a whole step).
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/str_cat.h"
#include "runtime/device/cuda/cuda_backend.h"
#include "tests/engine/reference_trainer.h"

namespace ecss {
namespace {

using namespace engine_test;  // NOLINT(google-build-using-namespace): the shared harness

// max |(a - a0) - (b - b0)| / max |b - b0| over every expert parameter.
double RelativeChangeError(const Weights& a, const Weights& a0, const Weights& b,
                           const Weights& b0) {
  double largest = 0, error = 0;
  for (size_t l = 0; l < b.size(); ++l) {
    for (size_t e = 0; e < b[l].size(); ++e) {
      for (size_t i = 0; i < b[l][e].size(); ++i) {
        const double want = double{b[l][e][i]} - double{b0[l][e][i]};
        const double got = double{a[l][e][i]} - double{a0[l][e][i]};
        largest = std::max(largest, std::abs(want));
        error = std::max(error, std::abs(got - want));
      }
    }
  }
  return largest > 0 ? error / largest : error;
}

TEST(SessionCudaTest, TrainsAsOnTheSimulatedDevice) {
  {
    CudaOptions probe;
    probe.device_memory_bytes = 1 << 20;
    StatusOr<std::unique_ptr<Backend>> cuda = CreateCudaBackend(probe);
    if (!cuda.ok()) GTEST_SKIP() << cuda.status();
  }
  char dir_template[] = "/tmp/ecss-session-cuda-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  // Every strategy in both dtypes, states and weights on NVMe, a learned gate, clipping (the
  // norm's kernel) and the delayed update.
  std::vector<std::pair<std::string, RunConfig>> configs;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
      for (bool nvme : {false, true}) {
        if (nvme && dtype != DType::kBF16) continue;  // NVMe states need bf16 compute weights
        RunConfig c;
        c.dtype = dtype;
        c.strategy = strategy;
        if (nvme) {
          c.nvme_dir = dir;
          c.nvme_weights = true;
        }
        configs.emplace_back(
            StrCat(DTypeName(dtype), " ", StrategyName(strategy), nvme ? " nvme" : " host"), c);
      }
    }
  }
  RunConfig gated;
  gated.gated = true;
  configs.emplace_back("f32 ecss gate", gated);
  RunConfig clipped;
  clipped.max_grad_norm = 0.5f;
  configs.emplace_back("f32 ecss clipped", clipped);
  RunConfig delayed;
  delayed.dtype = DType::kBF16;
  delayed.delayed = true;
  configs.emplace_back("bf16 ecss delayed", delayed);

  for (auto& [name, c] : configs) {
    SCOPED_TRACE(name);
    c.micro_batches = 2;
    c.steps = 3;
    c.eps = 1.0f;
    RunConfig initial = c;
    initial.steps = 0;
    std::vector<StepStats> sim_stats, cuda_stats;
    c.device = initial.device = "sim";
    const Weights sim_initial = TrainSession(initial);
    const Weights sim_trained = TrainSession(c, &sim_stats);
    c.device = initial.device = "cuda";
    const Weights cuda_initial = TrainSession(initial);
    const Weights cuda_trained = TrainSession(c, &cuda_stats);

    ASSERT_EQ(cuda_initial.size(), sim_initial.size());
    for (size_t l = 0; l < sim_initial.size(); ++l) {
      ASSERT_EQ(cuda_initial[l], sim_initial[l]) << "initial weights, layer " << l;
    }
    ASSERT_EQ(cuda_stats.size(), sim_stats.size());
    for (size_t s = 0; s < sim_stats.size(); ++s) {
      SCOPED_TRACE(::testing::Message() << "step " << s);
      EXPECT_EQ(cuda_stats[s].tokens, sim_stats[s].tokens);
      EXPECT_EQ(cuda_stats[s].h2d_bytes, sim_stats[s].h2d_bytes);
      EXPECT_EQ(cuda_stats[s].d2h_bytes, sim_stats[s].d2h_bytes);
      EXPECT_EQ(cuda_stats[s].expert_fetch_bytes, sim_stats[s].expert_fetch_bytes);
      EXPECT_EQ(cuda_stats[s].gradient_bytes, sim_stats[s].gradient_bytes);
      EXPECT_EQ(cuda_stats[s].nvme_bytes, sim_stats[s].nvme_bytes);
      EXPECT_EQ(cuda_stats[s].cache_hits, sim_stats[s].cache_hits);
      EXPECT_EQ(cuda_stats[s].cache_misses, sim_stats[s].cache_misses);
      EXPECT_EQ(cuda_stats[s].updated_experts, sim_stats[s].updated_experts);
      EXPECT_EQ(cuda_stats[s].updated_params, sim_stats[s].updated_params);
    }
    const double error = RelativeChangeError(cuda_trained, cuda_initial, sim_trained, sim_initial);
    const double tolerance = c.dtype == DType::kF32 ? 1e-4 : 1e-3;
    std::cout << "  " << name << ": weight changes differ by " << error
              << " of the largest (tolerance " << tolerance << ")\n";
    EXPECT_LT(error, tolerance);
    EXPECT_TRUE(std::isfinite(error));
    EXPECT_NE(sim_trained, sim_initial);  // something was trained
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace ecss
