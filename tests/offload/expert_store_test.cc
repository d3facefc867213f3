#include "offload/expert_store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"
#include "runtime/base/checksum.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/offload/flip_byte.h"

namespace ecss {
namespace {

constexpr ExpertState kAll[] = {ExpertState::kWeights, ExpertState::kMaster, ExpertState::kMoments,
                                ExpertState::kGradient};

bool Contains(const Status& status, std::string_view text) {
  return status.message().find(text) != std::string_view::npos;
}

// Live fault-injecting engines: each removes itself when the store that owns it goes.
class EngineRegistry {
 public:
  void Add(FaultInjectionIoEngine* engine) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine->set_options(faults_);
    engines_.push_back(engine);
  }
  void Remove(FaultInjectionIoEngine* engine) {
    std::lock_guard<std::mutex> lock(mutex_);
    engines_.erase(std::find(engines_.begin(), engines_.end(), engine));
  }
  // `faults` on every engine from now on; with `nth` > 0, each live engine's nth next request
  // fails.
  void SetFaults(FaultOptions faults, uint64_t nth) {
    std::lock_guard<std::mutex> lock(mutex_);
    faults_ = faults;
    for (FaultInjectionIoEngine* engine : engines_) {
      if (nth > 0) faults.fail_nth = engine->counters().requests + nth;
      engine->set_options(faults);
    }
  }
  uint64_t TornWrites() {
    std::lock_guard<std::mutex> lock(mutex_);
    uint64_t torn = 0;
    for (FaultInjectionIoEngine* engine : engines_) torn += engine->counters().torn_writes;
    return torn;
  }

 private:
  std::mutex mutex_;
  std::vector<FaultInjectionIoEngine*> engines_;  // GUARDED_BY(mutex_)
  FaultOptions faults_;                           // GUARDED_BY(mutex_)
};

// Holds every request submitted through the engines it is set on until it opens: a handle
// stays busy (its holder inside a read or write) for as long as a test needs, with no timing.
class Gate {
 public:
  void Pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    ++held_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  // Until a request is held, or `finished` (its thread gave up before submitting).
  void WaitUntilHeld(const std::atomic<bool>& finished) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (held_ == 0 && !finished) cv_.wait_for(lock, std::chrono::milliseconds(10));
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int held_ = 0;       // GUARDED_BY(mutex_)
  bool open_ = false;  // GUARDED_BY(mutex_)
};

class TrackedEngine final : public FaultInjectionIoEngine {
 public:
  TrackedEngine(std::unique_ptr<IoEngine> inner, EngineRegistry* registry)
      : FaultInjectionIoEngine(std::move(inner), FaultOptions{}), registry_(registry) {
    registry_->Add(this);
  }
  ~TrackedEngine() override { registry_->Remove(this); }
  void set_gate(Gate* gate) { gate_ = gate; }
  // Round trips: requests submitted with none in flight.
  int round_trips() const { return round_trips_.load(); }

 protected:
  Status DoSubmit(const IoRequest& request) override {
    if (Gate* gate = gate_.load()) gate->Pass();
    if (in_flight() == 0) ++round_trips_;
    return FaultInjectionIoEngine::DoSubmit(request);
  }

 private:
  EngineRegistry* registry_;
  std::atomic<Gate*> gate_{nullptr};
  std::atomic<int> round_trips_{0};
};

// Runs `io` on a thread of its own while `gate` holds another handle's request: whether it
// finished (within a minute, which only a wait for the held handle takes); the gate is open
// afterwards either way.
bool FinishesWhileHeld(Gate& gate, const std::function<void()>& io) {
  std::future<void> done = std::async(std::launch::async, io);
  const bool finished = done.wait_for(std::chrono::minutes(1)) == std::future_status::ready;
  gate.Open();
  done.wait();
  return finished;
}

class ExpertStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "/ecss_store_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ + "/a");
    std::filesystem::create_directories(root_ + "/b");
    SimOptions sim;
    sim.device_memory_bytes = 1 << 20;
    sim_ = std::move(SimBackend::Create(sim)).value();
    // Every engine a store makes (four per state file) injects the fixture's faults, and is
    // in made_ in the order the store makes them.
    options_.io_engines = [this]() -> StatusOr<std::unique_ptr<IoEngine>> {
      IoEngineOptions io;
      io.queue_depth = 8;
      auto engine = std::make_unique<TrackedEngine>(CreatePosixIoEngine(io), &engines_);
      made_.push_back(engine.get());
      return std::unique_ptr<IoEngine>(std::move(engine));
    };
    options_.layout = {{3, 3}, 1000, DType::kBF16, 2};
    options_.placement = {Tier::kDevice, Tier::kPinned, Tier::kNvme, Tier::kPinned};
    options_.dirs = {root_ + "/a", root_ + "/b"};
    options_.device_budget_bytes = 64 << 10;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  StatusOr<std::unique_ptr<ExpertStore>> Make(bool create, const ExpertStoreOptions& options) {
    return create ? ExpertStore::Create(*sim_, options) : ExpertStore::Open(*sim_, options);
  }
  void SetFaults(FaultOptions faults, uint64_t nth = 0) { engines_.SetFaults(faults, nth); }
  // made_[i], whose requests `gate` now holds.
  TrackedEngine* Held(size_t i, Gate* gate) {
    made_[i]->set_gate(gate);
    return made_[i];
  }
  uint64_t TornWrites() { return engines_.TornWrites(); }

  // The bytes a test writes for (state, layer, expert, version): every value distinct.
  std::vector<uint8_t> Pattern(const ExpertStore& store, ExpertState state, uint32_t layer,
                               uint32_t expert, uint32_t version) const {
    std::vector<uint8_t> bytes(store.StateBytes(state));
    for (size_t i = 0; i < bytes.size(); ++i) {
      bytes[i] = static_cast<uint8_t>(i * 7 + static_cast<int>(state) * 31 + layer * 13 +
                                      expert * 5 + version * 101);
    }
    return bytes;
  }
  void WriteAll(ExpertStore& store, uint32_t version) {
    for (ExpertState state : kAll) {
      for (uint32_t l = 0; l < 2; ++l) {
        for (uint32_t e = 0; e < 3; ++e) {
          std::vector<uint8_t> bytes = Pattern(store, state, l, e, version);
          ASSERT_TRUE(store.Write(state, {l, e}, bytes.data()).ok());
        }
      }
    }
  }
  void ExpectAll(ExpertStore& store, uint32_t version) {
    for (ExpertState state : kAll) {
      for (uint32_t l = 0; l < 2; ++l) {
        for (uint32_t e = 0; e < 3; ++e) {
          std::vector<uint8_t> got(store.StateBytes(state));
          Status read = store.Read(state, {l, e}, got.data());
          ASSERT_TRUE(read.ok()) << read;
          ASSERT_EQ(got, Pattern(store, state, l, e, version))
              << ExpertStateName(state) << " layer " << l << " expert " << e;
        }
      }
    }
  }
  std::string ManifestText() const {
    std::ifstream in(root_ + "/a/ecss-store.manifest");
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }
  // Replaces `from` with `to` in the manifest and seals it with a valid checksum again.
  void RewriteManifest(const std::string& from, const std::string& to) {
    std::string text = ManifestText();
    text = text.substr(0, text.rfind("crc "));
    text.replace(text.find(from), from.size(), to);
    char crc[16];
    std::snprintf(crc, sizeof(crc), "%08x", Crc32c(text.data(), text.size()));
    std::ofstream(root_ + "/a/ecss-store.manifest") << text << "crc " << crc << "\n";
  }

  std::string root_;
  std::unique_ptr<SimBackend> sim_;
  EngineRegistry engines_;  // outlives every store a test makes (declared before them)
  // Every engine made, in order (stores are made on the test's thread); a closed store's
  // dangle.
  std::vector<TrackedEngine*> made_;
  ExpertStoreOptions options_;
};

TEST_F(ExpertStoreTest, EveryTierRoundTripsAndReopensWithAnyPlacement) {
  {
    auto store = Make(true, options_);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ((*store)->StateBytes(ExpertState::kWeights), 2000u);
    EXPECT_EQ((*store)->StateBytes(ExpertState::kMoments), 8000u);
    // A fresh store reads as zeros everywhere.
    std::vector<uint8_t> got((*store)->StateBytes(ExpertState::kMoments), 1);
    ASSERT_TRUE((*store)->Read(ExpertState::kMoments, {1, 2}, got.data()).ok());
    EXPECT_EQ(got, std::vector<uint8_t>(got.size(), 0));
    WriteAll(**store, 1);
    ExpectAll(**store, 1);
    auto device = (*store)->Resident(ExpertState::kWeights, {1, 1});
    ASSERT_TRUE(device.ok());
    EXPECT_TRUE(sim_->device_memory().ContainsAddress(*device));
    EXPECT_EQ((*store)->Resident(ExpertState::kMoments, {0, 0}).status().code(),
              StatusCode::kFailedPrecondition);
    ASSERT_TRUE((*store)->Close().ok());
  }
  EXPECT_TRUE(std::filesystem::exists(root_ + "/b/ecss-store-weights-1.bin"));
  // Every state moves tier at reopen and is found as it was written.
  for (auto placement :
       {std::array<Tier, 4>{Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNvme},
        std::array<Tier, 4>{Tier::kPinned, Tier::kDevice, Tier::kPinned, Tier::kDevice},
        std::array<Tier, 4>{Tier::kHost, Tier::kHost, Tier::kNvme, Tier::kHost}}) {
    options_.placement = placement;
    auto store = Make(false, options_);
    ASSERT_TRUE(store.ok()) << store.status();
    ExpectAll(**store, 1);
    ASSERT_TRUE((*store)->Close().ok());
  }
  EXPECT_NE(ManifestText().find("state closed"), std::string::npos);
}

