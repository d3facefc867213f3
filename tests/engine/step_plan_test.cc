// The step plan alone: built without a device, checked against hand-computed ops, bytes and
// edges for every strategy, placement and routing.
#include "engine/step_plan.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>
#include <random>

#include <gtest/gtest.h>

#include "engine/session_options.h"
#include "engine/step_metrics.h"
#include "runtime/base/json_writer.h"

namespace ecss {
namespace {

// Two sparse layers of four experts, 100 parameters each (bf16 weights, AdamW).
PlanModel Model() {
  PlanModel m;
  m.d_model = 5;
  m.d_ff = 10;
  m.d_in = 10;
  m.params = 100;
  m.weight_bytes = 2;
  m.state_arrays = 3;
  m.experts_per_layer = {4, 4};
  return m;
}

// One micro-batch of 8 tokens: layer 0 routes 5 rows to expert 0 and 3 to expert 2; layer 1
// routes all 8 to expert 1.
MicroBatchRoute Batch() {
  MicroBatchRoute b;
  b.tokens = 8;
  b.plan_bytes = 256;
  b.layers = {{{0, 2}, {5, 3}}, {{1}, {8}}};
  return b;
}

StepPlan Build(PlanPolicy policy, std::vector<MicroBatchRoute> batches = {Batch()}) {
  StepPlanInputs in;
  in.model = Model();
  in.policy = policy;
  in.micro_batches = std::move(batches);
  auto plan = BuildStepPlan(in);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return std::move(plan).value();
}

PlanPolicy Policy(Strategy strategy, uint32_t slots = 4) {
  PlanPolicy p;
  p.strategy = strategy;
  p.cache_slots = slots;
  return p;
}

std::vector<uint32_t> Deps(const StepPlan& plan, uint32_t id) { return plan.ops()[id].deps; }

TEST(StepPlanTest, EcssListsTheRoutedExpertsWithTheirEdges) {
  const StepPlan plan = Build(Policy(Strategy::kEcss));
  const auto& ops = plan.ops();
  ASSERT_EQ(ops.size(), 14u);
  // 0, 1: step t-2's and t-1's updates (carried in); 2: the plan's upload.
  EXPECT_EQ(ops[0].step_offset, -2);
  EXPECT_EQ(ops[1].step_offset, -1);
  EXPECT_EQ(ops[2].kind, OpKind::kPlanUpload);
  EXPECT_EQ(ops[2].bytes, 256u);
  EXPECT_EQ(Deps(plan, 2), std::vector<uint32_t>({0}));  // the step waits for t-2 only
  // Forward of layer 0: its two experts fetched (each waiting for its update of t-1 only).
  EXPECT_EQ(ops[3].kind, OpKind::kFetch);
  EXPECT_EQ(ops[3].experts, std::vector<uint32_t>({0}));
  EXPECT_EQ(ops[3].bytes, 200u);
  EXPECT_EQ(Deps(plan, 3), std::vector<uint32_t>({1}));
  EXPECT_EQ(ops[4].experts, std::vector<uint32_t>({2}));
  EXPECT_EQ(ops[5].kind, OpKind::kForward);
  EXPECT_EQ(ops[5].resource, PlanResource::kCompute);
  EXPECT_EQ(ops[5].flops, 2.0 * 8 * 100);
  EXPECT_EQ(ops[5].rows, std::vector<uint32_t>({5, 3}));
  EXPECT_EQ(Deps(plan, 5), std::vector<uint32_t>({2, 3, 4}));
  // Layer 1: one fetch, its forward after layer 0's.
  EXPECT_EQ(ops[6].kind, OpKind::kFetch);
  EXPECT_EQ(Deps(plan, 7), std::vector<uint32_t>({2, 5, 6}));
  // Backward of layer 1 (a hit: it waits for the fetch of op 6), its gradient copy.
  EXPECT_EQ(ops[8].kind, OpKind::kBackward);
  EXPECT_EQ(ops[8].flops, 3 * 2.0 * 8 * 100);
  EXPECT_EQ(Deps(plan, 8), std::vector<uint32_t>({2, 6, 7}));
  EXPECT_EQ(ops[9].kind, OpKind::kGradientCopy);
  EXPECT_EQ(ops[9].resource, PlanResource::kD2h);
  EXPECT_EQ(ops[9].bytes, 400u);
  EXPECT_EQ(ops[10].kind, OpKind::kBackward);
  EXPECT_EQ(ops[11].bytes, 800u);
  // The updates wait for every gradient (the global norm: clipping or the overflow skip).
  EXPECT_EQ(ops[12].kind, OpKind::kUpdate);
  EXPECT_EQ(ops[12].layer, 0);
  EXPECT_EQ(ops[12].experts, std::vector<uint32_t>({0, 2}));
  EXPECT_EQ(ops[12].bytes, 2u * 100 * 30);  // 30 B per parameter: AdamW with a bf16 copy
  EXPECT_EQ(Deps(plan, 12), std::vector<uint32_t>({9, 11}));
  EXPECT_EQ(ops[13].layer, 1);
  EXPECT_EQ(plan.Count(OpKind::kFetch), 3u);
  EXPECT_EQ(plan.Bytes(OpKind::kFetch), 600u);
  EXPECT_EQ(plan.Count(OpKind::kEvict), 0u);
  for (const PlanOp& op : ops) EXPECT_FALSE(op.host_waits) << op.id;
  EXPECT_TRUE(plan.fetches_ahead());
  const std::vector<ExpertId> sequence = {{0, 0}, {0, 2}, {1, 1}, {1, 1}, {0, 0}, {0, 2}};
  EXPECT_EQ(plan.AccessSequence(), sequence);
}

TEST(StepPlanTest, ImmediateUpdatesFollowEachLayersLastGradient) {
  PlanPolicy policy = Policy(Strategy::kEcss);
  policy.deferred_updates = false;
  const StepPlan plan = Build(policy);
  const auto& ops = plan.ops();
  ASSERT_EQ(ops.size(), 14u);
  EXPECT_EQ(ops[10].kind, OpKind::kUpdate);
  EXPECT_EQ(ops[10].layer, 1);
  EXPECT_EQ(Deps(plan, 10), std::vector<uint32_t>({9}));
  EXPECT_EQ(ops[13].kind, OpKind::kUpdate);
  EXPECT_EQ(Deps(plan, 13), std::vector<uint32_t>({12}));
}

// No-overlap: the same ops; each device-side stage waits on the host for the stage before it
// (an access's fetches are one stage: issued together, then its compute waits for all of
// them), a layer's update that starts in the backward is a stage too (nothing overlaps the
// optimizer), and the step's end waits for the updates.
TEST(StepPlanTest, NoOverlapIsTheSameOpsEachStageWaitingForThePrevious) {
  PlanPolicy policy = Policy(Strategy::kNoOverlap);
  policy.deferred_updates = false;
  const StepPlan serial = Build(policy);
  policy.strategy = Strategy::kEcss;
  const StepPlan ecss = Build(policy);
  ASSERT_EQ(serial.ops().size(), ecss.ops().size());
  const auto& ops = serial.ops();
  for (size_t i = 0; i < ops.size(); ++i) {
    EXPECT_EQ(ops[i].kind, ecss.ops()[i].kind);
    EXPECT_EQ(ops[i].bytes, ecss.ops()[i].bytes);
    // Gradient copies join their backward's stage (ordered on the device).
    const bool chained = ops[i].step_offset == 0 && ops[i].kind != OpKind::kGradientCopy && i > 2;
    EXPECT_EQ(ops[i].host_waits, chained) << i;
  }
  // Layer 0's two fetches (ops 3 and 4) both wait for the upload (op 2), not for each other;
  // its forward (op 5) waits for both.
  EXPECT_EQ(ops[3].deps, std::vector<uint32_t>({1, 2}));
  EXPECT_EQ(ops[4].deps, std::vector<uint32_t>({1, 2}));
  EXPECT_EQ(ops[5].deps, std::vector<uint32_t>({2, 3, 4}));
  // Layer 1's fetch (op 6) waits for that forward.
  EXPECT_EQ(ops[6].deps, std::vector<uint32_t>({1, 5}));
  // Layer 1's backward (op 8) and its gradient copy (op 9) are one stage; layer 1's update
  // (op 10) waits for both, and layer 0's backward (op 11, all hits) waits for the update; its
  // copy (op 12) does not wait on the host, and layer 0's update (op 13) waits for both.
  EXPECT_EQ(ops[9].kind, OpKind::kGradientCopy);
  EXPECT_EQ(ops[9].deps, std::vector<uint32_t>({8}));
  EXPECT_EQ(ops[10].kind, OpKind::kUpdate);
  EXPECT_TRUE(std::count(ops[10].deps.begin(), ops[10].deps.end(), 8u) == 1 &&
              std::count(ops[10].deps.begin(), ops[10].deps.end(), 9u) == 1);
  EXPECT_EQ(ops[11].kind, OpKind::kBackward);
  EXPECT_TRUE(ops[11].host_waits);
  EXPECT_EQ(std::count(ops[11].deps.begin(), ops[11].deps.end(), 10u), 1);
  EXPECT_EQ(ops[13].kind, OpKind::kUpdate);
  EXPECT_TRUE(std::count(ops[13].deps.begin(), ops[13].deps.end(), 11u) == 1 &&
              std::count(ops[13].deps.begin(), ops[13].deps.end(), 12u) == 1);
  EXPECT_FALSE(serial.fetches_ahead());
  EXPECT_TRUE(serial.step_waits_for_updates());
  EXPECT_FALSE(ecss.step_waits_for_updates());
}

// The critical path walks back from the op that ended last through the dependency that ended
// last; the gaps are the host's.
TEST(StepPlanTest, TheCriticalPathOfAnExecutedPlan) {
  StepPlan plan = Build(Policy(Strategy::kEcss));
  const uint32_t forward = plan.Compute(OpKind::kForward, 0, 0)->id;
  uint32_t fetch = 0;
  for (uint32_t dep : plan.ops()[forward].deps) {
    if (plan.ops()[dep].kind == OpKind::kFetch) fetch = dep;
  }
  ASSERT_EQ(plan.ops()[fetch].kind, OpKind::kFetch);
  plan.mutable_ops()[fetch].start_s = 0.1;
  plan.mutable_ops()[fetch].end_s = 0.3;
  plan.mutable_ops()[forward].start_s = 0.5;
  plan.mutable_ops()[forward].end_s = 0.9;
  plan.set_seconds(1.0);
  const std::vector<PathShare> path = CriticalPath(plan);
  ASSERT_EQ(path.size(), 3u);
  std::map<std::string, double> share;
  for (const PathShare& each : path) share[each.kind] = each.share;
  EXPECT_NEAR(share["forward"], 0.4, 1e-12);
  EXPECT_NEAR(share["host"], 0.4, 1e-12);  // before the fetch, between, after the forward
  EXPECT_NEAR(share["fetch"], 0.2, 1e-12);
  EXPECT_EQ(path.back().kind, "fetch");  // largest first

  // The fetch issued while the updates of the step before still ran (the union of their
  // experts'; the fetch's expert's had ended): the path goes through them, up to the fetch.
  StepPlan waited = plan;
  const PlanOp& gate = waited.ops()[waited.ops()[fetch].deps.at(0)];
  ASSERT_EQ(gate.kind, OpKind::kUpdate);
  ASSERT_EQ(gate.step_offset, -1);
  waited.mutable_ops()[gate.id].start_s = 0;  // it began before this step
  waited.mutable_ops()[gate.id].end_s = 0.5;
  waited.mutable_ops()[fetch].start_s = 0.3;
  waited.mutable_ops()[fetch].end_s = 0.35;
  waited.mutable_ops()[forward].start_s = 0.35;
  std::map<std::string, double> waits;
  for (const PathShare& each : CriticalPath(waited)) waits[each.kind] = each.share;
  EXPECT_EQ(waits.size(), 4u);
  EXPECT_NEAR(waits["update"], 0.3, 1e-12);
  EXPECT_NEAR(waits["fetch"], 0.05, 1e-12);
  EXPECT_NEAR(waits["forward"], 0.55, 1e-12);
  EXPECT_NEAR(waits["host"], 0.1, 1e-12);

  // Every op observed, one after another with gaps: the shares add up to the step.
  StepPlan all = Build(Policy(Strategy::kNoOverlap));
  const auto n = static_cast<double>(all.ops().size());
  for (PlanOp& op : all.mutable_ops()) {
    op.start_s = op.id;
    op.end_s = op.id + 0.5;
  }
  all.set_seconds(n);
  double total = 0;
  for (const PathShare& each : CriticalPath(all)) total += each.share;
  EXPECT_NEAR(total, 1.0, 1e-12);
  // Nothing observed: all host.
  StepPlan unobserved = Build(Policy(Strategy::kEcss));
  unobserved.set_seconds(2.0);
  const std::vector<PathShare> none = CriticalPath(unobserved);
  ASSERT_EQ(none.size(), 1u);
  EXPECT_EQ(none[0].kind, "host");
  EXPECT_DOUBLE_EQ(none[0].share, 1.0);
}

TEST(StepPlanTest, NaiveMovesEveryExpertOfEveryLayer) {
  const StepPlan roomy = Build(Policy(Strategy::kNaive, 8));
  EXPECT_EQ(roomy.Count(OpKind::kFetch), 8u);
  EXPECT_EQ(roomy.Count(OpKind::kEvict), 0u);
  EXPECT_EQ(roomy.Bytes(OpKind::kGradientCopy), 8u * 400);
  const PlanOp* forward = roomy.Compute(OpKind::kForward, 0, 0);
  ASSERT_NE(forward, nullptr);
  EXPECT_EQ(forward->experts, std::vector<uint32_t>({0, 1, 2, 3}));
  EXPECT_EQ(forward->rows, std::vector<uint32_t>({5, 0, 3, 0}));
  EXPECT_EQ(roomy.Bytes(OpKind::kUpdate), 8u * 100 * 30);
  // Four slots: layer 1's forward evicts layer 0, whose backward fetches it again.
  const StepPlan tight = Build(Policy(Strategy::kNaive, 4));
  EXPECT_EQ(tight.Count(OpKind::kFetch), 12u);
  EXPECT_EQ(tight.Count(OpKind::kEvict), 8u);
  EXPECT_EQ(tight.Bytes(OpKind::kFetch), 12u * 200);
}

// bf16 gradients: the copies to the host and the updates' gradient reads are half as many
// bytes.
TEST(StepPlanTest, Bf16GradientsHalveTheGradientBytes) {
  StepPlanInputs in;
  in.model = Model();
  in.policy = Policy(Strategy::kEcss);
  in.micro_batches = {Batch()};
  const StatusOr<StepPlan> f32 = BuildStepPlan(in);
  in.model.gradient_bytes = 2;
  const StatusOr<StepPlan> bf16 = BuildStepPlan(in);
  ASSERT_TRUE(f32.ok() && bf16.ok());
  EXPECT_EQ(bf16->Bytes(OpKind::kGradientCopy) * 2, f32->Bytes(OpKind::kGradientCopy));
  EXPECT_GT(bf16->Bytes(OpKind::kGradientCopy), 0u);
  // Per parameter: the gradient read, master and moments read and written, the bf16 copy.
  EXPECT_EQ(f32->Bytes(OpKind::kUpdate) - bf16->Bytes(OpKind::kUpdate),
            f32->Bytes(OpKind::kUpdate) / (4 + 2 * 3 * 4 + 2) * 2);
}

// Zero-offload: naive's accesses and updates, with ecss's edges: no stage waits on the host
// for the one before it, so fetches run ahead; the step still waits for its own updates.
TEST(StepPlanTest, ZeroOffloadMovesEveryExpertWithFetchesAhead) {
  const StepPlan naive = Build(Policy(Strategy::kNaive, 8));
  const StepPlan zero = Build(Policy(Strategy::kZeroOffload, 8));
  for (OpKind kind : {OpKind::kFetch, OpKind::kGradientCopy, OpKind::kUpdate}) {
    EXPECT_EQ(zero.Count(kind), naive.Count(kind)) << OpKindName(kind);
    EXPECT_EQ(zero.Bytes(kind), naive.Bytes(kind)) << OpKindName(kind);
  }
  EXPECT_EQ(zero.Compute(OpKind::kForward, 0, 0)->experts, std::vector<uint32_t>({0, 1, 2, 3}));
  EXPECT_TRUE(zero.fetches_ahead());
  EXPECT_FALSE(naive.fetches_ahead());
  EXPECT_TRUE(zero.step_waits_for_updates());
  for (const PlanOp* op : zero.Find(OpKind::kFetch)) EXPECT_FALSE(op->host_waits);
  size_t host_waits = 0;
  for (const PlanOp* op : naive.Find(OpKind::kFetch)) host_waits += op->host_waits ? 1 : 0;
  EXPECT_GT(host_waits, 0u);
}

// Two slots: layer 1's forward evicts the layer-0 expert used last (Belady: expert 2, used
// after expert 0 in the backward); layer 0's backward then evicts layer 1's expert (never used
// again) to fetch expert 2 again. Each eviction waits for the victim's last use.
TEST(StepPlanTest, TheCacheEvictsByNextUse) {
  const StepPlan plan = Build(Policy(Strategy::kEcss, 2));
  const std::vector<const PlanOp*> evicts = plan.Find(OpKind::kEvict);
  ASSERT_EQ(evicts.size(), 2u);
  EXPECT_EQ(evicts[0]->layer, 0);
  EXPECT_EQ(evicts[0]->experts, std::vector<uint32_t>({2}));
  EXPECT_EQ(evicts[0]->deps, std::vector<uint32_t>({plan.Compute(OpKind::kForward, 0, 0)->id}));
  EXPECT_EQ(evicts[1]->layer, 1);
  EXPECT_EQ(evicts[1]->deps, std::vector<uint32_t>({plan.Compute(OpKind::kBackward, 0, 1)->id}));
  EXPECT_EQ(plan.Count(OpKind::kFetch), 4u);
  // A layer wider than the cache cannot be planned.
  const StatusOr<StepPlan> too_wide = [] {
    StepPlanInputs in;
    in.model = Model();
    in.policy = Policy(Strategy::kNaive, 3);
    in.micro_batches = {Batch()};
    return BuildStepPlan(in);
  }();
  EXPECT_EQ(too_wide.status().code(), StatusCode::kResourceExhausted);
}

TEST(StepPlanTest, StatesAndWeightsOnNvmeAddTheirReadsAndWrites) {
  PlanPolicy policy = Policy(Strategy::kEcss);
  policy.states_on_nvme = true;
  policy.weights_on_nvme = true;
  const StepPlan plan = Build(policy);
  EXPECT_EQ(plan.Count(OpKind::kStage), 3u);  // one per fetch
  EXPECT_EQ(plan.Bytes(OpKind::kStage), 600u);
  for (const PlanOp* fetch : plan.Find(OpKind::kFetch)) {
    ASSERT_EQ(fetch->deps.size(), 1u);
    EXPECT_EQ(plan.ops()[fetch->deps[0]].kind, OpKind::kStage);
  }
  // Per update: master and moments read (12 B / param), then written with the bf16 weights.
  EXPECT_EQ(plan.Bytes(OpKind::kStateRead), 3u * 100 * 12);
  EXPECT_EQ(plan.Bytes(OpKind::kStateWrite), 3u * 100 * 14);
  for (const PlanOp* update : plan.Find(OpKind::kUpdate)) {
    if (update->step_offset != 0) continue;
    EXPECT_EQ(plan.ops()[update->deps[0]].kind, OpKind::kStateRead);
    EXPECT_EQ(plan.ops()[update->id + 1].kind, OpKind::kStateWrite);
    EXPECT_EQ(plan.ops()[update->id + 1].deps, std::vector<uint32_t>({update->id}));
  }
}

// Two micro-batches: the second's gradients are added to the first's on the host, in order;
// an addition covers the experts with gradients of an earlier micro-batch, not the ones the
// later micro-batch touches first (their gradients are copied straight into place).
TEST(StepPlanTest, LaterMicroBatchesAccumulate) {
  const StepPlan plan = Build(Policy(Strategy::kEcss), {Batch(), Batch()});
  EXPECT_EQ(plan.Count(OpKind::kPlanUpload), 2u);
  EXPECT_EQ(plan.Count(OpKind::kGradientCopy), 4u);
  const std::vector<const PlanOp*> adds = plan.Find(OpKind::kAccumulate);
  ASSERT_EQ(adds.size(), 2u);
  EXPECT_EQ(adds[0]->micro_batch, 1);
  EXPECT_EQ(plan.Count(OpKind::kUpdate), 2u);
  EXPECT_EQ(plan.Count(OpKind::kFetch), 3u) << "the second micro-batch hits";

  MicroBatchRoute partly = Batch();
  partly.layers[0] = {{0, 3}, {4, 4}};  // expert 0 again, expert 3 first
  const StepPlan mixed = Build(Policy(Strategy::kEcss), {Batch(), partly});
  const std::vector<const PlanOp*> layer0 = mixed.Find(OpKind::kAccumulate, 1, 0);
  ASSERT_EQ(layer0.size(), 1u);
  EXPECT_EQ(layer0[0]->experts, std::vector<uint32_t>({0}));
  const PlanOp& copy = mixed.ops()[layer0[0]->deps.at(0)];
  EXPECT_EQ(copy.experts, std::vector<uint32_t>({0, 3}));
  EXPECT_EQ(layer0[0]->bytes * 2, copy.bytes);

  // Copies stage later micro-batches' gradients in two pinned halves in turn: each after the
  // addition two before it, which read that half; the first two wait for no addition.
  const StepPlan three = Build(Policy(Strategy::kEcss), {Batch(), Batch(), Batch()});
  const std::vector<const PlanOp*> additions = three.Find(OpKind::kAccumulate);
  ASSERT_EQ(additions.size(), 4u);
  for (size_t k = 0; k < additions.size(); ++k) {
    const PlanOp& staged = three.ops()[additions[k]->deps.at(0)];
    ASSERT_EQ(staged.kind, OpKind::kGradientCopy);
    std::vector<uint32_t> waits_for;
    for (uint32_t dep : staged.deps) {
      if (three.ops()[dep].kind == OpKind::kAccumulate) waits_for.push_back(dep);
    }
    EXPECT_EQ(waits_for, k < 2 ? std::vector<uint32_t>{} : std::vector{additions[k - 2]->id})
        << "addition " << k;
  }
}

// The device's gradient region is one: each backward but the first waits for the copies out of
// it of the backward before it (which may wait for a staging half's addition in turn), in
// every strategy, across layers and micro-batches.
TEST(StepPlanTest, EachBackwardWaitsForTheGradientCopyBeforeIt) {
  for (Strategy strategy :
       {Strategy::kEcss, Strategy::kZeroOffload, Strategy::kNoOverlap, Strategy::kNaive}) {
    const StepPlan plan = Build(Policy(strategy), {Batch(), Batch(), Batch()});
    const PlanOp* copy_before = nullptr;
    int backwards = 0;
    for (const PlanOp& op : plan.ops()) {
      if (op.kind == OpKind::kBackward) {
        ++backwards;
        const bool waits = copy_before != nullptr &&
                           std::count(op.deps.begin(), op.deps.end(), copy_before->id) == 1;
        EXPECT_EQ(waits, copy_before != nullptr)
            << StrategyName(strategy) << ": backward " << op.id << " of micro-batch "
            << op.micro_batch << " layer " << op.layer;
      }
      if (op.kind == OpKind::kGradientCopy) copy_before = &op;
    }
    EXPECT_EQ(backwards, 6) << StrategyName(strategy);
  }
}

// The delayed update: the step begins by publishing step t-2's update and starting step
// t-1's (the held gradients); its own gradients are not updated in its plan.
TEST(StepPlanTest, TheDelayedUpdateShiftsUpdatesByOneStep) {
  StepPlanInputs in;
  in.model = Model();
  in.policy = Policy(Strategy::kEcss);
  in.policy.delayed_update = true;
  in.micro_batches = {Batch()};
  in.held_experts = 3;
  const StatusOr<StepPlan> plan = BuildStepPlan(in);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const auto& ops = plan->ops();
  EXPECT_EQ(ops[1].kind, OpKind::kPublish);
  EXPECT_EQ(ops[1].deps, std::vector<uint32_t>({0}));
  EXPECT_EQ(ops[2].kind, OpKind::kUpdate);
  EXPECT_EQ(ops[2].step_offset, -1);
  EXPECT_EQ(ops[2].bytes, 3u * 100 * 30);
  EXPECT_EQ(plan->Count(OpKind::kUpdate), 0u) << "this step's gradients wait for the next";
  for (const PlanOp* fetch : plan->Find(OpKind::kFetch)) {
    EXPECT_EQ(fetch->deps, std::vector<uint32_t>({1})) << "fetches read what was published";
  }
}

// Learned gates: layers are appended as their gates run; eviction is LRU.
TEST(StepPlanTest, LearnedGatesAppendLayersAsTheyAreRouted) {
  PlanPolicy policy = Policy(Strategy::kEcss, 2);
  policy.learned_gate = true;
  MicroBatchRoute batch;
  batch.tokens = 8;
  StatusOr<StepPlan> built = [&] {
    StepPlanInputs in;
    in.model = Model();
    in.policy = policy;
    in.micro_batches = {batch};
    in.resident = {{1, 3}, {0, 1}};  // (1, 3) least recently used
    return BuildStepPlan(in);
  }();
  ASSERT_TRUE(built.ok()) << built.status();
  StepPlan& plan = *built;
  EXPECT_EQ(plan.ops().size(), 2u) << "only the carried updates before any gate ran";
  EXPECT_EQ(plan.AppendBackward(0, 0).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(plan.AppendForward(0, 0, {{1, 2}, {4, 4}}, 64).ok());
  EXPECT_EQ(plan.AppendForward(0, 0, {{1, 2}, {4, 4}}, 64).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.AppendForward(0, 2, {{1}, {8}}, 64).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.AppendForward(0, 1, {{3, 1}, {4, 4}}, 64).code(), StatusCode::kInvalidArgument)
      << "not ascending";
  EXPECT_EQ(plan.Count(OpKind::kPlanUpload), 1u);
  // (0, 1) was resident: a hit; (0, 2) evicts the least recently used, (1, 3).
  const std::vector<const PlanOp*> evicts = plan.Find(OpKind::kEvict);
  ASSERT_EQ(evicts.size(), 1u);
  EXPECT_EQ(evicts[0]->layer, 1);
  EXPECT_EQ(evicts[0]->experts, std::vector<uint32_t>({3}));
  ASSERT_TRUE(plan.AppendForward(0, 1, {{0}, {8}}, 64).ok());
  ASSERT_TRUE(plan.AppendBackward(0, 1).ok());
  ASSERT_TRUE(plan.AppendBackward(0, 0).ok());
  EXPECT_EQ(plan.Count(OpKind::kUpdate), 0u) << "deferred: at the step's end";
  plan.Finish();
  plan.Finish();  // once
  EXPECT_EQ(plan.Count(OpKind::kUpdate), 2u);
  // Forward: (0, 1) hits, (0, 2) evicts (1, 3); (1, 0) evicts (0, 1). Backward: (1, 0) hits;
  // (0, 1) evicts (1, 0), not (0, 2), whose lease its layer holds; (0, 2) hits.
  EXPECT_EQ(plan.Count(OpKind::kFetch), 3u);
  const std::vector<const PlanOp*> all_evicts = plan.Find(OpKind::kEvict);
  ASSERT_EQ(all_evicts.size(), 3u);
  EXPECT_EQ(all_evicts[2]->layer, 1);
  EXPECT_EQ(all_evicts[2]->experts, std::vector<uint32_t>({0}));
}

TEST(StepPlanTest, WritesTheDocumentedJson) {
  StepPlan plan = Build(Policy(Strategy::kNoOverlap));
  plan.mutable_ops()[5].start_s = 0.25;
  plan.mutable_ops()[5].end_s = 0.5;
  JsonWriter json;
  plan.WriteJson(json);
  ASSERT_TRUE(json.complete());
  const std::string& s = json.str();
  EXPECT_NE(s.find("\"kind\":\"forward\""), std::string::npos) << s;
  EXPECT_NE(s.find("\"resource\":\"compute\""), std::string::npos);
  EXPECT_NE(s.find("\"start_s\":0.25"), std::string::npos);
  EXPECT_NE(s.find("\"host_waits\":true"), std::string::npos);
  EXPECT_NE(s.find("\"step_offset\":-2"), std::string::npos);
}

// An evaluation step: uploads, fetches and forwards only; its fetches wait for the experts'
// last updates; it has no backward (refused) and never waits for updates at its end.
TEST(StepPlanTest, AnEvaluationIsForwardOnly) {
  PlanPolicy policy = Policy(Strategy::kNoOverlap);
  policy.evaluation = true;
  StepPlan plan = Build(policy);
  EXPECT_EQ(plan.Count(OpKind::kForward), 2u);
  EXPECT_EQ(plan.Count(OpKind::kBackward), 0u);
  EXPECT_EQ(plan.Count(OpKind::kGradientCopy), 0u);
  EXPECT_EQ(plan.Count(OpKind::kUpdate), 0u);
  EXPECT_EQ(plan.Count(OpKind::kFetch), 3u);
  EXPECT_FALSE(plan.step_waits_for_updates());
  EXPECT_EQ(plan.AppendBackward(0, 0).code(), StatusCode::kFailedPrecondition) << "built whole";
  const std::vector<ExpertId> sequence = {{0, 0}, {0, 2}, {1, 1}};
  EXPECT_EQ(plan.AccessSequence(), sequence);
  // Appended layer by layer (learned gates), an evaluation's backward is refused too.
  policy.learned_gate = true;
  StepPlanInputs in;
  in.model = Model();
  in.policy = policy;
  in.micro_batches = {MicroBatchRoute{8, 0, {}}};
  StatusOr<StepPlan> gated = BuildStepPlan(in);
  ASSERT_TRUE(gated.ok()) << gated.status();
  ASSERT_TRUE(gated->AppendForward(0, 0, {{0, 2}, {5, 3}}, 64).ok());
  EXPECT_EQ(gated->AppendBackward(0, 0).code(), StatusCode::kInvalidArgument);
}

// The cache the plan keeps, by its definition: per compute op in plan order, each of its
// experts a hit or a fetch that evicts, outside the op's own experts, the resident used
// farthest ahead in the step's access sequence (RRE; never used again, or of equal uses, the
// lowest key) or the least recently used (learned gates). Returns the victims in order; leaves
// the residents after the step in `resident`, least recently used first.
std::vector<ExpertId> VictimsByDefinition(const StepPlan& plan, uint32_t slots, bool learned,
                                          std::vector<ExpertId>& resident) {
  const std::vector<ExpertId> sequence = plan.AccessSequence();
  std::vector<ExpertId> victims;
  uint64_t position = 0;
  for (const PlanOp& op : plan.ops()) {
    if (op.kind != OpKind::kForward && op.kind != OpKind::kBackward) continue;
    const auto layer = static_cast<uint32_t>(op.layer);
    auto in_op = [&](ExpertId k) {
      return k.layer == layer &&
             std::find(op.experts.begin(), op.experts.end(), k.expert) != op.experts.end();
    };
    for (uint32_t e : op.experts) {
      const ExpertId key{layer, e};
      auto hit = std::find(resident.begin(), resident.end(), key);
      if (hit != resident.end()) {
        resident.erase(hit);
      } else if (resident.size() >= slots) {
        std::optional<ExpertId> victim;
        uint64_t farthest = 0;
        for (ExpertId r : resident) {  // least recently used first
          if (in_op(r)) continue;
          if (learned) {
            victim = r;
            break;
          }
          auto next = std::find(sequence.begin() + static_cast<std::ptrdiff_t>(position) + 1,
                                sequence.end(), r);
          const uint64_t at =
              next == sequence.end() ? UINT64_MAX : static_cast<uint64_t>(next - sequence.begin());
          if (!victim || at > farthest || (at == farthest && r < *victim)) {
            victim = r;
            farthest = at;
          }
        }
        EXPECT_TRUE(victim.has_value());
        if (!victim) return victims;
        victims.push_back(*victim);
        resident.erase(std::find(resident.begin(), resident.end(), *victim));
      }
      resident.push_back(key);
      ++position;
    }
  }
  return victims;
}

// Steps of random routing over 6 layers of 16 experts with room for 12, the cache carried from
// step to step: every eviction the plan lists is the one its definition names, and so are the
// residents it hands to the next step, for RRE (built whole) and for learned gates (appended).
TEST(StepPlanTest, EvictionsAreTheirPolicysDefinitionOverManySteps) {
  constexpr uint32_t kLayers = 6, kExperts = 16, kSlots = 12;
  for (const bool learned : {false, true}) {
    std::mt19937 rng(learned ? 11 : 5);
    PlanModel model = Model();
    model.experts_per_layer.assign(kLayers, kExperts);
    PlanPolicy policy = Policy(Strategy::kEcss, kSlots);
    policy.learned_gate = learned;
    std::vector<ExpertId> resident;
    size_t evictions = 0;
    for (int step = 0; step < 6; ++step) {
      std::vector<MicroBatchRoute> batches(3);
      for (MicroBatchRoute& batch : batches) {
        batch.tokens = 64;
        batch.plan_bytes = learned ? 0 : 256;
        for (uint32_t l = 0; l < kLayers; ++l) {
          std::vector<uint32_t> all(kExperts);
          std::iota(all.begin(), all.end(), 0u);
          std::shuffle(all.begin(), all.end(), rng);
          all.resize(1 + rng() % 6);
          std::sort(all.begin(), all.end());
          batch.layers.push_back({all, std::vector<uint32_t>(all.size(), 4)});
        }
      }
      StepPlanInputs in;
      in.model = model;
      in.policy = policy;
      in.resident = resident;
      in.micro_batches = batches;
      if (learned) {
        for (MicroBatchRoute& batch : in.micro_batches) batch.layers.clear();
      }
      StatusOr<StepPlan> built = BuildStepPlan(in);
      ASSERT_TRUE(built.ok()) << built.status();
      if (learned) {
        for (uint32_t b = 0; b < batches.size(); ++b) {
          for (uint32_t l = 0; l < kLayers; ++l) {
            ASSERT_TRUE(built->AppendForward(b, l, batches[b].layers[l], 64).ok());
          }
          for (uint32_t l = kLayers; l-- > 0;) ASSERT_TRUE(built->AppendBackward(b, l).ok());
        }
        built->Finish();
      }
      std::vector<ExpertId> listed;
      for (const PlanOp* evict : built->Find(OpKind::kEvict)) {
        listed.push_back({static_cast<uint32_t>(evict->layer), evict->experts.at(0)});
      }
      EXPECT_EQ(listed, VictimsByDefinition(*built, kSlots, learned, resident))
          << (learned ? "learned gates" : "RRE") << ", step " << step;
      EXPECT_EQ(built->ResidentAfter(), resident);
      evictions += listed.size();
      resident = built->ResidentAfter();
    }
    EXPECT_GT(evictions, 200u) << "the cache must be under pressure for this to say anything";
  }
}

// An RRE plan is built whole: appending to it is refused. A learned-gate plan copied midway
// goes on separately: each copy evicts by its own accesses, as its definition says.
TEST(StepPlanTest, CopiesOfAnAppendedPlanEvictByTheirOwnAccesses) {
  StepPlan rre = Build(Policy(Strategy::kEcss));
  EXPECT_EQ(rre.AppendForward(0, 0, {{1}, {8}}, 64).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(rre.AppendBackward(0, 0).code(), StatusCode::kFailedPrecondition);

  PlanPolicy policy = Policy(Strategy::kEcss, 2);
  policy.learned_gate = true;
  StepPlanInputs in;
  in.model = Model();
  in.policy = policy;
  in.micro_batches = {MicroBatchRoute{8, 0, {}}};
  in.resident = {{1, 3}, {1, 2}};
  StatusOr<StepPlan> first = BuildStepPlan(in);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(first->AppendForward(0, 0, {{0, 1}, {4, 4}}, 64).ok());
  StepPlan second = *first;
  // Layer 1's forward routes the first to (1, 2), the second to (1, 3): each evicts (0, 0),
  // and layer 0's backward then evicts the layer-1 expert each copy fetched. (With one policy
  // between them, the second would have evicted (0, 1), which the first's policy used last.)
  ASSERT_TRUE(first->AppendForward(0, 1, {{2}, {8}}, 64).ok());
  ASSERT_TRUE(second.AppendForward(0, 1, {{3}, {8}}, 64).ok());
  std::vector<std::vector<ExpertId>> evicted;
  for (StepPlan* plan : {&*first, &second}) {
    ASSERT_TRUE(plan->AppendBackward(0, 1).ok());
    ASSERT_TRUE(plan->AppendBackward(0, 0).ok());
    plan->Finish();
    std::vector<ExpertId> resident = in.resident;
    std::vector<ExpertId> listed;
    for (const PlanOp* evict : plan->Find(OpKind::kEvict)) {
      listed.push_back({static_cast<uint32_t>(evict->layer), evict->experts.at(0)});
    }
    EXPECT_EQ(listed, VictimsByDefinition(*plan, 2, true, resident));
    EXPECT_EQ(plan->ResidentAfter(), resident);
    evicted.push_back(listed);
  }
  EXPECT_EQ(evicted[0], (std::vector<ExpertId>{{1, 3}, {1, 2}, {0, 0}, {1, 2}}));
  EXPECT_EQ(evicted[1], (std::vector<ExpertId>{{1, 3}, {1, 2}, {0, 0}, {1, 3}}));
}

}  // namespace
}  // namespace ecss
