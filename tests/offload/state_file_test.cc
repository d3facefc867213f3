#include "offload/state_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"
#include "tests/offload/flip_byte.h"

namespace ecss {
namespace {

struct Arrays {
  explicit Arrays(uint64_t elements, float seed) {
    for (int a = 0; a < 3; ++a) {
      data[a] = static_cast<float*>(std::aligned_alloc(4096, StateArrayBytes(elements)));
      raw[a] = data[a];
      for (uint64_t i = 0; i < elements; ++i) data[a][i] = seed + a * 1000 + static_cast<float>(i);
    }
  }
  ~Arrays() {
    for (float* d : data) std::free(d);
  }
  Arrays(const Arrays&) = delete;
  Arrays& operator=(const Arrays&) = delete;
  float* data[3];
  void* raw[3];  // the same arrays, as the file takes them
};

// Counts round trips: a request submitted with none in flight starts one.
class RoundTripEngine final : public FaultInjectionIoEngine {
 public:
  explicit RoundTripEngine(std::unique_ptr<IoEngine> inner)
      : FaultInjectionIoEngine(std::move(inner), FaultOptions{}) {}
  int round_trips() const { return round_trips_; }

 protected:
  Status DoSubmit(const IoRequest& request) override {
    if (in_flight() == 0) ++round_trips_;
    return FaultInjectionIoEngine::DoSubmit(request);
  }

 private:
  int round_trips_ = 0;
};

class StateFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "/ecss_state_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::create_directories(root_ + "/a");
    std::filesystem::create_directories(root_ + "/b");
    IoEngineOptions io;
    io.queue_depth = 8;
    engine_ = std::make_unique<FaultInjectionIoEngine>(CreatePosixIoEngine(io), FaultOptions{});
    options_.dirs = {root_ + "/a", root_ + "/b"};
    options_.arrays = 3;
    options_.max_expert_elements = 5000;
    options_.experts = 5;
    options_.array_names = {"master", "moment 1", "moment 2"};
  }
  void TearDown() override {
    engine_.reset();
    std::filesystem::remove_all(root_);
  }
  // Shadowed files: their first handle (on engine_) and another on an engine of its own.
  struct ShadowFiles {
    std::unique_ptr<ExpertStateFile> writer;
    std::unique_ptr<RoundTripEngine> engine;
    std::unique_ptr<ExpertStateFile> reader;  // destroyed first: it uses `engine`
  };
  ShadowFiles MakeShadowFiles() {
    options_.shadow = true;
    ShadowFiles files;
    files.writer = *ExpertStateFile::Create(engine_.get(), options_);
    IoEngineOptions io;
    io.queue_depth = 16;  // the fault wrapper halves it: a load's 5 requests at once
    files.engine = std::make_unique<RoundTripEngine>(CreatePosixIoEngine(io));
    files.reader = *files.writer->AnotherHandle(files.engine.get());
    return files;
  }

  std::string root_;
  std::unique_ptr<FaultInjectionIoEngine> engine_;
  StateFileOptions options_;
};

TEST_F(StateFileTest, StoreLoadAndReopenAcrossStripedDirectories) {
  {
    auto file = ExpertStateFile::Create(engine_.get(), options_);
    ASSERT_TRUE(file.ok()) << file.status();
    for (uint32_t e = 0; e < 5; ++e) {
      Arrays arrays(1000 + e, static_cast<float>(e));
      ASSERT_TRUE((*file)->Store(e, arrays.raw, 1000 + e, 10 + e).ok());
    }
  }
  auto file = ExpertStateFile::Open(engine_.get(), options_);
  ASSERT_TRUE(file.ok()) << file.status();
  for (uint32_t e = 0; e < 5; ++e) {
    Arrays expected(1000 + e, static_cast<float>(e)), got(1000 + e, -1.0f);
    uint64_t count = 0;
    ASSERT_TRUE((*file)->Load(e, got.raw, 1000 + e, &count).ok());
    EXPECT_EQ(count, 10u + e);
    for (int a = 0; a < 3; ++a)
      ASSERT_EQ(std::memcmp(got.data[a], expected.data[a], (1000 + e) * 4), 0);
  }
  EXPECT_TRUE(std::filesystem::exists(root_ + "/a/ecss-states-0.bin"));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/b/ecss-states-1.bin"));
}

