#include "optimizer/state_pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "optimizer/cpu_optimizer.h"
#include "runtime/base/checksum.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

std::vector<float> Values(size_t n, uint64_t seed, float scale) {
  CounterRng rng(seed, 3);
  std::vector<float> v(n);
  for (float& x : v) x = scale * (rng.UniformFloat() - 0.5f);
  return v;
}

const std::vector<size_t> kSizes = {5000, 1, 70000, 1234, 65536};

// The caller-provided workspace an updater needs: 4 KiB aligned, as the pinned pool's is.
struct Workspace {
  explicit Workspace(uint64_t n)
      : bytes(n), data(std::aligned_alloc(4096, (n + 4095) / 4096 * 4096)) {}
  ~Workspace() { std::free(data); }
  uint64_t bytes;
  void* data;
};

StatusOr<std::unique_ptr<StateStreamingUpdater>> CreateUpdater(const StreamingOptions& options,
                                                               StateTier* tier,
                                                               std::unique_ptr<Workspace>* out) {
  ECSS_ASSIGN_OR_RETURN(const uint64_t bytes, StateStreamingUpdater::WorkspaceBytes(options));
  *out = std::make_unique<Workspace>(bytes);
  return StateStreamingUpdater::Create(options, tier, (*out)->data, bytes);
}

// f32 gradients of experts 0 .. experts - 1 (seeds seed + e), and the work streaming them.
struct Gradients {
  std::vector<std::vector<float>> values;
  std::vector<StreamedGradient> work;
};
Gradients MakeGradients(uint32_t experts, size_t size, uint64_t seed) {
  Gradients g;
  g.values.reserve(experts);
  for (uint32_t e = 0; e < experts; ++e) {
    g.values.push_back(Values(size, seed + e, 1.0f));
    g.work.push_back({e, g.values.back().data(), DType::kF32, nullptr});
  }
  return g;
}

// A tier that fails chosen operations, to show failures lose nothing.
class FailingTier : public StateTier {
 public:
  explicit FailingTier(InMemoryStateTier* inner) : inner_(inner) {}
  StatusOr<size_t> ExpertSize(uint32_t e) const override { return inner_->ExpertSize(e); }
  Status Load(uint32_t e, const StateSlot& s, uint64_t* c) override {
    if (e == fail_load) return DataLossError(StrCat("expert ", e, " master: checksum mismatch"));
    return inner_->Load(e, s, c);
  }
  Status Store(uint32_t e, const StateSlot& s, uint64_t c) override {
    if (e == fail_store) return ResourceExhaustedError("no space left on device");
    return inner_->Store(e, s, c);
  }
  uint32_t fail_load = UINT32_MAX;
  uint32_t fail_store = UINT32_MAX;

 private:
  InMemoryStateTier* inner_;
};

