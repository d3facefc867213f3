// The planner against the engine: for small configurations, the step plans it builds equal
// the plans a session on the simulated device executes for the same micro-batches, op for op;
// its memory plan is the session's; and the simulator prices the device's work as the sim's
// timed mode charges it. Then the simulator's invariants on the strategies' shapes.
#include "tools/plan/planner.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/plan_inputs.h"
#include "engine/session.h"
#include "runtime/device/sim/sim_backend.h"
#include "tools/plan/step_simulator.h"

namespace ecss::plan {
namespace {

constexpr const char* kHardware = R"({"name": "test", "device": {"kind": "sim",
    "memory_gib": 1, "profile": "h100-sxm"}, "host": {"memory_gib": 8, "optimizer_threads": 1,
    "optimizer_params_per_s_per_thread": 5e8}, "nvme": {"capacity_gib": 10, "read_gbps": 1.5,
    "write_gbps": 1.0}})";

struct Config {
  std::string name;
  std::string model;
  std::string workload;
};

std::vector<Config> Configs() {
  const std::string rre = R"({"sparse_layers": 3, "d_model": 64, "d_ff": 128,
      "routing": {"kind": "rre", "domains": [{"name": "a", "experts": 4}, {"name": "b",
      "experts": 3}, {"name": "c", "experts": 5}, {"name": "d", "experts": 4}]},
      "vocab": 500})";
  const std::string gate = R"({"sparse_layers": 2, "d_model": 64, "d_ff": 64,
      "activation": "swiglu", "routing": {"kind": "gate", "experts": 12, "k": 2},
      "vocab": 500, "gradient_dtype": "bf16"})";
  return {
      {"ecss_host_two_micro_batches", rre,
       R"({"tokens_per_micro_batch": 128, "seq_len": 32, "micro_batches": 2,
           "domains_per_step": 2, "device_budget_gib": 0.004})"},
      {"no_overlap_states_and_weights_on_nvme", rre,
       R"({"tokens_per_micro_batch": 64, "seq_len": 32, "domains_per_step": 3,
           "strategy": "no-overlap", "placement": {"weights": "nvme", "states": "nvme"},
           "device_budget_gib": 0.004})"},
      {"learned_gate_two_micro_batches_zero_offload_bf16_gradients", gate,
       R"({"tokens_per_micro_batch": 64, "seq_len": 64, "micro_batches": 2,
           "strategy": "zero-offload", "device_budget_gib": 0.008})"},
  };
}

class PlannerTest : public ::testing::TestWithParam<Config> {};

// Op for op, the plans are the same: kinds, resources, micro-batches, layers, experts, rows,
// access positions, bytes, FLOPs and edges.
void ExpectSamePlan(const StepPlan& planned, const StepPlan& executed, uint64_t step) {
  ASSERT_EQ(planned.ops().size(), executed.ops().size()) << "step " << step;
  for (size_t i = 0; i < planned.ops().size(); ++i) {
    const PlanOp& a = planned.ops()[i];
    const PlanOp& b = executed.ops()[i];
    SCOPED_TRACE(::testing::Message()
                 << "step " << step << " op " << i << " " << OpKindName(a.kind));
    EXPECT_EQ(a.kind, b.kind);
    EXPECT_EQ(a.resource, b.resource);
    EXPECT_EQ(a.micro_batch, b.micro_batch);
    EXPECT_EQ(a.layer, b.layer);
    EXPECT_EQ(a.step_offset, b.step_offset);
    EXPECT_EQ(a.experts, b.experts);
    EXPECT_EQ(a.rows, b.rows);
    EXPECT_EQ(a.position, b.position);
    EXPECT_EQ(a.bytes, b.bytes);
    EXPECT_EQ(a.flops, b.flops);
    EXPECT_EQ(a.deps, b.deps);
    EXPECT_EQ(a.host_waits, b.host_waits);
  }
}

// The calls came in the step's order (RunSampledSteps), so every device op of the step that ran
// ended no earlier than the ops it waits for on its own stream (compute, h2d, d2h: one worker
// stamps each stream's ends in its order; across streams the stamping threads' ends may swap by
// microseconds, and the optimizer's and the NVMe stager's are other threads'): a loop that ran
// every micro-batch's forwards before the first backward ended later micro-batches' forwards
// before the backwards their edges name.
void ExpectEdgesHonoured(const StepPlan& executed, uint64_t step) {
  const std::vector<PlanOp>& ops = executed.ops();
  for (const PlanOp& op : ops) {
    const bool stream = op.resource == PlanResource::kCompute ||
                        op.resource == PlanResource::kH2d || op.resource == PlanResource::kD2h;
    if (op.step_offset != 0 || op.end_s < 0 || !stream) continue;
    for (uint32_t dep : op.deps) {
      if (ops[dep].resource != op.resource || ops[dep].end_s < 0) continue;
      EXPECT_GE(op.end_s, ops[dep].end_s)
          << "step " << step << ": op " << op.id << " (" << OpKindName(op.kind) << ", micro-batch "
          << op.micro_batch << ", layer " << op.layer << ") ended before its dep " << dep << " ("
          << OpKindName(ops[dep].kind) << ", micro-batch " << ops[dep].micro_batch << ", layer "
          << ops[dep].layer << ")";
    }
  }
}