TEST_F(ExpertStoreTest, InjectedFaultsNameTheExpertAndStateAndNeverCorrupt) {
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kPinned};
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  std::vector<uint8_t> got(store->StateBytes(ExpertState::kMaster));
  // A failed write (EIO on its array; a torn one; EIO on its header): the previous version
  // stays readable.
  const std::vector<uint8_t> v2 = Pattern(*store, ExpertState::kMaster, 1, 2, 2);
  for (int mode = 0; mode < 3; ++mode) {
    FaultOptions faults;
    faults.torn_writes = mode == 1;
    SetFaults(faults, mode == 2 ? 2 : 1);
    Status written = store->Write(ExpertState::kMaster, {1, 2}, v2.data());
    SetFaults(FaultOptions{});
    EXPECT_FALSE(written.ok());
    EXPECT_TRUE(Contains(written, "layer 1 expert 2 master")) << written;
    ASSERT_TRUE(store->Read(ExpertState::kMaster, {1, 2}, got.data()).ok());
    EXPECT_EQ(got, Pattern(*store, ExpertState::kMaster, 1, 2, 1)) << "mode " << mode;
  }
  // A failed read names what it read; the store stays usable.
  FaultOptions faults;
  SetFaults(faults, 1);
  Status read = store->Read(ExpertState::kWeights, {0, 1}, got.data());
  EXPECT_FALSE(read.ok());
  EXPECT_TRUE(Contains(read, "layer 0 expert 1 weights")) << read;
  SetFaults(FaultOptions{});
  ASSERT_TRUE(store->Write(ExpertState::kMaster, {1, 2}, v2.data()).ok());
  ASSERT_TRUE(store->Read(ExpertState::kMaster, {1, 2}, got.data()).ok());
  EXPECT_EQ(got, v2);
  // Random failures and split reads: every operation either succeeds with the right bytes or
  // fails with an error; a reader never sees another version's bytes.
  faults = FaultOptions{};
  faults.fail_one_in = 5;
  faults.split_reads = true;
  faults.torn_writes = true;
  faults.seed = 7;
  SetFaults(faults);
  std::vector<uint32_t> version(6, 1);  // of each (layer, expert)'s moments, as last written
  uint32_t failures = 0;
  for (uint32_t round = 0; round < 60; ++round) {
    const uint32_t l = round % 2, e = (round / 2) % 3, key = l * 3 + e;
    const uint32_t next = version[key] + 1;
    std::vector<uint8_t> bytes = Pattern(*store, ExpertState::kMoments, l, e, next);
    if (store->Write(ExpertState::kMoments, {l, e}, bytes.data()).ok()) {
      version[key] = next;
    } else {
      ++failures;
    }
    std::vector<uint8_t> seen(store->StateBytes(ExpertState::kMoments));
    Status status = store->Read(ExpertState::kMoments, {l, e}, seen.data());
    if (status.ok()) {
      EXPECT_EQ(seen, Pattern(*store, ExpertState::kMoments, l, e, version[key])) << round;
    } else {
      ++failures;
      EXPECT_TRUE(Contains(status, "moments")) << status;
    }
  }
  SetFaults(FaultOptions{});
  EXPECT_GT(failures, 0u);
  EXPECT_GT(TornWrites(), 0u);
}

TEST_F(ExpertStoreTest, CorruptionOnDiskIsDataLossNamingLayerExpertAndState) {
  options_.placement = {Tier::kPinned, Tier::kPinned, Tier::kNvme, Tier::kPinned};
  options_.dirs = {root_ + "/a"};
  auto store = std::move(Make(true, options_)).value();
  std::vector<uint8_t> bytes = Pattern(*store, ExpertState::kMoments, 0, 1, 3);
  ASSERT_TRUE(store->Write(ExpertState::kMoments, {0, 1}, bytes.data()).ok());
  // Expert 1's slots start after expert 0's two; its first version is in its first slot.
  const uint64_t slot = 4096 + StateBlockBytes(8000);
  const uint64_t at = 4096 + 2 * slot + 4096 + 77;  // past the file header and a slot header
  ASSERT_TRUE(FlipByte(root_ + "/a/ecss-store-moments-0.bin", at, 0x10));
  std::vector<uint8_t> got(bytes.size());
  Status read = store->Read(ExpertState::kMoments, {0, 1}, got.data());
  EXPECT_EQ(read.code(), StatusCode::kDataLoss) << read;
  EXPECT_TRUE(Contains(read, "layer 0 expert 1 moments")) << read;
  EXPECT_TRUE(Contains(read, "checksum mismatch")) << read;
  // Rewriting the expert repairs it.
  ASSERT_TRUE(store->Write(ExpertState::kMoments, {0, 1}, bytes.data()).ok());
  ASSERT_TRUE(store->Read(ExpertState::kMoments, {0, 1}, got.data()).ok());
  EXPECT_EQ(got, bytes);
}

TEST_F(ExpertStoreTest, BadDirectoriesDisksModelsAndBudgetsLeaveExistingDataIntact) {
  {
    auto store = std::move(Make(true, options_)).value();
    WriteAll(*store, 4);
  }  // the destructor closes
  // A second store over the first is refused.
  Status again = Make(true, options_).status();
  EXPECT_EQ(again.code(), StatusCode::kAlreadyExists) << again;
  // Missing and read-only directories.
  ExpertStoreOptions missing = options_;
  missing.dirs = {root_ + "/a", root_ + "/nope"};
  Status not_found = Make(false, missing).status();
  EXPECT_EQ(not_found.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(not_found, "/nope' does not exist")) << not_found;
  // A file where a directory belongs says so (not "does not exist").
  { std::ofstream(root_ + "/file") << "x"; }
  ExpertStoreOptions file = options_;
  file.dirs = {root_ + "/file"};
  Status not_a_directory = Make(true, file).status();
  EXPECT_EQ(not_a_directory.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(not_a_directory, "/file' is not a directory")) << not_a_directory;
  // A path through a file: the stat's own error, with its errno (ENOTDIR).
  file.dirs = {root_ + "/file/below"};
  Status through_a_file = Make(true, file).status();
  EXPECT_EQ(through_a_file.sys_errno(), ENOTDIR) << through_a_file;
  EXPECT_EQ(through_a_file.code(), StatusCode::kInvalidArgument) << through_a_file;
  EXPECT_TRUE(Contains(through_a_file, "/file/below'")) << through_a_file;
  ExpertStoreOptions empty = options_;
  std::filesystem::create_directories(root_ + "/c");
  empty.dirs = {root_ + "/c"};
  EXPECT_EQ(Make(false, empty).status().code(), StatusCode::kNotFound);
  if (::geteuid() != 0) {  // root writes anywhere
    std::filesystem::create_directories(root_ + "/ro");
    ::chmod((root_ + "/ro").c_str(), 0500);
    ExpertStoreOptions read_only = options_;
    read_only.dirs = {root_ + "/ro"};
    EXPECT_EQ(Make(true, read_only).status().code(), StatusCode::kPermissionDenied);
  }
  // Another model, another format version, a damaged manifest.
  ExpertStoreOptions other = options_;
  other.layout.params_per_expert = 999;
  Status model = Make(false, other).status();
  EXPECT_EQ(model.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(model, "params_per_expert 1000 there, 999 here")) << model;
  other = options_;
  other.layout.weights_dtype = DType::kF32;
  EXPECT_TRUE(Contains(Make(false, other).status(), "weights_dtype bf16"));
  const std::string manifest = ManifestText();
  RewriteManifest("format 5", "format 9");
  Status format = Make(false, options_).status();
  EXPECT_EQ(format.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(format, "format version 9")) << format;
  std::ofstream(root_ + "/a/ecss-store.manifest")
      << manifest.substr(0, 40) << "x" << manifest.substr(41);
  EXPECT_EQ(Make(false, options_).status().code(), StatusCode::kDataLoss);
  std::ofstream(root_ + "/a/ecss-store.manifest") << manifest;
  // Budgets below one expert, or below all of them: refused, with the bytes needed.
  ExpertStoreOptions small = options_;
  small.device_budget_bytes = 1000;
  Status device = Make(false, small).status();
  EXPECT_EQ(device.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(device, "holds no expert")) << device;
  EXPECT_TRUE(Contains(device, "need 2048 bytes")) << device;
  small = options_;
  small.pinned_budget_bytes = 30000;
  Status pinned = Make(false, small).status();
  EXPECT_EQ(pinned.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(pinned, "cannot hold every expert")) << pinned;
  EXPECT_EQ(Make(true, small).status().code(), StatusCode::kAlreadyExists);
  // After all of that the store opens and holds what was written.
  auto store = Make(false, options_);
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectAll(**store, 4);
}

TEST_F(ExpertStoreTest, AStoreNotClosedIsRefusedOnlyWhenStatesLivedInMemory) {
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 2);
  // While it is open, its manifest says so: what a crash leaves.
  ASSERT_TRUE(store->Close().ok());
  const std::string closed = ManifestText();
  RewriteManifest("state closed", "state open");
  Status unclean = Make(false, options_).status();
  EXPECT_EQ(unclean.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(unclean, "weights (device), master (pinned), gradient (pinned)")) << unclean;
  EXPECT_EQ(store->Write(ExpertState::kMaster, {0, 0}, nullptr).code(),
            StatusCode::kFailedPrecondition);
  std::ofstream(root_ + "/a/ecss-store.manifest") << closed;
  // With every state on NVMe nothing lives only in memory: an unclosed store opens.
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNvme};
  auto first = std::move(Make(false, options_)).value();
  ASSERT_TRUE(first->Close().ok());
  RewriteManifest("state closed", "state open");
  auto second = Make(false, options_);
  ASSERT_TRUE(second.ok()) << second.status();
  ExpectAll(**second, 2);
}