TEST(StateStreamingTest, MatchesTheInMemoryOptimizerBitForBit) {
  // {buffers, loads_in_flight, stores_in_flight}: one of each, and several (with slots to hold
  // them, and not).
  struct Stages {
    int buffers, loads, stores;
  };
  for (auto [buffers, loads, stores] : std::vector<Stages>{{2, 1, 1},
                                                           {3, 1, 1},
                                                           {2, 2, 1},
                                                           {3, 2, 1},
                                                           {4, 3, 1},
                                                           {2, 1, 2},
                                                           {3, 2, 2},
                                                           {5, 2, 3}}) {
    for (int threads : {1, 2}) {
      InMemoryStateTier tier(OptimizerKind::kAdamW);
      // The same experts held in memory by CpuOptimizer, as the reference.
      std::vector<std::vector<float>> master, m, v;
      for (uint32_t e = 0; e < kSizes.size(); ++e) {
        tier.AddExpert(Values(kSizes[e], e, 1.0f));
        master.push_back(Values(kSizes[e], e, 1.0f));
        m.emplace_back(kSizes[e], 0.0f);
        v.emplace_back(kSizes[e], 0.0f);
      }
      CpuOptimizerOptions reference_options;
      reference_options.skip_step_on_nonfinite = false;
      auto reference = *CpuOptimizer::Create(reference_options);
      for (uint32_t e = 0; e < kSizes.size(); ++e) {
        ASSERT_TRUE(reference
                        ->RegisterExpert(
                            {master[e].data(), m[e].data(), v[e].data(), nullptr, kSizes[e], 0})
                        .ok());
      }
      std::unique_ptr<Workspace> staging;
      StreamingOptions options;
      options.buffers = buffers;
      options.loads_in_flight = loads;
      options.stores_in_flight = stores;
      options.threads = threads;
      options.max_expert_elements = 70000;
      auto updater = CreateUpdater(options, &tier, &staging);
      ASSERT_TRUE(updater.ok()) << updater.status();
      std::vector<BFloat16> copy(70000);
      for (uint64_t step = 1; step <= 3; ++step) {
        std::vector<std::vector<float>> grads;
        std::vector<StreamedGradient> work;
        ASSERT_TRUE(reference->BeginStep(2.0f).ok());
        for (uint32_t e = 0; e < kSizes.size(); ++e) {
          if ((e + step) % 4 == 0) continue;  // not every expert every step
          grads.push_back(Values(kSizes[e], 100 * step + e, 3.0f));
          work.push_back({e, grads.back().data(), DType::kF32, e == 2 ? copy.data() : nullptr});
          ASSERT_TRUE(reference->SubmitGradient(e, grads.back().data(), DType::kF32).ok());
        }
        ASSERT_TRUE(reference->FinishStep().ok());
        ASSERT_TRUE(reference->Synchronize().ok());
        // From step 2 on, the work arrives in batches of one that join the run (the hooks'
        // `more`), and each expert is reported done once stored (in order with one store at
        // a time).
        StreamingHooks hooks;
        std::vector<StreamedGradient> first = work, later;
        std::mutex done_mutex;  // (two stores at once call done at once)
        std::vector<uint32_t> done;
        if (step > 1) {
          first.assign(work.begin(), work.begin() + 1);
          later.assign(work.begin() + 1, work.end());
          hooks.more = [&](std::vector<StreamedGradient>* more) {
            if (later.empty()) return false;
            more->assign(later.begin(), later.begin() + 1);
            later.erase(later.begin());
            return true;
          };
          hooks.done = [&](uint32_t expert) {
            std::lock_guard<std::mutex> lock(done_mutex);
            done.push_back(expert);
          };
        }
        StatusOr<StreamingReport> report = (*updater)->Run(first, 2.0f, 1.0f, nullptr, hooks);
        ASSERT_TRUE(report.ok()) << report.status();
        EXPECT_EQ(report->updated, work.size());
        if (step > 1) {
          ASSERT_EQ(done.size(), work.size());
          std::vector<uint32_t> expected;
          for (const StreamedGradient& g : work) expected.push_back(g.expert);
          if (stores > 1) {
            std::sort(done.begin(), done.end());
            std::sort(expected.begin(), expected.end());
          }
          EXPECT_EQ(done, expected);
        }
      }
      for (uint32_t e = 0; e < kSizes.size(); ++e) {
        EXPECT_EQ(tier.master(e), master[e]) << "expert " << e << " buffers " << buffers
                                             << " loads " << loads << " stores " << stores;
        EXPECT_EQ(tier.state(e, 0), m[e]);
        EXPECT_EQ(tier.state(e, 1), v[e]);
        EXPECT_EQ(tier.update_count(e), reference->version(e));
      }
      for (size_t i = 0; i < kSizes[2]; ++i)
        ASSERT_EQ(copy[i].bits, FloatToBf16(master[2][i]).bits);
    }
  }
}