TEST_P(PlannerTest, PlansAndMemoryAreTheSessions) {
  const Config& config = GetParam();
  auto model = ParseModel(config.model);
  auto hardware = ParseHardware(kHardware);
  auto workload = ParseWorkload(config.workload);
  ASSERT_TRUE(model.ok() && hardware.ok() && workload.ok())
      << model.status() << hardware.status() << workload.status();
  auto shard = ShardFor(*model, *hardware, *workload);
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto options = SessionOptionsFor(*shard, *model, *hardware, *workload, workload->strategy);
  ASSERT_TRUE(options.ok()) << options.status();
  char dir[] = "/tmp/ecss_plan_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  if (options->placement.states_on_nvme()) options->placement.nvme_dirs = {dir};
  options->record_op_times = true;  // ExpectEdgesHonoured
  auto memory = PlanMemoryFor(*options, *hardware);
  ASSERT_TRUE(memory.ok()) << memory.status();
  constexpr uint32_t kSteps = 4;
  StepSampler planner_sampler(*options, shard->domains_per_step, workload->seq_len, workload->seed);
  auto plans = BuildStepPlans(*options, *memory, planner_sampler, kSteps);
  ASSERT_TRUE(plans.ok()) << plans.status();

  SimOptions sim;
  sim.device_memory_bytes = options->budgets.device_bytes + (uint64_t{8} << 20);
  sim.kernel_mode = KernelMode::kTimed;
  sim.h2d_bandwidth_gbps = hardware->device.h2d_bandwidth_gbps;
  sim.d2h_bandwidth_gbps = hardware->device.d2h_bandwidth_gbps;
  auto backend = SimBackend::Create(sim);
  ASSERT_TRUE(backend.ok()) << backend.status();
  {
    auto session = Session::Create(**backend, *options);
    ASSERT_TRUE(session.ok()) << session.status();
    Session& s = **session;
    EXPECT_EQ(s.memory_plan().Summary(), memory->Summary());
    StepSampler sampler(*options, shard->domains_per_step, workload->seq_len, workload->seed);
    const EngineBusyTimes before = (*backend)->busy_times();
    auto stats = RunSampledSteps(s, **backend, *options, sampler, kSteps);
    ASSERT_TRUE(stats.ok()) << stats.status();
    double compute = 0, h2d = 0, d2h = 0;  // as the simulator prices the executed plans
    double kernels = 0, copies = 0;        // the sim's clock rounds each to a nanosecond
    StatusOr<StepSimulator> simulator =
        StepSimulator::Create(*options, {.device = hardware->device,
                                         .optimizer_params_per_s = 1e9,
                                         .nvme_read_gbps = 1.5,
                                         .nvme_write_gbps = 1.0});
    ASSERT_TRUE(simulator.ok()) << simulator.status();
    for (uint32_t step = 0; step < kSteps; ++step) {
      auto executed = s.ExecutedPlan((*stats)[step].step);
      ASSERT_TRUE(executed.ok()) << executed.status();
      ExpectSamePlan((*plans)[step], *executed, step);
      ExpectEdgesHonoured(*executed, step);
      StepPlan priced = *executed;
      ASSERT_TRUE(simulator->Run(priced).ok());
      for (const PlanOp& op : priced.ops()) {
        const double seconds = op.end_s - op.start_s;
        if (op.resource == PlanResource::kCompute) {
          compute += seconds;
          kernels += 4;
        }
        if (op.resource == PlanResource::kH2d) h2d += seconds;
        if (op.resource == PlanResource::kD2h) d2h += seconds;
        if (op.resource == PlanResource::kH2d || op.resource == PlanResource::kD2h) {
          copies += std::max<double>(1, op.experts.size());
        }
      }
    }
    // The sim's timed engines were busy exactly as long as the simulator priced the ops.
    const EngineBusyTimes after = (*backend)->busy_times();
    EXPECT_NEAR(after.compute_busy_seconds - before.compute_busy_seconds, compute, kernels * 1e-9);
    EXPECT_NEAR(after.h2d_busy_seconds - before.h2d_busy_seconds, h2d, copies * 1e-9);
    EXPECT_NEAR(after.d2h_busy_seconds - before.d2h_busy_seconds, d2h, copies * 1e-9);
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Configs, PlannerTest, ::testing::ValuesIn(Configs()),
                         [](const ::testing::TestParamInfo<Config>& param) {
                           return param.param.name;
                         });

// The simulator's tests' configuration: 16 domains of 2 experts in 4 layers on kHardware, 1,024
// tokens a step from 2 domains.
struct Simulated {
  ModelConfig model;
  HardwareConfig hardware;
  WorkloadConfig workload;
};

void ParseSimulated(Simulated* out) {
  auto model = ParseModel(R"({"sparse_layers": 4, "d_model": 256, "d_ff": 512,
      "routing": {"kind": "rre", "domains": 16, "experts_per_domain": 2}, "vocab": 5000})");
  auto hardware = ParseHardware(kHardware);
  auto workload = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "domains_per_step": 2,
      "device_budget_gib": 0.1})");
  ASSERT_TRUE(model.ok() && hardware.ok() && workload.ok());
  *out = {*model, *hardware, *workload};
}

// The session options of `strategy` for `c` and the plans of its first `steps` steps.
void PlansOf(const Simulated& c, Strategy strategy, uint32_t steps, SessionOptions* options,
             std::vector<StepPlan>* plans) {
  auto shard = ShardFor(c.model, c.hardware, c.workload);
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto made = SessionOptionsFor(*shard, c.model, c.hardware, c.workload, strategy);
  ASSERT_TRUE(made.ok()) << made.status();
  auto memory = PlanMemoryFor(*made, c.hardware);
  ASSERT_TRUE(memory.ok()) << memory.status();
  StepSampler sampler(*made, shard->domains_per_step, c.workload.seq_len, c.workload.seed);
  auto built = BuildStepPlans(*made, *memory, sampler, steps);
  ASSERT_TRUE(built.ok()) << built.status();
  *options = *std::move(made);
  *plans = *std::move(built);
}