TEST_F(ExpertStoreTest, BadArgumentsAreClearErrors) {
  options_.layout.moments = 0;  // SGD: no moments state
  auto store = std::move(Make(true, options_)).value();
  std::vector<uint8_t> buffer(4000);
  EXPECT_EQ(store->Read(ExpertState::kMoments, {0, 0}, buffer.data()).code(),
            StatusCode::kInvalidArgument);
  Status layer = store->Read(ExpertState::kMaster, {2, 0}, buffer.data());
  EXPECT_EQ(layer.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(layer, "no layer 2 expert 0")) << layer;
  EXPECT_EQ(store->Write(ExpertState::kGradient, {0, 3}, buffer.data()).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->ReadBlock(ExpertState::kMaster, {0, 0}, buffer.data() + 1).code(),
            StatusCode::kInvalidArgument);
  ExpertStoreOptions bad = options_;
  bad.layout.experts_per_layer = {0, 0};
  EXPECT_EQ(Make(true, bad).status().code(), StatusCode::kInvalidArgument);
  bad = options_;
  bad.device_budget_bytes = 2 << 20;
  EXPECT_TRUE(Contains(Make(true, bad).status(), "more than the device"));
  EXPECT_EQ(ParseTier("ssd").status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ExpertStoreTest, AStateItDoesNotKeepHasNoFileAndCannotAppearLater) {
  options_.placement = {Tier::kNvme, Tier::kNone, Tier::kNone, Tier::kNone};
  {
    auto store = std::move(Make(true, options_)).value();
    std::vector<uint8_t> bytes = Pattern(*store, ExpertState::kWeights, 1, 1, 1);
    alignas(4096) static uint8_t block[4096];
    std::memcpy(block, bytes.data(), bytes.size());
    ASSERT_TRUE(store->WriteBlock(ExpertState::kWeights, {1, 1}, block).ok());
    std::vector<uint8_t> got(bytes.size());
    ASSERT_TRUE(store->Read(ExpertState::kWeights, {1, 1}, got.data()).ok());
    EXPECT_EQ(got, bytes);
    EXPECT_EQ(store->Read(ExpertState::kMaster, {0, 0}, got.data()).code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(store->WriteBlock(ExpertState::kWeights, {0, 0}, block + 1).code(),
              StatusCode::kInvalidArgument);
  }
  EXPECT_FALSE(std::filesystem::exists(root_ + "/a/ecss-store-master-0.bin"));
  // Not closed with only NVMe states: it reopens; a state it never kept cannot be placed now.
  ExpertStoreOptions more = options_;
  more.placement[static_cast<int>(ExpertState::kGradient)] = Tier::kPinned;
  Status refused = Make(false, more).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(refused, "without the gradient state")) << refused;
  EXPECT_TRUE(Make(false, options_).ok());
}

TEST_F(ExpertStoreTest, ConcurrentReadersAndWritersStayWithinBudget) {
  options_.placement = {Tier::kPinned, Tier::kNvme, Tier::kNvme, Tier::kDevice};
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      // Thread t owns expert t of every layer: it writes versions and reads them back.
      for (uint32_t round = 2; round < 12; ++round) {
        for (ExpertState state : kAll) {
          for (uint32_t l = 0; l < 2; ++l) {
            std::vector<uint8_t> bytes = Pattern(*store, state, l, t, round);
            std::vector<uint8_t> got(bytes.size());
            if (!store->Write(state, {l, t}, bytes.data()).ok() ||
                !store->Read(state, {l, t}, got.data()).ok() || got != bytes) {
              ++errors;
            }
          }
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(errors.load(), 0);
  ExpectAll(*store, 11);
  EXPECT_LE(store->pinned_pool().stats().peak_used_bytes, store->pinned_pool().capacity_bytes());
  EXPECT_LE(sim_->device_memory().stats().peak_used_bytes, options_.device_budget_bytes);
}

// An update writes the master, then the moments: a crash between them leaves the master a
// version ahead, and ReadStates reads both as of the version they share.
TEST_F(ExpertStoreTest, ReadStatesReadsAnUpdateCutShortAsThePreviousVersion) {
  options_.placement = {Tier::kNone, Tier::kNvme, Tier::kNvme, Tier::kNone};
  auto store = std::move(Make(true, options_)).value();
  const ExpertId id{1, 2};
  const uint64_t master_block = store->BlockBytes(ExpertState::kMaster);
  const uint64_t moments_block = store->BlockBytes(ExpertState::kMoments);
  auto block = [](uint64_t bytes) {
    return std::unique_ptr<uint8_t, decltype(&std::free)>(
        static_cast<uint8_t*>(std::aligned_alloc(4096, bytes)), &std::free);
  };
  auto master = block(master_block), moments = block(moments_block);
  auto fill = [&](uint32_t version) {
    std::vector<uint8_t> m = Pattern(*store, ExpertState::kMaster, 1, 2, version);
    std::vector<uint8_t> k = Pattern(*store, ExpertState::kMoments, 1, 2, version);
    std::memcpy(master.get(), m.data(), m.size());
    std::memcpy(moments.get(), k.data(), k.size());
  };
  auto read = [&](uint64_t* version) {
    void* blocks[2] = {master.get(), moments.get()};
    return store->ReadStates(id, {ExpertState::kMaster, ExpertState::kMoments}, blocks, version);
  };
  auto expect = [&](uint32_t version) {
    EXPECT_EQ(std::memcmp(master.get(), Pattern(*store, ExpertState::kMaster, 1, 2, version).data(),
                          store->StateBytes(ExpertState::kMaster)),
              0);
    EXPECT_EQ(
        std::memcmp(moments.get(), Pattern(*store, ExpertState::kMoments, 1, 2, version).data(),
                    store->StateBytes(ExpertState::kMoments)),
        0);
  };
  fill(1);
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMaster, id, master.get(), 1).ok());
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMoments, id, moments.get(), 1).ok());
  fill(2);
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMaster, id, master.get(), 2).ok());
  // The crash: the moments of version 2 were never written.
  uint64_t version = 0;
  ASSERT_TRUE(read(&version).ok());
  EXPECT_EQ(version, 1u);
  expect(1);
  uint64_t alone = 0;
  ASSERT_TRUE(store->ReadBlock(ExpertState::kMaster, id, master.get(), &alone).ok());
  EXPECT_EQ(alone, 2u) << "read alone, the master is its newest version";
  // The update finished: both at version 2.
  fill(2);
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMoments, id, moments.get(), 2).ok());
  ASSERT_TRUE(read(&version).ok());
  EXPECT_EQ(version, 2u);
  expect(2);
  // Two master versions ahead of the moments: the shadow slots no longer hold a shared one.
  fill(3);
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMaster, id, master.get(), 3).ok());
  ASSERT_TRUE(store->WriteBlock(ExpertState::kMaster, id, master.get(), 4).ok());
  Status lost = read(&version);
  EXPECT_EQ(lost.code(), StatusCode::kDataLoss) << lost;
  EXPECT_TRUE(Contains(lost, "layer 1 expert 2 master at version 2 (it holds 4)")) << lost;
}

// WriteStates with the caller's checksums (an update's): right ones read back as written, a
// wrong one reads as damaged, never as other data, and the version before stays readable.
TEST_F(ExpertStoreTest, WriteStatesTakesTheCallersChecksums) {
  options_.placement = {Tier::kNone, Tier::kNvme, Tier::kNvme, Tier::kNone};
  auto store = std::move(Make(true, options_)).value();
  const ExpertId id{0, 1};
  const std::vector<ExpertState> states = {ExpertState::kMaster, ExpertState::kMoments};
  std::vector<std::unique_ptr<uint8_t, decltype(&std::free)>> blocks;
  for (ExpertState state : states) {
    blocks.emplace_back(static_cast<uint8_t*>(std::aligned_alloc(4096, store->BlockBytes(state))),
                        &std::free);
  }
  auto write = [&](uint32_t version, bool wrong) {
    uint32_t checksums[2];
    for (size_t i = 0; i < states.size(); ++i) {
      std::vector<uint8_t> bytes = Pattern(*store, states[i], 0, 1, version);
      std::memcpy(blocks[i].get(), bytes.data(), bytes.size());
      checksums[i] = Crc32c(bytes.data(), bytes.size()) ^ (wrong && i == 1 ? 1u : 0u);
    }
    const void* raw[2] = {blocks[0].get(), blocks[1].get()};
    return store->WriteStates(id, states, raw, version, checksums);
  };
  auto read = [&](uint64_t* version) {
    void* raw[2] = {blocks[0].get(), blocks[1].get()};
    return store->ReadStates(id, states, raw, version);
  };
  ASSERT_TRUE(write(1, false).ok());
  uint64_t version = 0;
  ASSERT_TRUE(read(&version).ok());
  EXPECT_EQ(version, 1u);
  for (size_t i = 0; i < states.size(); ++i) {
    EXPECT_EQ(std::memcmp(blocks[i].get(), Pattern(*store, states[i], 0, 1, 1).data(),
                          store->StateBytes(states[i])),
              0);
  }
  ASSERT_TRUE(write(2, /*wrong=*/true).ok());
  Status damaged = read(&version);
  EXPECT_EQ(damaged.code(), StatusCode::kDataLoss) << damaged;
  EXPECT_TRUE(Contains(damaged, "checksum mismatch")) << damaged;
  EXPECT_TRUE(Contains(damaged, "moments")) << damaged;
  // The version before is still in the other shadow slot: read as of it.
  void* raw[2] = {blocks[0].get(), blocks[1].get()};
  ASSERT_TRUE(store->ReadStatesAt(id, {ExpertState::kMaster}, raw, 1).ok());
  EXPECT_EQ(std::memcmp(blocks[0].get(), Pattern(*store, ExpertState::kMaster, 0, 1, 1).data(),
                        store->StateBytes(ExpertState::kMaster)),
            0);
  // Rewritten with its right checksums, version 2 reads again.
  ASSERT_TRUE(write(2, false).ok());
  ASSERT_TRUE(read(&version).ok());
  EXPECT_EQ(version, 2u);
}