// A tier that takes checksums: at every load it records the loaded arrays' checksums as
// storage would (or, for the experts named below, as storage would after bit rot), and at every
// store it checks the checksums the update handed over against the slot's arrays read again.
class ChecksumCheckingTier : public StateTier {
 public:
  explicit ChecksumCheckingTier(InMemoryStateTier* inner) : inner_(inner) {}
  StatusOr<size_t> ExpertSize(uint32_t e) const override { return inner_->ExpertSize(e); }
  Status Load(uint32_t e, const StateSlot& s, uint64_t* c) override {
    if (s.checksums == nullptr) {  // the update's second read, which the tier checks itself
      ++reread;
      if (e == damaged_master || e == damaged_states) {
        return DataLossError(StrCat("expert ", e, " in 'rotten.bin' at offset 4096: ",
                                    e == damaged_master ? "master" : "moments",
                                    " checksum mismatch"));
      }
      return inner_->Load(e, s, c);
    }
    ECSS_RETURN_IF_ERROR(inner_->Load(e, s, c));
    const bool master_wrong = e == damaged_master || e == damaged_once;
    damaged_once = e == damaged_once ? UINT32_MAX : damaged_once;
    s.checksums->loaded_master = Crc32c(s.master, s.size * 4) ^ (master_wrong ? 1u : 0u);
    s.checksums->loaded_states = Crc32c(s.state0, s.size * 4);
    if (s.state1 != nullptr) {
      s.checksums->loaded_states =
          Crc32cCombine(s.checksums->loaded_states, Crc32c(s.state1, s.size * 4), s.size * 4);
    }
    s.checksums->loaded_states ^= e == damaged_states ? 1u : 0u;
    return Status::Ok();
  }
  Status Store(uint32_t e, const StateSlot& s, uint64_t c) override {
    EXPECT_NE(s.checksums, nullptr) << "expert " << e;
    EXPECT_TRUE(e != damaged_master && e != damaged_states) << "a damaged expert is not stored";
    if (s.checksums == nullptr) return inner_->Store(e, s, c);
    const size_t n = s.size;
    auto crc = [n](const void* array, size_t element_bytes) {
      return array == nullptr ? 0u : Crc32c(array, n * element_bytes);
    };
    const ParamChecksums& written = s.checksums->written;
    EXPECT_EQ(written.master, crc(s.master, 4)) << "expert " << e;
    EXPECT_EQ(written.state0, crc(s.state0, 4)) << "expert " << e;
    EXPECT_EQ(written.state1, crc(s.state1, 4)) << "expert " << e;
    EXPECT_EQ(written.compute_copy, crc(s.compute, sizeof(BFloat16))) << "expert " << e;
    ++checked;
    return inner_->Store(e, s, c);
  }
  bool TakesChecksums() const override { return true; }
  int checked = 0;
  int reread = 0;
  // Rotten on storage: every read of it is wrong.
  uint32_t damaged_master = UINT32_MAX;
  uint32_t damaged_states = UINT32_MAX;
  // Its first read went wrong on the way; storage is right.
  uint32_t damaged_once = UINT32_MAX;

 private:
  InMemoryStateTier* inner_;
};

TEST(StateStreamingTest, TheStoreGetsTheChecksumsOfWhatTheUpdateWrote) {
  for (auto [kind, threads] :
       {std::pair{OptimizerKind::kAdamW, 1}, std::pair{OptimizerKind::kAdamW, 2},
        std::pair{OptimizerKind::kAdagrad, 2}}) {
    InMemoryStateTier inner(kind);
    for (uint32_t e = 0; e < kSizes.size(); ++e) inner.AddExpert(Values(kSizes[e], e, 1.0f));
    ChecksumCheckingTier tier(&inner);
    StreamingOptions options;
    options.kind = kind;
    options.threads = threads;
    options.buffers = 3;
    options.chunk_elements = 1024;  // many chunks joined, the last ones short
    options.max_expert_elements = 70000;
    options.stage_compute_copy = true;
    std::unique_ptr<Workspace> staging;
    auto updater = CreateUpdater(options, &tier, &staging);
    ASSERT_TRUE(updater.ok()) << updater.status();
    // Expert 2's copy goes to the caller: the slot's compute array keeps what it held, and
    // its checksum says so.
    std::vector<BFloat16> copy(70000);
    for (uint64_t step = 1; step <= 2; ++step) {
      std::vector<std::vector<float>> grads;
      std::vector<StreamedGradient> work;
      grads.reserve(kSizes.size());
      for (uint32_t e = 0; e < kSizes.size(); ++e) {
        grads.push_back(Values(kSizes[e], 10 * step + e, 1.0f));
        work.push_back({e, grads.back().data(), DType::kF32, e == 2 ? copy.data() : nullptr});
      }
      StatusOr<StreamingReport> report = (*updater)->Run(work, 1.0f, 1.0f);
      ASSERT_TRUE(report.ok()) << report.status();
    }
    EXPECT_EQ(tier.checked, static_cast<int>(2 * kSizes.size()));
  }
}