// The strategies' shapes, in virtual time: no-overlap and naive run their resources in turn
// (the step takes at least the sum of their busy times), ecss overlaps them and is faster
// than no-overlap, which moves the same bytes, and than naive and zero-offload, which move
// every expert.
TEST(StepSimulatorTest, TheStrategiesShapesShowInVirtualTime) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  auto report = Plan(c.model, c.hardware, c.workload);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->feasible);
  std::map<Strategy, const StrategyPrediction*> by;
  for (const StrategyPrediction& p : report->predictions) {
    ASSERT_TRUE(p.feasible) << StrategyName(p.strategy) << ": " << p.why_not;
    by[p.strategy] = &p;
  }
  ASSERT_EQ(by.size(), 4u);
  for (Strategy chained : {Strategy::kNoOverlap, Strategy::kNaive}) {
    const StepMetrics& metrics = by[chained]->metrics;
    double sum = 0;
    for (const ResourceUse& use : metrics.resources) sum += use.busy_seconds;
    EXPECT_GE(metrics.seconds, sum * (1 - 1e-9)) << StrategyName(chained);
    ASSERT_TRUE(metrics.overlap_fraction.has_value());
    EXPECT_LE(*metrics.overlap_fraction, 1e-9);
  }
  EXPECT_EQ(by[Strategy::kEcss]->h2d_bytes, by[Strategy::kNoOverlap]->h2d_bytes);
  EXPECT_EQ(by[Strategy::kEcss]->updated_params, by[Strategy::kNoOverlap]->updated_params);
  EXPECT_GT(by[Strategy::kNaive]->updated_params, by[Strategy::kEcss]->updated_params);
  EXPECT_GT(by[Strategy::kEcss]->tokens_per_s, by[Strategy::kNoOverlap]->tokens_per_s);
  EXPECT_GT(by[Strategy::kEcss]->tokens_per_s, by[Strategy::kZeroOffload]->tokens_per_s);
  EXPECT_GT(by[Strategy::kZeroOffload]->tokens_per_s, by[Strategy::kNaive]->tokens_per_s);
  EXPECT_LT(by[Strategy::kEcss]->metrics.bound_ratio,
            by[Strategy::kNoOverlap]->metrics.bound_ratio);
  // Note [The driving thread helps]: once a step's device work is done, a strategy whose step
  // waits for its updates waits in the optimizer's arena and runs updates too. No-overlap's
  // last layer's updates (every layer updates as many experts) are the ones after its device
  // work: a quarter of them at two threads' rate (one optimizer thread), the rest at one.
  // ecss's driving thread goes on to the next step and never helps.
  const double one_thread = 5e8;
  const StrategyPrediction& chained = *by[Strategy::kNoOverlap];
  const auto cpu = static_cast<size_t>(PlanResource::kCpuOptimizer);
  const auto updated = static_cast<double>(chained.updated_params);
  EXPECT_NEAR(chained.busy_per_step[cpu],
              updated * 3 / 4 / one_thread + updated / 4 / (2 * one_thread), 1e-9);
  EXPECT_NEAR(by[Strategy::kEcss]->busy_per_step[cpu],
              static_cast<double>(by[Strategy::kEcss]->updated_params) / one_thread, 1e-9);
  // ...and the step ends when they do: nothing of no-overlap's overlaps, so its step is its
  // resources' busy time.
  double sum = 0;
  for (const ResourceUse& use : chained.metrics.resources) sum += use.busy_seconds;
  EXPECT_NEAR(chained.metrics.seconds, sum, 1e-9 * sum);

  // Two threads measured at 1.6x one (a memory bus they share): the helped updates run at
  // that rate.
  std::string measured = kHardware;
  measured.replace(measured.find(R"("optimizer_params_per_s_per_thread": 5e8)"), 40,
                   R"("optimizer_params_per_s_by_threads": [5e8, 8e8])");
  auto shared_bus = ParseHardware(measured);
  ASSERT_TRUE(shared_bus.ok()) << shared_bus.status();
  auto slower = Plan(c.model, *shared_bus, c.workload);
  ASSERT_TRUE(slower.ok()) << slower.status();
  auto found =
      std::find_if(slower->predictions.begin(), slower->predictions.end(),
                   [](const StrategyPrediction& p) { return p.strategy == Strategy::kNoOverlap; });
  ASSERT_NE(found, slower->predictions.end());
  EXPECT_EQ(found->updated_params, chained.updated_params);
  EXPECT_NEAR(found->busy_per_step[cpu], updated * 3 / 4 / one_thread + updated / 4 / 8e8, 1e-9);
  EXPECT_NEAR(found->step_seconds - chained.step_seconds,
              updated / 4 / 8e8 - updated / 4 / (2 * one_thread), 1e-9);
}

// The host's costs: an op the host waits for its dependencies to issue (no-overlap's chain)
// starts no sooner than the host's wait latency after they ended, and every op of a step no
// sooner than the host's work at its begin (a part per op of its plan). ecss issues nothing
// after a host wait: the wait latency alone changes none of its times.
TEST(StepSimulatorTest, HostWaitsAndTheStepsBeginCostTheHostsTime) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  auto shard = ShardFor(c.model, c.hardware, c.workload);
  ASSERT_TRUE(shard.ok()) << shard.status();
  constexpr double kWaitUs = 40, kBeginSeconds = 3e-4, kBeginPerOp = 2e-6;
  const ResourceRates free_host{.device = c.hardware.device, .optimizer_params_per_s = 5e8};
  ResourceRates waits = free_host;
  waits.host_wait_latency_us = kWaitUs;
  ResourceRates both = waits;
  both.begin_step_seconds = kBeginSeconds;
  both.begin_step_seconds_per_op = kBeginPerOp;
  for (Strategy strategy : {Strategy::kNoOverlap, Strategy::kEcss}) {
    SCOPED_TRACE(StrategyName(strategy));
    SessionOptions options;
    std::vector<StepPlan> plans;
    ASSERT_NO_FATAL_FAILURE(PlansOf(c, strategy, 3, &options, &plans));
    auto plain = StepSimulator::Create(options, free_host);
    auto waiting = StepSimulator::Create(options, waits);
    auto costly = StepSimulator::Create(options, both);
    ASSERT_TRUE(plain.ok() && waiting.ok() && costly.ok());
    for (const StepPlan& plan : plans) {
      StepPlan without = plan, waited = plan, with = plan;
      ASSERT_TRUE(plain->Run(without).ok());
      ASSERT_TRUE(waiting->Run(waited).ok());
      auto step = costly->Run(with);
      ASSERT_TRUE(step.ok()) << step.status();
      // The step's begin work, as the planner reports it (begin_seconds_per_step).
      EXPECT_DOUBLE_EQ(step->begin_work_s,
                       kBeginSeconds + kBeginPerOp * static_cast<double>(with.ops().size()));
      size_t host_waits = 0, computes = 0;
      for (const PlanOp& op : with.ops()) {
        if (op.step_offset != 0) continue;
        const double ops = static_cast<double>(with.ops().size());
        EXPECT_GE(op.start_s, kBeginSeconds + kBeginPerOp * ops - 1e-12) << op.id;
        if (op.resource == PlanResource::kCompute) ++computes;
        if (!op.host_waits) continue;
        ++host_waits;
        for (uint32_t dep : op.deps) {
          const PlanOp& d = with.ops()[dep];
          if (d.step_offset == 0) {
            EXPECT_GE(op.start_s, d.end_s + kWaitUs * 1e-6 - 1e-12) << op.id;
          }
        }
      }
      if (strategy == Strategy::kNoOverlap) {
        // Every compute op waits on the host, each on the chain's critical path.
        EXPECT_GT(host_waits, 0u);
        EXPECT_GE(waited.seconds() - without.seconds(), computes * kWaitUs * 1e-6 - 1e-9);
      } else {
        EXPECT_EQ(host_waits, 0u);
        EXPECT_EQ(waited.seconds(), without.seconds());
      }
    }
  }
  auto options = SessionOptionsFor(*shard, c.model, c.hardware, c.workload, Strategy::kEcss);
  ASSERT_TRUE(options.ok());
  ResourceRates negative = free_host;
  negative.host_wait_latency_us = -1;
  EXPECT_EQ(StepSimulator::Create(*options, negative).status().code(),
            StatusCode::kInvalidArgument);
  ResourceRates unknown_begin = free_host;
  unknown_begin.begin_step_seconds = std::nan("");
  const Status refused = StepSimulator::Create(*options, unknown_begin).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("begin_step_seconds"), std::string::npos) << refused;
  ResourceRates negative_per_op = free_host;
  negative_per_op.begin_step_seconds_per_op = -1e-6;
  EXPECT_EQ(StepSimulator::Create(*options, negative_per_op).status().code(),
            StatusCode::kInvalidArgument);
}

