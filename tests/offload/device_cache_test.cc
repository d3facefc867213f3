#include "offload/device_cache.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

constexpr uint64_t kExpertBytes = 64 * 1024;

class DeviceCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SimOptions options;
    options.device_memory_bytes = 4 * kExpertBytes;
    sim_ = std::move(SimBackend::Create(options)).value();
    copy_ = std::move(CreateOwnedStream(*sim_, "h2d")).value();
    compute_ = std::move(CreateOwnedStream(*sim_, "compute")).value();
    for (uint32_t e = 0; e < 8; ++e) host_.emplace_back(kExpertBytes, static_cast<uint8_t>(e + 1));
  }
  std::unique_ptr<SimBackend> sim_;
  OwnedStream copy_, compute_;
  std::vector<std::vector<uint8_t>> host_;
};

uint64_t BytesMoved(Backend& backend, std::unique_ptr<EvictionPolicy> policy,
                    const std::vector<ExpertId>& sequence,
                    const std::vector<std::vector<uint8_t>>& host, Stream copy, Stream compute) {
  auto cache = *DeviceCache::Create(backend, {kExpertBytes, 2}, std::move(policy));
  for (uint64_t p = 0; p < sequence.size(); ++p) {
    StatusOr<Lease> lease = cache->Acquire(sequence[p], host[sequence[p].expert].data(), copy, p);
    EXPECT_TRUE(lease.ok()) << lease.status();
    EXPECT_TRUE(lease->Release(compute).ok());
  }
  EXPECT_TRUE(backend.SynchronizeAll().ok());
  return cache->stats().bytes_moved;
}

TEST_F(DeviceCacheTest, BeladyMovesFewerBytesThanLruOnALoop) {
  // A loop over three experts with room for two: LRU misses every access, Belady does not.
  std::vector<ExpertId> sequence;
  for (int round = 0; round < 10; ++round) {
    for (uint32_t e : {0u, 1u, 2u}) sequence.push_back({0, e});
  }
  const uint64_t lru =
      BytesMoved(*sim_, MakeLruPolicy(), sequence, host_, copy_.get(), compute_.get());
  const uint64_t belady =
      BytesMoved(*sim_, MakeBeladyPolicy(sequence), sequence, host_, copy_.get(), compute_.get());
  EXPECT_EQ(lru, sequence.size() * kExpertBytes);
  EXPECT_LT(belady, lru);
  EXPECT_EQ(belady, (2 + (sequence.size() - 2) / 2) * kExpertBytes)
      << "Belady misses every other access here";
}

TEST_F(DeviceCacheTest, WeightsArriveAndSlotsWaitForTheirLastUse) {
  auto cache = *DeviceCache::Create(*sim_, {kExpertBytes, 1}, MakeLruPolicy());
  EXPECT_EQ(cache->residency({0, 0}), Residency::kAbsent);
  StatusOr<Lease> first = cache->Acquire({0, 0}, host_[0].data(), copy_.get(), 0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(cache->residency({0, 0}), Residency::kLeased);
  // A kernel reads the weights slowly on the compute stream, after their copy.
  ASSERT_TRUE(sim_->WaitEvent(compute_.get(), first->ready()).ok());
  std::atomic<int> seen{-1};
  const auto* weights = static_cast<const uint8_t*>(first->weights());
  ASSERT_TRUE(sim_->LaunchHostFunction(compute_.get(), "slow kernel",
                                       [&seen, weights] {
                                         std::this_thread::sleep_for(std::chrono::milliseconds(30));
                                         seen = weights[kExpertBytes - 1];
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(first->Release(compute_.get()).ok());
  // The only slot goes to expert 1 at once; its copy must wait for the kernel.
  StatusOr<Lease> second = cache->Acquire({0, 1}, host_[1].data(), copy_.get(), 1);
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(sim_->SynchronizeAll().ok());
  EXPECT_EQ(seen.load(), 1) << "the kernel saw expert 0's weights, not expert 1's";
  EXPECT_EQ(static_cast<const uint8_t*>(second->weights())[0], 2);
  EXPECT_EQ(cache->residency({0, 0}), Residency::kAbsent);
  EXPECT_EQ(cache->stats().evictions, 1u);
}

TEST_F(DeviceCacheTest, BudgetsAndLeasesAreEnforced) {
  Status small = DeviceCache::Create(*sim_, {kExpertBytes, 5}, MakeLruPolicy()).status();
  EXPECT_EQ(small.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(small.message().find("need 320.00 KiB"), std::string_view::npos) << small;
  EXPECT_EQ(DeviceCache::Create(*sim_, {0, 1}, MakeLruPolicy()).status().code(),
            StatusCode::kInvalidArgument);
  auto cache = *DeviceCache::Create(*sim_, {kExpertBytes, 2}, MakeLruPolicy());
  StatusOr<Lease> a = cache->Acquire({0, 0}, host_[0].data(), copy_.get(), 0);
  StatusOr<Lease> b = cache->Acquire({0, 1}, host_[1].data(), copy_.get(), 1);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(cache->Acquire({0, 2}, host_[2].data(), copy_.get(), 2).status().code(),
            StatusCode::kResourceExhausted);
  StatusOr<Lease> again = cache->Acquire({0, 0}, nullptr, copy_.get(), 3);
  ASSERT_TRUE(again.ok()) << "a hit needs no host weights";
  EXPECT_EQ(cache->stats().hits, 1u);
  *a = Lease();  // released by destruction
  *again = Lease();
  EXPECT_TRUE(cache->Acquire({0, 2}, host_[2].data(), copy_.get(), 4).ok()) << "room again";
  EXPECT_EQ(cache->Acquire({0, 3}, nullptr, copy_.get(), 5).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

}  // namespace
}  // namespace ecss