// A tier that leaves checking what it loaded to the update: an expert whose bytes do not
// match what its storage recorded, master or states, fails alone with the error of the tier's
// own checked read, before anything of it is updated or stored (the caller's compute copy
// too); its copy in the tier stays as it was, and the other experts go on. One whose first
// read went wrong on the way, and whose second is right, is updated.
TEST(StateStreamingTest, TheUpdateChecksWhatATierLoadedBeforeUsingIt) {
  for (OptimizerKind kind : {OptimizerKind::kAdamW, OptimizerKind::kAdagrad}) {
    InMemoryStateTier inner(kind);
    for (uint32_t e = 0; e < kSizes.size(); ++e) inner.AddExpert(Values(kSizes[e], e, 1.0f));
    ChecksumCheckingTier tier(&inner);
    tier.damaged_master = 2;
    tier.damaged_states = 3;
    tier.damaged_once = 4;
    StreamingOptions options;
    options.kind = kind;
    options.buffers = 3;
    options.chunk_elements = 1024;
    options.max_expert_elements = 70000;
    std::unique_ptr<Workspace> staging;
    auto updater = CreateUpdater(options, &tier, &staging);
    ASSERT_TRUE(updater.ok()) << updater.status();
    const std::vector<float> before2 = inner.master(2), before3 = inner.state(3, 0);
    std::vector<BFloat16> copy(kSizes[2], BFloat16{0x1234});
    Gradients g = MakeGradients(static_cast<uint32_t>(kSizes.size()), 70000, 7);
    g.work[2].compute_copy = copy.data();  // (gradients of 70000 elements cover every size)
    StatusOr<StreamingReport> report = (*updater)->Run(g.work, 1.0f, 1.0f);
    ASSERT_EQ(report.status().code(), StatusCode::kDataLoss) << report.status();
    EXPECT_NE(report.status().ToString().find(
                  "loading expert 2: expert 2 in 'rotten.bin' at offset 4096: master checksum"),
              std::string::npos)
        << report.status();
    EXPECT_EQ(inner.master(2), before2);
    EXPECT_EQ(inner.state(3, 0), before3);
    for (BFloat16 b : copy) ASSERT_EQ(b.bits, 0x1234) << "the caller's copy is left alone";
    EXPECT_EQ(tier.reread, 3);
    EXPECT_EQ(tier.checked, static_cast<int>(kSizes.size()) - 2);
    for (uint32_t e = 0; e < kSizes.size(); ++e) {
      EXPECT_EQ(inner.update_count(e), e == 2 || e == 3 ? 0u : 1u) << e;
    }
  }
}

TEST(StateStreamingTest, FailuresLoseNothingAndNameTheExpert) {
  for (int stores : {1, 2}) {
    SCOPED_TRACE(StrCat(stores, " stores at once"));
    InMemoryStateTier tier(OptimizerKind::kAdamW);
    for (uint32_t e = 0; e < 4; ++e) tier.AddExpert(Values(1000, e, 1.0f));
    FailingTier failing(&tier);
    failing.fail_load = 1;
    failing.fail_store = 2;
    std::unique_ptr<Workspace> staging;
    StreamingOptions options;
    options.max_expert_elements = 1000;
    options.buffers = 3;
    options.stores_in_flight = stores;
    auto updater = *CreateUpdater(options, &failing, &staging);
    Gradients g = MakeGradients(4, 1000, 50);
    std::vector<std::vector<float>>& grads = g.values;
    const std::vector<StreamedGradient>& work = g.work;
    grads[3][10] = std::nanf("");
    std::vector<std::vector<float>> before;
    for (uint32_t e = 0; e < 4; ++e) before.push_back(tier.master(e));
    StatusOr<StreamingReport> report = updater->Run(work, 1.0f, 1.0f);
    ASSERT_FALSE(report.ok());
    EXPECT_EQ(report.status().code(), StatusCode::kDataLoss)
        << "the earliest expert's failure (expert 1's load), whichever store ends first";
    EXPECT_NE(report.status().message().find("loading expert 1"), std::string_view::npos)
        << report.status();
    EXPECT_NE(tier.master(0), before[0]) << "expert 0 was updated";
    EXPECT_EQ(tier.master(1), before[1]) << "failed load: untouched";
    EXPECT_EQ(tier.master(2), before[2]) << "failed store: the previous copy stays";
    EXPECT_EQ(tier.master(3), before[3]) << "non-finite gradient: skipped";
    EXPECT_EQ(tier.update_count(3), 0u);
    // The updater stays usable.
    failing.fail_load = failing.fail_store = UINT32_MAX;
    grads[3][10] = 0;
    StatusOr<StreamingReport> again = updater->Run(work, 1.0f, 1.0f);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->updated, 4u);
  }
}

