// IoEngine conformance over every engine, and fault injection: every injected error surfaces
// as a Status naming what failed, nothing corrupt is returned as good data, and the engine
// stays usable.
#include "offload/io/io_engine.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"

namespace ecss {
namespace {

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes)
      : data(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes))), size(bytes) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data;
  size_t size;
};

void Fill(uint8_t* data, size_t bytes, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 7;
  for (size_t i = 0; i < bytes; ++i) {
    x = x * 1664525u + 1013904223u;
    data[i] = static_cast<uint8_t>(x >> 24);
  }
}

struct EngineUnderTest {
  std::string name;
  std::function<StatusOr<std::unique_ptr<IoEngine>>()> create;
};
void PrintTo(const EngineUnderTest& e, std::ostream* out) { *out << e.name; }

class IoEngineConformanceTest : public ::testing::TestWithParam<EngineUnderTest> {
 protected:
  void SetUp() override {
    StatusOr<std::unique_ptr<IoEngine>> created = GetParam().create();
    if (created.status().code() == StatusCode::kUnavailable) GTEST_SKIP() << created.status();
    ASSERT_TRUE(created.ok()) << created.status();
    engine_ = std::move(created).value();
    std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (char& c : test) c = c == '/' ? '_' : c;  // parameterised names contain '/'
    path_ = ::testing::TempDir() + "/ecss_io_" + test;
  }
  void TearDown() override {
    engine_.reset();
    ::unlink(path_.c_str());
  }
  std::unique_ptr<IoEngine> engine_;
  std::string path_;
};

TEST_P(IoEngineConformanceTest, WriteThenReadBackManySizes) {
  StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kCreate);
  ASSERT_TRUE(file.ok()) << file.status();
  AlignedBuffer out(8 << 20), in(8 << 20);
  uint64_t offset = 0;
  uint32_t seed = 0;
  for (size_t bytes : {size_t{4096}, size_t{8192}, size_t{1} << 20, size_t{3} << 20}) {
    Fill(out.data, bytes, ++seed);
    ASSERT_TRUE(WriteAt(*engine_, *file, offset, out.data, bytes).ok());
    std::memset(in.data, 0, bytes);
    ASSERT_TRUE(ReadAt(*engine_, *file, offset, in.data, bytes).ok());
    ASSERT_EQ(std::memcmp(in.data, out.data, bytes), 0) << bytes;
    offset += bytes;
  }
  EXPECT_EQ(*engine_->FileSize(*file), offset);
  ASSERT_TRUE(engine_->Sync(*file).ok());
  ASSERT_TRUE(engine_->Close(*file).ok());
  // Reopened, the data is there.
  StatusOr<IoFileId> again = engine_->Open(path_, OpenMode::kRead);
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE(ReadAt(*engine_, *again, offset - (3 << 20), in.data, 3 << 20).ok());
  EXPECT_EQ(std::memcmp(in.data, out.data, 3 << 20), 0);
}

