#include "offload/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"
#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/offload/flip_byte.h"

namespace ecss {

namespace {

bool Contains(const Status& status, std::string_view text) {
  return status.message().find(text) != std::string_view::npos;
}

constexpr uint32_t kExperts = 20;  // two layers of ten
const std::vector<ExpertState> kSaved = {ExpertState::kWeights, ExpertState::kMaster,
                                         ExpertState::kMoments};

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "/ecss_checkpoint_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    for (const char* dir : {"/store", "/other", "/ckpt"}) {
      std::filesystem::create_directories(root_ + dir);
    }
    SimOptions sim;
    sim.device_memory_bytes = 1 << 20;
    sim_ = std::move(SimBackend::Create(sim)).value();
    options_.layout = {{10, 10}, 1000, DType::kBF16, 2};
    options_.placement = {Tier::kPinned, Tier::kNvme, Tier::kNvme, Tier::kNone};
    options_.dirs = {root_ + "/store"};
    options_.initial = [](ExpertState, ExpertId id, void* dst, uint64_t bytes) {
      std::memset(dst, static_cast<int>(id.expert + 1), bytes);
    };
    options_.initial_id = "fill with expert + 1";
    store_ = std::move(ExpertStore::Create(*sim_, options_)).value();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(root_);
  }
  std::string ckpt() const { return root_ + "/ckpt"; }
  // Replaces `from` with `to` in checkpoint `name`'s manifest and seals it again (a crafted
  // file, not damage); returns the manifest as it was.
  std::string EditManifest(const std::string& name, const std::string& from,
                           const std::string& to) {
    const std::string path = ckpt() + "/" + name + "/checkpoint.manifest";
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::string_view body;
    EXPECT_TRUE(UnsealText(text, &body));
    std::string edited(body);
    const size_t at = edited.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) edited.replace(at, from.size(), to);
    std::ofstream(path) << SealText(edited);
    return text;
  }

  static ExpertId Id(uint32_t flat) { return {flat / 10, flat % 10}; }
  // Every byte depends on the state, the expert and the version.
  static std::vector<uint8_t> Pattern(const ExpertStore& store, ExpertState state, uint32_t flat,
                                      uint64_t version) {
    std::vector<uint8_t> bytes(store.StateBytes(state));
    for (size_t i = 0; i < bytes.size(); ++i) {
      bytes[i] =
          static_cast<uint8_t>(i * 3 + static_cast<int>(state) * 11 + flat * 7 + version * 29);
    }
    return bytes;
  }
  void Update(uint32_t flat, uint64_t version) {
    for (ExpertState state : kSaved) {
      std::vector<uint8_t> bytes = Pattern(*store_, state, flat, version);
      ASSERT_TRUE(store_->Write(state, Id(flat), bytes.data(), version).ok());
    }
  }
  // A new store in /other with another placement, the checkpoint restored into it.
  StatusOr<std::unique_ptr<ExpertStore>> Restored(const std::string& name,
                                                  std::vector<CheckpointBlob>* blobs = nullptr) {
    std::filesystem::remove_all(root_ + "/other");
    std::filesystem::create_directories(root_ + "/other");
    ExpertStoreOptions other = options_;
    other.dirs = {root_ + "/other"};
    other.placement = {Tier::kNvme, Tier::kHost, Tier::kPinned, Tier::kNone};
    other.host_budget_bytes = 0;
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ExpertStore> store, ExpertStore::Create(*sim_, other));
    ECSS_ASSIGN_OR_RETURN(std::vector<CheckpointBlob> got, RestoreCheckpoint(ckpt(), name, *store));
    if (blobs != nullptr) *blobs = std::move(got);
    return store;
  }
  // Every expert of `store` at versions[flat] (0: its initial value).
  void Expect(ExpertStore& store, const std::vector<uint64_t>& versions) {
    for (uint32_t flat = 0; flat < kExperts; ++flat) {
      for (ExpertState state : kSaved) {
        std::vector<uint8_t> got(store.StateBytes(state));
        ASSERT_TRUE(store.Read(state, Id(flat), got.data()).ok());
        const std::vector<uint8_t> want =
            versions[flat] == 0
                ? std::vector<uint8_t>(got.size(), static_cast<uint8_t>(Id(flat).expert + 1))
                : Pattern(store, state, flat, versions[flat]);
        ASSERT_EQ(got, want) << "expert " << flat << " " << ExpertStateName(state);
      }
    }
  }

  std::string root_;
  std::unique_ptr<SimBackend> sim_;
  ExpertStoreOptions options_;
  std::unique_ptr<ExpertStore> store_;
};