// A tier whose load (or store: `held`) of expert 0 waits until expert 1's has begun (or 10 s:
// then they did not overlap), so that expert 1's finishes first.
class OverlapTier : public StateTier {
 public:
  enum class Held { kLoads, kStores };
  OverlapTier(InMemoryStateTier* inner, Held held) : inner_(inner), held_(held) {}
  StatusOr<size_t> ExpertSize(uint32_t e) const override { return inner_->ExpertSize(e); }
  Status Load(uint32_t e, const StateSlot& s, uint64_t* c) override {
    if (held_ == Held::kLoads) Meet(e);
    return inner_->Load(e, s, c);
  }
  Status Store(uint32_t e, const StateSlot& s, uint64_t c) override {
    if (held_ == Held::kStores) Meet(e);
    return inner_->Store(e, s, c);
  }
  // Whether expert 1's began while expert 0's waited.
  bool overlapped() {
    std::lock_guard<std::mutex> lock(mutex_);
    return overlapped_;
  }

 private:
  void Meet(uint32_t e) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (e == 1) {
      second_started_ = true;
      cv_.notify_all();
    } else if (e == 0) {
      overlapped_ = cv_.wait_for(lock, std::chrono::seconds(10), [&] { return second_started_; });
    }
  }
  InMemoryStateTier* inner_;
  const Held held_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool second_started_ = false;  // GUARDED_BY(mutex_)
  bool overlapped_ = false;      // GUARDED_BY(mutex_)
};

// Loads at once overlap and the update stage still takes them in order; stores at once overlap
// and may end out of order. Either way the results are those of one at a time.
TEST(StateStreamingTest, LoadsAndStoresInFlightOverlap) {
  for (OverlapTier::Held held : {OverlapTier::Held::kLoads, OverlapTier::Held::kStores}) {
    const bool loads = held == OverlapTier::Held::kLoads;
    SCOPED_TRACE(loads ? "two loads at once" : "two stores at once");
    InMemoryStateTier tier(OptimizerKind::kAdamW);
    InMemoryStateTier reference(OptimizerKind::kAdamW);
    for (uint32_t e = 0; e < 6; ++e) {
      tier.AddExpert(Values(3000, e, 1.0f));
      reference.AddExpert(Values(3000, e, 1.0f));
    }
    OverlapTier overlapping(&tier, held);
    StreamingOptions options;
    options.max_expert_elements = 3000;
    options.buffers = 3;
    (loads ? options.loads_in_flight : options.stores_in_flight) = 2;
    std::unique_ptr<Workspace> staging, reference_staging;
    auto updater = *CreateUpdater(options, &overlapping, &staging);
    options.loads_in_flight = options.stores_in_flight = 1;
    auto one_at_a_time = *CreateUpdater(options, &reference, &reference_staging);
    const Gradients g = MakeGradients(6, 3000, 70);
    std::mutex done_mutex;  // (two stores at once call done at once)
    std::vector<uint32_t> done;
    StreamingHooks hooks;
    hooks.done = [&](uint32_t expert) {
      std::lock_guard<std::mutex> lock(done_mutex);
      done.push_back(expert);
    };
    StatusOr<StreamingReport> report = updater->Run(g.work, 1.0f, 1.0f, nullptr, hooks);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(report->updated, 6u);
    // (One at a time takes expert 0 first, alone: its wait for expert 1's times out.)
    EXPECT_TRUE(overlapping.overlapped()) << "expert 1's began before expert 0's ended";
    if (!loads) std::sort(done.begin(), done.end());
    EXPECT_EQ(done, (std::vector<uint32_t>{0, 1, 2, 3, 4, 5})) << "loads: updated in order";
    ASSERT_TRUE(one_at_a_time->Run(g.work, 1.0f, 1.0f).ok());
    for (uint32_t e = 0; e < 6; ++e) {
      EXPECT_EQ(tier.master(e), reference.master(e)) << "expert " << e;
      EXPECT_EQ(tier.state(e, 1), reference.state(e, 1)) << "expert " << e;
      EXPECT_EQ(tier.update_count(e), 1u);
    }
  }
}

