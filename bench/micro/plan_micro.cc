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

// `steps` RRE steps of `micro_batches` micro-batches over the model's layers, each routing to
// `active` experts a layer with `rows` rows each.
std::vector<std::vector<MicroBatchRoute>> Routings(const PlanModel& model, uint32_t micro_batches,
                                                   uint32_t active, uint32_t rows, size_t steps) {
  std::mt19937 rng(1);
  std::vector<std::vector<MicroBatchRoute>> routings(steps);
  for (std::vector<MicroBatchRoute>& step : routings) {
    for (uint32_t b = 0; b < micro_batches; ++b) {
      MicroBatchRoute route;
      route.tokens = 1024;
      route.plan_bytes = 4096;
      for (const uint32_t experts : model.experts_per_layer) {
        std::vector<uint32_t> all(experts);
        std::iota(all.begin(), all.end(), 0u);
        std::shuffle(all.begin(), all.end(), rng);
        LayerRoute layer{std::vector<uint32_t>(all.begin(), all.begin() + active), {}};
        std::sort(layer.experts.begin(), layer.experts.end());
        layer.rows.assign(active, rows);
        route.layers.push_back(std::move(layer));
      }
      step.push_back(std::move(route));
    }
  }
  return routings;
}

// Plans built one after another from `routings` in turn, the cache carried over from step to
// step, as in training.
void BuildPlans(benchmark::State& state, StepPlanInputs in,
                const std::vector<std::vector<MicroBatchRoute>>& routings) {
  size_t step = 0;
  uint64_t evictions = 0, ops = 0;
  for (auto _ : state) {
    in.micro_batches = routings[step++ % routings.size()];
    StatusOr<StepPlan> plan = BuildStepPlan(in);
    if (!plan.ok()) {
      state.SkipWithError(plan.status().ToString().c_str());
      return;
    }
    evictions += plan->Count(OpKind::kEvict);
    ops += plan->ops().size();
    in.resident = plan->ResidentAfter();
  }
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["evictions_per_plan"] = static_cast<double>(evictions) / iterations;
  state.counters["ops_per_plan"] = static_cast<double>(ops) / iterations;
}

PlanModel SmallExperts(uint32_t layers, uint32_t experts) {
  PlanModel model;
  model.d_model = 64;
  model.d_ff = 256;
  model.d_in = 256;
  model.params = 2 * 64 * 256;
  model.experts_per_layer.assign(layers, experts);
  return model;
}

// An RRE step of 2 micro-batches over `layers` layers of 256 experts, each micro-batch routing
// to 64 experts a layer, with the device cache holding `slots` experts: a cache that misses on
// every eighth access or so, whose evictions each choose among thousands of residents.
void BM_BuildStepPlan(benchmark::State& state) {
  StepPlanInputs in;
  in.model = SmallExperts(static_cast<uint32_t>(state.range(0)), 256);
  in.policy.cache_slots = static_cast<uint32_t>(state.range(1));
  BuildPlans(state, in, Routings(in.model, 2, 64, 16, 4));
}
BENCHMARK(BM_BuildStepPlan)->Args({8, 256})->Args({32, 2000})->Unit(benchmark::kMillisecond);

// Zero-offload's step in the shape of tools/plan/configs' `uneven zero-offload-host`: one
// micro-batch over 4 layers of 96 experts, 40 routed a layer, every expert of a layer in each
// of its accesses, with 165 slots: about 440 evictions and 895 ops a plan.
void BM_BuildZeroOffloadPlan(benchmark::State& state) {
  StepPlanInputs in;
  in.model = SmallExperts(4, 96);
  in.policy.strategy = Strategy::kZeroOffload;
  in.policy.cache_slots = 165;
  BuildPlans(state, in, Routings(in.model, 1, 40, 51, 4));
}
BENCHMARK(BM_BuildZeroOffloadPlan)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace ecss