TEST_P(IoEngineConformanceTest, QueueFullIsRetryableAndEveryRequestCompletesOnce) {
  StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kCreate);
  ASSERT_TRUE(file.ok());
  const uint32_t depth = engine_->queue_depth();
  const size_t block = 64 << 10;
  AlignedBuffer buffer(block * (depth + 1));
  Fill(buffer.data, buffer.size, 3);
  for (uint32_t i = 0; i < depth; ++i) {
    ASSERT_TRUE(
        engine_->Submit({IoOp::kWrite, *file, i * block, buffer.data + i * block, block, 100 + i})
            .ok());
  }
  Status busy = engine_->Submit(
      {IoOp::kWrite, *file, depth * block, buffer.data + depth * block, block, 999});
  EXPECT_EQ(busy.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(busy.retryable());
  std::multiset<uint64_t> seen;
  IoCompletion completions[8];
  while (seen.size() < depth) {
    const size_t n = engine_->Poll(completions, 8, std::chrono::seconds(5));
    ASSERT_GT(n, 0u) << "timed out";
    for (size_t i = 0; i < n; ++i) {
      ASSERT_TRUE(completions[i].status.ok()) << completions[i].status;
      EXPECT_EQ(completions[i].bytes, block);
      seen.insert(completions[i].user_data);
    }
  }
  for (uint32_t i = 0; i < depth; ++i) EXPECT_EQ(seen.count(100 + i), 1u);
  EXPECT_EQ(engine_->in_flight(), 0u);
  EXPECT_EQ(engine_->Poll(completions, 8, std::chrono::microseconds(0)), 0u);
  // Read everything back in one batch.
  AlignedBuffer check(block * depth);
  for (uint32_t i = 0; i < depth; ++i) {
    ASSERT_TRUE(
        engine_->Submit({IoOp::kRead, *file, i * block, check.data + i * block, block, i}).ok());
  }
  size_t done = 0;
  while (done < depth) done += engine_->Poll(completions, 8, std::chrono::seconds(5));
  EXPECT_EQ(std::memcmp(check.data, buffer.data, block * depth), 0);
}

