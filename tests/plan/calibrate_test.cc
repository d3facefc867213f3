// Calibration through the runtime's own code (tools/plan/calibrate.h). Real NVMe I/O and
// several sessions: labelled slow.
#include "tools/plan/calibrate.h"

#include <linux/magic.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace ecss::plan {
namespace {

// --calibrate measures through the runtime's code and writes a file that reads back as what it
// measured: a rate per thread count up to this machine's cores, the drive's rates and the
// fraction of them a session's NVMe pipeline reaches; its scratch files are gone after, and so
// is what a killed calibration left.
TEST(CalibrateTest, WritesAHardwareFileThatReadsBackAsMeasured) {
  const std::string dir = ::testing::TempDir() + "/ecss_calibrate_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  struct statfs fs {};
  ASSERT_EQ(statfs(dir.c_str(), &fs), 0);
  if (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC) {
    std::filesystem::remove_all(dir);
    GTEST_SKIP() << dir << " is in memory: NVMe cannot be measured";
  }
  // What a calibration killed mid-way left: its store's directory, its lock not held.
  const std::string killed = dir + "/ecss-plan-calibration.999999999";
  std::filesystem::create_directories(killed);
  { std::ofstream(killed + "/experts.bin") << "left behind"; }
  auto base = LoadHardware("this-machine");
  ASSERT_TRUE(base.ok()) << base.status();
  CalibrationOptions options;
  options.dir = dir;
  options.expert_params = uint64_t{1} << 18;
  options.steps = 2;
  options.nvme_bytes = uint64_t{32} << 20;
  options.nvme_steps = 2;
  options.domains = 8;
  options.nvme_large_expert_params = uint64_t{1} << 20;
  options.max_threads = 2;
  CalibrationOptions one_size = options;
  one_size.nvme_large_expert_params = options.expert_params;
  EXPECT_EQ(Calibrate(*base, one_size).status().code(), StatusCode::kInvalidArgument);
  CalibrationOptions few_domains = options;  // fewer than a calibration step's 4: refused first
  few_domains.nvme_large_domains = 3;
  Status refused = Calibrate(*base, few_domains).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("nvme_large_domains (3)"), std::string::npos) << refused;
  few_domains = options;
  few_domains.domains = 0;
  refused = Calibrate(*base, few_domains).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("calibration: domains (0)"), std::string::npos) << refused;
  auto measured = Calibrate(*base, options);
  ASSERT_TRUE(measured.ok()) << measured.status();
  ASSERT_EQ(measured->optimizer_params_per_s_by_threads.size(),
            std::min(2u, std::max(1u, std::thread::hardware_concurrency())));
  for (double rate : measured->optimizer_params_per_s_by_threads) EXPECT_GT(rate, 0);
  ASSERT_EQ(measured->nvme.size(), 1u);
  EXPECT_GT(measured->nvme[0].read_gbps, 0);
  EXPECT_GT(measured->nvme[0].session_fraction, 0);
  EXPECT_LE(measured->nvme[0].session_fraction, kMostSessionFraction);
  EXPECT_GE(measured->nvme[0].update_overhead_us, 0);
  // The host's costs: the simulated device's wait (the base's device is simulated) and the
  // step's begin, both through the runtime's code.
  EXPECT_GT(measured->host_wait_latency_us, 0);
  // The step's begin: routing per token-layer and plan building per op, one of them at least
  // (the fit leaves a figure at 0 that would come out negative).
  EXPECT_GE(measured->routing_ns_per_token_layer, 0);
  EXPECT_GE(measured->step_begin_ns_per_op, 0);
  EXPECT_GT(measured->routing_ns_per_token_layer + measured->step_begin_ns_per_op, 0);
  EXPECT_GT(measured->gradient_add_gbps, 0);  // two micro-batches' additions
  // Beside the optimizer: a rate no faster than alone.
  EXPECT_GT(measured->gradient_add_beside_optimizer_gbps, 0);
  EXPECT_LE(measured->gradient_add_beside_optimizer_gbps, measured->gradient_add_gbps);
  EXPECT_GE(measured->optimizer_rate_beside_additions, 0.1);
  EXPECT_LE(measured->optimizer_rate_beside_additions, 1);
  EXPECT_GE(measured->optimizer_update_gap_us, 0);  // 0 where one thread did not bound the steps
  auto back = ParseHardware(HardwareJson(*measured));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->optimizer_params_per_s_by_threads, measured->optimizer_params_per_s_by_threads);
  EXPECT_EQ(back->optimizer_params_per_s_per_thread, 0);
  EXPECT_EQ(back->optimizer_update_gap_us, measured->optimizer_update_gap_us);
  EXPECT_EQ(back->nvme[0].session_fraction, measured->nvme[0].session_fraction);
  EXPECT_EQ(back->nvme[0].update_overhead_us, measured->nvme[0].update_overhead_us);
  EXPECT_EQ(back->host_wait_latency_us, measured->host_wait_latency_us);
  EXPECT_EQ(back->routing_ns_per_token_layer, measured->routing_ns_per_token_layer);
  EXPECT_EQ(back->step_begin_ns_per_op, measured->step_begin_ns_per_op);
  EXPECT_EQ(back->gradient_add_gbps, measured->gradient_add_gbps);
  EXPECT_EQ(back->gradient_add_beside_optimizer_gbps, measured->gradient_add_beside_optimizer_gbps);
  EXPECT_EQ(back->optimizer_rate_beside_additions, measured->optimizer_rate_beside_additions);
  const bool empty = std::filesystem::is_empty(dir);
  std::filesystem::remove_all(dir);
  EXPECT_TRUE(empty);
}

}  // namespace
}  // namespace ecss::plan