// `steps` ecss steps of the simulated configuration in 4 micro-batches (the later ones'
// gradients added on the host).
void MicroBatchedPlans(uint32_t steps, Simulated* c, SessionOptions* options,
                       std::vector<StepPlan>* plans) {
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(c));
  c->workload.micro_batches = 4;
  ASSERT_NO_FATAL_FAILURE(PlansOf(*c, Strategy::kEcss, steps, options, plans));
}

// Later micro-batches' gradient additions run one at a time on the host's add stream, each
// bytes / GB/s once its copy ended; a copy into one of the two staging halves waits for that
// half's last addition, and a layer's update for its additions. Free additions (0 GB/s, the
// default) take no time, and the steps with them are never shorter.
TEST(StepSimulatorTest, AdditionsRunOneAtATimeOnTheHostsAddStream) {
  Simulated c;
  SessionOptions options;
  std::vector<StepPlan> plans;
  ASSERT_NO_FATAL_FAILURE(MicroBatchedPlans(3, &c, &options, &plans));
  constexpr double kGbps = 0.5;
  const ResourceRates free_adds{.device = c.hardware.device, .optimizer_params_per_s = 5e8};
  ResourceRates adds = free_adds;
  adds.gradient_add_gbps = kGbps;
  auto plain = StepSimulator::Create(options, free_adds);
  auto adding = StepSimulator::Create(options, adds);
  ASSERT_TRUE(plain.ok() && adding.ok());
  size_t additions = 0;
  for (const StepPlan& plan : plans) {
    StepPlan without = plan, with = plan;
    ASSERT_TRUE(plain->Run(without).ok());
    ASSERT_TRUE(adding->Run(with).ok());
    EXPECT_GT(with.seconds(), without.seconds());
    for (const PlanOp* add : without.Find(OpKind::kAccumulate)) {
      EXPECT_EQ(add->end_s, add->start_s) << add->id;
    }
    const std::vector<const PlanOp*> added = with.Find(OpKind::kAccumulate);
    ASSERT_GE(added.size(), 3u);
    additions += added.size();
    for (size_t k = 0; k < added.size(); ++k) {
      const PlanOp& add = *added[k];
      EXPECT_NEAR(add.end_s - add.start_s, static_cast<double>(add.bytes) / (kGbps * 1e9), 1e-12);
      const PlanOp& copy = with.ops()[add.id - 1];
      ASSERT_EQ(copy.kind, OpKind::kGradientCopy);
      EXPECT_GE(add.start_s, copy.end_s - 1e-12) << add.id;
      if (k >= 1) {
        EXPECT_GE(add.start_s, added[k - 1]->end_s - 1e-12) << add.id;
      }
      if (k >= 2) {
        EXPECT_GE(copy.start_s, added[k - 2]->end_s - 1e-12) << copy.id;
      }
    }
    for (const PlanOp* update : with.Find(OpKind::kUpdate)) {
      if (update->step_offset != 0) continue;
      for (const PlanOp* add : with.Find(OpKind::kAccumulate, -1, update->layer)) {
        EXPECT_GE(update->start_s, add->end_s - 1e-12) << update->id;
      }
    }
  }
  EXPECT_GT(additions, 0u);
  ResourceRates negative = free_adds;
  negative.gradient_add_gbps = -1;
  const Status refused = StepSimulator::Create(options, negative).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("additions"), std::string::npos) << refused;
  ResourceRates negative_beside = free_adds;
  negative_beside.gradient_add_beside_optimizer_gbps = -1;
  EXPECT_EQ(StepSimulator::Create(options, negative_beside).status().code(),
            StatusCode::kInvalidArgument);
}

// EndBeside: work runs at `share` of its rate inside the intervals and at its full rate outside,
// whether it starts before, inside or after them, and through intervals that overlap.
TEST(StepSimulatorTest, EndBesideRunsAtTheShareOnlyInsideTheIntervals) {
  EXPECT_DOUBLE_EQ(EndBeside(1, 2, {}, 0.5), 3);
  EXPECT_DOUBLE_EQ(EndBeside(0, 2, {{1, 3}}, 0.5), 3);           // 1 s alone, 2 s at half the rate
  EXPECT_DOUBLE_EQ(EndBeside(0, 0.5, {{1, 3}}, 0.5), 0.5);       // done before the interval
  EXPECT_DOUBLE_EQ(EndBeside(2, 1, {{1, 3}}, 0.5), 3.5);         // inside: 0.5 of work by 3
  EXPECT_DOUBLE_EQ(EndBeside(0, 1, {{0, 2}, {1, 4}}, 0.25), 4);  // overlapping intervals
  EXPECT_DOUBLE_EQ(EndBeside(2, 1, {{0, 1}}, 0.5), 3);           // an interval that ended before
  EXPECT_DOUBLE_EQ(EndBeside(0, 3, {{1, 2}, {3, 4}}, 0.5), 4);   // 1 + 0.5 + 1 + 0.5
}

// Note [Additions beside the optimizer]: an addition runs at gradient_add_gbps while the
// optimizer's timeline is idle and at gradient_add_beside_optimizer_gbps while it is busy, so
// each takes between its bytes at the one rate and at the other, some (here, where the
// previous step's updates run into the next step's additions) longer than alone, and no step
// is shorter; a beside rate of 0 is the idle one.
TEST(StepSimulatorTest, AdditionsBesideTheOptimizerRunAtTheirOwnRate) {
  Simulated c;
  SessionOptions options;
  std::vector<StepPlan> plans;
  ASSERT_NO_FATAL_FAILURE(MicroBatchedPlans(4, &c, &options, &plans));
  constexpr double kIdleGbps = 0.5, kBesideGbps = 0.2;
  ResourceRates idle{.device = c.hardware.device, .optimizer_params_per_s = 5e7};
  idle.gradient_add_gbps = kIdleGbps;
  ResourceRates unset = idle, beside = idle;
  beside.gradient_add_beside_optimizer_gbps = kBesideGbps;
  auto one_rate = StepSimulator::Create(options, idle);
  auto zero = StepSimulator::Create(options, unset);
  auto two_rates = StepSimulator::Create(options, beside);
  ASSERT_TRUE(one_rate.ok() && zero.ok() && two_rates.ok());
  size_t slowed = 0;
  for (const StepPlan& plan : plans) {
    StepPlan alone = plan, same = plan, with = plan;
    ASSERT_TRUE(one_rate->Run(alone).ok());
    ASSERT_TRUE(zero->Run(same).ok());
    ASSERT_TRUE(two_rates->Run(with).ok());
    EXPECT_EQ(same.seconds(), alone.seconds());
    EXPECT_GE(with.seconds(), alone.seconds() - 1e-12);
    for (const PlanOp* add : with.Find(OpKind::kAccumulate)) {
      const double took = add->end_s - add->start_s;
      const auto bytes = static_cast<double>(add->bytes);
      EXPECT_GE(took, bytes / (kIdleGbps * 1e9) - 1e-12) << add->id;
      EXPECT_LE(took, bytes / (kBesideGbps * 1e9) + 1e-12) << add->id;
      if (took > bytes / (kIdleGbps * 1e9) + 1e-9) ++slowed;
    }
  }
  EXPECT_GT(slowed, 0u);
}

