// FitStatePipeline (tools/plan/calibrate.h): a drive's session_fraction and update_overhead_us
// from the NVMe state pipeline at two expert sizes, without measuring anything.
#include <gtest/gtest.h>

#include "tools/plan/calibrate.h"

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

// A line flatter than the drive's rates allow (the large experts' bytes faster than at the
// rates: noise) leaves all of the rates and the small sample's excess as the overhead: its time
// is kept.
TEST(FitStatePipelineTest, AFractionAboveOneIsOneWithTheSmallSamplesExcessAsOverhead) {
  const NvmeDrive drive = Fit(kSmallBound + 2e-3, kLargeBound + 1e-3);
  EXPECT_EQ(drive.session_fraction, 1);
  EXPECT_NEAR(drive.update_overhead_us, 2000, 1e-6);
}

// A line that would need a negative overhead (the large experts slower per byte than the small
// ones) leaves no overhead and the small sample's fraction of the rates.
TEST(FitStatePipelineTest, ANegativeOverheadIsNoneWithTheSmallSamplesFraction) {
  const NvmeDrive drive = Fit(8.5e-3, 80e-3);
  EXPECT_EQ(drive.update_overhead_us, 0);
  EXPECT_NEAR(drive.session_fraction, kSmallBound / 8.5e-3, 1e-12);
  // Faster than the rates at both sizes: all of them, nothing more.
  const NvmeDrive fast = Fit(kSmallBound / 2, kLargeBound / 2);
  EXPECT_EQ(fast.session_fraction, 1);
  EXPECT_EQ(fast.update_overhead_us, 0);
}

}  // namespace
}  // namespace ecss::plan