TEST_F(StateFileTest, CorruptionIsDataLossNamingExpertAndArray) {
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays arrays(3000, 1.0f);
  ASSERT_TRUE(file->Store(2, arrays.raw, 3000, 1).ok());
  // Flip one bit of the master array of expert 2 (directory a, second slot) on disk.
  const uint64_t master_offset = 4096 + file->slot_bytes() + 4096;  // after the file header
  ASSERT_TRUE(FlipByte(root_ + "/a/ecss-states-0.bin", master_offset + 100, 0x04));
  Arrays got(3000, 0.0f);
  uint64_t count = 0;
  Status loaded = file->Load(2, got.raw, 3000, &count);
  EXPECT_EQ(loaded.code(), StatusCode::kDataLoss);
  EXPECT_NE(loaded.message().find("expert 2"), std::string_view::npos) << loaded;
  EXPECT_NE(loaded.message().find("master checksum mismatch"), std::string_view::npos) << loaded;
  // A slot never stored is unwritten (the caller knows its initial value); a wrong element
  // count is refused.
  Status unwritten = file->Load(4, got.raw, 3000, &count);
  EXPECT_EQ(unwritten.code(), StatusCode::kNotFound) << unwritten;
  EXPECT_NE(unwritten.message().find("unwritten"), std::string_view::npos) << unwritten;
  ASSERT_TRUE(file->Store(2, arrays.raw, 3000, 1).ok());
  EXPECT_EQ(file->Load(2, got.raw, 2999, &count).code(), StatusCode::kDataLoss);
  EXPECT_EQ(file->Load(7, got.raw, 3000, &count).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(file->Load(2, got.raw, 6000, &count).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(file->Load(2, got.raw, 3000, &count).ok()) << "the store stays usable";
}

TEST_F(StateFileTest, ArraysOfSeveralPiecesRoundTripAndDamageInALaterPieceIsDataLoss) {
  // Arrays larger than one transfer piece (4 MiB) move in pieces, checksummed beside the
  // transfer: 2.6 M floats is three pieces, the last one partial, and the element count
  // ends inside a 4 KiB block, so the checksum must stop where the data does.
  constexpr uint64_t kElements = 2'600'001;
  options_.max_expert_elements = kElements;
  options_.experts = 2;
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays stored(kElements, 3.0f);
  ASSERT_TRUE(file->Store(0, stored.raw, kElements, 7).ok());
  Arrays got(kElements, 0.0f);
  uint64_t count = 0;
  ASSERT_TRUE(file->Load(0, got.raw, kElements, &count).ok());
  EXPECT_EQ(count, 7u);
  for (int a = 0; a < 3; ++a)
    ASSERT_EQ(std::memcmp(got.data[a], stored.data[a], kElements * 4), 0) << a;
  // Expert 0's first store is in its first slot (directory a, after the file's header and the
  // slot's). The padding after the last element is outside the checksum: damage there reads.
  const uint64_t block = StateArrayBytes(kElements);
  const std::string path = root_ + "/a/ecss-states-0.bin";
  const uint64_t first_array = 4096 + 4096;
  ASSERT_TRUE(FlipByte(path, first_array + kElements * 4 + 10, 1));
  ASSERT_TRUE(file->Load(0, got.raw, kElements, &count).ok());
  // One bit of the third piece of the last array is DataLoss naming it.
  const uint64_t last_array = first_array + 2 * block;
  ASSERT_TRUE(FlipByte(path, last_array + (uint64_t{8} << 20) + 100, 1));
  Status loaded = file->Load(0, got.raw, kElements, &count);
  EXPECT_EQ(loaded.code(), StatusCode::kDataLoss) << loaded;
  EXPECT_NE(loaded.message().find("moment 2 checksum mismatch"), std::string_view::npos) << loaded;
  ASSERT_TRUE(FlipByte(path, last_array + (uint64_t{8} << 20) + 100, 1));
  // A failure in a middle piece of a store (the second piece of array 1, into the other slot)
  // fails it, leaves nothing in flight, and the version before stays the one read.
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 5;
  engine_->set_options(faults);
  Arrays newer(kElements, 4.0f);
  EXPECT_FALSE(file->Store(0, newer.raw, kElements, 8).ok());
  engine_->set_options(FaultOptions{});
  EXPECT_EQ(engine_->counters().injected_eio, 1u);
  EXPECT_EQ(engine_->in_flight(), 0u);
  ASSERT_TRUE(file->Load(0, got.raw, kElements, &count).ok());
  EXPECT_EQ(count, 7u);
  for (int a = 0; a < 3; ++a)
    ASSERT_EQ(std::memcmp(got.data[a], stored.data[a], kElements * 4), 0) << a;
}

// A store into a slot never stored before is a first write (the file system allocates as it
// goes): with shadow slots, an expert's first two stores; on files it opens, a handle knows
// once it read the expert's headers; a store that overwrites counts nothing.
TEST_F(StateFileTest, FreshBytesCountTheStoresIntoSlotsNeverStoredBefore) {
  options_.shadow = true;
  Arrays v(3000, 1.0f);
  // Three arrays of 3000 floats (12000 bytes, padded to 12 KiB) and the slot header.
  const uint64_t store_bytes = 3 * 12288 + 4096;
  {
    auto file = *ExpertStateFile::Create(engine_.get(), options_);
    EXPECT_EQ(file->fresh_written_bytes(), 0u);
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 1).ok());
    EXPECT_EQ(file->fresh_written_bytes(), store_bytes);
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 2).ok());
    EXPECT_EQ(file->fresh_written_bytes(), 2 * store_bytes) << "the second copy's first store";
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 3).ok());
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 4).ok());
    EXPECT_EQ(file->fresh_written_bytes(), 2 * store_bytes) << "overwrites";
    ASSERT_TRUE(file->Store(2, v.raw, 3000, 1).ok());
    EXPECT_EQ(file->fresh_written_bytes(), 3 * store_bytes);
  }
  auto reopened = *ExpertStateFile::Open(engine_.get(), options_);
  ASSERT_TRUE(reopened->Store(1, v.raw, 3000, 5).ok());
  ASSERT_TRUE(reopened->Store(2, v.raw, 3000, 2).ok());
  EXPECT_EQ(reopened->fresh_written_bytes(), store_bytes) << "expert 2's second copy only";
}

