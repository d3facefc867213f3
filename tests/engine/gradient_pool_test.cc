// The gradient accumulators alone, against an updater whose updates the test finishes by
// hand: slots go to a step's experts, come back once no update reads them, and more than the
// pool holds is refused, never waited for.
#include "engine/gradient_pool.h"

#include <algorithm>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/device/host_allocator.h"

namespace ecss {
namespace {

// Updates that stay pending until the test finishes them (Wait finishes one, as a real
// update would end).
class FakeUpdater final : public ExpertUpdater {
 public:
  std::set<uint32_t> pending;
  std::vector<uint32_t> waited;

  Status Submit(uint32_t id, const void*, DType) override {
    pending.insert(id);
    return Status::Ok();
  }
  bool Pending(uint32_t id) const override { return pending.count(id) > 0; }
  Status Wait(uint32_t id) override {
    waited.push_back(id);
    pending.erase(id);
    return Status::Ok();
  }
  Status BeginStep(float) override { return Status::Ok(); }
  Status SetHyperParams(const HyperParams&) override { return Status::Ok(); }
  HyperParams hyper_params() const override { return {}; }
  Status Flush() override { return Status::Ok(); }
  StatusOr<StepReport> FinishStep() override { return StepReport{}; }
  Status AbortStep() override { return Status::Ok(); }
  uint32_t Expedite(const std::vector<uint32_t>&) override { return 0; }
  Status WaitForStep(uint64_t) override { return Status::Ok(); }
  Status TakeError() override { return Status::Ok(); }
  Status Synchronize() override { return Status::Ok(); }
  double busy_seconds() const override { return 0; }
  uint64_t nvme_bytes() const override { return 0; }
  StatusOr<std::vector<float>> Master(uint32_t) override { return std::vector<float>(); }
};

class GradientPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HostAllocatorOptions options;
    options.name = "gradients";
    options.capacity_bytes = 1 << 20;
    memory_ = std::move(HostAllocator::Create(options)).value();
    pool_ = std::move(GradientPool::Create(*memory_, 3, 4096, 10)).value();
  }
  void* Take(uint32_t id, uint64_t step) {
    auto slot = pool_->Take(id, step, updater_);
    EXPECT_TRUE(slot.ok()) << "expert " << id << ": " << slot.status();
    return slot.ok() ? *slot : nullptr;
  }
  // Step `step` hands `id`'s gradient to the updater.
  void Submit(uint32_t id, uint64_t step) {
    ASSERT_TRUE(updater_.Submit(id, pool_->Of(id), DType::kF32).ok());
    pool_->Release(id, step);
  }

  std::unique_ptr<HostAllocator> memory_;
  std::unique_ptr<GradientPool> pool_;
  FakeUpdater updater_;
};

TEST_F(GradientPoolTest, ASlotComesBackOnceItsUpdateNoLongerReadsIt) {
  void* a = Take(0, 1);
  void* b = Take(1, 1);
  void* c = Take(2, 1);
  EXPECT_EQ(std::set<void*>({a, b, c}).size(), 3u);
  EXPECT_EQ(pool_->Of(1), b);
  // Full with step 1's own experts: refused, not waited for.
  auto full = pool_->Take(3, 1, updater_);
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted) << full.status();
  // Step 1 submits all three; expert 0's update finishes (or is skipped: not pending either).
  for (uint32_t id : {0u, 1u, 2u}) Submit(id, 1);
  updater_.pending.erase(0);
  EXPECT_EQ(Take(3, 2), a) << "the finished update's slot";
  EXPECT_EQ(pool_->Of(0), nullptr);
  EXPECT_TRUE(updater_.waited.empty());
  // Nothing finished: the slot released first in an earlier step, after waiting for its update.
  EXPECT_EQ(Take(4, 2), b);
  EXPECT_EQ(updater_.waited, std::vector<uint32_t>({1}));
  // An expert that still holds its slot gets it back once its update is done with it.
  EXPECT_EQ(Take(2, 2), c);
  EXPECT_EQ(updater_.waited, std::vector<uint32_t>({1, 2}));
  EXPECT_FALSE(pool_->released(2));
  // Step 2's experts hold every slot now.
  EXPECT_EQ(pool_->Take(5, 2, updater_).status().code(), StatusCode::kResourceExhausted);
}

TEST_F(GradientPoolTest, ReleasesOfTheCurrentStepAreNeverWaitedFor) {
  // A step's updates may not have started before the step ends (deferred updates): waiting
  // for one inside the step could wait forever.
  Take(0, 7);
  Take(1, 7);
  Take(2, 7);
  Submit(0, 7);
  EXPECT_EQ(pool_->Take(3, 7, updater_).status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(updater_.waited.empty());
  EXPECT_EQ(pool_->Of(0) != nullptr, true) << "still read by its update";
}

TEST_F(GradientPoolTest, ManyStepsKeepTheBookkeepingBounded) {
  for (uint64_t step = 1; step <= 200; ++step) {
    for (uint32_t i = 0; i < 3; ++i) {
      const uint32_t id = static_cast<uint32_t>((step * 3 + i) % 10);
      ASSERT_NE(Take(id, step), nullptr) << "step " << step;
      Submit(id, step);
      updater_.pending.erase(id);
    }
  }
  EXPECT_EQ(pool_->slots(), 3u);
}

}  // namespace
}  // namespace ecss