TEST(StateStreamingTest, AnExpertIsInARunOnce) {
  for (int loads : {1, 2}) {
    InMemoryStateTier tier(OptimizerKind::kAdamW);
    for (uint32_t e = 0; e < 3; ++e) tier.AddExpert(Values(2000, e, 1.0f));
    StreamingOptions options;
    options.max_expert_elements = 2000;
    options.buffers = 3;
    options.loads_in_flight = loads;
    std::unique_ptr<Workspace> staging;
    auto updater = *CreateUpdater(options, &tier, &staging);
    std::vector<float> grad(2000, 0.25f);
    const StreamedGradient g0{0, grad.data(), DType::kF32, nullptr};
    const StreamedGradient g1{1, grad.data(), DType::kF32, nullptr};
    const StreamedGradient g2{2, grad.data(), DType::kF32, nullptr};
    Status twice = updater->Run({g0, g1, g0}, 1.0f, 1.0f).status();
    EXPECT_EQ(twice.code(), StatusCode::kInvalidArgument) << twice;
    EXPECT_NE(twice.message().find("expert 0 is in the run twice"), std::string_view::npos)
        << twice;
    EXPECT_EQ(tier.loads(), 0u) << "refused before any I/O";
    // Appended by hooks.more: that one fails alone; the others are updated once.
    std::vector<std::vector<StreamedGradient>> batches = {{g2, g1}};
    StreamingHooks hooks;
    hooks.more = [&](std::vector<StreamedGradient>* more) {
      if (batches.empty()) return false;
      *more = batches.back();
      batches.pop_back();
      return true;
    };
    Status appended = updater->Run({g0, g1}, 1.0f, 1.0f, nullptr, hooks).status();
    EXPECT_EQ(appended.code(), StatusCode::kInvalidArgument) << appended;
    EXPECT_NE(appended.message().find("expert 1 is in the run twice"), std::string_view::npos)
        << appended;
    for (uint32_t e = 0; e < 3; ++e) EXPECT_EQ(tier.update_count(e), 1u) << "expert " << e;
  }
}

TEST(StateStreamingTest, BadInput) {
  InMemoryStateTier tier(OptimizerKind::kAdamW);
  tier.AddExpert(Values(5000, 1, 1.0f));
  std::unique_ptr<Workspace> staging;
  StreamingOptions options;
  options.max_expert_elements = 4096;
  options.buffers = 1;
  EXPECT_EQ(StateStreamingUpdater::WorkspaceBytes(options).status().code(),
            StatusCode::kInvalidArgument);
  options.buffers = 2;
  for (auto [field, name] : {std::pair{&options.loads_in_flight, "loads_in_flight"},
                             std::pair{&options.stores_in_flight, "stores_in_flight"}}) {
    for (int n : {0, 3}) {  // none, or more than the slots
      *field = n;
      const Status refused = StateStreamingUpdater::WorkspaceBytes(options).status();
      EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << name << " " << n;
      EXPECT_NE(refused.message().find(StrCat("1 <= ", name, " <= buffers (", n, ")")),
                std::string_view::npos)
          << refused;
    }
    *field = 1;
  }
  // 2 slots x (master, m, v) x 16 KiB.
  EXPECT_EQ(*StateStreamingUpdater::WorkspaceBytes(options), 2u * 3 * 16384);
  Workspace short_workspace(2 * 3 * 16384 - 4096);
  const Status too_short =
      StateStreamingUpdater::Create(options, &tier, short_workspace.data, short_workspace.bytes)
          .status();
  EXPECT_EQ(too_short.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(too_short.message().find("98304 bytes"), std::string_view::npos) << too_short;
  Workspace roomy(2 * 3 * 16384 + 4096);
  EXPECT_EQ(StateStreamingUpdater::Create(options, &tier, static_cast<char*>(roomy.data) + 64,
                                          roomy.bytes - 64)
                .status()
                .code(),
            StatusCode::kInvalidArgument)
      << "misaligned";
  EXPECT_EQ(
      StateStreamingUpdater::Create(options, nullptr, roomy.data, roomy.bytes).status().code(),
      StatusCode::kInvalidArgument);
  auto updater = *CreateUpdater(options, &tier, &staging);
  std::vector<float> grad(5000, 0.1f);
  Status too_big = updater->Run({{0, grad.data(), DType::kF32, nullptr}}, 1.0f, 1.0f).status();
  EXPECT_EQ(too_big.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(too_big.message().find("expert 0 has 5000 elements"), std::string_view::npos)
      << too_big;
  EXPECT_EQ(updater->Run({{7, grad.data(), DType::kF32, nullptr}}, 1.0f, 1.0f).status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(updater->Run({}, 0.0f, 1.0f).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tier.loads(), 0u) << "rejected before any I/O";
}

}  // namespace
}  // namespace ecss
