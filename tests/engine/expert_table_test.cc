// The expert table alone: every expert's entry, the same initial weights on every placement,
// the delayed update's published copies, and a store it must not overwrite.
#include "engine/expert_table.h"

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/device/sim/sim_backend.h"
#include "tests/engine/reference_trainer.h"

namespace ecss {
namespace {

using engine_test::OptionsFor;
using engine_test::RunConfig;

class ExpertTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    sim_ = std::move(SimBackend::Create(so)).value();
    char dir_template[] = "/tmp/ecss-expert-table-XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  StatusOr<std::unique_ptr<ExpertTable>> Make(const SessionOptions& o) {
    StatusOr<MemoryPlan> plan = PlanMemory(o, DeviceMemoryRules{}, 4096);
    if (!plan.ok()) return plan.status();
    plan_ = *plan;
    return ExpertTable::Create(*sim_, o, plan_);
  }

  std::unique_ptr<SimBackend> sim_;
  std::string dir_;
  MemoryPlan plan_;
};

TEST_F(ExpertTableTest, EveryPlacementStartsFromTheSameWeights) {
  RunConfig c;
  c.dtype = DType::kBF16;
  SessionOptions host = OptionsFor(c);
  auto in_memory = Make(host);
  ASSERT_TRUE(in_memory.ok()) << in_memory.status();
  ExpertTable& a = **in_memory;
  c.nvme_dir = dir_;
  c.nvme_weights = true;
  auto on_nvme = Make(OptionsFor(c));
  ASSERT_TRUE(on_nvme.ok()) << on_nvme.status();
  ExpertTable& b = **on_nvme;
  ASSERT_EQ(a.index().size(), 14u);  // 2 layers of 7
  for (uint32_t flat = 0; flat < a.index().size(); ++flat) {
    const ExpertId id = a.index().Id(flat);
    EXPECT_EQ(a.at(id).id, flat);
    EXPECT_EQ(b.at(id).id, flat);
    // Host weights are fetched from the store's pinned copy; NVMe weights through the stager.
    EXPECT_NE(a.FetchSource(id), nullptr);
    EXPECT_EQ(b.FetchSource(id), nullptr);
    EXPECT_FALSE(a.at(id).touched);
    auto master_a = a.Master(id);
    auto master_b = b.Master(id);
    ASSERT_TRUE(master_a.ok() && master_b.ok());
    EXPECT_EQ(*master_a, *master_b) << a.index().Name(flat);
    // The compute copy is the master rounded to bf16.
    std::vector<BFloat16> want(master_a->size());
    ConvertF32ToBf16(master_a->data(), want.data(), want.size());
    EXPECT_EQ(0, std::memcmp(a.FetchSource(id), want.data(), want.size() * 2));
  }
  EXPECT_EQ(a.experts_in_layer(1), 7u);
  EXPECT_EQ(a.experts_in_layer(2), 0u);
  EXPECT_NE(b.stager(), nullptr);
  EXPECT_EQ(a.stager(), nullptr);
  EXPECT_EQ(b.nvme_bytes(), 0u);  // no update or fetch yet (initial writes do not count)
  EXPECT_GT(a.pinned_peak_bytes(), 0u);
}

TEST_F(ExpertTableTest, TheDelayedUpdateFetchesThePublishedCopy) {
  RunConfig c;
  c.dtype = DType::kBF16;
  c.delayed = true;
  auto made = Make(OptionsFor(c));
  ASSERT_TRUE(made.ok()) << made.status();
  ExpertTable& t = **made;
  const ExpertId id{1, 3};
  const uint64_t bytes = plan_.expert_bytes;
  ASSERT_NE(t.FetchSource(id), t.at(id).weights);
  EXPECT_EQ(0, std::memcmp(t.FetchSource(id), t.at(id).weights, bytes));
  // An update rewrites the weights; the device keeps fetching the published copy until
  // Publish.
  std::memset(t.at(id).weights, 0x3c, bytes);
  EXPECT_NE(0, std::memcmp(t.FetchSource(id), t.at(id).weights, bytes));
  t.Publish(id);
  EXPECT_EQ(0, std::memcmp(t.FetchSource(id), t.at(id).weights, bytes));
  ASSERT_TRUE(t.TakeGradient(id, 1).ok());
  t.at(id).touched = true;
  t.ClearTouched(1);
  EXPECT_FALSE(t.at(id).touched);
  EXPECT_TRUE(t.gradients().released(t.at(id).id));
}

