// The plan recorder alone: the times it gives an executed plan's ops, with hand-made clocks.
#include "engine/plan_recorder.h"

#include <chrono>
#include <map>
#include <string>

#include <gtest/gtest.h>

#include "engine/step_metrics.h"

namespace ecss {
namespace {

// The step plan of step_plan_test's ecss case: two sparse layers of four experts,
// `micro_batches` micro-batches each routed to experts 0 and 2 (layer 0) and 1 (layer 1).
StepPlan Plan(size_t micro_batches = 1) {
  StepPlanInputs in;
  in.model.d_model = 5;
  in.model.d_ff = 10;
  in.model.d_in = 10;
  in.model.params = 100;
  in.model.weight_bytes = 2;
  in.model.state_arrays = 3;
  in.model.experts_per_layer = {4, 4};
  in.policy.strategy = Strategy::kEcss;
  in.policy.cache_slots = 4;
  MicroBatchRoute b;
  b.tokens = 8;
  b.plan_bytes = 256;
  b.layers = {{{0, 2}, {5, 3}}, {{1}, {8}}};
  in.micro_batches.assign(micro_batches, b);
  auto plan = BuildStepPlan(in);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return std::move(plan).value();
}

// An update carried into a step is timed by the optimizer step it stands for, clipped to the
// step's start: a step that waits for the updates of the step before has them on its
// critical path, not the host.
TEST(PlanRecorderTest, ACarriedUpdateHasTheTimesOfTheUpdatesItStandsFor) {
  using std::chrono::milliseconds;
  const StepPlan plan = Plan();
  const PlanOp* carried = nullptr;  // step t-1's updates, which the fetches wait for
  const PlanOp* layer0 = nullptr;   // this step's update of layer 0
  for (const PlanOp* update : plan.Find(OpKind::kUpdate)) {
    if (update->step_offset == -1) carried = update;
    if (update->step_offset == 0 && update->layer == 0) layer0 = update;
  }
  ASSERT_NE(carried, nullptr);
  ASSERT_NE(layer0, nullptr);
  PlanRecorder recorder;
  const PlanRecorder::Clock::time_point t0{};
  for (uint64_t step : {1, 2}) {
    recorder.BeginStep(step, t0 + milliseconds(1000 * (step - 1)));
    recorder.SetPlan(step, plan);
    recorder.MapUpdaterStep(step, step, 0);
  }
  recorder.MapUpdaterStep(1, 2, -1);  // step 2's fetches wait for the optimizer's step 1
  recorder.UpdateRan(1, 0, t0 + milliseconds(500), t0 + milliseconds(1300));  // into step 2
  recorder.UpdateRan(1, 1, t0 + milliseconds(600), t0 + milliseconds(1400));
  recorder.UpdateRan(2, 0, t0 + milliseconds(1600), t0 + milliseconds(1800));
  recorder.EndStep(2, t0 + milliseconds(2000));

  StatusOr<StepPlan> first = recorder.ExecutedPlan(1);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_DOUBLE_EQ(first->ops()[layer0->id].start_s, 0.5);
  EXPECT_DOUBLE_EQ(first->ops()[layer0->id].end_s, 1.3);
  EXPECT_LT(first->ops()[carried->id].end_s, 0) << "step 1 has no step before it";
  StatusOr<StepPlan> second = recorder.ExecutedPlan(2);
  ASSERT_TRUE(second.ok()) << second.status();
  const PlanOp& before = second->ops()[carried->id];
  EXPECT_DOUBLE_EQ(before.start_s, 0.0);  // both layers of step 1, from step 2's start
  EXPECT_NEAR(before.end_s, 0.4, 1e-12);
  EXPECT_NEAR(second->ops()[layer0->id].start_s, 0.6, 1e-12);
  EXPECT_NEAR(second->ops()[layer0->id].end_s, 0.8, 1e-12);
  for (const PlanOp* update : second->Find(OpKind::kUpdate)) {
    if (update->step_offset == -2) {
      EXPECT_LT(update->end_s, 0) << "step 0 never ran";
    }
  }
  // From the last op back: host 0.2, the update of layer 0 0.2, host 0.2 (waiting for its
  // gradients, which were not observed), then the same resource's op before it, step 1's.
  std::map<std::string, double> share;
  for (const PathShare& each : CriticalPath(*second)) share[each.kind] = each.share;
  EXPECT_NEAR(share["update"], 0.6, 1e-12);
  EXPECT_NEAR(share["host"], 0.4, 1e-12);
}

// Later micro-batches' additions run one at a time on the host's add stream: an addition
// issued while the one before still ran starts when that one ended, not when its own copy did.
TEST(PlanRecorderTest, AnAdditionStartsWhenTheOneBeforeItEnded) {
  using std::chrono::milliseconds;
  const StepPlan plan = Plan(2);
  const std::vector<const PlanOp*> adds = plan.Find(OpKind::kAccumulate);
  ASSERT_EQ(adds.size(), 2u);
  const PlanOp& copy0 = plan.ops()[adds[0]->deps.at(0)];
  const PlanOp& copy1 = plan.ops()[adds[1]->deps.at(0)];
  PlanRecorder recorder;
  const PlanRecorder::Clock::time_point t0{};
  recorder.BeginStep(1, t0);
  recorder.SetPlan(1, plan);
  auto ended = [&](uint32_t id, int ms) {  // issued at the step's begin
    recorder.Ran(1, id, t0, t0 + milliseconds(ms));
  };
  ended(copy0.id, 10);
  ended(adds[0]->id, 50);
  ended(copy1.id, 20);
  ended(adds[1]->id, 90);
  StatusOr<StepPlan> executed = recorder.ExecutedPlan(1);
  ASSERT_TRUE(executed.ok()) << executed.status();
  EXPECT_NEAR(executed->ops()[adds[0]->id].start_s, 0.010, 1e-12);
  EXPECT_NEAR(executed->ops()[adds[1]->id].start_s, 0.050, 1e-12);  // not its copy's 0.020
  EXPECT_NEAR(executed->ops()[adds[1]->id].end_s, 0.090, 1e-12);
}

}  // namespace
}  // namespace ecss