// A slow optimizer (2.5e7 parameters/s) beside additions of 0.5 GB/s at its full rate, and
// at half of it (optimizer_rate_beside_additions 0.5).
ResourceRates BesideAdditionsRates(const Simulated& c, double share) {
  ResourceRates rates{.device = c.hardware.device, .optimizer_params_per_s = 2.5e7};
  rates.gradient_add_gbps = 0.5;
  rates.optimizer_rate_beside_additions = share;
  return rates;
}

// Note [The optimizer beside the additions]: with optimizer_rate_beside_additions < 1 a step's
// updates that run beside its additions take longer (the step's updates end later in some step,
// never sooner), and the share must lie in (0, 1].
TEST(StepSimulatorTest, TheOptimizerBesideTheAdditionsKeepsItsShareOfItsRate) {
  Simulated c;
  SessionOptions options;
  std::vector<StepPlan> plans;
  ASSERT_NO_FATAL_FAILURE(MicroBatchedPlans(4, &c, &options, &plans));
  const ResourceRates full = BesideAdditionsRates(c, 1);
  auto unaffected = StepSimulator::Create(options, full);
  auto slowed = StepSimulator::Create(options, BesideAdditionsRates(c, 0.5));
  ASSERT_TRUE(unaffected.ok() && slowed.ok());
  auto updates_end = [](const StepPlan& plan) {
    double end = 0;
    for (const PlanOp* update : plan.Find(OpKind::kUpdate)) {
      if (update->step_offset == 0) end = std::max(end, update->end_s);
    }
    return end;
  };
  size_t later = 0;
  for (size_t s = 0; s < plans.size(); ++s) {
    StepPlan alone = plans[s], beside = plans[s];
    ASSERT_TRUE(unaffected->Run(alone).ok());
    ASSERT_TRUE(slowed->Run(beside).ok());
    EXPECT_GE(updates_end(beside), updates_end(alone) - 1e-12);
    if (updates_end(beside) > updates_end(alone) + 1e-9) ++later;
    if (s == 0) {  // from one state: slowed at most for the time its additions ran
      double adding = 0;
      for (const PlanOp* add : beside.Find(OpKind::kAccumulate))
        adding += add->end_s - add->start_s;
      double updating = 0;
      for (const PlanOp* update : alone.Find(OpKind::kUpdate)) {
        if (update->step_offset == 0) updating += update->end_s - update->start_s;
      }
      EXPECT_LE(updates_end(beside) - updates_end(alone), adding * (1 / 0.5 - 1) + 1e-9);
      EXPECT_GT(updating, adding);  // so that slowing every update would exceed it
    }
  }
  EXPECT_GT(later, 0u);
  for (double share : {0.0, -0.5, 1.5, std::nan("")}) {
    ResourceRates bad = full;
    bad.optimizer_rate_beside_additions = share;
    const Status refused = StepSimulator::Create(options, bad).status();
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << share;
    EXPECT_NE(refused.message().find("optimizer_rate_beside_additions"), std::string::npos);
  }
}

// Note [The optimizer beside the additions]: the step before's updates that run on beside a
// step's additions are slowed too (ecss: they overlap the step after's device work), from its
// first addition on. A step of one micro-batch (no additions: its updates run at the full
// rate; its plan from a session of one micro-batch, which the simulator times as given) then
// one of four: the first step's updates end later beside the second's additions, by at most
// what those additions' time lost at the share, and the carried-in op that stands for them
// (a point) says so; the third step's work begins no sooner.
TEST(StepSimulatorTest, TheStepBeforesUpdatesBesideTheAdditionsAreSlowedToo) {
  Simulated c;
  SessionOptions options, one_options;
  std::vector<StepPlan> four, one;
  ASSERT_NO_FATAL_FAILURE(MicroBatchedPlans(3, &c, &options, &four));
  c.workload.micro_batches = 1;
  ASSERT_NO_FATAL_FAILURE(PlansOf(c, Strategy::kEcss, 1, &one_options, &one));
  const ResourceRates full = BesideAdditionsRates(c, 1);
  auto unaffected = StepSimulator::Create(options, full);
  auto slowed = StepSimulator::Create(options, BesideAdditionsRates(c, 0.5));
  ASSERT_TRUE(unaffected.ok() && slowed.ok());
  StepPlan first_alone = one[0], first_beside = one[0];
  ASSERT_TRUE(unaffected->Run(first_alone).ok());
  ASSERT_TRUE(slowed->Run(first_beside).ok());
  ASSERT_TRUE(first_alone.Find(OpKind::kAccumulate).empty());
  StepPlan alone = four[1], beside = four[1];
  ASSERT_TRUE(unaffected->Run(alone).ok());
  ASSERT_TRUE(slowed->Run(beside).ok());
  auto carried_end = [](const StepPlan& plan) {
    for (const PlanOp& op : plan.ops()) {
      if (op.kind == OpKind::kUpdate && op.step_offset == -1) return op.end_s;
    }
    return -1.0;
  };
  const std::vector<const PlanOp*> additions = beside.Find(OpKind::kAccumulate);
  ASSERT_FALSE(additions.empty());
  // The first step's updates ran on past the second's first addition.
  ASSERT_GT(carried_end(alone), additions.front()->start_s);
  EXPECT_GT(carried_end(beside), carried_end(alone) + 1e-9);
  double adding = 0;
  for (const PlanOp* add : additions) adding += add->end_s - add->start_s;
  EXPECT_LE(carried_end(beside) - carried_end(alone), adding * (1 / 0.5 - 1) + 1e-9);
  // One optimizer: the step's own updates start once the step before's ended.
  for (const PlanOp* update : beside.Find(OpKind::kUpdate)) {
    if (update->step_offset == 0) {
      EXPECT_GE(update->start_s, carried_end(beside) - 1e-12);
    }
    if (update->step_offset == -1) {
      EXPECT_EQ(update->start_s, update->end_s);
    }
  }
  StepPlan third_alone = four[2], third_beside = four[2];
  auto a = unaffected->Run(third_alone);
  auto b = slowed->Run(third_beside);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GE(b->begin_s, a->begin_s);
}