// ReadStates with `checksums` hands out the checksum each block must have, unchecked: what
// the header records for an nvme state (of the version read, an update cut short included),
// the initial value's for an unwritten expert, a memory state's computed.
TEST_F(ExpertStoreTest, ReadStatesHandsOutTheChecksumsBlocksMustHave) {
  options_.placement = {Tier::kNone, Tier::kNvme, Tier::kPinned, Tier::kNone};
  auto store = std::move(Make(true, options_)).value();
  const ExpertId id{1, 0};
  const std::vector<ExpertState> states = {ExpertState::kMaster, ExpertState::kMoments};
  std::vector<std::unique_ptr<uint8_t, decltype(&std::free)>> blocks;
  for (ExpertState state : states) {
    blocks.emplace_back(static_cast<uint8_t*>(std::aligned_alloc(4096, store->BlockBytes(state))),
                        &std::free);
  }
  void* raw[2] = {blocks[0].get(), blocks[1].get()};
  auto expect_read = [&](uint64_t want_version, uint32_t want_pattern) {
    uint32_t checksums[2] = {1, 1};
    uint64_t version = 99;
    ASSERT_TRUE(store->ReadStates(id, states, raw, &version, checksums).ok());
    EXPECT_EQ(version, want_version);
    for (size_t i = 0; i < states.size(); ++i) {
      EXPECT_EQ(checksums[i], Crc32c(blocks[i].get(), store->StateBytes(states[i]))) << i;
      if (want_pattern == 0) continue;
      EXPECT_EQ(std::memcmp(blocks[i].get(), Pattern(*store, states[i], 1, 0, want_pattern).data(),
                            store->StateBytes(states[i])),
                0)
          << i;
    }
  };
  expect_read(0, 0);  // never written: initial values
  auto write = [&](ExpertState state, uint32_t version) {
    std::vector<uint8_t> bytes = Pattern(*store, state, 1, 0, version);
    return store->Write(state, id, bytes.data(), version);
  };
  ASSERT_TRUE(write(ExpertState::kMaster, 1).ok());
  ASSERT_TRUE(write(ExpertState::kMoments, 1).ok());
  expect_read(1, 1);
  ASSERT_TRUE(write(ExpertState::kMaster, 2).ok());  // an update cut short: the master ahead
  expect_read(1, 1);
}

TEST_F(ExpertStoreTest, LayersMayHaveDifferentExpertCounts) {
  options_.layout.experts_per_layer = {2, 0, 3};
  options_.placement = {Tier::kNvme, Tier::kPinned, Tier::kNone, Tier::kNone};
  {
    auto store = std::move(Make(true, options_)).value();
    EXPECT_EQ(store->index().size(), 5u);
    for (ExpertId id : {ExpertId{0, 1}, ExpertId{2, 2}}) {
      std::vector<uint8_t> bytes = Pattern(*store, ExpertState::kMaster, id.layer, id.expert, 1);
      ASSERT_TRUE(store->Write(ExpertState::kMaster, id, bytes.data()).ok());
    }
    std::vector<uint8_t> got(store->StateBytes(ExpertState::kMaster));
    Status none = store->Read(ExpertState::kMaster, {1, 0}, got.data());
    EXPECT_EQ(none.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(none, "no layer 1 expert 0 (3 layers; that one has 0 experts)")) << none;
    EXPECT_EQ(store->Read(ExpertState::kMaster, {2, 3}, got.data()).code(),
              StatusCode::kInvalidArgument);
    ASSERT_TRUE(store->Close().ok());
  }
  EXPECT_NE(ManifestText().find("experts_per_layer 2 0 3\n"), std::string::npos);
  auto store = Make(false, options_);
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<uint8_t> got((*store)->StateBytes(ExpertState::kMaster));
  ASSERT_TRUE((*store)->Read(ExpertState::kMaster, {2, 2}, got.data()).ok());
  EXPECT_EQ(got, Pattern(**store, ExpertState::kMaster, 2, 2, 1));
  store->reset();
  ExpertStoreOptions other = options_;
  other.layout.experts_per_layer = {3, 0, 2};
  Status refused = Make(false, other).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(refused, "3 layers (2 0 3 experts) there, 3 layers (3 0 2 experts) here"))
      << refused;
}

// Stores of format 3 (no initial values or sharing in the manifest) and the state files sessions
// kept before the store are refused, naming their version; nothing is written over them.
TEST_F(ExpertStoreTest, EarlierFormatsAreRefusedNamingTheirVersion) {
  { ASSERT_TRUE(Make(true, options_).ok()); }
  RewriteManifest("format 5", "format 3");
  const std::string before = ManifestText();
  Status old_store = Make(false, options_).status();
  EXPECT_EQ(old_store.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(old_store, "has format version 3; this build reads version 5")) << old_store;
  EXPECT_EQ(ManifestText(), before);
  // A directory with the session's older state files (ecss-states-<i>.bin) and no store.
  std::filesystem::create_directories(root_ + "/legacy");
  {
    std::ofstream legacy(root_ + "/legacy/ecss-states-0.bin", std::ios::binary);
    const char magic[8] = {'E', 'C', 'S', 'S', 'S', 'T', '0', '1'};
    const uint32_t version = 2;
    legacy.write(magic, sizeof(magic));
    legacy.write(reinterpret_cast<const char*>(&version), sizeof(version));
    legacy << std::string(4084, '\0');
  }
  ExpertStoreOptions legacy = options_;
  legacy.dirs = {root_ + "/legacy"};
  Status refused = Make(false, legacy).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(refused, "state-file format version 2")) << refused;
  EXPECT_TRUE(Contains(refused, "does not read or migrate them")) << refused;
  EXPECT_EQ(std::filesystem::file_size(root_ + "/legacy/ecss-states-0.bin"), 4096u);
}

// The weight stager reads weights while the optimizer pipeline loads and stores masters and
// moments: each state and direction has its own handle and lock, and every read sees a whole
// version.
TEST_F(ExpertStoreTest, ReadsAndWritesOfDifferentStatesRunAtOnce) {
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kPinned};
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  std::atomic<int> errors{0};
  auto block_of = [&](ExpertState state) {
    return std::unique_ptr<uint8_t, decltype(&std::free)>(
        static_cast<uint8_t*>(std::aligned_alloc(4096, store->BlockBytes(state))), &std::free);
  };
  std::thread stager([&] {  // weights of layer 0, read over and over
    auto block = block_of(ExpertState::kWeights);
    for (int round = 0; round < 30; ++round) {
      const uint32_t e = round % 3;
      if (!store->ReadBlock(ExpertState::kWeights, {0, e}, block.get()).ok() ||
          std::memcmp(block.get(), Pattern(*store, ExpertState::kWeights, 0, e, 1).data(),
                      store->StateBytes(ExpertState::kWeights)) != 0) {
        ++errors;
      }
    }
  });
  std::thread writer([&] {  // masters and moments of layer 1, new versions
    for (ExpertState state : {ExpertState::kMaster, ExpertState::kMoments}) {
      auto block = block_of(state);
      for (uint32_t version = 2; version < 8; ++version) {
        for (uint32_t e = 0; e < 3; ++e) {
          std::vector<uint8_t> bytes = Pattern(*store, state, 1, e, version);
          std::memcpy(block.get(), bytes.data(), bytes.size());
          if (!store->WriteBlock(state, {1, e}, block.get(), version).ok()) ++errors;
        }
      }
    }
  });
  std::thread loader([&] {  // masters of layer 0, read as the pipeline's load stage does
    auto block = block_of(ExpertState::kMaster);
    for (int round = 0; round < 30; ++round) {
      const uint32_t e = round % 3;
      uint64_t version = 9;
      if (!store->ReadBlock(ExpertState::kMaster, {0, e}, block.get(), &version).ok() ||
          version != 0 ||
          std::memcmp(block.get(), Pattern(*store, ExpertState::kMaster, 0, e, 1).data(),
                      store->StateBytes(ExpertState::kMaster)) != 0) {
        ++errors;
      }
    }
  });
  stager.join();
  writer.join();
  loader.join();
  EXPECT_EQ(errors.load(), 0);
  for (uint32_t e = 0; e < 3; ++e) {
    for (ExpertState state : {ExpertState::kMaster, ExpertState::kMoments}) {
      std::vector<uint8_t> got(store->StateBytes(state));
      ASSERT_TRUE(store->Read(state, {1, e}, got.data()).ok());
      EXPECT_EQ(got, Pattern(*store, state, 1, e, 7));
    }
  }
}

// An aligned block of a state holding `pattern` (StateBytes of it, then zeros).
std::unique_ptr<uint8_t, decltype(&std::free)> Block(const ExpertStore& store, ExpertState state,
                                                     const std::vector<uint8_t>& pattern) {
  std::unique_ptr<uint8_t, decltype(&std::free)> block(
      static_cast<uint8_t*>(std::aligned_alloc(4096, store.BlockBytes(state))), &std::free);
  std::memset(block.get(), 0, store.BlockBytes(state));
  std::copy_n(pattern.begin(), std::min<size_t>(pattern.size(), store.BlockBytes(state)),
              block.get());
  return block;
}

// Two reads of one nvme state run at once, each on a reading handle of its own: while one
// read is held on its handle, another read of the state takes the other handle.
TEST_F(ExpertStoreTest, TwoReadsOfOneStateRunAtOnce) {
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  // Every state has a file (the memory ones are durable), each two writing handles and two
  // reading ones, in the states' order: the moments' are the third four.
  ASSERT_EQ(made_.size(), 16u);
  Gate gate;
  Held(10, &gate);
  FaultInjectionIoEngine* second = made_[11];
  const ExpertState state = ExpertState::kMoments;
  auto read = [&](ExpertId id) {
    auto block = Block(*store, state, {});
    const Status done = store->ReadBlock(state, id, block.get());
    EXPECT_TRUE(done.ok()) << done;
    EXPECT_EQ(std::memcmp(block.get(), Pattern(*store, state, id.layer, id.expert, 1).data(),
                          store->StateBytes(state)),
              0)
        << "layer " << id.layer << " expert " << id.expert;
  };
  std::atomic<bool> held_read_done{false};
  std::thread held_read([&] {
    read({0, 0});
    held_read_done = true;
  });
  gate.WaitUntilHeld(held_read_done);  // the first handle is busy
  const uint64_t second_before = second->bytes_read();
  EXPECT_TRUE(FinishesWhileHeld(gate, [&] { read({1, 2}); })) << "it waited for the held one";
  EXPECT_GT(second->bytes_read(), second_before) << "the second read took the other handle";
  held_read.join();
}

