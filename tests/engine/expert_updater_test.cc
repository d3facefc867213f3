// The engine's internal pieces, alone: the expert index and the NVMe updater's durability.
#include "engine/expert_updater.h"

#include <stdlib.h>

#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/expert_index.h"
#include "offload/io/io_engines.h"
#include "runtime/base/logging.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

TEST(ExpertIndexTest, LayersMayHaveDifferentExpertCounts) {
  const ExpertIndex index({2, 0, 3});
  EXPECT_EQ(index.size(), 5u);
  EXPECT_EQ(index.layers(), 3u);
  EXPECT_EQ(index.Flat({0, 1}), 1u);
  EXPECT_EQ(index.Flat({2, 0}), 2u);
  EXPECT_EQ(index.Flat({2, 2}), 4u);
  for (uint32_t i = 0; i < index.size(); ++i) EXPECT_EQ(index.Flat(index.Id(i)), i);
  EXPECT_TRUE(index.Id(2) == (ExpertId{2, 0}));  // layer 1 has none
  EXPECT_EQ(index.Name(3), "expert (2, 1)");
  EXPECT_FALSE(index.Contains({1, 0}));
  EXPECT_FALSE(index.Contains({3, 0}));
  EXPECT_TRUE(index.Contains({2, 2}));
}

// ~NvmeUpdater makes the state files durable, and a failed fdatasync is not silent.
TEST(NvmeUpdaterTest, DestructionSyncsTheStateFilesAndLogsAFailure) {
  char dir[] = "/tmp/ecss_updater_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  auto sim = SimBackend::Create({});
  ASSERT_TRUE(sim.ok());
  PinnedPoolOptions pool_options;
  pool_options.capacity_bytes = 4 << 20;
  auto pool = (*sim)->CreatePinnedPool(pool_options);
  ASSERT_TRUE(pool.ok());
  std::vector<FaultInjectionIoEngine*> engines;
  NvmeUpdaterOptions options;
  options.dirs = {dir};
  options.expert_elements = 1024;
  options.experts = ExpertIndex({2, 3});
  options.io_engines = [&engines]() -> StatusOr<std::unique_ptr<IoEngine>> {
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> inner, CreateFileIoEngine({}));
    auto engine = std::make_unique<FaultInjectionIoEngine>(std::move(inner), FaultOptions{});
    engines.push_back(engine.get());
    return std::unique_ptr<IoEngine>(std::move(engine));
  };
  std::mutex mutex;
  std::vector<std::string> errors;
  SetLogSink([&](LogLevel level, std::string_view, int, std::string_view message) {
    std::lock_guard<std::mutex> lock(mutex);
    if (level >= LogLevel::kError) errors.emplace_back(message);
  });
  for (bool fail_sync : {false, true}) {
    {
      auto updater = NvmeUpdater::Create(options, pool->get());
      ASSERT_TRUE(updater.ok()) << updater.status();
      std::vector<float> master(1024, 0.25f);
      std::vector<BFloat16> copy(1024);
      for (uint32_t id = 0; id < options.experts.size(); ++id) {
        ASSERT_TRUE((*updater)->Initialize(id, master.data(), copy.data()).ok());
      }
      ASSERT_EQ(engines.size(), 2u);  // loads, then stores: the store side syncs
      FaultOptions faults;
      faults.fail_sync = fail_sync;
      engines[1]->set_options(faults);
    }
    engines.clear();
    std::lock_guard<std::mutex> lock(mutex);
    if (fail_sync) {
      ASSERT_EQ(errors.size(), 1u);
      EXPECT_NE(errors[0].find("fdatasync"), std::string::npos) << errors[0];
    } else {
      EXPECT_TRUE(errors.empty());
    }
  }
  SetLogSink({});
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ecss
