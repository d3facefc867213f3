// kill -9 of a process writing an expert store, at random points, many times: every time the
// store opens again (the lock gone with the process, a generation change cut short finished),
// and every expert reads as exactly one version that was written, never older than the last
// acknowledged write and never a mix of versions. Labelled slow (release build only).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "offload/expert_store.h"
#include "runtime/base/random.h"
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

// The writer: opens the store, then writes every expert's states at increasing versions,
// acknowledging each, and closes and reopens it every few rounds (so kills land in Open's
// generation change and Close too). Never returns.
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
    for (int pass = 0; pass < 3; ++pass) {
      for (uint32_t e = 0; e < kExperts; ++e) {
        const uint32_t v = version[e] + 1;
        for (size_t s = 0; s < kStates.size(); ++s) {
          Fill(blocks.data[s], blocks.bytes[s], kStates[s], e, v);
        }
        if (!(*store)->WriteStates(Id(e), kStates, blocks.data.data(), v).ok()) std::_Exit(5);
        version[e] = v;
        const Ack ack{e, v};
        if (::write(ack_fd, &ack, sizeof(ack)) != sizeof(ack)) std::_Exit(6);
      }
    }
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
    int pipe_fds[2];
    ASSERT_EQ(::pipe(pipe_fds), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(pipe_fds[0]);
      Write(dir, pipe_fds[1]);
    }
    ::close(pipe_fds[1]);
    // Anywhere from inside the first Open to many rounds in.
    std::this_thread::sleep_for(std::chrono::microseconds(500 + rng.Uniform(100000)));
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the writer failed on its own: exit " << WEXITSTATUS(status);
    Ack ack{};
    while (::read(pipe_fds[0], &ack, sizeof(ack)) == sizeof(ack)) {
      ASSERT_LT(ack.expert, kExperts);
      acked[ack.expert] = ack.version;
      ++killed_mid_run;
    }
    ::close(pipe_fds[0]);
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
  EXPECT_GT(killed_mid_run, kKills) << "the writers got far enough to be tested";
  RecordProperty("acknowledged_writes", killed_mid_run);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ecss
