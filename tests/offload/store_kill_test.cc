// kill -9 of a process writing an expert store, at random points, many times: every time the
// store opens again (the lock gone with the process, a generation change cut short finished),
// and every expert reads as exactly one version that was written, never older than the last
// acknowledged write and never a mix of versions. Labelled slow (release build only).
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "offload/checkpoint.h"
#include "offload/expert_store.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

constexpr uint32_t kExperts = 6;  // two layers of three
const std::vector<ExpertState> kStates = {ExpertState::kWeights, ExpertState::kMaster,
                                          ExpertState::kMoments};

struct Ack {  // what the writer reports through its pipe after a WriteStates returned
  uint32_t expert;
  uint32_t version;
};

ExpertStoreOptions StoreOptions(const std::string& dir) {
  ExpertStoreOptions options;
  options.layout = {{3, 3}, 1000, DType::kBF16, 2};
  // Every state on NVMe: nothing lives only in memory, so an unclosed store must open.
  options.placement = {Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNone};
  options.dirs = {dir};
  return options;
}

ExpertId Id(uint32_t flat) { return {flat / 3, flat % 3}; }

SimOptions SmallDevice() {  // the store keeps nothing on the device: map little
  SimOptions sim;
  sim.device_memory_bytes = 1 << 20;
  return sim;
}

// The block of (state, expert, version): every byte depends on all three.
void Fill(void* block, uint64_t bytes, ExpertState state, uint32_t expert, uint32_t version) {
  auto* out = static_cast<uint8_t*>(block);
  for (uint64_t i = 0; i < bytes; ++i) {
    out[i] = static_cast<uint8_t>(i * 13 + static_cast<int>(state) * 7 + expert * 31 + version * 5);
  }
}

struct Blocks {
  explicit Blocks(const ExpertStore& store) {
    for (ExpertState state : kStates) {
      bytes.push_back(store.BlockBytes(state));
      data.push_back(std::aligned_alloc(4096, bytes.back()));
    }
  }
  ~Blocks() {
    for (void* d : data) std::free(d);
  }
  Blocks(const Blocks&) = delete;
  Blocks& operator=(const Blocks&) = delete;
  std::vector<uint64_t> bytes;
  std::vector<void*> data;
};

// Runs `child(ack_fd)` in a forked process (it never returns), kills it with SIGKILL `delay`
// after its start, or with `after_first_ack` after its first acknowledgement (so that the loop
// makes progress however slow the machine; the others land anywhere, its start included), and
// returns what it acknowledged through the pipe; a child that died on its own is a test
// failure.
std::vector<Ack> RunAndKill(const std::function<void(int)>& child, std::chrono::microseconds delay,
                            bool after_first_ack) {
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) {
    ADD_FAILURE() << "pipe";
    return {};
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    child(pipe_fds[1]);
    std::_Exit(1);
  }
  ::close(pipe_fds[1]);
  std::vector<Ack> acks;
  Ack ack{};
  if (after_first_ack && ::read(pipe_fds[0], &ack, sizeof(ack)) == sizeof(ack)) {
    acks.push_back(ack);
  }
  std::this_thread::sleep_for(delay);
  ::kill(pid, SIGKILL);
  int status = 0;
  EXPECT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the child failed on its own: exit " << WEXITSTATUS(status);
  while (::read(pipe_fds[0], &ack, sizeof(ack)) == sizeof(ack)) acks.push_back(ack);
  ::close(pipe_fds[0]);
  return acks;
}

// The writer: opens the store, then writes every expert's states at increasing versions (two
// at once), acknowledging each, and closes and reopens it every few rounds (so kills land in
// Open's generation change and Close too). Never returns.
[[noreturn]] void Write(const std::string& dir, int ack_fd) {
  auto sim = SimBackend::Create(SmallDevice());
  if (!sim.ok()) std::_Exit(2);
  std::vector<uint32_t> version(kExperts, 0);
  for (uint32_t round = 0;; ++round) {
    auto store = ExpertStore::Open(**sim, StoreOptions(dir));
    if (!store.ok()) std::_Exit(3);
    Blocks blocks(**store);
    if (round == 0) {
      for (uint32_t e = 0; e < kExperts; ++e) {
        uint64_t v = 0;
        if (!(*store)->ReadStates(Id(e), kStates, blocks.data.data(), &v).ok()) std::_Exit(4);
        version[e] = static_cast<uint32_t>(v);
      }
    }
    // Even and odd experts from a thread each, so that kills land with both writing handles
    // of a state mid-write (the store writes expert e through its (e % 2)th). An ack is one
    // write of a pipe, smaller than PIPE_BUF: atomic.
    auto write_parity = [&](uint32_t parity) {
      Blocks own(**store);
      for (int pass = 0; pass < 3; ++pass) {
        for (uint32_t e = parity; e < kExperts; e += 2) {
          const uint32_t v = version[e] + 1;
          for (size_t s = 0; s < kStates.size(); ++s) {
            Fill(own.data[s], own.bytes[s], kStates[s], e, v);
          }
          if (!(*store)->WriteStates(Id(e), kStates, own.data.data(), v).ok()) std::_Exit(5);
          version[e] = v;
          const Ack ack{e, v};
          if (::write(ack_fd, &ack, sizeof(ack)) != sizeof(ack)) std::_Exit(6);
        }
      }
    };
    std::thread odd(write_parity, 1u);
    write_parity(0);
    odd.join();
    if (!(*store)->Close().ok()) std::_Exit(7);
  }
}