// With states on NVMe, each expert's update takes the drives' overhead beside its bytes, half
// on its read and half on its write: no-overlap's steps, their updates inside them, keep the
// drives busy that much longer per updated expert. A negative or unknown overhead is refused.
TEST(StepSimulatorTest, EachNvmeUpdatePaysItsOverheadOnTheDrives) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  c.workload.states = Tier::kNvme;
  SessionOptions options;
  std::vector<StepPlan> plans;
  ASSERT_NO_FATAL_FAILURE(PlansOf(c, Strategy::kNoOverlap, 3, &options, &plans));
  constexpr double kOverhead = 2e-3;
  const ResourceRates plain{.device = c.hardware.device,
                            .optimizer_params_per_s = 5e8,
                            .nvme_read_gbps = 1.5,
                            .nvme_write_gbps = 1.0};
  ResourceRates costly = plain;
  costly.nvme_update_overhead_seconds = kOverhead;
  auto without = StepSimulator::Create(options, plain);
  auto with = StepSimulator::Create(options, costly);
  ASSERT_TRUE(without.ok() && with.ok()) << without.status() << with.status();
  const size_t read = static_cast<size_t>(PlanResource::kNvmeRead);
  const size_t write = static_cast<size_t>(PlanResource::kNvmeWrite);
  for (const StepPlan& plan : plans) {
    ASSERT_TRUE(plan.step_waits_for_updates());
    StepPlan a = plan, b = plan;
    auto fast = without->Run(a);
    auto slow = with->Run(b);
    ASSERT_TRUE(fast.ok() && slow.ok());
    const double updated = static_cast<double>(TouchedExperts(plan).size());
    ASSERT_GT(updated, 0);
    EXPECT_NEAR(slow->busy[read] - fast->busy[read], updated * kOverhead / 2, 1e-9);
    EXPECT_NEAR(slow->busy[write] - fast->busy[write], updated * kOverhead / 2, 1e-9);
    EXPECT_GE(slow->seconds - fast->seconds, updated * kOverhead - 1e-9);
  }
  for (double bad : {-1e-3, std::nan(""), std::numeric_limits<double>::infinity()}) {
    ResourceRates refused_rates = plain;
    refused_rates.nvme_update_overhead_seconds = bad;
    const Status refused = StepSimulator::Create(options, refused_rates).status();
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(refused.message().find("nvme_update_overhead_seconds"), std::string::npos) << refused;
  }
}

// A weight's stage from NVMe keeps the drives busy, but it is the stager's read, not the
// optimizer's work (a session's optimizer metric is its updates' spans): no-overlap's steps with
// weights and states on NVMe, their stages and their updates one after the other, keep the same
// optimizer busy time with their stages priced at nothing, and the drives' read time differs by
// exactly the stages'.
TEST(StepSimulatorTest, WeightStagesKeepTheDrivesBusyButAreNotTheOptimizersWork) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  c.workload.states = Tier::kNvme;
  c.workload.weights = Tier::kNvme;
  SessionOptions options;
  std::vector<StepPlan> plans;
  ASSERT_NO_FATAL_FAILURE(PlansOf(c, Strategy::kNoOverlap, 3, &options, &plans));
  constexpr double kReadGbps = 1.5;
  const ResourceRates rates{.device = c.hardware.device,
                            .optimizer_params_per_s = 5e8,
                            .nvme_read_gbps = kReadGbps,
                            .nvme_write_gbps = 1.0};
  auto staged = StepSimulator::Create(options, rates);
  auto unstaged = StepSimulator::Create(options, rates);
  ASSERT_TRUE(staged.ok() && unstaged.ok()) << staged.status() << unstaged.status();
  auto optimizer_busy = [](const StepMetrics& metrics) {
    for (const ResourceUse& use : metrics.resources) {
      if (use.name == "optimizer") return use.busy_seconds;
    }
    ADD_FAILURE() << "no optimizer in the step's metrics";
    return 0.0;
  };
  const size_t read = static_cast<size_t>(PlanResource::kNvmeRead);
  for (const StepPlan& plan : plans) {
    ASSERT_TRUE(plan.step_waits_for_updates());
    StepPlan a = plan, b = plan;
    double stages_seconds = 0;
    for (PlanOp& op : b.mutable_ops()) {
      if (op.kind != OpKind::kStage) continue;
      stages_seconds += static_cast<double>(op.bytes) / (kReadGbps * 1e9);
      op.bytes = 0;
    }
    ASSERT_GT(stages_seconds, 0);
    auto with = staged->Run(a);
    auto without = unstaged->Run(b);
    ASSERT_TRUE(with.ok() && without.ok()) << with.status() << without.status();
    EXPECT_NEAR(with->busy[read] - without->busy[read], stages_seconds, 1e-9);
    const double busy = optimizer_busy(with->metrics);
    EXPECT_GT(busy, 0);
    EXPECT_NEAR(busy, optimizer_busy(without->metrics), 1e-9);
  }
}

// The hardware file's host costs reach the prediction: no-overlap's step, its ops one after
// another, grows by at least the routing at its begin (per token and layer, every
// micro-batch's, and per line of the tables it reads) and a wait before each compute op; a
// learned gate routes at its forwards, so the routing's cost leaves its steps as they were.
TEST(PlannerTest, TheHardwareFilesHostCostsReachThePrediction) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  c.workload.micro_batches = 2;
  HardwareConfig costly = c.hardware;
  costly.host_wait_latency_us = 40;
  costly.routing_ns_per_token_layer = 100;
  costly.routing_ns_per_table_line = 300;
  auto step_seconds = [&](const ModelConfig& model, const HardwareConfig& hardware) {
    std::map<Strategy, double> seconds;
    StatusOr<PlanReport> report = Plan(model, hardware, c.workload);
    EXPECT_TRUE(report.ok()) << report.status();
    if (!report.ok()) return seconds;
    for (const StrategyPrediction& p : report->predictions) seconds[p.strategy] = p.step_seconds;
    return seconds;
  };
  const auto before = step_seconds(c.model, c.hardware);
  const auto after = step_seconds(c.model, costly);
  ASSERT_EQ(before.count(Strategy::kNoOverlap), 1u);
  ASSERT_EQ(after.count(Strategy::kNoOverlap), 1u);
  const double layers = c.model.sparse_layers, micro_batches = c.workload.micro_batches;
  const double tokens = c.workload.tokens_per_micro_batch * micro_batches;
  const double routing =
      100e-9 * tokens * layers +
      300e-9 * RoutingTableLines(tokens, c.workload.domains_per_step, layers, c.model.vocab);
  ASSERT_GT(RoutingTableLines(tokens, c.workload.domains_per_step, layers, c.model.vocab), 0);
  const double waits = 2 * layers * micro_batches * 40e-6;  // forward and backward ops
  EXPECT_GE(after.at(Strategy::kNoOverlap) - before.at(Strategy::kNoOverlap),
            routing + waits - 1e-9);

  auto gate = ParseModel(R"({"sparse_layers": 2, "d_model": 128, "d_ff": 256,
      "routing": {"kind": "gate", "experts": 16, "k": 2}, "vocab": 5000})");
  ASSERT_TRUE(gate.ok()) << gate.status();
  HardwareConfig routing_only = c.hardware;
  routing_only.routing_ns_per_token_layer = 100;
  routing_only.routing_ns_per_table_line = 300;
  EXPECT_EQ(step_seconds(*gate, c.hardware), step_seconds(*gate, routing_only));
}