TEST_P(IoEngineConformanceTest, BadRequestsAreRefusedUpFront) {
  StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kCreate);
  ASSERT_TRUE(file.ok());
  AlignedBuffer buffer(16384);
  EXPECT_EQ(engine_->Submit({IoOp::kRead, 77, 0, buffer.data, 4096, 1}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Submit({IoOp::kRead, *file, 0, nullptr, 4096, 1}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Submit({IoOp::kRead, *file, 0, buffer.data, 0, 1}).code(),
            StatusCode::kInvalidArgument);
  if (engine_->alignment() > 1) {
    Status misaligned = engine_->Submit({IoOp::kWrite, *file, 100, buffer.data, 4096, 1});
    EXPECT_EQ(misaligned.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(misaligned.message().find("not aligned"), std::string_view::npos) << misaligned;
    EXPECT_EQ(engine_->Submit({IoOp::kWrite, *file, 0, buffer.data + 8, 4096, 1}).code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(engine_->Submit({IoOp::kWrite, *file, 0, buffer.data, 1000, 1}).code(),
              StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(engine_->in_flight(), 0u) << "nothing refused was queued";
  Status missing = engine_->Open(path_ + "/no/such/dir", OpenMode::kRead).status();
  EXPECT_FALSE(missing.ok());
  if (GetParam().name != "memory") {  // memory files have no directories
    EXPECT_EQ(engine_->Open("/nonexistent-ecss-dir/file", OpenMode::kCreate).status().code(),
              StatusCode::kNotFound);
  }
  EXPECT_EQ(engine_->FileSize(55).status().code(), StatusCode::kInvalidArgument);
}

TEST_P(IoEngineConformanceTest, ReadPastTheEndIsOutOfRangeWithTheBytesThatExist) {
  StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kCreate);
  ASSERT_TRUE(file.ok());
  AlignedBuffer buffer(16384);
  Fill(buffer.data, 8192, 5);
  ASSERT_TRUE(WriteAt(*engine_, *file, 0, buffer.data, 8192).ok());
  AlignedBuffer in(16384);
  ASSERT_TRUE(engine_->Submit({IoOp::kRead, *file, 4096, in.data, 8192, 42}).ok());
  IoCompletion completion;
  while (engine_->Poll(&completion, 1, std::chrono::seconds(5)) == 0) {
  }
  EXPECT_EQ(completion.user_data, 42u);
  EXPECT_EQ(completion.status.code(), StatusCode::kOutOfRange) << completion.status;
  EXPECT_EQ(completion.bytes, 4096u);
  EXPECT_EQ(std::memcmp(in.data, buffer.data + 4096, 4096), 0);
}

TEST_P(IoEngineConformanceTest, ReadOnlyFilesRefuseWrites) {
  {
    StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kCreate);
    ASSERT_TRUE(file.ok());
    ASSERT_TRUE(engine_->Allocate(*file, 1 << 20).ok());
    EXPECT_GE(*engine_->FileSize(*file), uint64_t{1} << 20);
    ASSERT_TRUE(engine_->Close(*file).ok());
  }
  StatusOr<IoFileId> file = engine_->Open(path_, OpenMode::kRead);
  ASSERT_TRUE(file.ok());
  AlignedBuffer buffer(4096);
  Status write = WriteAt(*engine_, *file, 0, buffer.data, 4096);
  EXPECT_FALSE(write.ok());
  EXPECT_TRUE(ReadAt(*engine_, *file, 0, buffer.data, 4096).ok()) << "the engine stays usable";
}

IoEngineOptions Options() {
  IoEngineOptions options;
  options.queue_depth = 8;
  return options;
}

INSTANTIATE_TEST_SUITE_P(
    Engines, IoEngineConformanceTest,
    ::testing::Values(
        EngineUnderTest{"memory", [] { return CreateIoEngine(IoEngineKind::kMemory, Options()); }},
        EngineUnderTest{"posix", [] { return CreateIoEngine(IoEngineKind::kPosix, Options()); }},
        EngineUnderTest{"uring", [] { return CreateIoEngine(IoEngineKind::kUring, Options()); }},
        EngineUnderTest{"faults_off_posix",
                        []() -> StatusOr<std::unique_ptr<IoEngine>> {
                          FaultOptions none;
                          none.split_reads = true;  // reads arrive as two halves
                          none.latency_us = 100;
                          return std::unique_ptr<IoEngine>(std::make_unique<FaultInjectionIoEngine>(
                              CreatePosixIoEngine(Options()), none));
                        }}),
    [](const ::testing::TestParamInfo<EngineUnderTest>& param_info) {
      return param_info.param.name;
    });

// ---- Fault injection -----------------------------------------------------------------------

class FaultInjectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/ecss_faults_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    engine_ =
        std::make_unique<FaultInjectionIoEngine>(CreatePosixIoEngine(Options()), FaultOptions{});
    file_ = *engine_->Open(path_, OpenMode::kCreate);
  }
  void TearDown() override {
    engine_.reset();
    ::unlink(path_.c_str());
  }
  std::string path_;
  std::unique_ptr<FaultInjectionIoEngine> engine_;
  IoFileId file_ = 0;
};

TEST_F(FaultInjectionTest, NthRequestFailsWithEioAndNothingElse) {
  AlignedBuffer data(4 * 4096), in(4096);
  Fill(data.data, data.size, 9);
  FaultOptions options;
  options.fail_nth = 3;
  engine_->set_options(options);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, 4096).ok());            // 1
  ASSERT_TRUE(WriteAt(*engine_, file_, 4096, data.data + 4096, 4096).ok());  // 2
  std::memset(in.data, 0xEE, 4096);
  Status failed = ReadAt(*engine_, file_, 0, in.data, 4096);  // 3
  EXPECT_EQ(failed.code(), StatusCode::kUnavailable);
  EXPECT_EQ(failed.sys_errno(), EIO);
  EXPECT_NE(failed.message().find("read of 4096 bytes at offset 0"), std::string_view::npos)
      << failed;
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(in.data[i], 0xEE) << "no data delivered with the error";
  ASSERT_TRUE(ReadAt(*engine_, file_, 0, in.data, 4096).ok()) << "the engine stays usable";
  EXPECT_EQ(std::memcmp(in.data, data.data, 4096), 0);
  EXPECT_EQ(engine_->counters().injected_eio, 1u);
}

TEST_F(FaultInjectionTest, OneInNFailsAboutThatOften) {
  FaultOptions options;
  options.fail_one_in = 4;
  options.seed = 17;
  engine_->set_options(options);
  AlignedBuffer data(4096);
  int failures = 0;
  for (int i = 0; i < 400; ++i)
    failures += WriteAt(*engine_, file_, 0, data.data, 4096).ok() ? 0 : 1;
  EXPECT_EQ(static_cast<uint64_t>(failures), engine_->counters().injected_eio);
  EXPECT_GT(failures, 60);
  EXPECT_LT(failures, 140);
}

