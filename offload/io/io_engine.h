// IoEngine: every byte ECSS moves to or from storage goes through this interface (LevelDB's
// Env, RocksDB's async reads), so tests swap in an in-memory or fault-injecting engine.
//   Submit  never blocks: a full queue is Unavailable + retryable ("busy"), not a wait.
//   Poll    collects completions, waiting up to a timeout.
//   Cancel  best effort; a cancelled request still completes, with Cancelled.
// Deadline: with set_request_deadline, Poll cancels a request still in flight that long after
// its Submit, and it completes with DeadlineExceeded naming the file, offset and deadline (a
// hung device or a lost completion becomes an error instead of a wait without end). A request
// the engine can no longer cancel (posix: already running on a worker; uring: already at the
// device) still completes when the kernel returns it, with its real result.
// Alignment: buffer address, offset and length must be multiples of alignment() (4 KiB for
// the O_DIRECT engines, 1 for memory), checked at Submit (InvalidArgument).
// Short transfers and EINTR/EAGAIN are handled inside the engines: a completion is either the
// whole request, or an error. A read that reaches the end of the file completes with
// OutOfRange and the bytes it did transfer.
// Implementations: uring (io_uring_engine.h), posix (pread/pwrite on worker threads), memory,
// and the fault-injection wrapper. Thread-compatible: one thread drives an engine (DESIGN.md
// section 7: one submit/complete loop per engine).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

#include "runtime/base/status.h"

namespace ecss {

enum class IoOp : uint8_t { kRead, kWrite };

using IoFileId = uint32_t;

struct IoRequest {
  IoOp op = IoOp::kRead;
  IoFileId file = 0;
  uint64_t offset = 0;
  void* buffer = nullptr;
  size_t bytes = 0;
  uint64_t user_data = 0;  // returned in the completion; unique among requests in flight
};

struct IoCompletion {
  uint64_t user_data = 0;
  Status status;
  size_t bytes = 0;  // transferred
};

enum class OpenMode : uint8_t {
  kRead,       // existing file, read-only
  kReadWrite,  // existing file
  kCreate,     // create or truncate, read-write
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;

  virtual std::string_view name() const = 0;
  virtual size_t alignment() const = 0;
  virtual uint32_t queue_depth() const = 0;

  // NotFound, PermissionDenied, ... naming the path.
  virtual StatusOr<IoFileId> Open(const std::string& path, OpenMode mode) = 0;
  // The path `file` was opened with ("" for an unknown id), for errors.
  virtual std::string FilePath(IoFileId file) const = 0;
  // REQUIRES: no request on the file in flight.
  virtual Status Close(IoFileId file) = 0;
  virtual StatusOr<uint64_t> FileSize(IoFileId file) = 0;
  // Reserves `bytes` on the device (fallocate), so that running out of space is reported now,
  // not in the middle of a write: ResourceExhausted when the disk is full.
  virtual Status Allocate(IoFileId file, uint64_t bytes) = 0;
  // Sets the file's size (ftruncate) without reserving its blocks: a sparse file, whose
  // unwritten parts read as zeros and take no space until written.
  virtual Status Resize(IoFileId file, uint64_t bytes) = 0;
  // Durability of completed writes (fdatasync).
  virtual Status Sync(IoFileId file) = 0;

  // Checks the request (file, alignment, in-flight user_data) and queues it.
  Status Submit(const IoRequest& request);
  // Up to `max` completions into `out`, waiting up to `wait` for the first one.
  size_t Poll(IoCompletion* out, size_t max, std::chrono::microseconds wait);
  Status Cancel(uint64_t user_data) { return DoCancel(user_data); }
  size_t in_flight() const { return in_flight_; }
  // See "Deadline" above; zero (the default): none. Set while nothing is in flight.
  void set_request_deadline(std::chrono::microseconds deadline) { deadline_ = deadline; }
  // Reads and writes the kernel did only in part, whose rest the engine then issued (posix,
  // uring; IoEngineOptions::max_transfer_bytes makes every large request one).
  uint64_t short_transfers() const { return short_transfers_.load(std::memory_order_relaxed); }
  // Bytes of the reads and writes submitted so far (what went to the device, headers and
  // padding included). Readable from any thread.
  uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  uint64_t bytes_written() const { return bytes_written_.load(std::memory_order_relaxed); }

 protected:
  virtual Status CheckFile(IoFileId file) const = 0;
  virtual Status DoSubmit(const IoRequest& request) = 0;
  virtual size_t DoPoll(IoCompletion* out, size_t max, std::chrono::microseconds wait) = 0;
  virtual Status DoCancel(uint64_t user_data) = 0;
  void CountShortTransfer() { short_transfers_.fetch_add(1, std::memory_order_relaxed); }