// The drives' update overhead reaches the prediction at the device's share of them: with two
// drives to one device, half of it per update on the device's NVMe queue (no-overlap's steps,
// their updates inside them).
TEST(PlannerTest, TheDrivesUpdateOverheadReachesThePredictionAtTheDevicesShare) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  c.workload.states = Tier::kNvme;
  ASSERT_EQ(c.hardware.devices_per_node, 1u);
  c.hardware.nvme.assign(2, c.hardware.nvme.at(0));
  HardwareConfig costly = c.hardware;
  for (NvmeDrive& drive : costly.nvme) drive.update_overhead_us = 2000;
  auto no_overlap = [&](const HardwareConfig& hardware) {
    StatusOr<PlanReport> report = Plan(c.model, hardware, c.workload);
    EXPECT_TRUE(report.ok()) << report.status();
    StrategyPrediction found;
    for (const StrategyPrediction& p : report->predictions) {
      if (p.strategy == Strategy::kNoOverlap) found = p;
    }
    EXPECT_TRUE(found.feasible) << found.why_not;
    return found;
  };
  const StrategyPrediction before = no_overlap(c.hardware);
  const StrategyPrediction after = no_overlap(costly);
  const double updates =
      static_cast<double>(before.updated_params) / static_cast<double>(c.model.expert_params());
  ASSERT_GT(updates, 0);
  auto drives_busy = [](const StrategyPrediction& p) {
    return p.busy_per_step[static_cast<size_t>(PlanResource::kNvmeRead)] +
           p.busy_per_step[static_cast<size_t>(PlanResource::kNvmeWrite)];
  };
  EXPECT_NEAR(drives_busy(after) - drives_busy(before), updates * 1e-3, 1e-9 * updates);
  EXPECT_GE(after.step_seconds - before.step_seconds, updates * 1e-3 - 1e-9);
}

// Note [The optimizer's gap between updates]: an update of host states that was ready while the
// optimizer was busy starts the gap after it was free, outside its busy time. No-overlap's
// updates run inside its steps, a layer's once its gradients are copied (the first of them onto
// an idle optimizer, the others, their copies done, one after another): three layers' on one
// thread, a gap each but the first, and the last layer's, the first under way when the device
// work ends, with the driving thread's help at half of it (two threads' rate, twice one's); its
// busy time is as it was. With two optimizer threads a device, the threads' gaps overlap: half
// as long on their timeline, a third with the driving thread. ecss, bound by its optimizer,
// grows by about a gap an update; with states on NVMe nothing changes (their pipeline's time is
// calibrated whole). A negative gap is refused.
TEST(PlannerTest, EachUpdateOfHostStatesStartsAfterTheOptimizersGap) {
  Simulated c;
  ASSERT_NO_FATAL_FAILURE(ParseSimulated(&c));
  constexpr double kGap = 50e-6;
  auto predictions = [&](const HardwareConfig& hardware, const WorkloadConfig& workload) {
    std::map<Strategy, StrategyPrediction> by;
    StatusOr<PlanReport> report = Plan(c.model, hardware, workload);
    EXPECT_TRUE(report.ok()) << report.status();
    if (report.ok()) {
      for (const StrategyPrediction& p : report->predictions) by[p.strategy] = p;
    }
    return by;
  };
  HardwareConfig gapped = c.hardware;
  gapped.optimizer_update_gap_us = kGap * 1e6;
  const auto cpu = static_cast<size_t>(PlanResource::kCpuOptimizer);
  for (uint32_t threads : {1u, 2u}) {
    HardwareConfig plain = c.hardware;
    plain.optimizer_threads = gapped.optimizer_threads = threads;
    auto before = predictions(plain, c.workload);
    auto after = predictions(gapped, c.workload);
    ASSERT_EQ(before.count(Strategy::kNoOverlap), 1u);
    ASSERT_EQ(after.count(Strategy::kEcss), 1u);
    const StrategyPrediction& chained = before[Strategy::kNoOverlap];
    const double updates =
        static_cast<double>(chained.updated_params) / static_cast<double>(c.model.expert_params());
    ASSERT_GT(updates, 0);
    const double helped = (threads + 1.0) / threads;  // linear rates per thread
    const double layers = c.model.sparse_layers, gapped_per_layer = updates / layers - 1;
    EXPECT_NEAR(after[Strategy::kNoOverlap].step_seconds - chained.step_seconds,
                gapped_per_layer * (layers - 1 + 1 / helped) * kGap / threads, 1e-9)
        << threads << " threads";
    EXPECT_NEAR(after[Strategy::kNoOverlap].busy_per_step[cpu], chained.busy_per_step[cpu], 1e-12);
    const double ecss_updates = static_cast<double>(before[Strategy::kEcss].updated_params) /
                                static_cast<double>(c.model.expert_params());
    const double grown = after[Strategy::kEcss].step_seconds - before[Strategy::kEcss].step_seconds;
    EXPECT_GT(grown, 0.9 * ecss_updates * kGap / threads) << threads << " threads";
    EXPECT_LT(grown, 1.1 * ecss_updates * kGap / threads) << threads << " threads";
  }
  WorkloadConfig on_nvme = c.workload;
  on_nvme.states = Tier::kNvme;
  gapped.optimizer_threads = c.hardware.optimizer_threads;
  auto before = predictions(c.hardware, on_nvme);
  auto after = predictions(gapped, on_nvme);
  ASSERT_EQ(before.count(Strategy::kEcss), 1u);
  for (const auto& [strategy, p] : before) {
    EXPECT_EQ(after[strategy].step_seconds, p.step_seconds) << StrategyName(strategy);
  }
  gapped.optimizer_update_gap_us = -1;
  const Status refused = Plan(c.model, gapped, c.workload).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("optimizer_update_gap"), std::string::npos) << refused;
}