// A handle that opened the files learns which copy is newest from the headers before its first
// store of an expert; when that read fails, the store fails, and the next one reads them
// again (it must not take the expert for unwritten and write sequence 1 over the newest copy,
// which the older copy would then outrank).
TEST_F(StateFileTest, AFailedHeaderReadBeforeAStoreIsNotTakenForAnUnwrittenExpert) {
  options_.shadow = true;
  Arrays v(3000, 1.0f), v3(3000, 3.0f), got(3000, 0.0f);
  {
    auto file = *ExpertStateFile::Create(engine_.get(), options_);
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 1).ok());
    ASSERT_TRUE(file->Store(1, v.raw, 3000, 2).ok());
  }
  auto reopened = *ExpertStateFile::Open(engine_.get(), options_);
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 1;  // a header read
  engine_->set_options(faults);
  EXPECT_FALSE(reopened->Store(1, v3.raw, 3000, 3).ok());
  engine_->set_options(FaultOptions{});
  ASSERT_TRUE(reopened->Store(1, v3.raw, 3000, 3).ok());
  uint64_t count = 0;
  ASSERT_TRUE(reopened->Load(1, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 3u);
  EXPECT_EQ(got.data[0][0], 3.0f);
}

TEST_F(StateFileTest, TornStoreIsDetectedNotUsed) {
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays old_states(4096, 1.0f), new_states(4096, 2.0f);
  ASSERT_TRUE(file->Store(1, old_states.raw, 4096, 1).ok());
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 1;  // the next request: array 0 of the store
  faults.torn_writes = true;
  engine_->set_options(faults);
  Status torn = file->Store(1, new_states.raw, 4096, 2);
  EXPECT_FALSE(torn.ok());
  EXPECT_NE(torn.message().find("storing expert 1"), std::string_view::npos) << torn;
  engine_->set_options(FaultOptions{});
  Arrays got(4096, 0.0f);
  uint64_t count = 0;
  Status loaded = file->Load(1, got.raw, 4096, &count);
  EXPECT_EQ(loaded.code(), StatusCode::kDataLoss) << "half-new data is never returned as good";
}