TEST_F(FaultInjectionTest, DiskFullIsResourceExhausted) {
  FaultOptions options;
  options.enospc_after_bytes = 8192;
  engine_->set_options(options);
  AlignedBuffer data(3 * 4096);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, 8192).ok());
  Status full = WriteAt(*engine_, file_, 8192, data.data, 4096);
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(full.sys_errno(), ENOSPC);
  EXPECT_EQ(engine_->Allocate(file_, 1 << 20).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(*engine_->FileSize(file_), 8192u) << "the refused write wrote nothing";
}

TEST_F(FaultInjectionTest, TornWriteLeavesHalfAndReportsTheError) {
  AlignedBuffer old_data(4 * 4096), new_data(4 * 4096), in(4 * 4096);
  Fill(old_data.data, old_data.size, 1);
  Fill(new_data.data, new_data.size, 2);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, old_data.data, old_data.size).ok());
  FaultOptions options;
  options.fail_nth = 2;  // the next request
  options.torn_writes = true;
  engine_->set_options(options);
  Status torn = WriteAt(*engine_, file_, 0, new_data.data, new_data.size);
  EXPECT_EQ(torn.sys_errno(), EIO);
  options.fail_nth = 0;
  engine_->set_options(options);
  ASSERT_TRUE(ReadAt(*engine_, file_, 0, in.data, in.size).ok());
  EXPECT_EQ(std::memcmp(in.data, new_data.data, 2 * 4096), 0) << "the first half landed";
  EXPECT_EQ(std::memcmp(in.data + 2 * 4096, old_data.data + 2 * 4096, 2 * 4096), 0)
      << "the rest did not";
  EXPECT_EQ(engine_->counters().torn_writes, 1u);
}

TEST_F(FaultInjectionTest, LatencyIsALowerBound) {
  FaultOptions options;
  options.latency_us = 20000;
  engine_->set_options(options);
  AlignedBuffer data(4096);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, 4096).ok());
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::microseconds(20000));
}

// ---- Every fault on every engine ------------------------------------------------------------

// The fault-injection wrapper over each real engine (uring skips where the kernel refuses it),
// and each engine's own short-transfer path.
class FaultsOnEveryEngineTest : public ::testing::TestWithParam<IoEngineKind> {
 protected:
  void SetUp() override {
    IoEngineOptions options = Options();
    options.max_transfer_bytes = 4096;  // every larger request goes through the short path
    StatusOr<std::unique_ptr<IoEngine>> inner = CreateIoEngine(GetParam(), options);
    if (inner.status().code() == StatusCode::kUnavailable) GTEST_SKIP() << inner.status();
    ASSERT_TRUE(inner.ok()) << inner.status();
    engine_ = std::make_unique<FaultInjectionIoEngine>(std::move(inner).value(), FaultOptions{});
    std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (char& c : test) c = c == '/' ? '_' : c;  // parameterised names contain '/'
    path_ = ::testing::TempDir() + "/ecss_every_fault_" + test;
    file_ = *engine_->Open(path_, OpenMode::kCreate);
  }
  void TearDown() override {
    engine_.reset();
    ::unlink(path_.c_str());
  }
  // The next request suffers `fault`.
  void Next(Fault fault) {
    FaultOptions options;
    options.fault = fault;
    options.fail_nth = engine_->counters().requests + 1;
    engine_->set_options(options);
  }
  std::string path_;
  std::unique_ptr<FaultInjectionIoEngine> engine_;
  IoFileId file_ = 0;
};