// An infeasible configuration names the short budget and the change that fits.
TEST(PlannerTest, AModelTooLargeForHostMemorySaysWhatWouldFit) {
  auto model = ParseModel(R"({"sparse_layers": 8, "d_model": 1024, "d_ff": 4096,
      "routing": {"kind": "rre", "domains": 40, "experts_per_domain": 4}, "vocab": 5000})");
  auto hardware = ParseHardware(kHardware);  // 8 GiB of host memory, 10 GiB of NVMe
  auto workload = ParseWorkload(R"({"tokens_per_micro_batch": 512})");
  ASSERT_TRUE(model.ok() && hardware.ok() && workload.ok());
  // 1,280 experts of 8.4M parameters: 21.5 GB of compute weights alone.
  auto report = Plan(*model, *hardware, *workload);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(report->feasible);
  ASSERT_FALSE(report->short_of.empty());
  EXPECT_NE(report->short_of[0].find("memory"), std::string::npos) << report->short_of[0];
  bool host_more = false;
  for (const std::string& s : report->suggestions) host_more |= s.find("host memory +") == 0;
  EXPECT_TRUE(host_more) << ::testing::PrintToString(report->suggestions);
}

}  // namespace
}  // namespace ecss::plan

namespace ecss::plan {
namespace {

// A budget beyond the device's memory does not fit; more domains a step than the model has,
// or states on NVMe without drives, are said so.
TEST(PlannerTest, ImpossibleBudgetsAndPlacementsAreReported) {
  auto model = LoadModel("bench-default");
  auto hardware = ParseHardware(kHardware);  // 1 GiB of device memory
  auto over = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "device_budget_gib": 2})");
  ASSERT_TRUE(model.ok() && hardware.ok() && over.ok());
  auto report = Plan(*model, *hardware, *over);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(report->feasible);
  ASSERT_FALSE(report->short_of.empty());
  EXPECT_NE(report->short_of[0].find("exceed the device's 1.00 GiB"), std::string::npos)
      << report->short_of[0];
  auto many = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "domains_per_step": 41})");
  ASSERT_TRUE(many.ok());
  EXPECT_EQ(Plan(*model, *hardware, *many).status().message(),
            "workload.domains_per_step: 41 is more than the model's 40 domains");
  auto diskless = ParseHardware(R"({"device": {"kind": "sim", "memory_gib": 1,
      "profile": "h100-sxm"}, "host": {"memory_gib": 8, "optimizer_threads": 1,
      "optimizer_params_per_s_per_thread": 5e8}})");
  ASSERT_TRUE(diskless.ok()) << diskless.status();
  auto nvme = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "placement": {"states": "nvme"},
      "device_budget_gib": 0.25})");
  ASSERT_TRUE(nvme.ok());
  report = Plan(*model, *diskless, *nvme);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(report->feasible);
  EXPECT_FALSE(report->predictions.front().feasible);
  EXPECT_NE(report->predictions.front().why_not.find("no NVMe drives"), std::string::npos);
}

// --only-workload-strategy: the workload's prediction alone, the very one the comparison
// starts with (each strategy's simulation is its own).
TEST(PlannerTest, TheWorkloadsStrategyAloneIsTheComparisonsFirst) {
  auto model = LoadModel("bench-default");
  auto hardware = ParseHardware(kHardware);
  auto workload = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "micro_batches": 2,
      "strategy": "zero-offload"})");
  ASSERT_TRUE(model.ok() && hardware.ok() && workload.ok());
  auto every = Plan(*model, *hardware, *workload);
  auto alone = Plan(*model, *hardware, *workload, Strategies::kWorkloadOnly);
  ASSERT_TRUE(every.ok() && alone.ok()) << every.status() << alone.status();
  ASSERT_EQ(every->predictions.size(), 4u);
  ASSERT_EQ(alone->predictions.size(), 1u);
  const StrategyPrediction& a = alone->predictions[0];
  const StrategyPrediction& e = every->predictions[0];
  EXPECT_EQ(a.strategy, Strategy::kZeroOffload);
  ASSERT_TRUE(a.feasible && e.feasible) << a.why_not << e.why_not;
  EXPECT_EQ(a.step_seconds, e.step_seconds);
  EXPECT_EQ(a.tokens_per_s, e.tokens_per_s);
  EXPECT_EQ(a.metrics.bottleneck, e.metrics.bottleneck);
  EXPECT_EQ(a.last_plan.ops().size(), e.last_plan.ops().size());
  EXPECT_EQ(alone->memory.items.size(), every->memory.items.size());
  EXPECT_EQ(alone->feasible, every->feasible);
  // --optimize takes it too: the chosen workload's strategy alone.
  auto best = Optimize(*model, *hardware, *workload, Strategies::kWorkloadOnly);
  ASSERT_TRUE(best.ok()) << best.status();
  EXPECT_EQ(best->predictions.size(), 1u);
  EXPECT_FALSE(best->optimized.empty());
}

// --optimize: a model whose states do not fit host memory gets them on NVMe, and says so.
TEST(PlannerTest, OptimizeMovesTheStatesThatDoNotFitToNvme) {
  auto model = LoadModel("bench-default");  // 320 experts of 1 Mi parameters: 3.75 GiB of states
  std::string small_host = kHardware;
  small_host.replace(small_host.find(R"("memory_gib": 8)"), 15, R"("memory_gib": 4)");
  auto hardware = ParseHardware(small_host);
  auto workload = ParseWorkload(R"({"tokens_per_micro_batch": 1024, "domains_per_step": 2,
      "device_budget_gib": 0.25})");
  ASSERT_TRUE(model.ok() && hardware.ok() && workload.ok()) << hardware.status();
  auto given = Plan(*model, *hardware, *workload);
  ASSERT_TRUE(given.ok()) << given.status();
  EXPECT_FALSE(given->feasible);
  auto best = Optimize(*model, *hardware, *workload);
  ASSERT_TRUE(best.ok()) << best.status();
  EXPECT_TRUE(best->feasible) << ::testing::PrintToString(best->optimized);
  EXPECT_EQ(best->workload.states, Tier::kNvme);
  EXPECT_EQ(best->workload.tokens_per_micro_batch * best->workload.micro_batches, 1024u);
  ASSERT_GE(best->optimized.size(), 3u);
  EXPECT_EQ(best->optimized[0].rfind("given:", 0), 0u);
  EXPECT_NE(best->optimized[0].find("does not fit"), std::string::npos) << best->optimized[0];
  EXPECT_EQ(best->optimized[1].rfind("chosen: weights", 0), 0u) << best->optimized[1];
}

}  // namespace
}  // namespace ecss::plan
