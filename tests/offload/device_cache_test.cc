#include "offload/device_cache.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <set>
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

TEST_F(DeviceCacheTest, FreedSlotsFillLowestFirstAndANewPolicyIsToldTheResidents) {
  auto cache = *DeviceCache::Create(*sim_, {kExpertBytes, 3}, MakeLruPolicy());
  for (uint32_t e = 0; e < 3; ++e) {
    ASSERT_TRUE(cache->Acquire({0, e}, host_[e].data(), copy_.get(), e).ok());
  }
  ASSERT_TRUE(cache->Invalidate({0, 2}).ok());  // slot 2, then slot 0
  ASSERT_TRUE(cache->Invalidate({0, 0}).ok());
  ASSERT_TRUE(cache->Acquire({0, 5}, host_[5].data(), copy_.get(), 3).ok());
  EXPECT_EQ(cache->ResidentKeys(), (std::vector<ExpertId>{{0, 5}, {0, 1}}));
  ASSERT_TRUE(cache->Acquire({0, 6}, host_[6].data(), copy_.get(), 4).ok());
  EXPECT_EQ(cache->ResidentKeys(), (std::vector<ExpertId>{{0, 5}, {0, 1}, {0, 6}}));
  EXPECT_EQ(cache->stats().evictions, 0u);
  // A step's Belady policy over the three residents: (0, 1) is used next, (0, 5) after it, and
  // (0, 6) never, so (0, 6) leaves for (0, 7).
  cache->SetPolicy(MakeBeladyPolicy({{0, 7}, {0, 1}, {0, 5}}));
  ASSERT_TRUE(cache->Acquire({0, 7}, host_[7].data(), copy_.get(), 0).ok());
  EXPECT_EQ(cache->ResidentKeys(), (std::vector<ExpertId>{{0, 5}, {0, 1}, {0, 7}}));
  EXPECT_EQ(cache->stats().evictions, 1u);
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

// A miss whose copy cannot be queued (here: a stream the backend never made) fails; its victim
// is gone and its slot is free for the next miss, and the cache names no expert it does not
// hold.
TEST_F(DeviceCacheTest, AFailedCopyLeavesTheVictimsSlotFree) {
  auto cache = *DeviceCache::Create(*sim_, {kExpertBytes, 2}, MakeLruPolicy());
  ASSERT_TRUE(cache->Acquire({0, 0}, host_[0].data(), copy_.get(), 0).ok());
  ASSERT_TRUE(cache->Acquire({0, 1}, host_[1].data(), copy_.get(), 1).ok());
  EXPECT_FALSE(cache->Acquire({0, 2}, host_[2].data(), Stream{}, 2).ok());
  EXPECT_EQ(cache->ResidentKeys(), (std::vector<ExpertId>{{0, 1}}));
  EXPECT_EQ(cache->residency({0, 0}), Residency::kAbsent);
  EXPECT_EQ(cache->residency({0, 2}), Residency::kAbsent);
  ASSERT_TRUE(cache->Acquire({0, 2}, host_[2].data(), copy_.get(), 3).ok());
  EXPECT_EQ(cache->ResidentKeys(), (std::vector<ExpertId>{{0, 2}, {0, 1}}));
  EXPECT_EQ(cache->stats().evictions, 1u) << "the retry took the free slot";
  EXPECT_TRUE(sim_->SynchronizeAll().ok());
}

TEST(EvictionPolicyTest, LruEvictsTheLeastRecentlyUsedItMay) {
  auto lru = MakeLruPolicy();
  const auto any = [](ExpertId) { return true; };
  lru->OnResident({1, 4});  // resident before the policy: used at 0, lowest key first
  lru->OnResident({0, 9});
  lru->OnAccess({0, 1}, 1);
  lru->OnAccess({0, 2}, 2);
  lru->OnAccess({0, 1}, 3);
  EXPECT_EQ(lru->ChooseVictim(3, any), (ExpertId{0, 9}));
  lru->OnEvict({0, 9});
  EXPECT_EQ(lru->ChooseVictim(3, any), (ExpertId{1, 4}));
  EXPECT_EQ(lru->ChooseVictim(3, [](ExpertId k) { return k != ExpertId{1, 4}; }), (ExpertId{0, 2}));
  lru->OnEvict({1, 4});
  lru->OnEvict({0, 2});
  EXPECT_EQ(lru->ChooseVictim(3, any), (ExpertId{0, 1}));
  EXPECT_EQ(lru->ChooseVictim(3, [](ExpertId) { return false; }), std::nullopt);
}

// Belady's victim by its definition, a pass over the residents: the farthest next use after
// `position`; none, or one past the lookahead, counts as never; of equal ones the lowest key.
std::optional<ExpertId> BeladyByDefinition(const std::vector<ExpertId>& sequence,
                                           uint64_t lookahead, const std::set<ExpertId>& residents,
                                           uint64_t position,
                                           const std::function<bool(ExpertId)>& evictable) {
  std::optional<ExpertId> victim;
  uint64_t farthest = 0;
  for (ExpertId key : residents) {  // lowest key first
    if (!evictable(key)) continue;
    uint64_t next = UINT64_MAX;
    for (uint64_t p = position + 1; p < sequence.size(); ++p) {
      if (sequence[p] == key) {
        if (p - position <= lookahead) next = p;
        break;
      }
    }
    if (!victim || next > farthest) {
      victim = key;
      farthest = next;
    }
  }
  return victim;
}

// The policy keeps an order instead of passing over the residents; its victims must be the
// pass's. A cache of 4 slots follows random sequences as a prefetcher may: mostly in order,
// sometimes skipping ahead, going back, acquiring another expert than the sequence's there,
// invalidating a resident, or finding one resident unannounced (OnResident), with random
// residents leased at each choice, each choice asked twice with other leases.
TEST(EvictionPolicyTest, BeladyChoosesAsAPassOverTheResidentsWould) {
  std::mt19937 rng(7);
  auto random_key = [&] {
    return ExpertId{static_cast<uint32_t>(rng() % 2), static_cast<uint32_t>(rng() % 5)};
  };
  uint64_t choices = 0, went_back = 0, skipped = 0, others = 0, unannounced = 0;
  for (uint64_t lookahead : {uint64_t{UINT64_MAX}, uint64_t{12}}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<ExpertId> sequence(200);
      for (ExpertId& key : sequence) key = random_key();
      auto policy = MakeBeladyPolicy(sequence, lookahead);
      std::set<ExpertId> residents = {random_key(), random_key()};
      for (ExpertId key : residents) policy->OnResident(key);
      uint64_t position = 0;
      while (position < sequence.size()) {
        const uint32_t draw = rng() % 20;
        if (draw == 0) {
          position = std::min<uint64_t>(sequence.size() - 1, position + 1 + rng() % 5);
          ++skipped;
        } else if (draw == 1 && position > 0) {
          position -= 1 + rng() % std::min<uint64_t>(position, 5);
          ++went_back;
        } else if (draw == 2 && !residents.empty()) {
          const ExpertId gone = *std::next(residents.begin(), rng() % residents.size());
          residents.erase(gone);
          policy->OnEvict(gone);
        } else if (draw == 4) {  // one leaves unannounced, another is found resident
          const ExpertId found = random_key();
          if (residents.count(found) == 0) {
            if (residents.size() == 4) {
              const ExpertId gone = *std::next(residents.begin(), rng() % residents.size());
              residents.erase(gone);
              policy->OnEvict(gone);
            }
            residents.insert(found);
            policy->OnResident(found);
            ++unannounced;
          }
        }
        const ExpertId key = draw == 3 ? random_key() : sequence[position];
        others += draw == 3 ? 1 : 0;
        if (residents.count(key) == 0 && residents.size() == 4) {
          std::set<ExpertId> leased;
          const auto evictable = [&](ExpertId k) { return leased.count(k) == 0; };
          std::optional<ExpertId> expected;
          for (int ask = 0; ask < 2; ++ask) {
            leased.clear();
            for (ExpertId r : residents) {
              if (rng() % 4 == 0) leased.insert(r);
            }
            expected = BeladyByDefinition(sequence, lookahead, residents, position, evictable);
            ASSERT_EQ(policy->ChooseVictim(position, evictable), expected)
                << "trial " << trial << ", position " << position << ", lookahead " << lookahead
                << ", ask " << ask;
            ++choices;
          }
          if (!expected) {  // every resident leased
            ++position;
            continue;
          }
          residents.erase(*expected);
          policy->OnEvict(*expected);
        }
        residents.insert(key);
        policy->OnAccess(key, position);
        ++position;
      }
    }
  }
  EXPECT_GT(choices, 4000u);
  EXPECT_GT(went_back, 100u);
  EXPECT_GT(skipped, 100u);
  EXPECT_GT(others, 100u);
  EXPECT_GT(unannounced, 100u);
}

}  // namespace
}  // namespace ecss