TEST_F(CheckpointTest, AFullCheckpointRestoresEveryExpertIntoAnotherPlacement) {
  std::vector<uint64_t> versions(kExperts, 0);
  for (uint32_t flat = 0; flat < kExperts; flat += 2) Update(flat, versions[flat] = 1);
  Update(4, versions[4] = 2);
  CheckpointOptions options;
  options.blobs = {{"loop.dense", std::string("\0dense\xff", 7)}, {"loop.step", "42"}};
  auto saved = SaveCheckpoint(*store_, ckpt(), "step-1", options);
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_TRUE(saved->full);
  EXPECT_EQ(saved->experts_copied, 10u);
  EXPECT_EQ(saved->experts_initial, 10u);
  EXPECT_EQ(*LatestCheckpoint(ckpt()), "step-1");
  Update(6, 7);  // after the save: not in it
  std::vector<CheckpointBlob> blobs;
  auto restored = Restored("step-1", &blobs);
  ASSERT_TRUE(restored.ok()) << restored.status();
  Expect(**restored, versions);
  ASSERT_EQ(blobs.size(), 2u);
  EXPECT_EQ(blobs[0].name, "loop.dense");
  EXPECT_EQ(blobs[0].bytes, std::string("\0dense\xff", 7));
  EXPECT_EQ(blobs[1].bytes, "42");
  uint64_t version = 9;
  std::vector<uint8_t> block((*restored)->BlockBytes(ExpertState::kMoments) + 4096);
  void* aligned = block.data() + (4096 - reinterpret_cast<uintptr_t>(block.data()) % 4096) % 4096;
  ASSERT_TRUE((*restored)->ReadBlock(ExpertState::kWeights, Id(4), aligned, &version).ok());
  EXPECT_EQ(version, 2u) << "versions (the optimizer's update counts) are restored";
  // The restored store is a new one: restoring again is refused.
  Status twice = RestoreCheckpoint(ckpt(), "step-1", **restored).status();
  EXPECT_EQ(twice.code(), StatusCode::kFailedPrecondition) << twice;
  EXPECT_TRUE(Contains(twice, "needs a new store")) << twice;
}

// A save holds the versions its experts were at when it began, however the store is written
// while it copies: an nvme state's version before stays in its other shadow slot, and memory
// states handed to Preserve are copied before they change. A second write of an expert in
// that time is more than a shadow slot keeps: the save fails naming the version, and saves
// nothing else instead.
TEST_F(CheckpointTest, ASaveHoldsTheVersionsItBeganAtWhileTheStoreIsWritten) {
  std::vector<uint64_t> versions(kExperts, 0);
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, versions[flat] = 1);
  auto save = CheckpointSave::Begin(*store_, ckpt(), "begun", {});
  ASSERT_TRUE(save.ok()) << save.status();
  for (uint32_t flat = 0; flat < kExperts; flat += 2) {
    (*save)->Preserve(Id(flat));  // the weights are in pinned memory
    Update(flat, 2);
  }
  auto saved = (*save)->Wait();  // the copy runs now, after every write
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->experts_copied, kExperts);
  EXPECT_EQ(saved->experts_preserved, kExperts / 2);
  save->reset();
  auto restored = Restored("begun");
  ASSERT_TRUE(restored.ok()) << restored.status();
  Expect(**restored, versions);

  // Expert 2 written twice while the save runs: preserved first, its copy is what is saved.
  for (uint32_t flat = 0; flat < kExperts; flat += 2) versions[flat] = 2;
  save = CheckpointSave::Begin(*store_, ckpt(), "twice", {});
  ASSERT_TRUE(save.ok()) << save.status();
  (*save)->Preserve(Id(2));
  Update(2, 3);
  Update(2, 4);
  ASSERT_TRUE((*save)->Start().ok());
  saved = (*save)->Wait();
  ASSERT_TRUE(saved.ok()) << saved.status();
  save->reset();
  restored = Restored("twice");
  ASSERT_TRUE(restored.ok()) << restored.status();
  Expect(**restored, versions);

  // Every expert updated while the copy runs, with room to keep one expert only: Preserve
  // keeps what it can and otherwise waits for the copy to write that expert first.
  versions[2] = 4;
  CheckpointOptions small;
  small.buffer_bytes = 1;
  save = CheckpointSave::Begin(*store_, ckpt(), "small", small);
  ASSERT_TRUE(save.ok()) << save.status();
  ASSERT_TRUE((*save)->Start().ok());
  for (uint32_t flat = 0; flat < kExperts; ++flat) {
    (*save)->Preserve(Id(flat));
    Update(flat, 5);
  }
  saved = (*save)->Wait();
  ASSERT_TRUE(saved.ok()) << saved.status();
  save->reset();
  restored = Restored("small");
  ASSERT_TRUE(restored.ok()) << restored.status();
  Expect(**restored, versions);

  // A memory state changed without Preserve: the save fails naming it (the copy has not run).
  save = CheckpointSave::Begin(*store_, ckpt(), "lost", {});
  ASSERT_TRUE(save.ok()) << save.status();
  Update(5, 6);
  saved = (*save)->Wait();
  EXPECT_EQ(saved.status().code(), StatusCode::kDataLoss) << saved.status();
  EXPECT_TRUE(Contains(saved.status(), "at version 5")) << saved.status();
  EXPECT_TRUE(Contains(saved.status(), "layer 0 expert 5")) << saved.status();
  save->reset();
  EXPECT_FALSE(std::filesystem::exists(ckpt() + "/lost"));
  EXPECT_EQ(*LatestCheckpoint(ckpt()), "small");
  // Its lock is gone with it: the next save proceeds. One never run leaves nothing.
  save = CheckpointSave::Begin(*store_, ckpt(), "abandoned", {});
  ASSERT_TRUE(save.ok()) << save.status();
  save->reset();
  EXPECT_FALSE(std::filesystem::exists(ckpt() + "/abandoned"));
  EXPECT_TRUE(SaveCheckpoint(*store_, ckpt(), "after", {}).ok());
}