TEST_P(FaultsOnEveryEngineTest, AFlippedBitIsInTheDataReadAndNowhereElse) {
  AlignedBuffer data(4 * 4096), in(4 * 4096);
  Fill(data.data, data.size, 3);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, data.size).ok());
  Next(Fault::kBitFlip);
  ASSERT_TRUE(ReadAt(*engine_, file_, 0, in.data, in.size).ok()) << "rot reads as success";
  int bits = 0;
  for (size_t i = 0; i < in.size; ++i) bits += __builtin_popcount(in.data[i] ^ data.data[i]);
  EXPECT_EQ(bits, 1);
  EXPECT_EQ(engine_->counters().bit_flips, 1u);
  ASSERT_TRUE(ReadAt(*engine_, file_, 0, in.data, in.size).ok());
  EXPECT_EQ(std::memcmp(in.data, data.data, in.size), 0) << "the file itself is intact";
}

TEST_P(FaultsOnEveryEngineTest, ALostWriteSucceedsAndLeavesTheOldData) {
  AlignedBuffer old_data(2 * 4096), new_data(2 * 4096), in(2 * 4096);
  Fill(old_data.data, old_data.size, 4);
  Fill(new_data.data, new_data.size, 5);
  ASSERT_TRUE(WriteAt(*engine_, file_, 4096, old_data.data, old_data.size).ok());
  Next(Fault::kLostWrite);
  ASSERT_TRUE(WriteAt(*engine_, file_, 4096, new_data.data, new_data.size).ok());
  ASSERT_TRUE(ReadAt(*engine_, file_, 4096, in.data, in.size).ok());
  EXPECT_EQ(std::memcmp(in.data, old_data.data, in.size), 0);
  EXPECT_EQ(engine_->counters().lost_writes, 1u);
}

// A hung request fails with DeadlineExceeded naming the file and offset once the engine's
// deadline passes (cancelled, so it never completes later), and the engine goes on.
TEST_P(FaultsOnEveryEngineTest, AHungRequestFailsAtTheDeadlineNamingFileAndOffset) {
  engine_->set_request_deadline(std::chrono::milliseconds(300));
  AlignedBuffer data(2 * 4096), in(2 * 4096);
  Fill(data.data, data.size, 6);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, data.size).ok()) << "in time: fine";
  Next(Fault::kHang);
  Status hung = ReadAt(*engine_, file_, 4096, in.data, 4096);
  EXPECT_EQ(hung.code(), StatusCode::kDeadlineExceeded) << hung;
  EXPECT_NE(hung.message().find("read of 4096 bytes at offset 4096 of '" + path_ + "'"),
            std::string_view::npos)
      << hung;
  EXPECT_NE(hung.message().find("within 300 ms"), std::string_view::npos) << hung;
  EXPECT_EQ(engine_->counters().hung, 1u);
  EXPECT_EQ(engine_->in_flight(), 0u);
  ASSERT_TRUE(ReadAt(*engine_, file_, 0, in.data, in.size).ok()) << "the engine stays usable";
  EXPECT_EQ(std::memcmp(in.data, data.data, in.size), 0);
}

TEST_P(FaultsOnEveryEngineTest, AFailedSyncIsAnErrorAndTheNextOneWorks) {
  AlignedBuffer data(4096);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, data.size).ok());
  FaultOptions options;
  options.fail_sync = true;
  engine_->set_options(options);
  Status failed = engine_->Sync(file_);
  EXPECT_EQ(failed.sys_errno(), EIO) << failed;
  engine_->set_options(FaultOptions{});
  EXPECT_TRUE(engine_->Sync(file_).ok());
}

// Reads and writes in the middle of a file that the kernel moves 4 KiB at a time arrive whole,
// through each engine's short-transfer path.
TEST_P(FaultsOnEveryEngineTest, ShortTransfersMidFileCompleteWhole) {
  AlignedBuffer data(64 * 4096), in(16 * 4096);
  Fill(data.data, data.size, 7);
  ASSERT_TRUE(WriteAt(*engine_, file_, 0, data.data, data.size).ok());
  std::memset(in.data, 0, in.size);
  ASSERT_TRUE(ReadAt(*engine_, file_, 20 * 4096, in.data, in.size).ok());
  EXPECT_EQ(std::memcmp(in.data, data.data + 20 * 4096, in.size), 0);
  if (GetParam() != IoEngineKind::kMemory) {  // no system calls to cut short
    EXPECT_EQ(engine_->inner().short_transfers(), 63u + 15u) << "one per 4 KiB after the first";
  }
}

