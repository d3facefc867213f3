#include "offload/prefetcher.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

constexpr uint64_t kExpertBytes = 16 * 1024;
constexpr uint32_t kSlots = 3;

// A fence another thread releases, as the optimizer's update of an expert would.
struct Fences {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<bool> pending = std::vector<bool>(8, false);
  std::atomic<int> waits{0};

  bool Pending(ExpertKey key) {
    std::lock_guard<std::mutex> lock(mutex);
    return pending[key];
  }
  Status Wait(ExpertKey key) {
    ++waits;
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return !pending[key]; });
    return Status::Ok();
  }
  void Release(ExpertKey key) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      pending[key] = false;
    }
    cv.notify_all();
  }
};

class PrefetcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SimOptions options;
    options.device_memory_bytes = kSlots * kExpertBytes;
    sim_ = std::move(SimBackend::Create(options)).value();
    copy_ = std::move(CreateOwnedStream(*sim_, "h2d")).value();
    compute_ = std::move(CreateOwnedStream(*sim_, "compute")).value();
    for (uint32_t e = 0; e < 8; ++e) host_.emplace_back(kExpertBytes, static_cast<uint8_t>(e + 1));
    cache_ = std::move(DeviceCache::Create(*sim_, {kExpertBytes, kSlots}, MakeLruPolicy())).value();
    PrefetcherHooks hooks;
    hooks.host_weights = [this](ExpertKey key) -> const void* { return host_[key].data(); };
    hooks.fence_pending = [this](ExpertKey key) { return fences_.Pending(key); };
    hooks.wait_fence = [this](ExpertKey key) { return fences_.Wait(key); };
    prefetcher_ = std::make_unique<Prefetcher>(*cache_, copy_.get(), std::move(hooks), 0);
  }

  // Uses the leases as a kernel would: waits for their copies, checks the bytes, releases.
  void Use(std::vector<Lease>& leases, const std::vector<ExpertKey>& keys) {
    for (size_t i = 0; i < leases.size(); ++i) {
      ASSERT_TRUE(sim_->WaitEvent(compute_.get(), leases[i].ready()).ok());
      std::vector<uint8_t> got(kExpertBytes);
      ASSERT_TRUE(sim_->CopyAsync(compute_.get(), got.data(), leases[i].weights(), kExpertBytes,
                                  CopyKind::kDeviceToHost)
                      .ok());
      ASSERT_TRUE(sim_->SynchronizeStream(compute_.get()).ok());
      EXPECT_EQ(got, host_[keys[i]]) << "position " << i;
      ASSERT_TRUE(leases[i].Release(compute_.get()).ok());
    }
  }

  std::unique_ptr<SimBackend> sim_;
  OwnedStream copy_, compute_;
  std::vector<std::vector<uint8_t>> host_;
  std::unique_ptr<DeviceCache> cache_;
  Fences fences_;
  std::unique_ptr<Prefetcher> prefetcher_;
};

TEST_F(PrefetcherTest, LeasesAheadWithinTheDeviceBudgetAndHandsOverInOrder) {
  const std::vector<ExpertKey> sequence = {0, 1, 2, 3, 4, 0, 5};
  prefetcher_->BeginStep(sequence);
  ASSERT_TRUE(prefetcher_->Advance().ok());
  EXPECT_EQ(prefetcher_->held(), kSlots);  // never more than the slots
  EXPECT_EQ(cache_->stats().misses, kSlots);
  for (uint64_t p = 0; p < sequence.size(); p += 2) {
    const size_t count = std::min<size_t>(2, sequence.size() - p);
    auto leases = prefetcher_->Take(p, count);
    ASSERT_TRUE(leases.ok()) << leases.status();
    Use(*leases, {sequence.begin() + p, sequence.begin() + p + count});
    ASSERT_TRUE(prefetcher_->Advance().ok());
    EXPECT_LE(prefetcher_->held(), kSlots);
  }
  EXPECT_TRUE(prefetcher_->stalls().empty());
  EXPECT_EQ(prefetcher_->Take(6, 2).status().code(), StatusCode::kOutOfRange);
}

TEST_F(PrefetcherTest, NeverWaitsAheadAndRecordsTheFenceItWaitedOn) {
  fences_.pending[2] = true;  // expert 2's update is still running
  prefetcher_->BeginStep({0, 1, 2, 3});
  ASSERT_TRUE(prefetcher_->Advance().ok());
  EXPECT_EQ(prefetcher_->held(), 2u) << "stops before the fenced expert";
  EXPECT_EQ(fences_.waits.load(), 0);
  auto first = prefetcher_->Take(0, 2);
  ASSERT_TRUE(first.ok());
  Use(*first, {0, 1});
  // The update finishes on another thread once Take is waiting for it.
  std::thread updater([&] {
    while (fences_.waits.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    fences_.Release(2);
  });
  auto rest = prefetcher_->Take(2, 2);
  updater.join();
  ASSERT_TRUE(rest.ok()) << rest.status();
  Use(*rest, {2, 3});
  ASSERT_EQ(prefetcher_->stalls().size(), 1u);
  const StallRecord& stall = prefetcher_->stalls()[0];
  EXPECT_EQ(stall.key, 2u);
  EXPECT_EQ(stall.position, 2u);
  EXPECT_EQ(stall.cause, StallCause::kUpdateFence);
  EXPECT_GT(stall.seconds, 0);
  EXPECT_EQ(StallCauseName(stall.cause), "update_fence");
}

TEST_F(PrefetcherTest, SkippedPositionsAreDroppedAndTheBudgetHolds) {
  prefetcher_->BeginStep({0, 1, 2, 3, 4, 5});
  ASSERT_TRUE(prefetcher_->Advance().ok());
  // The caller jumps ahead: positions 0..2 were leased but are never used.
  auto leases = prefetcher_->Take(3, 3);
  ASSERT_TRUE(leases.ok()) << leases.status();
  Use(*leases, {3, 4, 5});
  EXPECT_EQ(prefetcher_->held(), 0u);
  // Every byte in device memory belongs to the cache's slots: the budget was never exceeded.
  EXPECT_LE(sim_->device_memory().stats().peak_used_bytes, kSlots * kExpertBytes);
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

}  // namespace
}  // namespace ecss
