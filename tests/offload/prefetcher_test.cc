#include "offload/prefetcher.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/offload/flip_byte.h"

namespace ecss {
namespace {

// Experts of layer 0.
std::vector<ExpertId> Keys(std::initializer_list<uint32_t> experts) {
  std::vector<ExpertId> keys;
  for (uint32_t e : experts) keys.push_back({0, e});
  return keys;
}

constexpr uint64_t kExpertBytes = 16 * 1024;
constexpr uint32_t kSlots = 3;

// A fence another thread releases, as the optimizer's update of an expert would.
struct Fences {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<bool> pending = std::vector<bool>(8, false);
  std::atomic<int> waits{0};

  bool Pending(ExpertId key) {
    std::lock_guard<std::mutex> lock(mutex);
    return pending[key.expert];
  }
  Status Wait(ExpertId key) {
    ++waits;
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return !pending[key.expert]; });
    return Status::Ok();
  }
  void Release(ExpertId key) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      pending[key.expert] = false;
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
    hooks.host_weights = [this](ExpertId key) -> const void* { return host_[key.expert].data(); };
    hooks.fence_pending = [this](ExpertId key) { return fences_.Pending(key); };
    hooks.wait_fence = [this](ExpertId key) { return fences_.Wait(key); };
    prefetcher_ = std::make_unique<Prefetcher>(*cache_, copy_.get(), std::move(hooks), 0);
  }

  // Uses the leases as a kernel would: waits for their copies, checks the bytes, releases.
  void Use(std::vector<Lease>& leases, const std::vector<ExpertId>& keys) {
    for (size_t i = 0; i < leases.size(); ++i) {
      ASSERT_TRUE(sim_->WaitEvent(compute_.get(), leases[i].ready()).ok());
      std::vector<uint8_t> got(kExpertBytes);
      ASSERT_TRUE(sim_->CopyAsync(compute_.get(), got.data(), leases[i].weights(), kExpertBytes,
                                  CopyKind::kDeviceToHost)
                      .ok());
      ASSERT_TRUE(sim_->SynchronizeStream(compute_.get()).ok());
      EXPECT_EQ(got, host_[keys[i].expert]) << "position " << i;
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
  const std::vector<ExpertId> sequence = Keys({0, 1, 2, 3, 4, 0, 5});
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
  prefetcher_->BeginStep(Keys({0, 1, 2, 3}));
  ASSERT_TRUE(prefetcher_->Advance().ok());
  EXPECT_EQ(prefetcher_->held(), 2u) << "stops before the fenced expert";
  EXPECT_EQ(fences_.waits.load(), 0);
  auto first = prefetcher_->Take(0, 2);
  ASSERT_TRUE(first.ok());
  Use(*first, Keys({0, 1}));
  // The update finishes on another thread once Take is waiting for it.
  std::thread updater([&] {
    while (fences_.waits.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    fences_.Release({0, 2});
  });
  auto rest = prefetcher_->Take(2, 2);
  updater.join();
  ASSERT_TRUE(rest.ok()) << rest.status();
  Use(*rest, Keys({2, 3}));
  ASSERT_EQ(prefetcher_->stalls().size(), 1u);
  const StallRecord& stall = prefetcher_->stalls()[0];
  EXPECT_TRUE(stall.key == (ExpertId{0, 2}));
  EXPECT_EQ(stall.position, 2u);
  EXPECT_EQ(stall.cause, StallCause::kUpdateFence);
  EXPECT_GT(stall.seconds, 0);
  EXPECT_EQ(StallCauseName(stall.cause), "update_fence");
}

TEST_F(PrefetcherTest, SkippedPositionsAreDroppedAndTheBudgetHolds) {
  prefetcher_->BeginStep(Keys({0, 1, 2, 3, 4, 5}));
  ASSERT_TRUE(prefetcher_->Advance().ok());
  // The caller jumps ahead: positions 0..2 were leased but are never used.
  auto leases = prefetcher_->Take(3, 3);
  ASSERT_TRUE(leases.ok()) << leases.status();
  Use(*leases, Keys({3, 4, 5}));
  EXPECT_EQ(prefetcher_->held(), 0u);
  // Every byte in device memory belongs to the cache's slots: the budget was never exceeded.
  EXPECT_LE(sim_->device_memory().stats().peak_used_bytes, kSlots * kExpertBytes);
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

// Compute weights on NVMe: an ExpertStore keeps them, a WeightStager reads them into pinned
// blocks ahead of the lease window.
class StagedPrefetcherTest : public PrefetcherTest {
 protected:
  static constexpr uint32_t kBlocks = 2;
  void SetUp() override {
    PrefetcherTest::SetUp();
    root_ = ::testing::TempDir() + "/ecss_staged_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
    ExpertStoreOptions options;
    options.layout = {{8}, kExpertBytes / 2, DType::kBF16, 2};
    options.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNvme};
    options.dirs = {root_};
    // The staging block of the largest state (the moments) plus kBlocks weight blocks.
    options.pinned_budget_bytes = 4 * kExpertBytes + kBlocks * kExpertBytes;
    store_ = std::move(ExpertStore::Create(*sim_, options)).value();
    for (uint32_t e = 0; e < 8; ++e) {
      ASSERT_TRUE(store_->Write(ExpertState::kWeights, {0, e}, host_[e].data()).ok());
    }
    stager_ = std::move(WeightStager::Create(*store_, 0)).value();
    PrefetcherHooks hooks;
    hooks.fence_pending = [this](ExpertId key) { return fences_.Pending(key); };
    hooks.wait_fence = [this](ExpertId key) { return fences_.Wait(key); };
    prefetcher_ =
        std::make_unique<Prefetcher>(*cache_, copy_.get(), std::move(hooks), 0, stager_.get());
  }
  void TearDown() override {
    prefetcher_.reset();
    stager_.reset();
    store_.reset();
    std::filesystem::remove_all(root_);
  }
  // Until `key`'s block is read, or already taken by a lease (a fast read can finish inside
  // the Advance that started it; its block is then released and the key no longer started).
  void WaitStaged(ExpertId key) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (stager_->Started(key) && !stager_->Ready(key)) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "staging never finished";
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  std::string root_;
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<WeightStager> stager_;
};

TEST_F(StagedPrefetcherTest, ReadsAheadFromNvmeWithinThePinnedBudget) {
  EXPECT_EQ(stager_->slots(), kBlocks) << "what the pinned budget leaves";
  const std::vector<ExpertId> sequence = Keys({0, 1, 2, 3, 4, 5, 6, 7, 0, 5});
  prefetcher_->BeginStep(sequence);
  ASSERT_TRUE(prefetcher_->Advance().ok());
  // A read can finish inside the Advance that started it, and is then leased at once (CI
  // saw it under tsan), so these hold whatever the reads' timing.
  EXPECT_LE(prefetcher_->held() * kExpertBytes, stager_->bytes_read())
      << "nothing is leased before its weights are staged";
  for (const ExpertId key : Keys({0, 1})) {
    EXPECT_TRUE(stager_->Started(key) || cache_->residency(key) != Residency::kAbsent)
        << "expert " << key.expert << " is neither being staged nor leased";
  }
  uint32_t staging = 0;
  for (const ExpertId key : Keys({0, 1, 2, 3, 4, 5, 6, 7})) staging += stager_->Started(key);
  EXPECT_LE(staging, kBlocks) << "two blocks: the window stops at the pinned budget";
  WaitStaged({0, 0});
  WaitStaged({0, 1});
  ASSERT_TRUE(prefetcher_->Advance().ok());
  EXPECT_GE(prefetcher_->held(), 2u);
  EXPECT_NE(cache_->residency({0, 0}), Residency::kAbsent);
  EXPECT_NE(cache_->residency({0, 1}), Residency::kAbsent);
  for (uint64_t p = 0; p < sequence.size(); ++p) {
    auto leases = prefetcher_->Take(p, 1);
    ASSERT_TRUE(leases.ok()) << leases.status();
    Use(*leases, {sequence[p]});
    ASSERT_TRUE(prefetcher_->Advance().ok());
  }
  for (const StallRecord& stall : prefetcher_->stalls()) {
    EXPECT_EQ(stall.cause, StallCause::kNvmeRead);
  }
  // Every miss read its expert from NVMe once; hits read nothing.
  EXPECT_EQ(stager_->bytes_read(), cache_->stats().misses * kExpertBytes);
  EXPECT_LE(store_->pinned_pool().stats().peak_used_bytes, store_->pinned_pool().capacity_bytes());
  EXPECT_LE(sim_->device_memory().stats().peak_used_bytes, kSlots * kExpertBytes);
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

// Note [Work ahead yields]: expert 0 is on the device when staging passes its second use
// (position 6), then evicted for expert 3; by then both blocks hold experts staged for later
// positions. Its miss takes a block back from them instead of failing a valid step with "all
// N staging blocks are held".
TEST_F(StagedPrefetcherTest, BlocksStagedAheadYieldToAnEarlierMiss) {
  const std::vector<ExpertId> sequence = Keys({0, 1, 2, 3, 1, 2, 0, 4, 5, 6});
  prefetcher_->BeginStep(sequence);
  for (uint64_t p = 0; p < sequence.size(); ++p) {
    // Everything staged and copied that can be, before each use: the stager's blocks are as
    // full as the window allows.
    for (int round = 0; round < 4; ++round) {
      ASSERT_TRUE(prefetcher_->Advance().ok());
      ASSERT_TRUE(sim_->SynchronizeAll().ok());
      for (uint64_t q = p; q < sequence.size(); ++q) {
        if (stager_->Started(sequence[q])) WaitStaged(sequence[q]);
      }
    }
    auto leases = prefetcher_->Take(p, 1);
    ASSERT_TRUE(leases.ok()) << "position " << p << ": " << leases.status();
    Use(*leases, {sequence[p]});
  }
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

TEST_F(StagedPrefetcherTest, ABadBlockOnNvmeIsAnErrorNeverStaged) {
  // Flip a byte of expert 3's weights (written once: its first shadow slot).
  const uint64_t slot = 4096 + kExpertBytes;
  const uint64_t at = 3 * 2 * slot + 4096 + 5;
  ASSERT_TRUE(FlipByte(root_ + "/ecss-store-weights-0.bin", at, 1));
  prefetcher_->BeginStep(Keys({2, 3, 4}));
  ASSERT_TRUE(prefetcher_->Advance().ok());
  auto first = prefetcher_->Take(0, 1);
  ASSERT_TRUE(first.ok()) << first.status();
  Use(*first, Keys({2}));
  auto bad = prefetcher_->Take(1, 1);
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("layer 0 expert 3 weights"), std::string_view::npos)
      << bad.status();
  // The block was freed and the step goes on.
  auto last = prefetcher_->Take(2, 1);
  ASSERT_TRUE(last.ok()) << last.status();
  Use(*last, Keys({4}));
}

TEST_F(StagedPrefetcherTest, TheStagerNeedsWeightsOnNvmeAndABlockOfBudget) {
  Status none = WeightStager::Create(*store_, 0).status();  // the fixture's took every block
  EXPECT_EQ(none.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(none.message().find("one staging block needs 16384"), std::string_view::npos) << none;
  std::filesystem::create_directories(root_ + "/pinned");
  ExpertStoreOptions options;
  options.layout = {{2}, 64, DType::kBF16, 0};
  options.dirs = {root_ + "/pinned"};
  auto pinned = std::move(ExpertStore::Create(*sim_, options)).value();
  EXPECT_EQ(WeightStager::Create(*pinned, 1).status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace ecss