// A request that really hangs inside io_uring (a read of an empty FIFO, which no data ever
// reaches) is cancelled at the deadline through the ring: DeadlineExceeded, and the ring
// goes on.
TEST(IoEngineDeadlineTest, AReadHungInTheKernelIsCancelledThroughTheRing) {
  IoEngineOptions options = Options();
  options.direct = false;  // a FIFO has no O_DIRECT
  options.request_deadline = std::chrono::milliseconds(200);
  StatusOr<std::unique_ptr<IoEngine>> engine = CreateIoEngine(IoEngineKind::kUring, options);
  if (engine.status().code() == StatusCode::kUnavailable) GTEST_SKIP() << engine.status();
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::string fifo = ::testing::TempDir() + "/ecss_hung_fifo";
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const IoFileId file = *(*engine)->Open(fifo, OpenMode::kReadWrite);  // no writer waits
  AlignedBuffer in(4096);
  Status hung = ReadAt(**engine, file, 0, in.data, in.size);
  EXPECT_EQ(hung.code(), StatusCode::kDeadlineExceeded) << hung;
  EXPECT_NE(hung.message().find(fifo), std::string_view::npos) << hung;
  EXPECT_EQ((*engine)->in_flight(), 0u);
  ASSERT_TRUE((*engine)->Close(file).ok());
  const std::string plain = fifo + ".bin";
  const IoFileId next = *(*engine)->Open(plain, OpenMode::kCreate);
  EXPECT_TRUE(WriteAt(**engine, next, 0, in.data, in.size).ok()) << "the ring goes on";
  engine->reset();
  ::unlink(fifo.c_str());
  ::unlink(plain.c_str());
}

INSTANTIATE_TEST_SUITE_P(Engines, FaultsOnEveryEngineTest,
                         ::testing::Values(IoEngineKind::kMemory, IoEngineKind::kPosix,
                                           IoEngineKind::kUring),
                         [](const ::testing::TestParamInfo<IoEngineKind>& param_info) {
                           return std::string(IoEngineKindName(param_info.param));
                         });

// The drive's rates as the bench and the planner measure them: a first write into a sparse
// file, an overwrite and a read, each positive; the scratch file is gone after; a block that
// is not a multiple of 4 KiB is refused before anything is written.
TEST(SequentialRatesTest, MeasuresFreshWritesOverwritesAndReadsAndLeavesNothing) {
  const std::string path = ::testing::TempDir() + "/ecss_rates_test.dat";
  IoEngineOptions options;
  options.queue_depth = 4;
  StatusOr<SequentialRates> rates = MeasureSequentialRates(path, options, 1 << 20, 8 << 20, 2);
  ASSERT_TRUE(rates.ok()) << rates.status();
  EXPECT_GT(rates->fresh_write_gbps, 0);
  EXPECT_GT(rates->write_gbps, 0);
  EXPECT_GT(rates->read_gbps, 0);
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "the scratch file is removed";
  EXPECT_EQ(MeasureSequentialRates(path, options, 1000, 8 << 20, 1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
}

TEST(IoEngineFactoryTest, Kinds) {
  EXPECT_EQ(*ParseIoEngineKind("uring"), IoEngineKind::kUring);
  EXPECT_EQ(ParseIoEngineKind("aio").status().code(), StatusCode::kInvalidArgument);
  IoEngineOptions zero;
  zero.queue_depth = 0;
  EXPECT_EQ(CreateIoEngine(IoEngineKind::kPosix, zero).status().code(),
            StatusCode::kInvalidArgument);
  std::unique_ptr<IoEngine> memory = CreateMemoryIoEngine(4);
  uint8_t byte = 0;
  EXPECT_EQ(RegisterIoBuffers(*memory, &byte, 1).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ecss