// Two writes of one state run at once when the experts' writers differ (flat id % 2): the
// pipeline's stores at once. Each expert keeps its writer, so each reads back what it wrote.
TEST_F(ExpertStoreTest, TwoWritesOfOneStateRunAtOnce) {
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  ASSERT_EQ(made_.size(), 16u);
  Gate gate;
  Held(8, &gate);  // the moments' writers: [8] writes even experts, [9] odd ones
  FaultInjectionIoEngine* odd = made_[9];
  const ExpertState state = ExpertState::kMoments;
  auto write = [&](ExpertId id) {
    auto block = Block(*store, state, Pattern(*store, state, id.layer, id.expert, 2));
    const Status done = store->WriteBlock(state, id, block.get(), 2);
    EXPECT_TRUE(done.ok()) << done;
  };
  // Layer 0 expert 0 is flat 0 (the even writer), layer 0 expert 1 flat 1 (the odd one).
  std::atomic<bool> held_write_done{false};
  std::thread held_write([&] {
    write({0, 0});
    held_write_done = true;
  });
  gate.WaitUntilHeld(held_write_done);
  const uint64_t odd_before = odd->bytes_written();
  EXPECT_TRUE(FinishesWhileHeld(gate, [&] { write({0, 1}); })) << "it waited for the held one";
  EXPECT_GT(odd->bytes_written(), odd_before) << "the second write took the other handle";
  held_write.join();
  made_[8]->set_gate(nullptr);
  for (ExpertId id : {ExpertId{0, 0}, ExpertId{0, 1}, ExpertId{0, 2}}) {
    std::vector<uint8_t> got(store->StateBytes(state));
    ASSERT_TRUE(store->Read(state, id, got.data()).ok());
    const bool rewritten = id.expert < 2;  // at version 2; WriteAll's are at 0
    StatusOr<uint64_t> version = store->Version(state, id);
    ASSERT_TRUE(version.ok()) << version.status();
    EXPECT_EQ(*version, rewritten ? 2u : 0u) << "expert " << id.expert;
    EXPECT_EQ(got, Pattern(*store, state, id.layer, id.expert, rewritten ? 2 : 1))
        << "expert " << id.expert;
  }
  // A reopened store (both writers learn each slot from its headers) goes on from there.
  ASSERT_TRUE(store->Close().ok());
  store = std::move(Make(false, options_)).value();
  WriteAll(*store, 3);
  for (uint32_t e = 0; e < 3; ++e) {
    std::vector<uint8_t> got(store->StateBytes(state));
    ASSERT_TRUE(store->Read(state, {1, e}, got.data()).ok());
    EXPECT_EQ(got, Pattern(*store, state, 1, e, 3));
  }
}

// A new store's writers both know its slots unwritten: first writes read no slot header, and
// what they write counts as fresh (written into a sparse file's holes).
TEST_F(ExpertStoreTest, FirstWritesOfANewStoreReadNothing) {
  auto store = std::move(Make(true, options_)).value();
  const ExpertStore::IoBytes start = store->io_bytes();
  WriteAll(*store, 1);  // the moments (on nvme) of experts of both parities
  const ExpertStore::IoBytes moved = store->io_bytes().Since(start);
  EXPECT_GT(moved.written, 0u);
  EXPECT_EQ(moved.read, 0u) << "a slot header read before a first write";
  EXPECT_EQ(moved.fresh_written, moved.written);
}

// Every handle of a state shares the guess of each expert's newest copy: a read after writes
// through either writer (experts of both parities) reads the slot headers and the newest
// copy's arrays in one round trip, and no other copy.
TEST_F(ExpertStoreTest, AReadAfterWritesThroughEitherWriterTakesOneRoundTrip) {
  auto store = std::move(Make(true, options_)).value();
  WriteAll(*store, 1);
  WriteAll(*store, 2);  // both copies of every expert's moments (on nvme) written
  auto round_trips = [&] {
    int trips = 0;
    for (const TrackedEngine* engine : made_) trips += engine->round_trips();
    return trips;
  };
  const uint64_t one_copy = 2 * 4096 + StateBlockBytes(store->StateBytes(ExpertState::kMoments));
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < 3; ++e) {
      const int trips = round_trips();
      const ExpertStore::IoBytes start = store->io_bytes();
      std::vector<uint8_t> got(store->StateBytes(ExpertState::kMoments));
      ASSERT_TRUE(store->Read(ExpertState::kMoments, {l, e}, got.data()).ok());
      EXPECT_EQ(got, Pattern(*store, ExpertState::kMoments, l, e, 2));
      EXPECT_EQ(round_trips() - trips, 1) << "layer " << l << " expert " << e;
      EXPECT_EQ(store->io_bytes().Since(start).read, one_copy);
    }
  }
}

// Writes of one state through both writers at once (the pipeline's stores: WriteStates of
// distinct experts from threads of their own), among them shared experts whose source has the
// other parity, so that first writes that move sharing (every handle of the state locked) run
// beside plain ones: each thread reads back what it wrote, and each expert ends at its last
// version, its own.
TEST_F(ExpertStoreTest, WritesOfBothParitiesAndSharedExpertsRunAtOnce) {
  options_.placement = {Tier::kPinned, Tier::kNvme, Tier::kNvme, Tier::kPinned};
  auto store = std::move(Make(true, options_)).value();
  const std::vector<ExpertState> states = {ExpertState::kMaster, ExpertState::kMoments};
  // Writes `id`'s states at `version`, then reads them back: whether both went as they should.
  auto write_and_read = [&](ExpertId id, uint32_t version) {
    std::vector<std::unique_ptr<uint8_t, decltype(&std::free)>> written, got;
    std::vector<void*> written_blocks, got_blocks;
    for (ExpertState state : states) {
      written.push_back(Block(*store, state, Pattern(*store, state, id.layer, id.expert, version)));
      got.push_back(Block(*store, state, {}));
      written_blocks.push_back(written.back().get());
      got_blocks.push_back(got.back().get());
    }
    uint64_t read_version = 0;
    if (!store->WriteStates(id, states, written_blocks.data(), version).ok() ||
        !store->ReadStates(id, states, got_blocks.data(), &read_version).ok() ||
        read_version != version) {
      return false;
    }
    for (size_t s = 0; s < states.size(); ++s) {
      if (std::memcmp(got[s].get(), written[s].get(), store->StateBytes(states[s])) != 0) {
        return false;
      }
    }
    return true;
  };
  // Layer 0's experts 0 and 1 (flat 0 and 1) at version 1, shared by layer 1's experts 0 and
  // 1 (flat 3 and 4): each source and its dependent on different writers.
  ASSERT_TRUE(write_and_read({0, 0}, 1));
  ASSERT_TRUE(write_and_read({0, 1}, 1));
  const std::vector<std::pair<ExpertId, ExpertId>> shared = {{{1, 0}, {0, 0}}, {{1, 1}, {0, 1}}};
  ASSERT_TRUE(store->Share(shared).ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < 3; ++e) {
      threads.emplace_back([&, l, e] {
        for (uint32_t version = 2; version <= 9; ++version) {
          if (!write_and_read({l, e}, version)) ++failures;
        }
      });
    }
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < 3; ++e) {
      EXPECT_TRUE(write_and_read({l, e}, 10)) << "layer " << l << " expert " << e;
      EXPECT_FALSE(store->ReadsSourceStorage({l, e}, ExpertState::kMoments));
    }
  }
}

// Memory states that are not durable have no file: a store without nvme states needs no
// directory and puts nothing on disk (the session's store with states in host memory).
TEST_F(ExpertStoreTest, AMemoryOnlyStoreKeepsEveryStateInMemory) {
  options_.dirs.clear();
  options_.durable_memory_states = false;
  options_.placement = {Tier::kPinned, Tier::kHost, Tier::kHost, Tier::kNone};
  auto store = Make(true, options_);
  ASSERT_TRUE(store.ok()) << store.status();
  ExpertStore& s = **store;
  for (ExpertState state : {ExpertState::kWeights, ExpertState::kMaster, ExpertState::kMoments}) {
    for (uint32_t l = 0; l < 2; ++l) {
      for (uint32_t e = 0; e < 3; ++e) {
        std::vector<uint8_t> bytes = Pattern(s, state, l, e, 1);
        ASSERT_TRUE(s.Write(state, {l, e}, bytes.data()).ok());
      }
    }
  }
  std::vector<uint8_t> got(s.StateBytes(ExpertState::kMoments));
  ASSERT_TRUE(s.Read(ExpertState::kMoments, {1, 2}, got.data()).ok());
  EXPECT_EQ(got, Pattern(s, ExpertState::kMoments, 1, 2, 1));
  // Resident host memory, the regions as RegionBytes says, nothing staged, nothing on disk.
  auto master = s.Resident(ExpertState::kMaster, {0, 1});
  ASSERT_TRUE(master.ok());
  EXPECT_EQ(std::memcmp(*master, Pattern(s, ExpertState::kMaster, 0, 1, 1).data(), 4000), 0);
  ASSERT_NE(s.host_memory(), nullptr);
  EXPECT_EQ(s.host_memory()->stats().peak_used_bytes,
            ExpertStore::RegionBytes(options_, ExpertState::kMaster) +
                ExpertStore::RegionBytes(options_, ExpertState::kMoments));
  EXPECT_EQ(ExpertStore::RegionBytes(options_, ExpertState::kMaster), 6u * 4032);
  EXPECT_EQ(ExpertStore::StagingBytes(options_), 0u);
  EXPECT_TRUE(s.Flush().ok());
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/a"));
  ASSERT_TRUE(s.Close().ok());
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/a"));
  // An nvme state needs a directory; opening always does.
  options_.placement[static_cast<int>(ExpertState::kMoments)] = Tier::kNvme;
  EXPECT_EQ(Make(true, options_).status().code(), StatusCode::kInvalidArgument);
  options_.placement[static_cast<int>(ExpertState::kMoments)] = Tier::kHost;
  EXPECT_EQ(Make(false, options_).status().code(), StatusCode::kInvalidArgument);
  // A budget below the host regions is refused with the bytes they need.
  options_.host_budget_bytes = 1000;
  Status small = Make(true, options_).status();
  EXPECT_EQ(small.code(), StatusCode::kResourceExhausted) << small;
  EXPECT_TRUE(Contains(small, "host budget")) << small;
}