 private:
  // What the deadline needs of a request in flight.
  struct Tracked {
    IoRequest request;
    std::chrono::steady_clock::time_point due;
    bool cancelled = false;
  };
  // Cancels the requests past their deadline; returns when the next one falls due.
  std::chrono::steady_clock::time_point CancelExpired();
  size_t PollWithDeadline(IoCompletion* out, size_t max, std::chrono::microseconds wait);

  size_t in_flight_ = 0;
  std::chrono::microseconds deadline_{0};
  std::unordered_map<uint64_t, Tracked> tracked_;  // by user_data, with a deadline only
  std::atomic<uint64_t> short_transfers_{0};
  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0};
};

// Synchronous helpers on top of Submit/Poll, for code that has nothing else to do meanwhile.
// They return the request's final status. FailedPrecondition when other requests are in
// flight (their completions would be taken).
Status ReadAt(IoEngine& engine, IoFileId file, uint64_t offset, void* buffer, size_t bytes);
Status WriteAt(IoEngine& engine, IoFileId file, uint64_t offset, const void* buffer, size_t bytes);

// Moves `blocks` blocks of `block` bytes of the file once (in order, or in a fixed random
// order), keeping the engine's queue depth of requests in flight from `buffers` (queue depth
// x block bytes, aligned). Returns GB/s (10^9 bytes/s): the I/O engine's own speed, as the
// bench's nvme suite and the planner's calibration measure it.
StatusOr<double> TransferGbps(IoEngine& engine, IoFileId file, IoOp op, bool random,
                              uint64_t blocks, size_t block, uint8_t* buffers);

struct IoEngineOptions;

// Sequential write and read GB/s of a drive: `bytes` in `block`-byte requests on a scratch file
// at `path` (removed after), through an engine that CreateFileIoEngine(options) makes; each
// the median of `passes`. A pass empties the file and sets its size (sparse, as a store's
// files are made), writes it (fresh_write_gbps: the file system allocates as it goes),
// writes it again (write_gbps: an overwrite, as every later store of an expert is), syncs,
// and reads it. What it writes is pseudo-random, so storage that compresses moves it as it
// moves model states (the same queue-depth blocks repeat: storage that deduplicates would
// still be flattered).
struct SequentialRates {
  double read_gbps = 0, write_gbps = 0;
  double fresh_write_gbps = 0;
};
StatusOr<SequentialRates> MeasureSequentialRates(const std::string& path,
                                                 const IoEngineOptions& options, size_t block,
                                                 uint64_t bytes, int passes);

enum class IoEngineKind : uint8_t { kUring, kPosix, kMemory };
std::string_view IoEngineKindName(IoEngineKind kind);
StatusOr<IoEngineKind> ParseIoEngineKind(std::string_view name);

struct IoEngineOptions {
  uint32_t queue_depth = 32;   // requests in flight at most (>= 1)
  bool direct = true;          // O_DIRECT for the file engines (bypass the page cache)
  uint32_t posix_threads = 4;  // worker threads of the posix engine
  // IoEngine::set_request_deadline of the engine (0: none). No single request of a healthy
  // drive takes minutes; one that does is reported rather than waited on for ever.
  std::chrono::microseconds request_deadline = std::chrono::minutes(5);
  // Each pread, pwrite or io_uring read or write moves at most this many bytes (0: the whole
  // request; with O_DIRECT a multiple of 4096), so that every larger request completes through
  // the engine's short-transfer path, as when the kernel cuts a transfer short. For tests.
  uint32_t max_transfer_bytes = 0;
};

// Unavailable when the kind cannot run here (e.g. io_uring disabled by the kernel): callers
// fall back to kPosix.
StatusOr<std::unique_ptr<IoEngine>> CreateIoEngine(IoEngineKind kind,
                                                   const IoEngineOptions& options);
// The engine for real files: io_uring where the kernel allows it, else posix.
StatusOr<std::unique_ptr<IoEngine>> CreateFileIoEngine(const IoEngineOptions& options);

// Makes the IoEngines that a component's NVMe files are read and written through (LevelDB's
// Env): tests pass one that wraps CreateFileIoEngine in a FaultInjectionIoEngine.
using IoEngineFactory = std::function<StatusOr<std::unique_ptr<IoEngine>>()>;
// factory() when given, else CreateFileIoEngine with a queue depth of 8.
StatusOr<std::unique_ptr<IoEngine>> CreateIoEngine(const IoEngineFactory& factory);

}  // namespace ecss
