// Google Benchmark microbenchmarks for the step plan: BuildStepPlan runs on the driving thread
// at every BeginStep, before the step's first op, so its cost is the step's begin.
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "engine/step_plan.h"

namespace ecss {
namespace {

// An RRE step of 2 micro-batches over `layers` layers of 256 experts, each micro-batch routing
// to 64 experts a layer, with the device cache holding `slots` experts: a cache that misses on
// every eighth access or so, whose evictions each choose among thousands of residents. The
// cache carries over from step to step, as in training.
void BM_BuildStepPlan(benchmark::State& state) {
  const auto layers = static_cast<uint32_t>(state.range(0));
  const auto slots = static_cast<uint32_t>(state.range(1));
  constexpr uint32_t kExperts = 256, kActive = 64, kMicroBatches = 2;
  StepPlanInputs in;
  in.model.d_model = 64;
  in.model.d_ff = 256;
  in.model.d_in = 256;
  in.model.params = 2 * 64 * 256;
  in.model.experts_per_layer.assign(layers, kExperts);
  in.policy.cache_slots = slots;
  std::mt19937 rng(1);
  std::vector<uint32_t> all(kExperts);
  std::iota(all.begin(), all.end(), 0u);
  // A few steps' routings, reused in turn.
  std::vector<std::vector<MicroBatchRoute>> steps(4);
  for (std::vector<MicroBatchRoute>& step : steps) {
    for (uint32_t b = 0; b < kMicroBatches; ++b) {
      MicroBatchRoute route;
      route.tokens = 1024;
      route.plan_bytes = 4096;
      for (uint32_t l = 0; l < layers; ++l) {
        std::shuffle(all.begin(), all.end(), rng);
        LayerRoute layer{std::vector<uint32_t>(all.begin(), all.begin() + kActive), {}};
        std::sort(layer.experts.begin(), layer.experts.end());
        layer.rows.assign(kActive, 16);
        route.layers.push_back(std::move(layer));
      }
      step.push_back(std::move(route));
    }
  }
  size_t step = 0;
  uint64_t evictions = 0;
  for (auto _ : state) {
    in.micro_batches = steps[step++ % steps.size()];
    StatusOr<StepPlan> plan = BuildStepPlan(in);
    if (!plan.ok()) {
      state.SkipWithError(plan.status().ToString().c_str());
      return;
    }
    evictions += plan->Count(OpKind::kEvict);
    in.resident = plan->ResidentAfter();
  }
  state.counters["evictions_per_plan"] =
      static_cast<double>(evictions) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_BuildStepPlan)->Args({8, 256})->Args({32, 2000})->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace ecss