// With nvme states beside memory states that are not durable, an unclosed store reopens (the
// memory states were never meant to outlive it: they start at zero), and a memory state that
// had no file cannot move to NVMe.
TEST_F(ExpertStoreTest, MemoryStatesThatAreNotDurableStartAtZeroAndHaveNoFile) {
  options_.durable_memory_states = false;
  options_.placement = {Tier::kPinned, Tier::kNvme, Tier::kNvme, Tier::kNone};
  {
    auto store = std::move(Make(true, options_)).value();
    std::vector<uint8_t> weights = Pattern(*store, ExpertState::kWeights, 1, 1, 1);
    std::vector<uint8_t> master = Pattern(*store, ExpertState::kMaster, 1, 1, 1);
    ASSERT_TRUE(store->Write(ExpertState::kWeights, {1, 1}, weights.data()).ok());
    ASSERT_TRUE(store->Write(ExpertState::kMaster, {1, 1}, master.data()).ok());
    EXPECT_FALSE(std::filesystem::exists(root_ + "/a/ecss-store-weights-0.bin"));
    EXPECT_NE(ManifestText().find("memory_states volatile"), std::string::npos);
    // Not closed (as after a crash): still opens.
    ASSERT_TRUE(store->Close().ok());
    RewriteManifest("state closed", "state open");
    auto again = Make(false, options_);
    ASSERT_TRUE(again.ok()) << again.status();
    std::vector<uint8_t> got(weights.size(), 1);
    ASSERT_TRUE((*again)->Read(ExpertState::kWeights, {1, 1}, got.data()).ok());
    EXPECT_EQ(got, std::vector<uint8_t>(got.size(), 0)) << "not durable: zeros";
    std::vector<uint8_t> got_master(master.size());
    ASSERT_TRUE((*again)->Read(ExpertState::kMaster, {1, 1}, got_master.data()).ok());
    EXPECT_EQ(got_master, master);
  }
  ExpertStoreOptions weights_on_nvme = options_;
  weights_on_nvme.placement[static_cast<int>(ExpertState::kWeights)] = Tier::kNvme;
  Status refused = Make(false, weights_on_nvme).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_TRUE(Contains(refused, "weights state in pinned memory only")) << refused;
}

// Before its first write, each state of each expert reads as `initial` says, on every tier:
// memory states start from it, nvme states read it until a write materialises them; an
// update cut short after its first state reads as the initial version of all of them.
TEST_F(ExpertStoreTest, UnwrittenExpertsReadAsTheirInitialValueUntilWritten) {
  // The fixture's layout: 1000 parameters, bf16 weights, two moment arrays.
  auto initial = [](ExpertState state, ExpertId id) {
    const size_t bytes = state == ExpertState::kWeights   ? 2000
                         : state == ExpertState::kMoments ? 8000
                                                          : 4000;
    std::vector<uint8_t> v(bytes);
    for (size_t i = 0; i < bytes; ++i) {
      v[i] = static_cast<uint8_t>(i * 3 + static_cast<int>(state) * 17 + id.layer * 29 +
                                  id.expert * 11 + 1);
    }
    return v;
  };
  std::atomic<int> calls{0};
  options_.initial = [&](ExpertState state, ExpertId id, void* dst, uint64_t bytes) {
    ++calls;
    const std::vector<uint8_t> v = initial(state, id);
    EXPECT_EQ(bytes, v.size());
    std::memcpy(dst, v.data(), v.size());
  };
  options_.placement = {Tier::kDevice, Tier::kNvme, Tier::kNvme, Tier::kHost};
  // Initial values need a name (the manifest records it).
  EXPECT_EQ(Make(true, options_).status().code(), StatusCode::kInvalidArgument);
  options_.initial_id = "test pattern 1";
  options_.max_file_bytes = 4096 + 2 * (4096 + StateBlockBytes(8000));  // one expert per file
  auto store = std::move(Make(true, options_)).value();
  EXPECT_EQ(calls.load(), 12) << "the memory states (weights, gradient) of 6 experts at Create";
  for (const auto& entry : std::filesystem::directory_iterator(root_ + "/a")) {
    struct stat st {};
    ASSERT_EQ(::stat(entry.path().c_str(), &st), 0);
    if (entry.path().extension() == ".bin") {
      EXPECT_LE(st.st_blocks * 512, 4096) << entry.path() << " holds its file header only";
    }
  }
  for (ExpertState state : kAll) {
    for (uint32_t e = 0; e < 3; ++e) {
      std::vector<uint8_t> got(store->StateBytes(state));
      ASSERT_TRUE(store->Read(state, {1, e}, got.data()).ok());
      EXPECT_EQ(got, initial(state, {1, e})) << ExpertStateName(state) << " expert " << e;
    }
  }
  // The first write materialises one state of one expert; the others stay initial.
  std::vector<uint8_t> written = Pattern(*store, ExpertState::kMaster, 1, 2, 1);
  ASSERT_TRUE(store->Write(ExpertState::kMaster, {1, 2}, written.data(), 1).ok());
  std::vector<uint8_t> got(store->StateBytes(ExpertState::kMaster));
  ASSERT_TRUE(store->Read(ExpertState::kMaster, {1, 2}, got.data()).ok());
  EXPECT_EQ(got, written);
  ASSERT_TRUE(store->Read(ExpertState::kMaster, {1, 1}, got.data()).ok());
  EXPECT_EQ(got, initial(ExpertState::kMaster, {1, 1}));
  // The master a version ahead of the unwritten moments (an update cut short): both are read
  // as the initial version.
  auto block = [](uint64_t bytes) {
    return std::unique_ptr<void, decltype(&std::free)>(std::aligned_alloc(4096, bytes), &std::free);
  };
  auto master = block(store->BlockBytes(ExpertState::kMaster));
  auto moments = block(store->BlockBytes(ExpertState::kMoments));
  void* blocks[2] = {master.get(), moments.get()};
  uint64_t version = 9;
  ASSERT_TRUE(
      store->ReadStates({1, 2}, {ExpertState::kMaster, ExpertState::kMoments}, blocks, &version)
          .ok());
  EXPECT_EQ(version, 0u);
  EXPECT_EQ(std::memcmp(master.get(), initial(ExpertState::kMaster, {1, 2}).data(), 4000), 0);
  EXPECT_EQ(std::memcmp(moments.get(), initial(ExpertState::kMoments, {1, 2}).data(), 8000), 0);
  // Closed and reopened: written and unwritten experts read as before, from files split as
  // they were made (whatever max_file_bytes says now); other initial values are refused.
  ASSERT_TRUE(store->Close().ok());
  EXPECT_TRUE(std::filesystem::exists(root_ + "/a/ecss-store-moments-0-part2.bin"));
  ExpertStoreOptions other = options_;
  other.initial_id = "test pattern 2";
  Status refused = Make(false, other).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_TRUE(Contains(refused, "other initial values")) << refused;
  options_.max_file_bytes = 0;
  store = std::move(Make(false, options_)).value();
  ASSERT_TRUE(store->Read(ExpertState::kMaster, {1, 2}, got.data()).ok());
  EXPECT_EQ(got, written);
  ASSERT_TRUE(store->Read(ExpertState::kMaster, {0, 0}, got.data()).ok());
  EXPECT_EQ(got, initial(ExpertState::kMaster, {0, 0}));
  // A memory state written at version 0 stays written through Close and Open; one never
  // written is not stored by Close (its file reads as its initial value) and stays unwritten.
  const std::vector<uint8_t> at_zero = Pattern(*store, ExpertState::kGradient, 0, 1, 0);
  ASSERT_TRUE(store->Write(ExpertState::kGradient, {0, 1}, at_zero.data(), 0).ok());
  // Whether (state, id), at version 0, was written.
  auto written_at_zero = [&](ExpertState state, ExpertId id) {
    bool stored = false;
    EXPECT_EQ(*store->Version(state, id, &stored), 0u);
    return stored;
  };
  EXPECT_TRUE(written_at_zero(ExpertState::kGradient, {0, 1}));
  ASSERT_TRUE(store->Close().ok());
  store = std::move(Make(false, options_)).value();
  EXPECT_TRUE(written_at_zero(ExpertState::kGradient, {0, 1}));
  EXPECT_FALSE(written_at_zero(ExpertState::kGradient, {0, 2}));
  std::vector<uint8_t> gradient(store->StateBytes(ExpertState::kGradient));
  ASSERT_TRUE(store->Read(ExpertState::kGradient, {0, 1}, gradient.data()).ok());
  EXPECT_EQ(gradient, at_zero);
  ASSERT_TRUE(store->Read(ExpertState::kGradient, {0, 2}, gradient.data()).ok());
  EXPECT_EQ(gradient, initial(ExpertState::kGradient, {0, 2}));
  // An nvme state written at version 0 is written too.
  const std::vector<uint8_t> master_at_zero = Pattern(*store, ExpertState::kMaster, 0, 2, 0);
  ASSERT_TRUE(store->Write(ExpertState::kMaster, {0, 2}, master_at_zero.data(), 0).ok());
  EXPECT_TRUE(written_at_zero(ExpertState::kMaster, {0, 2}));
  EXPECT_FALSE(written_at_zero(ExpertState::kMaster, {0, 0}));
}