// A save's place is fixed when it begins (a relative root too, whatever the working directory
// is when the copy writes); a bad blob name is refused then, before anything is made; a failed
// save removes only what it made.
TEST_F(CheckpointTest, ASaveWritesWhereItBeganAndRemovesOnlyWhatItMade) {
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, 1);
  CheckpointOptions bad;
  bad.blobs = {{"a b", "x"}};
  Status refused = CheckpointSave::Begin(*store_, ckpt(), "bad", bad).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
  EXPECT_FALSE(std::filesystem::exists(ckpt() + "/bad"));

  const std::filesystem::path was = std::filesystem::current_path();
  std::filesystem::current_path(root_);
  auto save = CheckpointSave::Begin(*store_, "ckpt", "relative", {});
  ASSERT_TRUE(save.ok()) << save.status();
  std::filesystem::current_path(root_ + "/other");
  std::filesystem::create_directory("ckpt");
  ASSERT_TRUE((*save)->Start().ok());
  auto saved = (*save)->Wait();
  std::filesystem::current_path(was);
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(*LatestCheckpoint(ckpt()), "relative");
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/other/ckpt"));

  // Its directory replaced by someone's file while it ran: the save fails, the file stays.
  save = CheckpointSave::Begin(*store_, ckpt(), "replaced", {});
  ASSERT_TRUE(save.ok()) << save.status();
  std::filesystem::remove(ckpt() + "/replaced");
  std::ofstream(ckpt() + "/replaced") << "someone's";
  saved = (*save)->Wait();
  EXPECT_FALSE(saved.ok());
  save->reset();
  std::ifstream in(ckpt() + "/replaced");
  std::string kept;
  in >> kept;
  EXPECT_EQ(kept, "someone's");
}

// An expert written at version 0 (what model surgery writes: a new group's experts from a
// dense FFN's weights, no update yet) is saved with its blocks and restored written, not
// taken for its initial value; one never written stays initial.
TEST_F(CheckpointTest, AnExpertWrittenAtVersionZeroIsSavedAsWritten) {
  Update(3, 0);
  Update(4, 1);
  auto saved = SaveCheckpoint(*store_, ckpt(), "a", {});
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->experts_copied, 2u);
  EXPECT_EQ(saved->experts_initial, kExperts - 2);
  auto again = SaveCheckpoint(*store_, ckpt(), "b", {});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->experts_referenced, 2u) << "unchanged: held by a";
  auto reader = CheckpointReader::Open(ckpt(), "b");
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE((*reader)->written(3));
  EXPECT_EQ((*reader)->version(3), 0u);
  EXPECT_FALSE((*reader)->written(5));
  auto restored = Restored("b");
  ASSERT_TRUE(restored.ok()) << restored.status();
  for (ExpertState state : kSaved) {
    std::vector<uint8_t> got((*restored)->StateBytes(state));
    ASSERT_TRUE((*restored)->Read(state, Id(3), got.data()).ok());
    EXPECT_EQ(got, Pattern(**restored, state, 3, 0)) << ExpertStateName(state);
    bool written = false;
    EXPECT_EQ(*(*restored)->Version(state, Id(3), &written), 0u);
    EXPECT_TRUE(written) << ExpertStateName(state) << " (the restored store saves it again)";
    EXPECT_EQ(*(*restored)->Version(state, Id(5), &written), 0u);
    EXPECT_FALSE(written) << ExpertStateName(state);
  }
  // Restoring needs a new store: one with an expert written at 0 is not.
  Status twice = RestoreCheckpoint(ckpt(), "b", **restored).status();
  EXPECT_EQ(twice.code(), StatusCode::kFailedPrecondition) << twice;
  // Such a manifest is of format 2 (a build that reads format 1 only refuses it by that);
  // a format 1 manifest with such a record is damaged, and format 3 is a later build's.
  const std::string manifest = EditManifest("b", "format 2", "format 1");
  Status old_format = Restored("b").status();
  EXPECT_EQ(old_format.code(), StatusCode::kDataLoss) << old_format;
  EditManifest("b", "format 1", "format 3");
  Status later = Restored("b").status();
  EXPECT_EQ(later.code(), StatusCode::kFailedPrecondition) << later;
  EXPECT_TRUE(Contains(later, "format version 3")) << later;
  std::ofstream(ckpt() + "/b/checkpoint.manifest") << manifest;
  EXPECT_TRUE(Restored("b").ok());
  Update(3, 1);  // no expert at version 0 written any more: format 1
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "c", {}).ok());
  std::ifstream in(ckpt() + "/c/checkpoint.manifest");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\nformat 1\n"), std::string::npos) << text.substr(0, 40);
}

