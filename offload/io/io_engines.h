// The IoEngine implementations (io_engine.h) and the fault-injection wrapper.
// CreateIoEngine (io_engine.h) picks one from a setting; tests build them directly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>

#include "offload/io/io_engine.h"

namespace ecss {

// Files in memory, shared by every memory engine of the process. Alignment 1.
std::unique_ptr<IoEngine> CreateMemoryIoEngine(uint32_t queue_depth);
// pread/pwrite on `threads` worker threads; the fallback where io_uring is unavailable.
std::unique_ptr<IoEngine> CreatePosixIoEngine(const IoEngineOptions& options);
// io_uring with O_DIRECT, registered files and (RegisterBuffers) registered buffers; requests
// are submitted in batches at Poll. Unavailable when the kernel refuses io_uring.
StatusOr<std::unique_ptr<IoEngine>> CreateUringIoEngine(const IoEngineOptions& options);
// Registers buffer regions (e.g. the pinned pool's slab) with an io_uring engine, so that
// requests inside them use fixed-buffer reads and writes. InvalidArgument for other engines.
Status RegisterIoBuffers(IoEngine& engine, void* base, size_t bytes);

// What happens to a request that FaultOptions::fail_nth or fail_one_in picks.
enum class Fault : uint8_t {
  kEio,        // fails with EIO (with torn_writes, a write first writes half its data)
  kBitFlip,    // a read completes, with one bit of its data flipped (rot the drive missed);
               // a write goes through unharmed
  kLostWrite,  // a write completes as written, and nothing reaches the file; a read goes
               // through
  kHang,       // never completes, until cancelled (a hung device; see the deadline in
               // io_engine.h)
};

struct FaultOptions {
  uint64_t fail_nth = 0;  // the Nth request (1-based, reads and writes) suffers `fault`; 0: never
  uint32_t fail_one_in = 0;  // each request suffers `fault` with probability 1/N; 0: never
  Fault fault = Fault::kEio;
  uint64_t enospc_after_bytes =
      UINT64_MAX;            // writes past this many bytes in total fail with ENOSPC
  bool torn_writes = false;  // a failing write first writes half its data (a crash mid-write)
  bool split_reads = false;  // every read reaches the inner engine as two halves
  uint32_t latency_us = 0;   // completions are held at least this long after submission
  bool fail_sync = false;    // Sync fails with EIO (fdatasync reporting a lost write-back)
  uint64_t seed = 1;         // for fail_one_in
};

struct FaultCounters {
  uint64_t requests = 0;
  uint64_t injected_eio = 0;
  uint64_t injected_enospc = 0;
  uint64_t torn_writes = 0;
  uint64_t bit_flips = 0;
  uint64_t lost_writes = 0;
  uint64_t hung = 0;
};

// Wraps `inner` and injects the faults of `options`. The faults are real: a torn write leaves
// the first half written; an injected error leaves the request's buffer unread or unwritten;
// a flipped bit is in the buffer the read hands back; a lost write never reaches the file.
class FaultInjectionIoEngine : public IoEngine {
 public:
  FaultInjectionIoEngine(std::unique_ptr<IoEngine> inner, const FaultOptions& options);
  ~FaultInjectionIoEngine() override;

  void set_options(const FaultOptions& options);
  FaultCounters counters() const;
  IoEngine& inner() { return *inner_; }

  std::string_view name() const override { return "fault-injection"; }
  size_t alignment() const override { return inner_->alignment(); }
  // Half the inner engine's: a split read takes two of its slots.
  uint32_t queue_depth() const override { return std::max(1u, inner_->queue_depth() / 2); }
  StatusOr<IoFileId> Open(const std::string& path, OpenMode mode) override {
    return inner_->Open(path, mode);
  }
  std::string FilePath(IoFileId file) const override { return inner_->FilePath(file); }
  Status Close(IoFileId file) override { return inner_->Close(file); }
  StatusOr<uint64_t> FileSize(IoFileId file) override { return inner_->FileSize(file); }
  Status Allocate(IoFileId file, uint64_t bytes) override;
  Status Resize(IoFileId file, uint64_t bytes) override { return inner_->Resize(file, bytes); }
  Status Sync(IoFileId file) override;

 protected:
  Status CheckFile(IoFileId file) const override;
  Status DoSubmit(const IoRequest& request) override;
  size_t DoPoll(IoCompletion* out, size_t max, std::chrono::microseconds wait) override;
  Status DoCancel(uint64_t user_data) override;

 private:
  struct State;
  std::unique_ptr<IoEngine> inner_;
  std::unique_ptr<State> state_;
};

}  // namespace ecss