// No space is reserved up front: a full disk fails the write that needs the space, naming the
// layer, expert and state, and the version before it (initial or written) stays readable.
TEST_F(ExpertStoreTest, AFullDiskFailsTheWriteThatNeedsTheSpaceAndKeepsThePreviousVersion) {
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNone};
  auto store = std::move(Make(true, options_)).value();
  std::vector<uint8_t> v1 = Pattern(*store, ExpertState::kMoments, 0, 1, 1);
  std::vector<uint8_t> v2 = Pattern(*store, ExpertState::kMoments, 0, 1, 2);
  std::vector<uint8_t> got(v1.size()), zeros(v1.size(), 0);
  FaultOptions full;
  full.enospc_after_bytes = 0;
  SetFaults(full);
  Status first = store->Write(ExpertState::kMoments, {0, 1}, v1.data(), 1);
  SetFaults(FaultOptions{});
  EXPECT_EQ(first.code(), StatusCode::kResourceExhausted) << first;
  EXPECT_TRUE(Contains(first, "layer 0 expert 1 moments")) << first;
  ASSERT_TRUE(store->Read(ExpertState::kMoments, {0, 1}, got.data()).ok());
  EXPECT_EQ(got, zeros) << "still unwritten: its initial value";
  ASSERT_TRUE(store->Write(ExpertState::kMoments, {0, 1}, v1.data(), 1).ok());
  SetFaults(full);
  EXPECT_EQ(store->Write(ExpertState::kMoments, {0, 1}, v2.data(), 2).code(),
            StatusCode::kResourceExhausted);
  SetFaults(FaultOptions{});
  ASSERT_TRUE(store->Read(ExpertState::kMoments, {0, 1}, got.data()).ok());
  EXPECT_EQ(got, v1);
}

// A store of about a trillion parameters (131,072 experts of 8 Mi parameters, every state on
// NVMe) is created without writing its states: its files are split under the file size limit
// and take no space until experts are written.
TEST_F(ExpertStoreTest, ATrillionParameterStoreIsCreatedWithoutWritingItsStates) {
  ExpertStoreOptions big;
  big.layout = {std::vector<uint32_t>(64, 2048), uint64_t{8} << 20, DType::kBF16, 2};
  big.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNone};
  big.dirs = {root_ + "/a"};
  big.lock_pinned_pages = false;
  uint64_t params = 0;
  for (uint32_t n : big.layout.experts_per_layer)
    params += uint64_t{n} * big.layout.params_per_expert;
  ASSERT_GE(params, uint64_t{1} << 40);
  auto store = ExpertStore::Create(*sim_, big);
  ASSERT_TRUE(store.ok()) << store.status();
  uint64_t size = 0, allocated = 0, files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(root_ + "/a")) {
    struct stat st {};
    ASSERT_EQ(::stat(entry.path().c_str(), &st), 0);
    EXPECT_LT(static_cast<uint64_t>(st.st_size), uint64_t{16} << 40) << entry.path();
    size += st.st_size;
    allocated += uint64_t{512} * st.st_blocks;
    ++files;
  }
  EXPECT_GT(files, 3u) << "split at 1 TiB per file";
  EXPECT_GE(size, ExpertStore::DiskBytes(big));
  EXPECT_LT(allocated, uint64_t{4} << 20) << "a few MiB at most: the manifest";
  // An expert far into the files reads as zeros, and is written where its slot is.
  const ExpertId last{63, 2047};
  std::vector<uint8_t> weights((*store)->StateBytes(ExpertState::kWeights));
  ASSERT_TRUE((*store)->Read(ExpertState::kWeights, last, weights.data()).ok());
  EXPECT_TRUE(std::all_of(weights.begin(), weights.end(), [](uint8_t b) { return b == 0; }));
  std::fill(weights.begin(), weights.end(), uint8_t{7});
  ASSERT_TRUE((*store)->Write(ExpertState::kWeights, last, weights.data(), 1).ok());
  std::vector<uint8_t> got(weights.size());
  ASSERT_TRUE((*store)->Read(ExpertState::kWeights, last, got.data()).ok());
  EXPECT_EQ(got, weights);
  ASSERT_TRUE((*store)->Close().ok());
}

// A shared expert holds its source's values as of Share, without a copy on NVMe until either
// writes: its own writes go to its own slots, and a source's write first gives the experts
// that still read it their own copy. Memory states are copied at Share. The manifest keeps the
// sharing across Close and Open, and a crash between an update's writes reads as one version.
TEST_F(ExpertStoreTest, ASharedExpertHoldsItsSourcesValuesUntilEitherWrites) {
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kPinned};
  auto store = std::move(Make(true, options_)).value();
  const ExpertId source{0, 0}, copy{1, 0};
  auto read = [&](ExpertState state, ExpertId id) {
    std::vector<uint8_t> got(store->StateBytes(state));
    Status status = store->Read(state, id, got.data());
    EXPECT_TRUE(status.ok()) << status;
    return got;
  };
  auto write = [&](ExpertState state, ExpertId id, uint32_t pattern, uint64_t version) {
    std::vector<uint8_t> bytes = Pattern(*store, state, id.layer, id.expert, pattern);
    ASSERT_TRUE(store->Write(state, id, bytes.data(), version).ok());
  };
  for (ExpertState state : kAll) write(state, source, 3, 3);
  write(ExpertState::kMaster, {0, 2}, 1, 1);
  ASSERT_TRUE(store->Share(copy, source).ok());
  EXPECT_EQ(store->SourceOf(copy), source);
  for (ExpertState state : kAll) {
    EXPECT_EQ(read(state, copy), Pattern(*store, state, 0, 0, 3)) << ExpertStateName(state);
  }
  // Refused: itself, a source sharing another's, an expert sharing already, sharing from one
  // that shares, an expert with a state of its own.
  EXPECT_EQ(store->Share(source, source).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Share(source, {0, 1}).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Share(copy, {0, 1}).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Share({1, 2}, copy).code(), StatusCode::kFailedPrecondition);
  Status written = store->Share({0, 2}, source);
  EXPECT_EQ(written.code(), StatusCode::kFailedPrecondition) << written;
  EXPECT_TRUE(Contains(written, "already wrote its master")) << written;
  // The source writes its master: the copy keeps version 3. The copy writes its moments: the
  // source keeps its own.
  write(ExpertState::kMaster, source, 4, 4);
  EXPECT_EQ(read(ExpertState::kMaster, source), Pattern(*store, ExpertState::kMaster, 0, 0, 4));
  EXPECT_EQ(read(ExpertState::kMaster, copy), Pattern(*store, ExpertState::kMaster, 0, 0, 3));
  write(ExpertState::kMoments, copy, 9, 4);
  EXPECT_EQ(read(ExpertState::kMoments, copy), Pattern(*store, ExpertState::kMoments, 1, 0, 9));
  EXPECT_EQ(read(ExpertState::kMoments, source), Pattern(*store, ExpertState::kMoments, 0, 0, 3));
  // Another copy, of a source at one version, whose update is cut short after its master:
  // both read as the source's version.
  const ExpertId cut{1, 1}, second{0, 1};
  for (ExpertState state : kAll) write(state, second, 3, 3);
  ASSERT_TRUE(store->Share(cut, second).ok());
  write(ExpertState::kMaster, cut, 5, 4);
  auto block = [](uint64_t bytes) {
    return std::unique_ptr<void, decltype(&std::free)>(std::aligned_alloc(4096, bytes), &std::free);
  };
  auto master = block(store->BlockBytes(ExpertState::kMaster));
  auto moments = block(store->BlockBytes(ExpertState::kMoments));
  void* blocks[2] = {master.get(), moments.get()};
  uint64_t version = 0;
  ASSERT_TRUE(
      store->ReadStates(cut, {ExpertState::kMaster, ExpertState::kMoments}, blocks, &version).ok());
  EXPECT_EQ(version, 3u);
  EXPECT_EQ(std::memcmp(master.get(), Pattern(*store, ExpertState::kMaster, 0, 1, 3).data(),
                        store->StateBytes(ExpertState::kMaster)),
            0);
  // Its own first write kept the source's version beside it: the source may move on.
  write(ExpertState::kMaster, second, 7, 4);
  write(ExpertState::kMaster, second, 8, 5);
  ASSERT_TRUE(
      store->ReadStates(cut, {ExpertState::kMaster, ExpertState::kMoments}, blocks, &version).ok());
  EXPECT_EQ(version, 3u);
  // Closed and reopened: still shared; the source's next write still leaves the copy alone.
  ASSERT_TRUE(store->Close().ok());
  store = std::move(Make(false, options_)).value();
  EXPECT_EQ(store->SourceOf(cut), second);
  write(ExpertState::kWeights, second, 6, 6);
  EXPECT_EQ(read(ExpertState::kWeights, cut), Pattern(*store, ExpertState::kWeights, 0, 1, 3));
  write(ExpertState::kWeights, source, 6, 5);
  EXPECT_EQ(read(ExpertState::kWeights, copy), Pattern(*store, ExpertState::kWeights, 0, 0, 3));
  EXPECT_EQ(read(ExpertState::kGradient, copy), Pattern(*store, ExpertState::kGradient, 0, 0, 3));
  // A manifest whose sharing names no pair of experts, a pair twice or a chain is DataLoss.
  ASSERT_TRUE(store->Close().ok());
  store.reset();
  const std::string manifest = ManifestText();
  for (const char* bad :
       {"shared 3:0 4:1 99:0", "shared 3:0 4:1 3:2", "shared 3:0 4:1 2:4", "shared 3:0 4:1 5:x"}) {
    RewriteManifest("shared 3:0 4:1", bad);
    Status damaged = Make(false, options_).status();
    EXPECT_EQ(damaged.code(), StatusCode::kDataLoss) << bad << ": " << damaged;
    std::ofstream(root_ + "/a/ecss-store.manifest") << manifest;
  }
  EXPECT_TRUE(Make(false, options_).ok());
}

