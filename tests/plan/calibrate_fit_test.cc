// FitStatePipeline (tools/plan/calibrate.h): a drive's session_fraction and update_overhead_us
// from the NVMe state pipeline at two expert sizes; FitGradientAdditions: the host's additions'
// rates while the optimizer is idle and beside it; HelpedRate: the optimizer's rate with the
// driving thread's help; FitStepBegin and RoutingTableLines: the step's begin per token-layer
// and per routing table line read; UpdateGapOf: the optimizer's time between updates;
// StatePipelineSampleOf: the NVMe pipeline's time per update. Without measuring anything.
#include <gtest/gtest.h>

#include "tools/plan/calibrate.h"
#include "tools/plan/planner.h"

namespace ecss::plan {
namespace {

// Per expert, seconds: a small and a large expert's bytes at the drive's rates.
constexpr double kSmallBound = 8e-3, kLargeBound = 64e-3;

NvmeDrive Fit(double small_busy, double large_busy) {
  NvmeDrive drive{.capacity_gib = 10, .read_gbps = 2, .write_gbps = 3};
  FitStatePipeline({kSmallBound, small_busy}, {kLargeBound, large_busy}, drive);
  return drive;
}

// Samples on a line busy = bound / fraction + overhead give back its fraction and overhead.
TEST(FitStatePipelineTest, SamplesOnALineGiveItsFractionAndOverhead) {
  const NvmeDrive drive = Fit(kSmallBound / 0.9 + 2e-3, kLargeBound / 0.9 + 2e-3);
  EXPECT_NEAR(drive.session_fraction, 0.9, 1e-12);
  EXPECT_NEAR(drive.update_overhead_us, 2000, 1e-6);
  EXPECT_EQ(drive.read_gbps, 2);  // the rates stay as measured
  EXPECT_EQ(drive.write_gbps, 3);
}

// Faster than the rates one after the other (a drive that reads and writes at once): a
// fraction above 1, up to kMostSessionFraction, with or without an overhead.
TEST(FitStatePipelineTest, AnOverlappingDrivesFractionPassesOne) {
  const NvmeDrive drive = Fit(kSmallBound / 1.25 + 1e-3, kLargeBound / 1.25 + 1e-3);
  EXPECT_NEAR(drive.session_fraction, 1.25, 1e-12);
  EXPECT_NEAR(drive.update_overhead_us, 1000, 1e-6);
  const NvmeDrive fast = Fit(kSmallBound / 1.5, kLargeBound / 1.5);
  EXPECT_NEAR(fast.session_fraction, 1.5, 1e-12);
  EXPECT_NEAR(fast.update_overhead_us, 0, 1e-6);
}

// A line flatter than overlap allows (the large experts' bytes faster than at twice the
// rates: noise) leaves the most of the rates and the small sample's excess as the overhead: its
// time is kept.
TEST(FitStatePipelineTest, AFractionPastTheMostIsTheMostWithTheSmallSamplesExcessAsOverhead) {
  const NvmeDrive drive = Fit(kSmallBound / 2 + 2e-3, kLargeBound / 2 + 1e-3);
  EXPECT_EQ(drive.session_fraction, kMostSessionFraction);
  EXPECT_NEAR(drive.update_overhead_us, 2000, 1e-6);
}

// A line that would need a negative overhead (the large experts slower per byte than the small
// ones) leaves no overhead and the small sample's fraction of the rates.
TEST(FitStatePipelineTest, ANegativeOverheadIsNoneWithTheSmallSamplesFraction) {
  const NvmeDrive drive = Fit(8.5e-3, 80e-3);
  EXPECT_EQ(drive.update_overhead_us, 0);
  EXPECT_NEAR(drive.session_fraction, kSmallBound / 8.5e-3, 1e-12);
  // Faster than the rates at the small size, the large slower per byte: the small sample's
  // fraction, above 1.
  const NvmeDrive overlapped = Fit(kSmallBound / 1.2, kLargeBound / 1.1);
  EXPECT_EQ(overlapped.update_overhead_us, 0);
  EXPECT_NEAR(overlapped.session_fraction, 1.2, 1e-12);
  // Faster than twice the rates at both sizes: the most, nothing more.
  const NvmeDrive fast = Fit(kSmallBound / 3, kLargeBound / 3);
  EXPECT_EQ(fast.session_fraction, kMostSessionFraction);
  EXPECT_EQ(fast.update_overhead_us, 0);
}

// A large sample whose bound is no larger cannot give a line: the small sample alone, its
// fraction and no overhead.
TEST(FitStatePipelineTest, SamplesOfOneSizeAreTheSmallSampleAlone) {
  NvmeDrive drive{.capacity_gib = 10, .read_gbps = 2, .write_gbps = 3};
  FitStatePipeline({kSmallBound, kSmallBound / 0.8}, {kSmallBound, kSmallBound}, drive);
  EXPECT_NEAR(drive.session_fraction, 0.8, 1e-12);
  EXPECT_EQ(drive.update_overhead_us, 0);
}

// The pipeline's updates are counted by their bytes: 15 updates' bytes and busy time in the
// measured steps, whatever the steps issued, give each update a fifteenth of the busy time; the
// bound is a planned update's reads and writes at their rates.
TEST(StatePipelineSampleOfTest, CountsTheUpdatesByTheirBytes) {
  StatePipelineRun run;
  run.planned_updates = 4;               // a step's 4 updates of about 1 Mi parameters:
  run.planned_read_bytes = 4 * 12e6;     // master and two moments read,
  run.planned_written_bytes = 4 * 12e6;  // and written
  run.bytes = 15 * 24e6;                 // what 15 updates moved
  run.busy_s = 0.075;
  auto sample = StatePipelineSampleOf(run, /*read_gbps=*/6, /*write_gbps=*/4);
  ASSERT_TRUE(sample.ok()) << sample.status();
  EXPECT_NEAR(sample->busy_s, 0.075 / 15, 1e-15);
  EXPECT_NEAR(sample->bound_s, 12e6 / 6e9 + 12e6 / 4e9, 1e-15);
}

// A run with no busy time, no bytes or no planned update did not measure the pipeline, and
// rates that are not > 0 give no bound.
TEST(StatePipelineSampleOfTest, ARunThatMovedNothingIsRefused) {
  const StatePipelineRun ran{.busy_s = 1,
                             .bytes = 24e6,
                             .planned_updates = 1,
                             .planned_read_bytes = 12e6,
                             .planned_written_bytes = 12e6};
  StatePipelineRun idle = ran;
  idle.busy_s = 0;
  StatePipelineRun nothing_moved = ran;
  nothing_moved.bytes = 0;
  StatePipelineRun unplanned = ran;  // bytes planned, but no update
  unplanned.planned_updates = 0;
  StatePipelineRun no_planned_bytes = ran;
  no_planned_bytes.planned_read_bytes = no_planned_bytes.planned_written_bytes = 0;
  for (const StatePipelineRun& run : {idle, nothing_moved, unplanned, no_planned_bytes}) {
    EXPECT_EQ(StatePipelineSampleOf(run, 6, 4).status().code(), StatusCode::kInternal);
  }
  EXPECT_EQ(StatePipelineSampleOf(ran, 0, 4).status().code(), StatusCode::kInternal);
  EXPECT_EQ(StatePipelineSampleOf(ran, 6, -1).status().code(), StatusCode::kInternal);
  EXPECT_TRUE(StatePipelineSampleOf(ran, 6, 4).ok());
}

// Additions alone at 20 GB/s and beside the optimizer at 8, some partly beside it: both rates
// come back.
TEST(FitGradientAdditionsTest, SamplesOfBothKindsGiveBothRates) {
  constexpr double kIdle = 20e9, kBeside = 8e9, kBytes = 16e6;
  std::vector<AdditionSample> samples;
  for (double beside : {0.0, 0.0, 1.0, 1.0, 0.5, 0.25}) {
    samples.push_back({kBytes, kBytes * (beside / kBeside + (1 - beside) / kIdle), beside});
  }
  HardwareConfig h;
  FitGradientAdditions(samples, h);
  EXPECT_NEAR(h.gradient_add_gbps, 20, 1e-9);
  EXPECT_NEAR(h.gradient_add_beside_optimizer_gbps, 8, 1e-9);
}

// Samples of one kind cannot tell the rates apart, and a fit with the additions faster beside
// the optimizer is noise: one rate, the samples' bytes over their time, written as both.
TEST(FitGradientAdditionsTest, OneKindOrAFasterBesideRateGivesOneRate) {
  HardwareConfig alone;
  FitGradientAdditions({{10e6, 1e-3, 0}, {30e6, 2e-3, 0}}, alone);
  EXPECT_NEAR(alone.gradient_add_gbps, 40e6 / 3e-3 / 1e9, 1e-9);
  EXPECT_EQ(alone.gradient_add_beside_optimizer_gbps, alone.gradient_add_gbps);
  HardwareConfig faster_beside;
  FitGradientAdditions({{10e6, 1e-3, 0}, {10e6, 0.5e-3, 1}}, faster_beside);
  EXPECT_NEAR(faster_beside.gradient_add_gbps, 20e6 / 1.5e-3 / 1e9, 1e-9);
  EXPECT_EQ(faster_beside.gradient_add_beside_optimizer_gbps, faster_beside.gradient_add_gbps);
  HardwareConfig none;
  FitGradientAdditions({}, none);
  EXPECT_EQ(none.gradient_add_gbps, 0);
}

PlanOp Ran(OpKind kind, PlanResource resource, double start, double end, int32_t step_offset = 0) {
  PlanOp op;
  op.kind = kind;
  op.resource = resource;
  op.step_offset = step_offset;
  op.start_s = start;
  op.end_s = end;
  return op;
}
PlanOp Update(double start, double end, int32_t step_offset = 0) {
  return Ran(OpKind::kUpdate, PlanResource::kCpuOptimizer, start, end, step_offset);
}
PlanOp GradientCopy(double start, double end) {
  return Ran(OpKind::kGradientCopy, PlanResource::kD2h, start, end);
}

// The union of the step's own updates up to the end of its last op that is neither an update
// nor a publish (the step simulator's device_end): a carried-in update, a publish and an op that
// did not run count for neither.
TEST(BusyBeforeDeviceEndTest, TheStepsUpdatesUpToItsLastDeviceOp) {
  StepPlan plan;
  plan.mutable_ops() = {
      Update(0, 0.4, -1),  // carried in from the step before
      Ran(OpKind::kFetch, PlanResource::kH2d, 0, 1),
      Ran(OpKind::kBackward, PlanResource::kCompute, 1, 2),
      GradientCopy(2, 3),
      Update(2.5, 6),
      Update(5, 8),
      Ran(OpKind::kPublish, PlanResource::kNone, 0, 9),
      Ran(OpKind::kForward, PlanResource::kCompute, -1, -1)  // not run
  };
  EXPECT_DOUBLE_EQ(BusyBeforeDeviceEnd(plan), 0.5);
  // An op on no resource (an addition on the host) ends the device work too, as in the
  // simulator.
  plan.mutable_ops().push_back(Ran(OpKind::kAccumulate, PlanResource::kNone, 3, 4));
  EXPECT_DOUBLE_EQ(BusyBeforeDeviceEnd(plan), 1.5);
  // Idle between updates before the end: only the updates' time counts.
  plan.mutable_ops() = {Update(1, 1.2), Update(1.8, 2), Update(1.9, 2.1), GradientCopy(0, 3)};
  EXPECT_DOUBLE_EQ(BusyBeforeDeviceEnd(plan), 0.5);
  // Updates that began after it: none; no updates: none.
  plan.mutable_ops() = {GradientCopy(0, 3), Update(3.5, 4)};
  EXPECT_EQ(BusyBeforeDeviceEnd(plan), 0);
  plan.mutable_ops() = {GradientCopy(0, 3)};
  EXPECT_EQ(BusyBeforeDeviceEnd(plan), 0);
}

// Begins that are 4 ns a token-layer plus 25 ns a table line give back both figures, and no
// per-op figure (the samples cannot tell it).
TEST(FitStepBeginTest, SamplesOnAPlaneGiveBothFigures) {
  const auto begin = [](double token_layers, double lines) {
    return StepBeginSample{token_layers * 4e-9 + lines * 25e-9, token_layers, lines};
  };
  HardwareConfig h;
  h.step_begin_ns_per_op = 900;
  FitStepBegin({begin(8192, 7000), begin(131072, 25000), begin(524288, 25100)}, h);
  EXPECT_NEAR(h.routing_ns_per_token_layer, 4, 1e-6);
  EXPECT_NEAR(h.routing_ns_per_table_line, 25, 1e-6);
  EXPECT_EQ(h.step_begin_ns_per_op, 0);
}

// The calibration's three samples as the development VM measured them (Note [The begin's
// samples], tools/plan/calibrate.cc): the lines read take up what per token-layer alone
// cannot, and each sample is then within 5%.
TEST(FitStepBeginTest, TheTablesLinesTakeUpTheSmallStepsExcess) {
  const auto lines = [](double tokens) { return RoutingTableLines(tokens, 4, 4, 50257); };
  const std::vector<StepBeginSample> samples = {{0.215e-3, 8192, lines(2048)},
                                                {1.24e-3, 131072, lines(32768)},
                                                {2.86e-3, 524288, lines(131072)}};
  HardwareConfig h;
  FitStepBegin(samples, h);
  EXPECT_GT(h.routing_ns_per_token_layer, 0);
  EXPECT_GT(h.routing_ns_per_table_line, 0);
  for (const StepBeginSample& s : samples) {
    const double planned = s.token_layers * h.routing_ns_per_token_layer * 1e-9 +
                           s.table_lines * h.routing_ns_per_table_line * 1e-9;
    EXPECT_NEAR(planned / s.seconds, 1, 0.05) << s.token_layers << " token-layers";
  }
}

// Where the plane would need a negative figure per line, the token-layers alone, through the
// origin; samples of no time are left out.
TEST(FitStepBeginTest, ANegativeFigureLeavesTheOtherAlone) {
  HardwareConfig h;
  // More lines and half the token-layers, in less than half the time: per line < 0.
  FitStepBegin({{1e-3, 250000, 5000}, {0.45e-3, 125000, 20000}, {0, 1e6, 10}}, h);
  EXPECT_EQ(h.routing_ns_per_table_line, 0);
  const double a = 250000 / 1e-3, b = 125000 / 0.45e-3;  // each sample's row, over its time
  EXPECT_NEAR(h.routing_ns_per_token_layer, (a + b) / (a * a + b * b) * 1e9, 1e-9);
}

// A few token ids read about as many lines; many read every line of every table, once.
TEST(RoutingTableLinesTest, ALineIsReadOnceHoweverOftenItsTokensAre) {
  const double table = 1571;  // 50,257 ids x 2 bytes / 64
  EXPECT_NEAR(RoutingTableLines(8, 1, 1, 50257), 8, 0.05);
  EXPECT_NEAR(RoutingTableLines(1e7, 4, 3, 50257), 4 * 3 * table, 1e-6);
  EXPECT_LT(RoutingTableLines(2048, 4, 4, 50257), RoutingTableLines(4096, 4, 4, 50257));
  // The same tokens over more domains read more tables, each less.
  EXPECT_LT(RoutingTableLines(65536, 2, 4, 50257), RoutingTableLines(65536, 4, 4, 50257));
  EXPECT_EQ(RoutingTableLines(2048, 0, 4, 50257), 0);
}

// A fifth of the busy time on one thread at 1 G/s and the rest on two at 1.6 G/s: the kept
// steps' share of their busy time applied to the whole window gives back 1.6 G/s, where the
// plain ratio reads 1.48.
TEST(HelpedRateTest, TakesOutThePartBeforeTheDeviceWorkEnded) {
  constexpr double kOne = 1e9, kTwo = 1.6e9;
  const HelpedSample sample{
      .params = 0.2 * kOne + 0.8 * kTwo, .busy_s = 1, .kept_busy_s = 0.5, .kept_before_s = 0.1};
  EXPECT_NEAR(HelpedRate(sample, kOne), kTwo, 1e-3);
}

// Without kept steps, or with the device work spanning 80% of the busy time or more, the two
// rates cannot be told apart: the plain ratio.
TEST(HelpedRateTest, WithoutASeparablePartThePlainRatio) {
  EXPECT_DOUBLE_EQ(HelpedRate({.params = 3e9, .busy_s = 2}, 1e9), 1.5e9);
  EXPECT_DOUBLE_EQ(
      HelpedRate({.params = 3e9, .busy_s = 2, .kept_busy_s = 1, .kept_before_s = 0.8}, 1e9), 1.5e9);
  // A part before the end that updated more than all of it (noise in the rates): the plain.
  EXPECT_DOUBLE_EQ(
      HelpedRate({.params = 1e9, .busy_s = 2, .kept_busy_s = 1, .kept_before_s = 0.7}, 2e9), 0.5e9);
}

// Steps the one thread bounds: the time it was not updating, per update, in microseconds. Steps
// it did not bound (below kLeastBoundShare), no updates, or more busy time than the steps' (the
// clocks' edges): 0.
TEST(UpdateGapOfTest, TheBoundStepsTimeNotUpdatingPerUpdate) {
  EXPECT_NEAR(UpdateGapOf({.seconds = 2, .busy_s = 1.97, .updates = 3000}), 10, 1e-9);
  EXPECT_NEAR(UpdateGapOf({.seconds = 1, .busy_s = kLeastBoundShare, .updates = 1e4}),
              (1 - kLeastBoundShare) * 100, 1e-9);
  EXPECT_EQ(UpdateGapOf({.seconds = 1, .busy_s = kLeastBoundShare - 0.01, .updates = 3000}), 0);
  EXPECT_EQ(UpdateGapOf({.seconds = 1, .busy_s = 0.99, .updates = 0}), 0);
  EXPECT_EQ(UpdateGapOf({.seconds = 1, .busy_s = 1.01, .updates = 3000}), 0);
  EXPECT_EQ(UpdateGapOf({}), 0);
}

}  // namespace
}  // namespace ecss::plan