// A block's bytes past its state (4 KiB alignment) are zeros, not what the buffers held before:
// equal stores save equal files.
TEST_F(CheckpointTest, ABlocksPaddingIsZeros) {
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, 1);
  // Master and moments written again with 0xab past their bytes (what a caller's block may
  // hold), which the state files keep.
  const std::vector<ExpertState> nvme = {ExpertState::kMaster, ExpertState::kMoments};
  std::vector<std::unique_ptr<void, decltype(&std::free)>> blocks;
  std::vector<void*> pointers;
  for (ExpertState state : nvme) {
    blocks.emplace_back(std::aligned_alloc(4096, store_->BlockBytes(state)), &std::free);
    pointers.push_back(blocks.back().get());
  }
  for (uint32_t flat = 0; flat < kExperts; ++flat) {
    for (size_t s = 0; s < nvme.size(); ++s) {
      std::memset(pointers[s], 0xab, store_->BlockBytes(nvme[s]));
      const std::vector<uint8_t> bytes = Pattern(*store_, nvme[s], flat, 2);
      std::memcpy(pointers[s], bytes.data(), bytes.size());
    }
    ASSERT_TRUE(store_->WriteStates(Id(flat), nvme, pointers.data(), 2).ok());
  }
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "a", {}).ok());
  std::ifstream in(ckpt() + "/a/experts.bin", std::ios::binary);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t set_bytes = 0;
  for (ExpertState state : kSaved) set_bytes += store_->BlockBytes(state);
  ASSERT_EQ(data.size(), kExperts * set_bytes);
  for (uint64_t set = 0; set < kExperts; ++set) {
    uint64_t at = set * set_bytes;
    for (ExpertState state : kSaved) {
      for (uint64_t i = store_->StateBytes(state); i < store_->BlockBytes(state); ++i) {
        ASSERT_EQ(data[at + i], 0) << "expert " << set << " " << ExpertStateName(state);
      }
      at += store_->BlockBytes(state);
    }
  }
}

// RRE updates a step's routed experts only: an incremental checkpoint after 10% of them changed
// writes about 10% of a full one, and deleting the older checkpoint keeps what it refers to.
TEST_F(CheckpointTest, AnIncrementalCheckpointWritesOnlyTheExpertsThatChanged) {
  std::vector<uint64_t> versions(kExperts, 1);
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, 1);
  auto full = SaveCheckpoint(*store_, ckpt(), "a", {});
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->experts_copied, kExperts);
  Update(3, versions[3] = 2);
  Update(15, versions[15] = 2);
  const uint64_t read_before = store_->io_bytes().read;
  auto delta = SaveCheckpoint(*store_, ckpt(), "b", {});
  // Unchanged experts are not even read: their nvme states' headers (2 states x 2 copies x
  // 4 KiB) tell their versions; only the two changed ones' blocks (4 KiB master, 8 KiB
  // moments) are read, with their headers again.
  const uint64_t read = store_->io_bytes().read - read_before;
  EXPECT_LE(read, kExperts * 2 * 2 * 4096 + 2 * (2 * 2 * 4096 + 4096 + 8192));
  ASSERT_TRUE(delta.ok()) << delta.status();
  EXPECT_FALSE(delta->full);
  EXPECT_EQ(delta->experts_copied, 2u);
  EXPECT_EQ(delta->experts_referenced, 18u);
  EXPECT_EQ(delta->full_bytes, full->full_bytes);
  const double fraction = static_cast<double>(delta->bytes_written) / full->bytes_written;
  EXPECT_GT(fraction, 0.09);
  EXPECT_LT(fraction, 0.12) << delta->bytes_written << " of " << full->bytes_written;
  RecordProperty("incremental_bytes_fraction", StrCat(fraction));
  EXPECT_EQ(*ListCheckpoints(ckpt()), (std::vector<std::string>{"a", "b"}));
  ASSERT_TRUE(DeleteCheckpoint(ckpt(), "a").ok());
  EXPECT_EQ(*ListCheckpoints(ckpt()), std::vector<std::string>{"b"});
  EXPECT_TRUE(std::filesystem::exists(ckpt() + "/a/experts.bin")) << "b refers to it";
  auto restored = Restored("b");
  ASSERT_TRUE(restored.ok()) << restored.status();
  Expect(**restored, versions);
  ASSERT_TRUE(DeleteCheckpoint(ckpt(), "b").ok());
  EXPECT_TRUE(std::filesystem::is_empty(ckpt())) << "nothing refers to a's data any more";
  EXPECT_EQ(DeleteCheckpoint(ckpt(), "b").code(), StatusCode::kNotFound);
}