TEST(StoreKillTest, EveryKillLeavesAStoreThatOpensWithOneWrittenVersionPerExpert) {
  const std::string dir = ::testing::TempDir() + "/ecss_store_kill";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  {  // No thread of the test process may run at a fork: each backend lives between two.
    auto sim = std::move(SimBackend::Create(SmallDevice())).value();
    ASSERT_TRUE(ExpertStore::Create(*sim, StoreOptions(dir)).ok());  // closed at once
  }
  std::vector<uint32_t> acked(kExperts, 0);
  CounterRng rng(2026, 12);
  constexpr int kKills = 60;
  int killed_mid_run = 0;  // acknowledged writes, all kills together
  for (int kill = 0; kill < kKills; ++kill) {
    // Anywhere from inside the first Open to many rounds in.
    const std::vector<Ack> acks =
        RunAndKill([&](int ack_fd) { Write(dir, ack_fd); },
                   std::chrono::microseconds(500 + rng.Uniform(100000)), kill % 2 == 0);
    ASSERT_FALSE(HasFailure());
    for (const Ack& ack : acks) {
      ASSERT_LT(ack.expert, kExperts);
      acked[ack.expert] = ack.version;
      ++killed_mid_run;
    }
    auto sim = std::move(SimBackend::Create(SmallDevice())).value();
    auto store = ExpertStore::Open(*sim, StoreOptions(dir));
    ASSERT_TRUE(store.ok()) << "kill " << kill << ": " << store.status();
    Blocks blocks(**store), want(**store);
    for (uint32_t e = 0; e < kExperts; ++e) {
      uint64_t version = 0;
      Status read = (*store)->ReadStates(Id(e), kStates, blocks.data.data(), &version);
      ASSERT_TRUE(read.ok()) << "kill " << kill << " expert " << e << ": " << read;
      // The acknowledged version, or the one whose write the kill cut short.
      ASSERT_GE(version, acked[e]) << "kill " << kill << " expert " << e;
      ASSERT_LE(version, acked[e] + 1) << "kill " << kill << " expert " << e;
      acked[e] = static_cast<uint32_t>(version);
      if (version == 0) continue;  // initial: zeros
      for (size_t s = 0; s < kStates.size(); ++s) {
        Fill(want.data[s], want.bytes[s], kStates[s], e, static_cast<uint32_t>(version));
        ASSERT_EQ(std::memcmp(blocks.data[s], want.data[s], (*store)->StateBytes(kStates[s])), 0)
            << "kill " << kill << " expert " << e << " " << ExpertStateName(kStates[s])
            << " is not version " << version;
      }
    }
    ASSERT_TRUE((*store)->Close().ok());
  }
  // Every other writer is killed only after a write it acknowledged.
  EXPECT_GE(killed_mid_run, kKills / 2) << "the writers got far enough to be tested";
  RecordProperty("acknowledged_writes", killed_mid_run);
  std::filesystem::remove_all(dir);
}

// ---- Checkpoints -----------------------------------------------------------------------------

constexpr uint32_t kCheckpointExperts = 20;  // two layers of ten

ExpertStoreOptions CheckpointStore(const std::string& dir) {
  ExpertStoreOptions options = StoreOptions(dir);
  options.layout = {{10, 10}, 1000, DType::kBF16, 2};
  return options;
}