// One owner per directory: a second store object on it, in this process or another, is
// refused naming the holder's pid, until the first closes; the lock file goes with it.
TEST_F(ExpertStoreTest, ASecondOwnerOfTheDirectoryIsRefusedNamingItsPid) {
  auto first = std::move(Make(true, options_)).value();
  const std::string lock = root_ + "/a/ecss-store.lock";
  EXPECT_TRUE(std::filesystem::exists(lock));
  for (bool create : {false, true}) {
    Status second = Make(create, options_).status();
    EXPECT_EQ(second.code(), StatusCode::kFailedPrecondition) << second;
    EXPECT_TRUE(Contains(second, StrCat("in use by process ", ::getpid()))) << second;
    EXPECT_TRUE(Contains(second, root_ + "/a")) << second;
  }
  WriteAll(*first, 1);  // the refused ones changed nothing
  ASSERT_TRUE(first->Close().ok());
  EXPECT_FALSE(std::filesystem::exists(lock));
  auto second = Make(false, options_);
  ASSERT_TRUE(second.ok()) << second.status();
  ExpectAll(**second, 1);
  second->reset();
  // A lock file left by an owner that died (its pid in it, no lock held) blocks nobody.
  std::ofstream(lock) << "999999\n";
  EXPECT_TRUE(Make(false, options_).ok());
}

// Every state file carries the store's id and generation, which each Open advances: a file
// copied back from an earlier run, or from another store, is refused naming the file.
TEST_F(ExpertStoreTest, AStateFileFromAnEarlierRunOrAnotherStoreIsRefused) {
  const std::string moments = root_ + "/a/ecss-store-moments-0.bin";
  const std::string saved = root_ + "/saved.bin";
  {
    auto store = std::move(Make(true, options_)).value();
    WriteAll(*store, 1);
    ASSERT_TRUE(store->Close().ok());
  }
  std::filesystem::copy_file(moments, saved);
  const std::string during = root_ + "/during.bin";
  {
    auto store = std::move(Make(false, options_)).value();
    WriteAll(*store, 2);
    ASSERT_TRUE(store->Flush().ok());
    std::filesystem::copy_file(moments, during);  // a copy taken while the store is open
    WriteAll(*store, 3);
    ASSERT_TRUE(store->Close().ok());
  }
  const std::string current = root_ + "/current.bin";
  std::filesystem::copy_file(moments, current);
  for (const std::string& copy : {saved, during}) {
    std::filesystem::copy_file(copy, moments, std::filesystem::copy_options::overwrite_existing);
    Status older = Make(false, options_).status();
    EXPECT_EQ(older.code(), StatusCode::kDataLoss) << older;
    EXPECT_TRUE(Contains(older, moments)) << older;
    EXPECT_TRUE(Contains(older, "an older copy of the file")) << older;
  }
  std::filesystem::copy_file(current, moments, std::filesystem::copy_options::overwrite_existing);
  {
    auto store = Make(false, options_);
    ASSERT_TRUE(store.ok()) << store.status();
    ExpectAll(**store, 3);
  }
  // A file of another store with the same layout.
  ExpertStoreOptions other = options_;
  std::filesystem::create_directories(root_ + "/c");
  std::filesystem::create_directories(root_ + "/d");
  other.dirs = {root_ + "/c", root_ + "/d"};
  ASSERT_TRUE(Make(true, other).ok());
  std::filesystem::copy_file(root_ + "/c/ecss-store-moments-0.bin", moments,
                             std::filesystem::copy_options::overwrite_existing);
  Status foreign = Make(false, options_).status();
  EXPECT_EQ(foreign.code(), StatusCode::kDataLoss) << foreign;
  EXPECT_TRUE(Contains(foreign, "belongs to another store")) << foreign;
}

// An Open or Close cut short between its two manifest writes leaves files of either generation:
// the manifest then accepts both, and the next Open finishes the move.
TEST_F(ExpertStoreTest, AnOpenCutShortBetweenGenerationsStillOpens) {
  {
    auto store = std::move(Make(true, options_)).value();
    WriteAll(*store, 1);
    ASSERT_TRUE(store->Close().ok());
  }
  // Create wrote generation 1, Close moved to 2.
  const std::string two = "generation 2\nprevious_generation 0";
  ASSERT_NE(ManifestText().find(two), std::string::npos) << ManifestText();
  // As if an Open had written its first manifest and no file header yet.
  RewriteManifest(two, "generation 3\nprevious_generation 2");
  {
    auto store = Make(false, options_);  // finishes the move: generation 4, Close 5
    ASSERT_TRUE(store.ok()) << store.status();
    ExpectAll(**store, 1);
  }
  const std::string five = "generation 5\nprevious_generation 0";
  ASSERT_NE(ManifestText().find(five), std::string::npos) << ManifestText();
  RewriteManifest(five, "generation 6\nprevious_generation 0");
  Status behind = Make(false, options_).status();
  EXPECT_EQ(behind.code(), StatusCode::kDataLoss) << behind;
  EXPECT_TRUE(Contains(behind, "generation 5, the store's is 6")) << behind;
}

// The manifest is read strictly: a line missing, repeated, unknown or malformed, or text after
// the checksum, is DataLoss, even when the checksum is right.
TEST_F(ExpertStoreTest, TheManifestIsParsedStrictly) {
  ASSERT_TRUE(Make(true, options_).ok());
  const std::string manifest = ManifestText();
  auto damaged = [&](std::string_view what) {
    Status opened = Make(false, options_).status();
    EXPECT_EQ(opened.code(), StatusCode::kDataLoss) << what << ": " << opened;
    std::ofstream(root_ + "/a/ecss-store.manifest") << manifest;
  };
  std::ofstream(root_ + "/a/ecss-store.manifest") << manifest << "extra\n";
  damaged("text after the checksum");
  std::ofstream(root_ + "/a/ecss-store.manifest") << manifest.substr(0, manifest.size() - 1);
  damaged("no newline at the end");
  for (auto [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"moments 2\n", ""},                              // missing
           {"moments 2\n", "moments 2\nmoments 2\n"},        // repeated
           {"moments 2\n", "moments 2\ncolour blue\n"},      // unknown
           {"moments 2\n", "moments 2 3\n"},                 // a value too many
           {"moments 2\n", "moments two\n"},                 // not a number
           {"moments 2\n", "moments 2\n\n"},                 // a blank line
           {"state closed", "state ajar"},                   // not a state
           {"memory_states durable", "memory_states kept"},  // not a kind
           {"experts_per_layer 3 3", "experts_per_layer 3 3x"}}) {
    RewriteManifest(from, to);
    damaged(to);
  }
  EXPECT_TRUE(Make(false, options_).ok()) << "the original still opens";
}

// Directories are locked one by one: a store striped over a directory another store uses is
// refused while that one is open, and its files there are never truncated afterwards either.
TEST_F(ExpertStoreTest, AStoreNeverSharesAStripedDirectoryWithAnother) {
  auto first = std::move(Make(true, options_)).value();
  WriteAll(*first, 1);
  std::filesystem::create_directories(root_ + "/c");
  ExpertStoreOptions other = options_;
  other.dirs = {root_ + "/c", root_ + "/b"};
  Status busy = Make(true, other).status();
  EXPECT_EQ(busy.code(), StatusCode::kFailedPrecondition) << busy;
  EXPECT_TRUE(Contains(busy, root_ + "/b")) << busy;
  ASSERT_TRUE(first->Close().ok());
  Status exists = Make(true, other).status();
  EXPECT_EQ(exists.code(), StatusCode::kAlreadyExists) << exists;
  EXPECT_TRUE(Contains(exists, root_ + "/b/ecss-store-")) << exists;
  // The same directories in the other order: the manifest in the second one is the first
  // store's, whose files the new one would mix with its own (neither created nor removed).
  ExpertStoreOptions reversed = options_;
  std::reverse(reversed.dirs.begin(), reversed.dirs.end());
  Status swapped = Make(true, reversed).status();
  EXPECT_EQ(swapped.code(), StatusCode::kAlreadyExists) << swapped;
  EXPECT_TRUE(Contains(swapped, "another expert store")) << swapped;
  EXPECT_EQ(ExpertStore::Remove(reversed).code(), StatusCode::kAlreadyExists);
  auto reopened = Make(false, options_);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ExpectAll(**reopened, 1);
}

// A budget refused after the store object exists leaves nothing to close (no crash), and
// writes nothing.
TEST_F(ExpertStoreTest, ABudgetRefusedOnNvmeIsAnErrorNotACrash) {
  options_.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNone};
  options_.pinned_budget_bytes = 4096;
  for (bool create : {true, false}) {
    Status refused = Make(create, options_).status();
    EXPECT_EQ(refused.code(), create ? StatusCode::kResourceExhausted : StatusCode::kNotFound)
        << refused;
  }
  options_.pinned_budget_bytes = 0;
  ASSERT_TRUE(Make(true, options_).ok());
  options_.pinned_budget_bytes = 4096;
  EXPECT_EQ(Make(false, options_).status().code(), StatusCode::kResourceExhausted);
}

// An Open that fails while moving to the next generation (here: fdatasync of the file headers)
// changes nothing else: the store, closed with states in memory, still opens as closed.
TEST_F(ExpertStoreTest, AnOpenThatFailsHalfWayLeavesTheStoreAsItWas) {
  {
    auto store = std::move(Make(true, options_)).value();  // master and gradient pinned
    WriteAll(*store, 1);
    ASSERT_TRUE(store->Close().ok());
  }
  FaultOptions faults;
  faults.fail_sync = true;
  SetFaults(faults);
  Status failed = Make(false, options_).status();
  EXPECT_FALSE(failed.ok());
  EXPECT_EQ(failed.sys_errno(), EIO) << failed;
  SetFaults(FaultOptions{});
  EXPECT_NE(ManifestText().find("state closed"), std::string::npos) << ManifestText();
  auto store = Make(false, options_);
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectAll(**store, 1);
}

}  // namespace
}  // namespace ecss