// M6's Pseudo-to-Real: layer 1's experts share layer 0's storage (no copies). A checkpoint
// stores each shared pair once, a restore shares them again without writing them, and the first
// write of either side of a pair leaves the other as it was.
TEST_F(CheckpointTest, SharedExpertsAreSavedOnceAndRestoredShared) {
  for (uint32_t e = 0; e < 9; ++e) Update(e, 3);
  Update(19, 3);
  // A batch refused at a later pair shares nothing.
  Status refused = store_->Share({{{1, 5}, {0, 5}}, {{0, 5}, {0, 6}}});
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_EQ(store_->SourceOf({1, 5}), (ExpertId{1, 5}));
  std::vector<std::pair<ExpertId, ExpertId>> pairs;
  for (uint32_t e = 0; e < 9; ++e) pairs.emplace_back(ExpertId{1, e}, ExpertId{0, e});
  pairs.emplace_back(ExpertId{0, 9}, ExpertId{1, 9});  // a source after its sharer
  ASSERT_TRUE(store_->Share(pairs).ok());
  EXPECT_EQ(store_->Share(pairs).code(), StatusCode::kFailedPrecondition) << "shares already";
  CheckpointOptions nvme_states;  // master and moments, as a session saves them
  nvme_states.states = {ExpertState::kMaster, ExpertState::kMoments};
  auto saved = SaveCheckpoint(*store_, ckpt(), "deep", nvme_states);
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->experts_copied, 11u) << "layer 0's nine, and both of the pair saved in reverse";
  EXPECT_EQ(saved->experts_shared, 9u);

  std::filesystem::create_directories(root_ + "/other");
  ExpertStoreOptions other = options_;
  other.dirs = {root_ + "/other"};
  auto store = std::move(ExpertStore::Create(*sim_, other)).value();
  const uint64_t written_before = store->io_bytes().written;
  ASSERT_TRUE(RestoreCheckpoint(ckpt(), "deep", *store).ok());
  // Eleven experts: a master and moments block and a slot header each per state.
  const uint64_t one_expert =
      store->BlockBytes(ExpertState::kMaster) + store->BlockBytes(ExpertState::kMoments) + 2 * 4096;
  EXPECT_LE(store->io_bytes().written - written_before, 11 * one_expert) << "none for the nine";
  auto read = [&](ExpertState state, ExpertId id) {
    std::vector<uint8_t> got(store->StateBytes(state));
    EXPECT_TRUE(store->Read(state, id, got.data()).ok());
    return got;
  };
  for (uint32_t e = 0; e < 9; ++e) {
    EXPECT_TRUE(store->ReadsSourceStorage({1, e}, ExpertState::kMaster)) << e;
    EXPECT_EQ(store->SourceOf({1, e}), (ExpertId{0, e}));
    EXPECT_EQ(read(ExpertState::kMaster, {1, e}), Pattern(*store, ExpertState::kMaster, e, 3));
  }
  EXPECT_FALSE(store->ReadsSourceStorage({0, 9}, ExpertState::kMaster)) << "saved as its own";
  EXPECT_EQ(read(ExpertState::kMaster, {0, 9}), Pattern(*store, ExpertState::kMaster, 19, 3));
  // Delinked by its own first update: layer 1's expert 4 moves on, layer 0's stays.
  for (ExpertState state : nvme_states.states) {
    std::vector<uint8_t> bytes = Pattern(*store, state, 14, 4);
    ASSERT_TRUE(store->Write(state, {1, 4}, bytes.data(), 4).ok());
  }
  EXPECT_FALSE(store->ReadsSourceStorage({1, 4}, ExpertState::kMaster));
  EXPECT_EQ(read(ExpertState::kMaster, {1, 4}), Pattern(*store, ExpertState::kMaster, 14, 4));
  EXPECT_EQ(read(ExpertState::kMaster, {0, 4}), Pattern(*store, ExpertState::kMaster, 4, 3));
  // Delinked by its source's update: layer 0's expert 5 moves on, layer 1's copy stays.
  for (ExpertState state : nvme_states.states) {
    std::vector<uint8_t> bytes = Pattern(*store, state, 5, 4);
    ASSERT_TRUE(store->Write(state, {0, 5}, bytes.data(), 4).ok());
  }
  EXPECT_EQ(read(ExpertState::kMaster, {1, 5}), Pattern(*store, ExpertState::kMaster, 5, 3));
  EXPECT_EQ(read(ExpertState::kMoments, {1, 5}), Pattern(*store, ExpertState::kMoments, 5, 3));
  // Saved again: the two delinked pairs are four experts of their own, the other seven pairs
  // stored once each.
  auto again = SaveCheckpoint(*store, ckpt(), "delinked", nvme_states);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->experts_shared, 7u);
  EXPECT_EQ(again->experts_copied, 13u);
  store.reset();
  // Two records naming the same blocks at different versions: damage, named.
  EditManifest("deep", "expert 10 3 deep", "expert 10 4 deep");
  Status damaged = Restored("deep").status();
  EXPECT_EQ(damaged.code(), StatusCode::kDataLoss) << damaged;
  EXPECT_TRUE(Contains(damaged, "layer 1 expert 0 (version 4)")) << damaged;
}