// Gradient accumulators are sized by the experts a step may activate (two steps' worth: one
// step's updates overlap the next), not by the model: slots are taken at an expert's first
// gradient, reused once released, and more than the limits allow is refused.
TEST_F(ExpertTableTest, GradientAccumulatorsFollowTheStepsExpertsNotTheModels) {
  RunConfig c;
  c.dtype = DType::kBF16;
  SessionOptions o = OptionsFor(c);
  o.limits.max_micro_batches = 1;
  o.limits.max_active_experts_per_layer = 1;
  auto made = Make(o);
  ASSERT_TRUE(made.ok()) << made.status();
  ExpertTable& t = **made;
  EXPECT_EQ(plan_.gradient_slots, 4u) << "2 layers x 1 expert x 2 steps, of 14 experts";
  ASSERT_NE(plan_.Find("gradient accumulators"), nullptr);
  EXPECT_EQ(plan_.Find("gradient accumulators")->count, 4u);
  const ExpertId taken[] = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};
  std::vector<void*> slots;
  for (ExpertId id : taken) {
    auto grad = t.TakeGradient(id, 1);
    ASSERT_TRUE(grad.ok()) << grad.status();
    EXPECT_EQ(*grad, t.GradientOf(id));
    EXPECT_EQ(std::count(slots.begin(), slots.end(), *grad), 0);
    slots.push_back(*grad);
  }
  Status full = t.TakeGradient({1, 6}, 1).status();
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted) << full;
  EXPECT_NE(full.message().find("layer 1 expert 6"), std::string_view::npos) << full;
  // Released in step 1 (no update reads them): step 2 reuses them; an expert that takes its
  // gradient again gets its own slot back.
  t.ReleaseGradient({0, 0}, 1);
  t.ReleaseGradient({0, 1}, 1);
  auto own = t.TakeGradient({0, 0}, 2);
  ASSERT_TRUE(own.ok());
  EXPECT_EQ(*own, slots[0]);
  auto other = t.TakeGradient({1, 6}, 2);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(*other, slots[1]);
  EXPECT_EQ(t.GradientOf({0, 1}), nullptr);
  EXPECT_EQ(t.TakeGradient({1, 5}, 2).status().code(), StatusCode::kResourceExhausted);
}

TEST_F(ExpertTableTest, AStoreLeftInTheDirectoryIsNotOverwritten) {
  RunConfig c;
  c.dtype = DType::kBF16;
  c.nvme_dir = dir_;
  { ASSERT_TRUE(Make(OptionsFor(c)).ok()); }
  StatusOr<std::unique_ptr<ExpertTable>> again = Make(OptionsFor(c));
  EXPECT_EQ(again.status().code(), StatusCode::kAlreadyExists);
  EXPECT_NE(again.status().message().find("placement.resume"), std::string_view::npos)
      << again.status();
  c.resume = true;  // the same model, resumed: the same weights
  StatusOr<std::unique_ptr<ExpertTable>> resumed = Make(OptionsFor(c));
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  RunConfig fresh;
  fresh.dtype = DType::kBF16;
  auto reference = Make(OptionsFor(fresh));
  ASSERT_TRUE(reference.ok());
  EXPECT_EQ(*(*resumed)->Master({1, 6}), *(*reference)->Master({1, 6}));
}

}  // namespace
}  // namespace ecss
