// Step metrics on constructed timelines: busy and exposed time per resource, bound_ratio and
// overlap_fraction, and that a run without overlap cannot score well on them; the optimizer's
// intervals as consecutive step windows take them.
#include "engine/step_metrics.h"

#include <gtest/gtest.h>

namespace ecss {
namespace {

using Clock = std::chrono::steady_clock;
const Clock::time_point kT0{};

// [from, to] milliseconds after kT0.
BusyInterval Ms(double from, double to) {
  auto at = [](double ms) {
    return kT0 + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double, std::milli>(ms));
  };
  return {at(from), at(to)};
}

const ResourceUse& Use(const StepMetrics& m, const std::string& name) {
  for (const ResourceUse& use : m.resources) {
    if (use.name == name) return use;
  }
  ADD_FAILURE() << "no resource " << name;
  return m.resources.front();
}

TEST(StepMetricsTest, SerialResourcesOverlapNothing) {
  // naive: fetch, compute, gradients, optimizer, one after the other, 100 ms in all.
  const StepMetrics m = ComputeStepMetrics(kT0, Ms(0, 100).end,
                                           {{"h2d", {Ms(0, 20)}},
                                            {"compute", {Ms(20, 30)}},
                                            {"d2h", {Ms(30, 40)}},
                                            {"optimizer", {Ms(40, 100)}}});
  EXPECT_DOUBLE_EQ(m.seconds, 0.1);
  EXPECT_NEAR(Use(m, "optimizer").busy_seconds, 0.06, 1e-12);
  EXPECT_NEAR(Use(m, "optimizer").exposed_seconds, 0.06, 1e-12);
  EXPECT_NEAR(Use(m, "h2d").exposed_seconds, 0.02, 1e-12);
  EXPECT_EQ(m.bottleneck, "optimizer");
  EXPECT_NEAR(m.bound_ratio, 0.1 / 0.06, 1e-12);  // not 1: the others were not hidden
  ASSERT_TRUE(m.overlap_fraction.has_value());
  EXPECT_NEAR(*m.overlap_fraction, 0.0, 1e-12);
  EXPECT_NEAR(m.overlap_denominator_seconds, 0.04, 1e-12);
}

TEST(StepMetricsTest, EverythingHiddenBehindTheBottleneckScoresOne) {
  // ecss: the optimizer runs the whole step; the device's work happens meanwhile.
  const StepMetrics m = ComputeStepMetrics(kT0, Ms(0, 60).end,
                                           {{"h2d", {Ms(0, 20)}},
                                            {"compute", {Ms(20, 30), Ms(25, 32)}},
                                            {"d2h", {Ms(32, 40)}},
                                            {"optimizer", {Ms(0, 60)}}});
  EXPECT_NEAR(Use(m, "compute").busy_seconds, 0.012, 1e-12);      // overlapping intervals once
  EXPECT_NEAR(Use(m, "optimizer").exposed_seconds, 0.02, 1e-12);  // 40..60 alone
  EXPECT_NEAR(Use(m, "h2d").exposed_seconds, 0.0, 1e-12);
  EXPECT_NEAR(m.bound_ratio, 1.0, 1e-12);
  ASSERT_TRUE(m.overlap_fraction.has_value());
  EXPECT_NEAR(*m.overlap_fraction, 1.0, 1e-12);
}

TEST(StepMetricsTest, IdleTimeAndIntervalsOutsideTheStep) {
  // 50 ms of host work with no resource busy; intervals reaching outside the step are clipped.
  const StepMetrics m = ComputeStepMetrics(
      kT0, Ms(0, 100).end, {{"compute", {Ms(-10, 20)}}, {"optimizer", {Ms(20, 50), Ms(90, 130)}}});
  EXPECT_NEAR(Use(m, "compute").busy_seconds, 0.02, 1e-12);
  EXPECT_NEAR(Use(m, "optimizer").busy_seconds, 0.04, 1e-12);
  EXPECT_NEAR(m.bound_ratio, 2.5, 1e-12);
  ASSERT_TRUE(m.overlap_fraction.has_value());
  EXPECT_NEAR(*m.overlap_fraction, (0.06 - 0.1) / 0.02, 1e-12);  // below 0: idle time
}

TEST(StepMetricsTest, OverlapIsAbsentWhereItCannotMatterAndNothingBusyHasNoRatio) {
  const StepMetrics lone = ComputeStepMetrics(
      kT0, Ms(0, 100).end, {{"compute", {Ms(0, 2)}}, {"optimizer", {Ms(0, 95)}}});
  EXPECT_FALSE(lone.overlap_fraction.has_value());  // 2 ms besides the bottleneck: < 5%
  EXPECT_NEAR(lone.overlap_denominator_seconds, 0.002, 1e-12);
  const StepMetrics idle = ComputeStepMetrics(kT0, Ms(0, 10).end, {{"optimizer", {}}});
  EXPECT_EQ(idle.bound_ratio, 0);
  EXPECT_EQ(idle.bottleneck, "");
  EXPECT_FALSE(idle.overlap_fraction.has_value());
}

TEST(StepMetricsTest, SumsOfStepsUseTheSameRules) {
  const StepMetrics a = ComputeStepMetrics(
      kT0, Ms(0, 100).end, {{"compute", {Ms(0, 40)}}, {"optimizer", {Ms(40, 100)}}});
  const StepMetrics b = ComputeStepMetrics(kT0, Ms(0, 100).end,
                                           {{"compute", {Ms(0, 40)}}, {"optimizer", {Ms(0, 100)}}});
  const StepMetrics sum = SumStepMetrics({a, b});
  EXPECT_DOUBLE_EQ(sum.seconds, 0.2);
  EXPECT_NEAR(Use(sum, "optimizer").busy_seconds, 0.16, 1e-12);
  EXPECT_NEAR(Use(sum, "compute").exposed_seconds, 0.04, 1e-12);
  EXPECT_NEAR(sum.bound_ratio, 0.2 / 0.16, 1e-12);
  ASSERT_TRUE(sum.overlap_fraction.has_value());
  EXPECT_NEAR(*sum.overlap_fraction, (0.24 - 0.2) / 0.08, 1e-12);
}

// An update that runs across EndStep counts in both windows, each for its own part; the
// optimizer's busy time was short by a part-update per step when it counted only in the
// window it ended in.
TEST(StepMetricsTest, AnUpdateAcrossTheStepsEndCountsInEachStepForItsPart) {
  UpdateIntervals updates;
  updates.Started(3, Ms(0, 0).start);
  updates.Ended(3, Ms(0, 4).start, Ms(0, 4).end);
  updates.Started(5, Ms(4, 4).start);  // still running at the first window's end, 10 ms
  const StepMetrics first =
      ComputeStepMetrics(kT0, Ms(0, 10).end, {{"optimizer", updates.Take(Ms(0, 10).end)}});
  EXPECT_NEAR(Use(first, "optimizer").busy_seconds, 0.010, 1e-9);
  updates.Ended(5, Ms(4, 16).start, Ms(4, 16).end);
  const StepMetrics second = ComputeStepMetrics(Ms(10, 10).start, Ms(10, 20).end,
                                                {{"optimizer", updates.Take(Ms(0, 20).end)}});
  EXPECT_NEAR(Use(second, "optimizer").busy_seconds, 0.006, 1e-9) << "16 - 10 ms";
  EXPECT_TRUE(updates.Take(Ms(0, 30).end).empty()) << "each interval is taken once";
}

}  // namespace
}  // namespace ecss