// A chain of incremental checkpoints never refers to more than max_chain others: the next one
// is full; `full` forces one.
TEST_F(CheckpointTest, TheChainIsBounded) {
  CheckpointOptions options;
  options.max_chain = 2;
  std::vector<bool> full;
  for (int i = 0; i < 5; ++i) {
    Update(static_cast<uint32_t>(i), 1);
    auto saved = SaveCheckpoint(*store_, ckpt(), StrCat("c", i), options);
    ASSERT_TRUE(saved.ok()) << saved.status();
    full.push_back(saved->full);
  }
  EXPECT_EQ(full, (std::vector<bool>{true, false, false, true, false}));
  options.full = true;
  Update(9, 1);
  EXPECT_TRUE(SaveCheckpoint(*store_, ckpt(), "forced", options)->full);
}

// Damage is refused naming the file and the expert and state (or blob), before anything wrong
// reaches a store; other models, unknown names and stores not new are refused too.
TEST_F(CheckpointTest, DamagedOrForeignCheckpointsAreRefusedNamingWhatIsWrong) {
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, 1);
  CheckpointOptions options;
  options.blobs = {{"loop.rng", "0123456789"}};
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "a", options).ok());
  Update(0, 2);
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "b", options).ok());
  const std::string data = ckpt() + "/a/experts.bin";
  // a's second record is layer 1 expert 1's (a save copies the last layer first, as a step's
  // updates reach experts); its master follows its weights block.
  const uint64_t record = 4096 + 4096 + 8192;  // weights, master and moments blocks
  ASSERT_TRUE(FlipByte(data, record + 4096 + 10, 0x08));
  Status flipped = Restored("b").status();
  EXPECT_EQ(flipped.code(), StatusCode::kDataLoss) << flipped;
  EXPECT_TRUE(Contains(flipped, data)) << flipped;
  EXPECT_TRUE(Contains(flipped, "layer 1 expert 1 master checksum mismatch")) << flipped;
  ASSERT_TRUE(FlipByte(data, record + 4096 + 10, 0x08));
  ASSERT_TRUE(Restored("b").ok());
  std::filesystem::resize_file(data, 3 * record);
  Status truncated = Restored("b").status();
  EXPECT_EQ(truncated.code(), StatusCode::kDataLoss) << truncated;
  EXPECT_TRUE(Contains(truncated, "truncated")) << truncated;
  std::filesystem::remove(data);
  Status missing = Restored("b").status();
  EXPECT_EQ(missing.code(), StatusCode::kDataLoss) << missing;
  EXPECT_TRUE(Contains(missing, data)) << missing;
  // b's own files: its blob, its manifest.
  ASSERT_TRUE(FlipByte(ckpt() + "/b/blobs.bin", 3, 0x01));
  Status blob = Restored("b").status();
  EXPECT_EQ(blob.code(), StatusCode::kDataLoss) << blob;
  EXPECT_TRUE(Contains(blob, "blob 'loop.rng'")) << blob;
  // A manifest whose (resealed) data reference is a path out of the root.
  {
    const std::string text = EditManifest("b", " a ", " ../../a ");
    Status traversal = Restored("b").status();
    EXPECT_EQ(traversal.code(), StatusCode::kDataLoss) << traversal;
    EXPECT_TRUE(Contains(traversal, "../../a")) << traversal;
    std::ofstream(ckpt() + "/b/checkpoint.manifest") << text;
  }
  std::ofstream(ckpt() + "/b/checkpoint.manifest", std::ios::app) << "extra\n";
  EXPECT_EQ(Restored("b").status().code(), StatusCode::kDataLoss);
  Status unknown = Restored("c").status();
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound) << unknown;
  EXPECT_TRUE(Contains(unknown, "there are: a")) << unknown;
  EXPECT_EQ(SaveCheckpoint(*store_, ckpt(), "a", {}).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(SaveCheckpoint(*store_, ckpt(), "../x", {}).status().code(),
            StatusCode::kInvalidArgument);
  // Another model's store.
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "c", {}).ok());
  std::filesystem::remove_all(root_ + "/other");
  std::filesystem::create_directories(root_ + "/other");
  ExpertStoreOptions other = options_;
  other.dirs = {root_ + "/other"};
  other.layout.params_per_expert = 999;
  auto foreign = std::move(ExpertStore::Create(*sim_, other)).value();
  Status model = RestoreCheckpoint(ckpt(), "c", *foreign).status();
  EXPECT_EQ(model.code(), StatusCode::kFailedPrecondition) << model;
  EXPECT_TRUE(Contains(model, "params_per_expert 1000 bf16 moments 2 there")) << model;
}