TEST_F(StateFileTest, BadDirectoriesAndFullDisksAreClearErrors) {
  StateFileOptions missing = options_;
  missing.dirs = {root_ + "/does-not-exist"};
  Status not_found = ExpertStateFile::Create(engine_.get(), missing).status();
  EXPECT_EQ(not_found.code(), StatusCode::kNotFound);
  EXPECT_NE(not_found.message().find("does-not-exist"), std::string_view::npos) << not_found;
  // A full disk is the failed store's error; the version before it stays readable (the
  // first time: unwritten).
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v1(3000, 1.0f), v2(3000, 2.0f), got(3000, 0.0f);
  FaultOptions full;
  full.enospc_after_bytes = 4096;
  engine_->set_options(full);
  Status no_space = file->Store(2, v1.raw, 3000, 1);
  EXPECT_EQ(no_space.code(), StatusCode::kResourceExhausted) << no_space;
  EXPECT_NE(no_space.message().find("expert 2"), std::string_view::npos) << no_space;
  engine_->set_options(FaultOptions{});
  uint64_t count = 0;
  EXPECT_EQ(file->Load(2, got.raw, 3000, &count).code(), StatusCode::kNotFound);
  ASSERT_TRUE(file->Store(2, v1.raw, 3000, 1).ok());
  engine_->set_options(full);
  EXPECT_EQ(file->Store(2, v2.raw, 3000, 2).code(), StatusCode::kResourceExhausted);
  engine_->set_options(FaultOptions{});
  ASSERT_TRUE(file->Load(2, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 1u);
  EXPECT_EQ(std::memcmp(got.data[0], v1.data[0], 12000), 0);
  file.reset();
  StateFileOptions bigger = options_;
  bigger.experts = 50;
  EXPECT_EQ(ExpertStateFile::Open(engine_.get(), bigger).status().code(),
            StatusCode::kFailedPrecondition);
  if (::geteuid() != 0) {  // root writes anywhere
    std::filesystem::create_directories(root_ + "/ro");
    ::chmod((root_ + "/ro").c_str(), 0500);
    StateFileOptions read_only = options_;
    read_only.dirs = {root_ + "/ro"};
    EXPECT_EQ(ExpertStateFile::Create(engine_.get(), read_only).status().code(),
              StatusCode::kPermissionDenied);
  }
}

TEST_F(StateFileTest, ShadowSlotsKeepThePreviousVersionThroughFailedStores) {
  options_.shadow = true;
  options_.element_bytes = 2;  // bf16-sized elements: the layout only cares about bytes
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v1(2000, 1.0f), v2(2000, 2.0f), v3(2000, 3.0f), got(2000, 0.0f);
  ASSERT_TRUE(file->Store(3, v1.raw, 4000, 1).ok());
  ASSERT_TRUE(file->Store(3, v2.raw, 4000, 2).ok());
  uint64_t count = 0;
  // A torn store and a failed one: each leaves version 2 readable, never a mix.
  for (bool torn : {true, false}) {
    FaultOptions faults;
    faults.fail_nth = engine_->counters().requests + (torn ? 1 : 4);  // an array / the header
    faults.torn_writes = torn;
    engine_->set_options(faults);
    EXPECT_FALSE(file->Store(3, v3.raw, 4000, 3).ok());
    engine_->set_options(FaultOptions{});
    ASSERT_TRUE(file->Load(3, got.raw, 4000, &count).ok()) << "torn=" << torn;
    EXPECT_EQ(count, 2u);
    for (int a = 0; a < 3; ++a) ASSERT_EQ(std::memcmp(got.data[a], v2.data[a], 8000), 0);
  }
  // The store stays usable, and a second handle (as after a reopen) finds the newest version.
  ASSERT_TRUE(file->Store(3, v3.raw, 4000, 3).ok());
  auto reopened = *ExpertStateFile::Open(engine_.get(), options_);
  ASSERT_TRUE(reopened->Load(3, got.raw, 4000, &count).ok());
  EXPECT_EQ(count, 3u);
  EXPECT_EQ(std::memcmp(got.data[1], v3.data[1], 8000), 0);
  ASSERT_TRUE(reopened->Store(3, v1.raw, 4000, 4).ok());
  ASSERT_TRUE(file->Load(3, got.raw, 4000, &count).ok());
  EXPECT_EQ(count, 4u);
  EXPECT_EQ(std::memcmp(got.data[2], v1.data[2], 8000), 0);
}

// The handles of one file share a guess of each expert's newest copy: a load reads the headers
// and the guessed copy's arrays in one round trip. A wrong guess (a store through a handle
// that does not share them) costs a second, for the right copy, and the load corrects it.
TEST_F(StateFileTest, ALoadReadsTheHeadersAndTheGuessedCopyInOneRoundTrip) {
  ShadowFiles files = MakeShadowFiles();
  ExpertStateFile* writer = files.writer.get();
  ExpertStateFile* reader = files.reader.get();
  RoundTripEngine& engine = *files.engine;
  Arrays v1(5000, 1.0f), v2(5000, 2.0f), v3(5000, 3.0f), got(5000, 0.0f);
  const uint64_t headers = 2 * 4096;
  const uint64_t arrays = 3 * StateArrayBytes(5000);
  struct Cost {
    int round_trips;
    uint64_t bytes;
  };
  // Loads expert 3 through `file`, expecting `expected` at update count `count`.
  auto load = [&](ExpertStateFile& file, const Arrays& expected, uint64_t count,
                  const uint64_t* want = nullptr) {
    const int trips = engine.round_trips();
    const uint64_t bytes = engine.bytes_read();
    uint64_t read = 0;
    const Status loaded = file.Load(3, got.raw, 5000, &read, want);
    EXPECT_TRUE(loaded.ok()) << loaded;
    EXPECT_EQ(read, count);
    for (int a = 0; a < 3; ++a) EXPECT_EQ(std::memcmp(got.data[a], expected.data[a], 20000), 0);
    return Cost{engine.round_trips() - trips, engine.bytes_read() - bytes};
  };
  // Never stored, no guess: the headers alone.
  uint64_t count = 0;
  bool unwritten = false;
  const int trips = engine.round_trips();
  const uint64_t bytes = engine.bytes_read();
  ASSERT_TRUE(reader->Load(3, got.raw, 5000, &count, nullptr, &unwritten).ok());
  EXPECT_TRUE(unwritten);
  EXPECT_EQ(engine.round_trips() - trips, 1);
  EXPECT_EQ(engine.bytes_read() - bytes, headers);
  // Each store's copy becomes the guess: one round trip, the headers and one copy's arrays.
  ASSERT_TRUE(writer->Store(3, v1.raw, 5000, 1).ok());
  Cost cost = load(*reader, v1, 1);
  EXPECT_EQ(cost.round_trips, 1);
  EXPECT_EQ(cost.bytes, headers + arrays);
  ASSERT_TRUE(writer->Store(3, v2.raw, 5000, 2).ok());  // the other copy
  EXPECT_EQ(load(*reader, v2, 2).round_trips, 1);
  // A handle opened apart shares no guesses: its store (the writer stores no more, as an expert
  // has one writing handle at a time) makes the guess wrong once.
  auto apart = *ExpertStateFile::Open(engine_.get(), options_);
  ASSERT_TRUE(apart->Store(3, v3.raw, 5000, 3).ok());
  cost = load(*reader, v3, 3);
  EXPECT_EQ(cost.round_trips, 2);
  EXPECT_EQ(cost.bytes, headers + 2 * arrays);
  EXPECT_EQ(load(*reader, v3, 3).round_trips, 1);
  // A load of the version before reads the other copy, and leaves the guess alone.
  const uint64_t before = 2;
  EXPECT_EQ(load(*reader, v2, 2, &before).round_trips, 2);
  EXPECT_EQ(load(*reader, v3, 3).round_trips, 1);
  // A file opened again starts with no guesses, and learns from its loads.
  auto reopened = *ExpertStateFile::Open(&engine, options_);
  EXPECT_EQ(load(*reopened, v3, 3).round_trips, 2);
  EXPECT_EQ(load(*reopened, v3, 3).round_trips, 1);
}

// A guess that is wrong, or whose copy cannot be read, costs round trips, never a load: an
// update that fails after retracting its copy leaves the copy before it guessed; a load whose
// guessed copy (not the one it needs) fails to read, or reads damaged, reads the right one;
// an error or damage in the right copy is the load's, as without a guess.
TEST_F(StateFileTest, AWrongOrUnreadableGuessCostsRoundTripsNeverALoad) {
  ShadowFiles files = MakeShadowFiles();
  ExpertStateFile* writer = files.writer.get();
  ExpertStateFile* reader = files.reader.get();
  RoundTripEngine& engine = *files.engine;
  Arrays v1(5000, 1.0f), v2(5000, 2.0f), v3(5000, 3.0f), v4(5000, 4.0f), got(5000, 0.0f);
  uint64_t count = 0;
  int trips = 0;
  // Loads expert 3 through `file`, with `fault` on the `nth` request of the load (0: none).
  auto load = [&](ExpertStateFile& file, Fault fault = Fault::kEio, uint64_t nth = 0) {
    FaultOptions faults;
    faults.fault = fault;
    faults.fail_nth = nth == 0 ? 0 : engine.counters().requests + nth;
    engine.set_options(faults);
    const int before = engine.round_trips();
    const Status loaded = file.Load(3, got.raw, 5000, &count);
    trips = engine.round_trips() - before;
    engine.set_options(FaultOptions{});
    return loaded;
  };
  auto holds = [&](const Arrays& expected) {
    for (int a = 0; a < 3; ++a) {
      if (std::memcmp(got.data[a], expected.data[a], 20000) != 0) return false;
    }
    return true;
  };
  ASSERT_TRUE(writer->Store(3, v1.raw, 5000, 1).ok());
  ASSERT_TRUE(writer->Store(3, v2.raw, 5000, 2).ok());
  // Update 2 written again (as after a crash that cut it short), failing once its copy was
  // retracted: version 1 is the newest, and the guess.
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 2;  // the retraction, then master
  engine_->set_options(faults);
  EXPECT_FALSE(writer->Store(3, v3.raw, 5000, 2, /*supersede=*/true).ok());
  engine_->set_options(FaultOptions{});
  ASSERT_TRUE(load(*reader).ok());
  EXPECT_EQ(count, 1u);
  EXPECT_TRUE(holds(v1));
  EXPECT_EQ(trips, 1);
  ASSERT_TRUE(writer->Store(3, v2.raw, 5000, 2).ok());  // into the retracted copy
  // A handle opened apart guesses from its own loads only: each store after one makes its
  // guess the copy before. Its guessed arrays failing to read (the headers are read again)
  // or reading damaged, the load reads the right copy.
  auto apart = *ExpertStateFile::Open(&engine, options_);
  ASSERT_TRUE(load(*apart).ok());
  EXPECT_EQ(trips, 2);  // no guess yet
  uint64_t version = 2;
  for (Fault fault : {Fault::kEio, Fault::kBitFlip}) {
    const Arrays& next = fault == Fault::kEio ? v3 : v4;
    ASSERT_TRUE(writer->Store(3, next.raw, 5000, ++version).ok());
    const Status loaded = load(*apart, fault, 3);  // two headers, then master
    ASSERT_TRUE(loaded.ok()) << loaded;
    EXPECT_EQ(count, version);
    EXPECT_TRUE(holds(next));
    EXPECT_EQ(trips, fault == Fault::kEio ? 3 : 2);
  }
  ASSERT_TRUE(load(*apart).ok());
  EXPECT_EQ(trips, 1);  // the guess corrected
  // The guess right: an error or damage in its arrays is the load's.
  const Status failed = load(*apart, Fault::kEio, 3);
  EXPECT_FALSE(failed.ok());
  EXPECT_NE(failed.message().find("loading expert 3 states"), std::string_view::npos) << failed;
  const Status flipped = load(*apart, Fault::kBitFlip, 3);
  EXPECT_EQ(flipped.code(), StatusCode::kDataLoss) << flipped;
  EXPECT_NE(flipped.message().find("master checksum mismatch"), std::string_view::npos) << flipped;
  ASSERT_TRUE(load(*apart).ok());
  EXPECT_EQ(count, 4u);
  EXPECT_TRUE(holds(v4));
}

// Create writes nothing but the files' sizes: any model takes constant time and no space up
// front; the files are split at max_file_bytes, each holding whole slots.
TEST_F(StateFileTest, FilesAreSparseAndSplitAtTheirMaximumSize) {
  options_.shadow = true;
  options_.experts = 9;  // directory a: experts 0 2 4 6 8; b: 1 3 5 7
  const uint64_t pair = 2 * (4096 + 3 * StateArrayBytes(5000));  // one expert's two slots
  options_.max_file_bytes = 4096 + 2 * pair + 1;  // a file header and two experts per file
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  const std::vector<std::string> paths = ExpertStateFile::Paths(options_);
  ASSERT_EQ(paths.size(), 5u);  // a: 2 + 2 + 1 experts, b: 2 + 2
  EXPECT_EQ(paths[0], root_ + "/a/ecss-states-0.bin");
  EXPECT_EQ(paths[2], root_ + "/a/ecss-states-0-part2.bin");
  EXPECT_EQ(paths[4], root_ + "/b/ecss-states-1-part1.bin");
  uint64_t bytes = 0, blocks = 0;
  for (const std::string& path : paths) {
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
    EXPECT_LE(static_cast<uint64_t>(st.st_size), options_.max_file_bytes) << path;
    bytes += st.st_size;
    blocks += st.st_blocks;
  }
  EXPECT_EQ(bytes, ExpertStateFile::DiskBytes(options_));
  EXPECT_LE(blocks * 512, paths.size() * 65536) << "nothing written yet but the file headers";
  // Every expert round-trips through its file, and the split holds at Open.
  for (uint32_t e = 0; e < 9; ++e) {
    Arrays v(5000, static_cast<float>(e));
    ASSERT_TRUE(file->Store(e, v.raw, 5000, e + 1).ok()) << e;
  }
  file.reset();
  auto reopened = *ExpertStateFile::Open(engine_.get(), options_);
  for (uint32_t e = 0; e < 9; ++e) {
    Arrays want(5000, static_cast<float>(e)), got(5000, 0.0f);
    uint64_t count = 0;
    ASSERT_TRUE(reopened->Load(e, got.raw, 5000, &count).ok()) << e;
    EXPECT_EQ(count, e + 1);
    for (int a = 0; a < 3; ++a) ASSERT_EQ(std::memcmp(got.data[a], want.data[a], 20000), 0);
  }
  // Opened with another split, the files do not match.
  StateFileOptions other = options_;
  other.max_file_bytes = 0;
  EXPECT_FALSE(ExpertStateFile::Open(engine_.get(), other).ok());
  // A maximum below one expert's slots and the file header is refused, naming the field.
  other.max_file_bytes = 4096 + pair - 1;
  Status small = ExpertStateFile::Create(engine_.get(), other).status();
  EXPECT_EQ(small.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(small.message().find("max_file_bytes"), std::string_view::npos) << small;
}

// Shadow copies of an expert never stored read as unwritten (NotFound), and so does one whose
// first store was cut short (the other copy is still unwritten); a second version is kept.
TEST_F(StateFileTest, AnUnwrittenExpertIsNotFoundUntilAStoreCompletes) {
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v1(3000, 1.0f), v2(3000, 2.0f), got(3000, 0.0f);
  uint64_t count = 0;
  EXPECT_EQ(file->Load(1, got.raw, 3000, &count).code(), StatusCode::kNotFound);
  FaultOptions faults;
  // Files it created need no header read before a store: the third array's write is torn,
  // and no header is written.
  faults.fail_nth = engine_->counters().requests + 3;
  faults.torn_writes = true;
  engine_->set_options(faults);
  EXPECT_FALSE(file->Store(1, v1.raw, 3000, 1).ok());
  engine_->set_options(FaultOptions{});
  Status torn = file->Load(1, got.raw, 3000, &count);
  EXPECT_EQ(torn.code(), StatusCode::kNotFound) << torn;
  ASSERT_TRUE(file->Store(1, v1.raw, 3000, 1).ok());
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 1u);
  const uint64_t zero = 0;
  EXPECT_EQ(file->Load(1, got.raw, 3000, &count, &zero).code(), StatusCode::kNotFound)
      << "version 0 is the initial one: still there beside version 1";
  ASSERT_TRUE(file->Store(1, v2.raw, 3000, 2).ok());
  EXPECT_EQ(file->Load(1, got.raw, 3000, &count, &zero).code(), StatusCode::kDataLoss)
      << "two versions stored: the initial one is gone";
}

// A slot header is written whole (one 4 KiB block), so a crash leaves it old or new: one that
// is neither is damage, and Load says so instead of going back to the other copy's version.
TEST_F(StateFileTest, ADamagedSlotHeaderIsDataLossNotTheOlderVersion) {
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v1(3000, 1.0f), v2(3000, 2.0f), got(3000, 0.0f);
  ASSERT_TRUE(file->Store(2, v1.raw, 3000, 1).ok());
  ASSERT_TRUE(file->Store(2, v2.raw, 3000, 2).ok());
  // Expert 2 is directory a's second: after the file header and expert 0's two slots; its
  // second copy holds version 2.
  const std::string path = root_ + "/a/ecss-states-0.bin";
  const uint64_t newest = 4096 + 2 * file->slot_bytes() + file->slot_bytes();
  uint64_t count = 0;
  for (uint64_t byte : {uint64_t{32}, uint64_t{0}}) {  // the sequence number, the magic
    ASSERT_TRUE(FlipByte(path, newest + byte, 0x01));
    Status loaded = file->Load(2, got.raw, 3000, &count);
    EXPECT_EQ(loaded.code(), StatusCode::kDataLoss) << loaded;
    EXPECT_NE(loaded.message().find("expert 2 in '" + path + "'"), std::string_view::npos)
        << loaded;
    EXPECT_NE(loaded.message().find("damaged slot header"), std::string_view::npos) << loaded;
    EXPECT_EQ(*file->Written(2), true);
    ASSERT_TRUE(FlipByte(path, newest + byte, 0x01));  // repaired
    ASSERT_TRUE(file->Load(2, got.raw, 3000, &count).ok());
    EXPECT_EQ(count, 2u);
  }
  // The older copy damaged: DataLoss too; a new version goes into the damaged slot (not the
  // newest), after which both copies are intact again.
  ASSERT_TRUE(FlipByte(path, newest - file->slot_bytes() + 32, 0x01));
  EXPECT_EQ(file->Load(2, got.raw, 3000, &count).code(), StatusCode::kDataLoss);
  ASSERT_TRUE(file->Store(2, v1.raw, 3000, 3).ok());
  ASSERT_TRUE(file->Load(2, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 3u);
  const uint64_t previous = 2;
  ASSERT_TRUE(file->Load(2, got.raw, 3000, &count, &previous).ok());
  EXPECT_EQ(std::memcmp(got.data[0], v2.data[0], 12000), 0);
}

// Every file starts with a header tying it to its store and generation: files of another
// store, older copies, renamed or swapped files and damaged headers are refused at Open,
// naming the file.
TEST_F(StateFileTest, OpenRefusesFilesOfAnotherStoreOrGeneration) {
  options_.store_id = 77;
  options_.generation = 3;
  options_.experts = 4;  // files of one size in both directories
  const std::string a = root_ + "/a/ecss-states-0.bin", b = root_ + "/b/ecss-states-1.bin";
  {
    auto file = *ExpertStateFile::Create(engine_.get(), options_);
    Arrays v(3000, 1.0f);
    ASSERT_TRUE(file->Store(0, v.raw, 3000, 1).ok());
  }
  ASSERT_TRUE(ExpertStateFile::Open(engine_.get(), options_).ok());
  auto refused = [&](const StateFileOptions& options, std::string_view why) {
    Status opened = ExpertStateFile::Open(engine_.get(), options).status();
    EXPECT_EQ(opened.code(), StatusCode::kDataLoss) << opened;
    EXPECT_NE(opened.message().find(a), std::string_view::npos) << opened;
    EXPECT_NE(opened.message().find(why), std::string_view::npos) << opened;
  };
  StateFileOptions other = options_;
  other.store_id = 78;
  refused(other, "belongs to another store (id 77; this store's is 78)");
  other = options_;
  other.generation = 4;
  refused(other, "generation 3, the store's is 4: an older copy");
  other.previous_generation = 3;  // a generation change cut short: both accepted
  ASSERT_TRUE(ExpertStateFile::Open(engine_.get(), other).ok());
  other = options_;
  other.generation = 2;
  refused(other, "newer than the store's manifest");
  {
    auto file = *ExpertStateFile::Open(engine_.get(), options_);
    ASSERT_TRUE(file->SetGeneration(4).ok());
  }
  refused(options_, "newer than the store's manifest");
  other = options_;
  other.generation = 4;
  ASSERT_TRUE(ExpertStateFile::Open(engine_.get(), other).ok());
  // Files swapped between directories, a damaged header, a slot written over the header.
  std::filesystem::rename(a, root_ + "/x");
  std::filesystem::rename(b, a);
  refused(other, "holds file 1 of 'ecss-states', not file 0");
  std::filesystem::rename(a, b);
  std::filesystem::rename(root_ + "/x", a);
  ASSERT_TRUE(ExpertStateFile::Open(engine_.get(), other).ok());
  ASSERT_TRUE(FlipByte(a, 90, 0x10));
  refused(other, "file header checksum mismatch");
  ASSERT_TRUE(FlipByte(a, 90, 0x10));
  ASSERT_TRUE(FlipByte(a, 0, 0x10));
  refused(other, "no state-file header");
}

// A Create that fails part way removes the files it made.
TEST_F(StateFileTest, AFailedCreateLeavesNoFiles) {
  options_.dirs = {root_ + "/a", root_ + "/missing"};
  EXPECT_EQ(ExpertStateFile::Create(engine_.get(), options_).status().code(),
            StatusCode::kNotFound);
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/a"));
  // And one whose header write fails.
  options_.dirs = {root_ + "/a", root_ + "/b"};
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 2;  // file b's header
  engine_->set_options(faults);
  EXPECT_FALSE(ExpertStateFile::Create(engine_.get(), options_).ok());
  engine_->set_options(FaultOptions{});
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/a"));
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/b"));
}

// Faults the drive does not report: a flipped bit in a read and a lost array write are
// DataLoss naming the expert and array, never data; a hung request fails at the engine's
// deadline naming the file. The file stays usable after each.
TEST_F(StateFileTest, SilentFaultsAreDataLossAndAHungRequestFailsAtItsDeadline) {
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v1(3000, 1.0f), v2(3000, 2.0f), got(3000, 0.0f);
  ASSERT_TRUE(file->Store(1, v1.raw, 3000, 1).ok());
  uint64_t count = 0;
  auto next = [&](Fault fault, uint64_t nth) {
    FaultOptions faults;
    faults.fault = fault;
    faults.fail_nth = engine_->counters().requests + nth;
    engine_->set_options(faults);
  };
  next(Fault::kBitFlip, 3);  // two slot headers, then master
  Status flipped = file->Load(1, got.raw, 3000, &count);
  EXPECT_EQ(flipped.code(), StatusCode::kDataLoss) << flipped;
  EXPECT_NE(flipped.message().find("expert 1"), std::string_view::npos) << flipped;
  EXPECT_NE(flipped.message().find("master checksum mismatch"), std::string_view::npos) << flipped;
  // Store reads no header (it knows the newest copy): its first request is master.
  next(Fault::kLostWrite, 2);  // moment 1 never reaches the disk
  ASSERT_TRUE(file->Store(1, v2.raw, 3000, 2).ok()) << "a lost write looks like success";
  engine_->set_options(FaultOptions{});
  Status lost = file->Load(1, got.raw, 3000, &count);
  EXPECT_EQ(lost.code(), StatusCode::kDataLoss) << lost;
  EXPECT_NE(lost.message().find("moment 1 checksum mismatch"), std::string_view::npos) << lost;
  const uint64_t previous = 1;
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count, &previous).ok()) << "version 1 is intact";
  engine_->set_request_deadline(std::chrono::milliseconds(200));
  next(Fault::kHang, 1);
  Status hung = file->Load(1, got.raw, 3000, &count);
  EXPECT_EQ(hung.code(), StatusCode::kDeadlineExceeded) << hung;
  EXPECT_NE(hung.message().find(root_ + "/b/ecss-states-1.bin"), std::string_view::npos) << hung;
  engine_->set_options(FaultOptions{});
  ASSERT_TRUE(file->Store(1, v2.raw, 3000, 3).ok());
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 3u);
  EXPECT_EQ(std::memcmp(got.raw[2], v2.raw[2], 12000), 0);
}