// Round r updates two experts (10%) to version r.
bool UpdatedIn(uint32_t round, uint32_t flat) {
  return flat == round % kCheckpointExperts || flat == (round * 7 + 3) % kCheckpointExperts;
}
// An expert's version after rounds 1..round: the last round that updated it (0: never).
uint32_t VersionAfter(uint32_t round, uint32_t flat) {
  for (uint32_t r = round; r > 0; --r) {
    if (UpdatedIn(r, flat)) return r;
  }
  return 0;
}
ExpertId CheckpointId(uint32_t flat) { return {flat / 10, flat % 10}; }

// The saver: a new store restored from the newest checkpoint (if any), then rounds of
// updates, each followed by a save named after it (acknowledged once it returns), keeping the
// last three checkpoints. Never returns.
[[noreturn]] void Save(const std::string& root, const std::string& store_dir, int ack_fd) {
  auto sim = SimBackend::Create(SmallDevice());
  if (!sim.ok()) std::_Exit(2);
  std::filesystem::remove_all(store_dir);
  std::filesystem::create_directories(store_dir);
  auto store = ExpertStore::Create(**sim, CheckpointStore(store_dir));
  if (!store.ok()) std::_Exit(3);
  uint32_t round = 0;
  StatusOr<std::string> latest = LatestCheckpoint(root);
  if (latest.ok()) {
    if (!RestoreCheckpoint(root, *latest, **store).ok()) std::_Exit(4);
    round = static_cast<uint32_t>(std::stoul(latest->substr(6)));  // "round-N"
  }
  Blocks blocks(**store);
  while (true) {
    ++round;
    for (uint32_t flat = 0; flat < kCheckpointExperts; ++flat) {
      if (!UpdatedIn(round, flat)) continue;
      for (size_t s = 0; s < kStates.size(); ++s) {
        Fill(blocks.data[s], blocks.bytes[s], kStates[s], flat, round);
      }
      if (!(*store)->WriteStates(CheckpointId(flat), kStates, blocks.data.data(), round).ok()) {
        std::_Exit(5);
      }
    }
    CheckpointOptions options;
    options.blobs = {{"round", std::to_string(round)}};
    if (!SaveCheckpoint(**store, root, StrCat("round-", round), options).ok()) std::_Exit(6);
    const Ack ack{0, round};
    if (::write(ack_fd, &ack, sizeof(ack)) != sizeof(ack)) std::_Exit(7);
    if (round > 3 && !DeleteCheckpoint(root, StrCat("round-", round - 3)).ok()) std::_Exit(8);
  }
}

// kill -9 at random points of updates, saves, deletes and restores, 50 times: the newest
// checkpoint is always one the saver finished, at least the last one it acknowledged, and it
// restores to exactly the experts of its round.
TEST(StoreKillTest, EveryKillLeavesTheLastDurableCheckpointLoadableAndExact) {
  const std::string dir = ::testing::TempDir() + "/ecss_checkpoint_kill";
  const std::string root = dir + "/checkpoints";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(root);
  uint32_t acked = 0;
  CounterRng rng(2026, 16);
  constexpr int kKills = 50;
  for (int kill = 0; kill < kKills; ++kill) {
    const std::vector<Ack> acks =
        RunAndKill([&](int ack_fd) { Save(root, StrCat(dir, "/store-", kill), ack_fd); },
                   std::chrono::microseconds(1000 + rng.Uniform(150000)), kill % 2 == 0);
    ASSERT_FALSE(HasFailure());
    if (!acks.empty()) acked = acks.back().version;
    std::filesystem::remove_all(StrCat(dir, "/store-", kill));
    StatusOr<std::string> latest = LatestCheckpoint(root);
    if (acked == 0 && !latest.ok()) continue;  // killed before its first save
    ASSERT_TRUE(latest.ok()) << "kill " << kill << ": " << latest.status();
    const uint32_t round = static_cast<uint32_t>(std::stoul(latest->substr(6)));
    ASSERT_GE(round, acked) << "kill " << kill << ": an acknowledged checkpoint is gone";
    ASSERT_LE(round, acked + 1) << "kill " << kill;
    acked = round;
    auto sim = std::move(SimBackend::Create(SmallDevice())).value();
    const std::string verify = dir + "/verify";
    std::filesystem::remove_all(verify);
    std::filesystem::create_directories(verify);
    auto store = std::move(ExpertStore::Create(*sim, CheckpointStore(verify))).value();
    auto blobs = RestoreCheckpoint(root, *latest, *store);
    ASSERT_TRUE(blobs.ok()) << "kill " << kill << ": " << blobs.status();
    ASSERT_EQ(blobs->size(), 1u);
    EXPECT_EQ((*blobs)[0].bytes, std::to_string(round));
    Blocks got(*store), want(*store);
    for (uint32_t flat = 0; flat < kCheckpointExperts; ++flat) {
      uint64_t version = 0;
      ASSERT_TRUE(store->ReadStates(CheckpointId(flat), kStates, got.data.data(), &version).ok());
      ASSERT_EQ(version, VersionAfter(round, flat)) << "kill " << kill << " expert " << flat;
      if (version == 0) continue;
      for (size_t s = 0; s < kStates.size(); ++s) {
        Fill(want.data[s], want.bytes[s], kStates[s], flat, static_cast<uint32_t>(version));
        ASSERT_EQ(std::memcmp(got.data[s], want.data[s], store->StateBytes(kStates[s])), 0)
            << "kill " << kill << " expert " << flat << " " << ExpertStateName(kStates[s]);
      }
    }
  }
  // Every other saver is killed only after a save it acknowledged.
  EXPECT_GE(acked, static_cast<uint32_t>(kKills / 2)) << "the savers got far enough";
  RecordProperty("rounds_saved", static_cast<int>(acked));
  std::filesystem::remove_all(dir);
}