// A save cut short (a directory without a manifest) is never listed, and the next save
// removes it, even under the same name.
TEST_F(CheckpointTest, ASaveCutShortIsIgnoredThenRemoved) {
  Update(0, 1);
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "a", {}).ok());
  std::filesystem::create_directories(ckpt() + "/b");
  std::ofstream(ckpt() + "/b/experts.bin") << "half";
  std::filesystem::create_directories(ckpt() + "/notes");
  std::ofstream(ckpt() + "/notes/readme.txt") << "mine";
  EXPECT_EQ(*LatestCheckpoint(ckpt()), "a");
  auto saved = SaveCheckpoint(*store_, ckpt(), "b", {});
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(*LatestCheckpoint(ckpt()), "b");
  EXPECT_TRUE(std::filesystem::exists(ckpt() + "/notes/readme.txt")) << "not a checkpoint's";
}

// Versions name values only within one store: a store restored from an older checkpoint that
// reaches the newest one's versions with other values saves in full, never referring to data
// it does not hold.
TEST_F(CheckpointTest, ARestoredStoreSavesInFullNotByVersion) {
  Update(0, 1);
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "a", {}).ok());
  Update(0, 2);  // version 2 of expert 0: Pattern(.., 2)
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "b", {}).ok());
  auto restored = Restored("a");  // back to version 1, in a new store
  ASSERT_TRUE(restored.ok()) << restored.status();
  std::swap(store_, *restored);
  for (ExpertState state : kSaved) {  // version 2 again, with other values
    std::vector<uint8_t> bytes = Pattern(*store_, state, 0, 99);
    ASSERT_TRUE(store_->Write(state, Id(0), bytes.data(), 2).ok());
  }
  auto saved = SaveCheckpoint(*store_, ckpt(), "c", {});
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_TRUE(saved->full);
  restored = Restored("c");
  ASSERT_TRUE(restored.ok()) << restored.status();
  std::vector<uint8_t> got(store_->StateBytes(ExpertState::kMaster));
  ASSERT_TRUE((*restored)->Read(ExpertState::kMaster, Id(0), got.data()).ok());
  EXPECT_EQ(got, Pattern(*store_, ExpertState::kMaster, 0, 99));
}