// An update cut short leaves one state a version ahead of the others; writing that version
// again as an update (supersede) replaces the copy written ahead, never the version before it,
// which the other states still match: a second crash mid-write leaves it readable.
TEST_F(StateFileTest, RewritingAVersionWrittenAheadKeepsTheVersionBefore) {
  options_.shadow = true;
  auto file = *ExpertStateFile::Create(engine_.get(), options_);
  Arrays v4(3000, 4.0f), ahead(3000, 5.0f), again(3000, 6.0f), got(3000, 0.0f);
  ASSERT_TRUE(file->Store(1, v4.raw, 3000, 4).ok());
  ASSERT_TRUE(file->Store(1, ahead.raw, 3000, 5).ok());  // the others stayed at 4
  FaultOptions faults;
  faults.fail_nth = engine_->counters().requests + 2;  // the retraction, then array 0: torn
  faults.torn_writes = true;
  engine_->set_options(faults);
  EXPECT_FALSE(file->Store(1, again.raw, 3000, 5, /*supersede=*/true).ok());
  engine_->set_options(FaultOptions{});
  uint64_t count = 0;
  const uint64_t four = 4;
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count, &four).ok()) << "version 4 is kept";
  EXPECT_EQ(std::memcmp(got.data[0], v4.data[0], 12000), 0);
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 4u) << "the copy written ahead is retracted";
  ASSERT_TRUE(file->Store(1, again.raw, 3000, 5, /*supersede=*/true).ok());
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count).ok());
  EXPECT_EQ(count, 5u);
  EXPECT_EQ(std::memcmp(got.data[2], again.data[2], 12000), 0);
  ASSERT_TRUE(file->Load(1, got.raw, 3000, &count, &four).ok());
}

}  // namespace
}  // namespace ecss