// The process's address space now (VmSize), from /proc.
uint64_t AddressSpaceBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;  // kB
  }
  return 0;
}

// A checkpoint larger than the memory the process may map: saved and restored under an
// address-space limit (RLIMIT_AS) of 128 MiB above what the process has when it starts, with
// a 336 MB checkpoint. Save and restore stream one buffer of experts at a time.
TEST(StoreKillTest, ACheckpointLargerThanMemoryIsSavedAndRestoredUnderAMemoryLimit) {
  const std::string dir = ::testing::TempDir() + "/ecss_checkpoint_rlimit";
  std::filesystem::remove_all(dir);
  for (const char* sub : {"/store", "/restored", "/checkpoints"}) {
    std::filesystem::create_directories(dir + sub);
  }
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // exit codes name the step that failed
    auto sim = SimBackend::Create(SmallDevice());
    if (!sim.ok()) std::_Exit(2);
    ExpertStoreOptions options = StoreOptions(dir + "/store");
    options.layout = {{12, 12}, uint64_t{1} << 20, DType::kBF16, 2};  // 14 MB per expert
    options.pinned_budget_bytes = 0;
    auto store = ExpertStore::Create(**sim, options);
    if (!store.ok()) std::_Exit(3);
    const uint64_t checkpoint_bytes = 24 * (2 + 4 + 8) * (uint64_t{1} << 20);
    const uint64_t limit = AddressSpaceBytes() + (uint64_t{128} << 20);
    const rlimit as{limit, limit};
    if (checkpoint_bytes <= limit - AddressSpaceBytes() || ::setrlimit(RLIMIT_AS, &as) != 0) {
      std::_Exit(4);
    }
    {
      Blocks blocks(**store);
      for (uint32_t flat = 0; flat < 24; ++flat) {
        for (size_t s = 0; s < kStates.size(); ++s) {
          Fill(blocks.data[s], blocks.bytes[s], kStates[s], flat, 1);
        }
        if (!(*store)->WriteStates({flat / 12, flat % 12}, kStates, blocks.data.data(), 1).ok()) {
          std::_Exit(5);
        }
      }
    }
    CheckpointOptions save;
    save.buffer_bytes = uint64_t{32} << 20;
    auto saved = SaveCheckpoint(**store, dir + "/checkpoints", "big", save);
    if (!saved.ok() || saved->bytes_written < checkpoint_bytes) std::_Exit(6);
    options.dirs = {dir + "/restored"};
    auto restored = ExpertStore::Create(**sim, options);
    if (!restored.ok()) std::_Exit(7);
    if (!RestoreCheckpoint(dir + "/checkpoints", "big", **restored).ok()) std::_Exit(8);
    Blocks got(**restored), want(**restored);
    for (uint32_t flat = 0; flat < 24; ++flat) {
      uint64_t version = 0;
      if (!(*restored)
               ->ReadStates({flat / 12, flat % 12}, kStates, got.data.data(), &version)
               .ok() ||
          version != 1) {
        std::_Exit(9);
      }
      for (size_t s = 0; s < kStates.size(); ++s) {
        Fill(want.data[s], want.bytes[s], kStates[s], flat, 1);
        if (std::memcmp(got.data[s], want.data[s], (*restored)->StateBytes(kStates[s])) != 0) {
          std::_Exit(10);
        }
      }
    }
    std::_Exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the step that failed (see the exit codes above)";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ecss