// What a hostile caller or file can do: names that are no plain names, a second writer on the
// root, a failing disk part way through a save, a crafted blob offset, a restore into a store
// that is not new. Each is a clear error and changes nothing it should not.
TEST_F(CheckpointTest, HostileNamesWritersDisksAndManifestsAreRefused) {
  for (uint32_t flat = 0; flat < kExperts; ++flat) Update(flat, 1);
  for (const char* bad : {"step\v1", "a/b", "..", "", "tab\tname"}) {
    EXPECT_EQ(SaveCheckpoint(*store_, ckpt(), bad, {}).status().code(),
              StatusCode::kInvalidArgument)
        << bad;
  }
  CheckpointOptions blob;
  blob.blobs = {{"rng\rstate", "x"}};
  EXPECT_EQ(SaveCheckpoint(*store_, ckpt(), "a", blob).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(ListCheckpoints(ckpt())->empty()) << "a refused save leaves nothing";
  // Roots that are missing, a file, under a file or read-only, each said as the store says
  // it, for writers and readers alike.
  Status missing = SaveCheckpoint(*store_, root_ + "/nope", "a", {}).status();
  EXPECT_EQ(missing.code(), StatusCode::kNotFound) << missing;
  EXPECT_TRUE(Contains(missing, "checkpoint root '" + root_ + "/nope' does not exist")) << missing;
  Status listed = ListCheckpoints(root_ + "/nope").status();
  EXPECT_EQ(listed.code(), StatusCode::kNotFound) << listed;
  EXPECT_TRUE(Contains(listed, "checkpoint root '" + root_ + "/nope' does not exist")) << listed;
  { std::ofstream(root_ + "/file") << "x"; }
  Status file = DeleteCheckpoint(root_ + "/file", "a");
  EXPECT_EQ(file.code(), StatusCode::kNotFound) << file;
  EXPECT_TRUE(Contains(file, "/file' is not a directory")) << file;
  for (const Status& through : {SaveCheckpoint(*store_, root_ + "/file/below", "a", {}).status(),
                                LatestCheckpoint(root_ + "/file/below").status()}) {
    // The stat's own error (ENOTDIR), before any lock file is tried.
    EXPECT_EQ(through.sys_errno(), ENOTDIR) << through;
    EXPECT_EQ(through.code(), StatusCode::kInvalidArgument) << through;
    EXPECT_TRUE(Contains(through, "checkpoint root '" + root_ + "/file/below': ")) << through;
  }
  if (::geteuid() != 0) {  // root writes anywhere
    std::filesystem::create_directories(root_ + "/ro");
    ::chmod((root_ + "/ro").c_str(), 0500);
    Status read_only = SaveCheckpoint(*store_, root_ + "/ro", "a", {}).status();
    EXPECT_EQ(read_only.code(), StatusCode::kPermissionDenied) << read_only;
    EXPECT_EQ(read_only.sys_errno(), EACCES) << read_only;
    EXPECT_TRUE(Contains(read_only, "/ro' is not writable")) << read_only;
    EXPECT_TRUE(ListCheckpoints(root_ + "/ro").ok()) << "reading needs no write permission";
    ::chmod((root_ + "/ro").c_str(), 0700);
  }
  {  // another writer holds the root
    auto held = std::move(FileLock::Acquire(ckpt() + "/checkpoints.lock", "x")).value();
    Status busy = SaveCheckpoint(*store_, ckpt(), "a", {}).status();
    EXPECT_EQ(busy.code(), StatusCode::kFailedPrecondition) << busy;
    EXPECT_TRUE(Contains(busy, "in use by process")) << busy;
  }
  // A write that fails part way: an error, nothing left behind, and the next save works.
  CheckpointOptions failing;
  failing.io_engines = []() -> StatusOr<std::unique_ptr<IoEngine>> {
    IoEngineOptions io;
    io.queue_depth = 8;
    FaultOptions faults;
    faults.fail_nth = 5;
    return std::unique_ptr<IoEngine>(
        std::make_unique<FaultInjectionIoEngine>(CreatePosixIoEngine(io), faults));
  };
  failing.buffer_bytes = 1;  // one expert in flight at a time
  Status failed = SaveCheckpoint(*store_, ckpt(), "a", failing).status();
  EXPECT_FALSE(failed.ok());
  EXPECT_FALSE(std::filesystem::exists(ckpt() + "/a"));
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "a", {}).ok());
  // A user's empty directory under the root is left alone.
  std::filesystem::create_directories(ckpt() + "/tensorboard");
  Update(2, 2);
  ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "b", {}).ok());
  EXPECT_TRUE(std::filesystem::exists(ckpt() + "/tensorboard"));
  // A crafted (resealed) blob record whose offset and length wrap around.
  {
    CheckpointOptions with_blob;
    with_blob.blobs = {{"rng", "0123"}};
    Update(3, 2);
    ASSERT_TRUE(SaveCheckpoint(*store_, ckpt(), "c", with_blob).ok());
    const std::string text =
        EditManifest("c", "blob rng 0 4 ", "blob rng 18446744069414584320 4294967297 ");
    Status wrapped = Restored("c").status();
    EXPECT_EQ(wrapped.code(), StatusCode::kDataLoss) << wrapped;
    std::ofstream(ckpt() + "/c/checkpoint.manifest") << text;
  }
  // A store that is not new is refused before anything is written into it.
  std::filesystem::remove_all(root_ + "/other");
  std::filesystem::create_directories(root_ + "/other");
  ExpertStoreOptions other = options_;
  other.dirs = {root_ + "/other"};
  auto used = std::move(ExpertStore::Create(*sim_, other)).value();
  std::vector<uint8_t> bytes = Pattern(*used, ExpertState::kMaster, 19, 5);
  for (ExpertState state : kSaved) {
    bytes = Pattern(*used, state, 19, 5);
    ASSERT_TRUE(used->Write(state, Id(19), bytes.data(), 5).ok());
  }
  Status not_new = RestoreCheckpoint(ckpt(), "c", *used).status();
  EXPECT_EQ(not_new.code(), StatusCode::kFailedPrecondition) << not_new;
  std::vector<uint8_t> got(used->StateBytes(ExpertState::kMaster));
  ASSERT_TRUE(used->Read(ExpertState::kMaster, Id(0), got.data()).ok());
  EXPECT_EQ(got, std::vector<uint8_t>(got.size(), 1)) << "expert 0 left at its initial value";
}

}  // namespace
}  // namespace ecss
