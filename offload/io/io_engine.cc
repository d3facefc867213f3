#include "offload/io/io_engine.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <vector>

#include "offload/io/io_engines.h"
#include "runtime/base/median.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/arena_allocator.h"

namespace ecss {

Status IoEngine::Submit(const IoRequest& request) {
  ECSS_RETURN_IF_ERROR(CheckFile(request.file));
  const size_t align = alignment();
  if (request.buffer == nullptr || request.bytes == 0) {
    return InvalidArgumentError(
        StrCat(name(), ": request ", request.user_data, " has no buffer or no bytes"));
  }
  if (reinterpret_cast<uintptr_t>(request.buffer) % align != 0 || request.offset % align != 0 ||
      request.bytes % align != 0) {
    return InvalidArgumentError(StrCat(name(), ": request ", request.user_data, " (", request.bytes,
                                       " bytes at offset ", request.offset, ", buffer ",
                                       request.buffer, ") is not aligned to ", align, " bytes"));
  }
  if (in_flight_ >= queue_depth()) {
    return UnavailableError(StrCat(name(), ": queue full (", queue_depth(), " in flight)"))
        .WithRetryable(true);
  }
  if (deadline_.count() > 0 && tracked_.count(request.user_data) != 0) {
    return InvalidArgumentError(
        StrCat(name(), ": request ", request.user_data, " is already in flight"));
  }
  ECSS_RETURN_IF_ERROR(DoSubmit(request));
  ++in_flight_;
  if (deadline_.count() > 0) {
    tracked_[request.user_data] = {request, std::chrono::steady_clock::now() + deadline_, false};
  }
  (request.op == IoOp::kRead ? bytes_read_ : bytes_written_)
      .fetch_add(request.bytes, std::memory_order_relaxed);
  return Status::Ok();
}

size_t IoEngine::Poll(IoCompletion* out, size_t max, std::chrono::microseconds wait) {
  if (max == 0 || in_flight_ == 0) return 0;
  const size_t n =
      deadline_.count() > 0 ? PollWithDeadline(out, max, wait) : DoPoll(out, max, wait);
  in_flight_ -= n;
  return n;
}

std::chrono::steady_clock::time_point IoEngine::CancelExpired() {
  const auto now = std::chrono::steady_clock::now();
  auto next = std::chrono::steady_clock::time_point::max();
  for (auto& [user_data, tracked] : tracked_) {
    if (tracked.cancelled) continue;
    if (tracked.due > now) {
      next = std::min(next, tracked.due);
      continue;
    }
    // NotFound: past cancelling (running, or at the device); it completes as the kernel says.
    // Busy: the cancel is retried at the next Poll.
    const Status cancelled = DoCancel(user_data);
    tracked.cancelled = cancelled.ok() || !cancelled.retryable();
    if (!tracked.cancelled) next = now;
  }
  return next;
}

size_t IoEngine::PollWithDeadline(IoCompletion* out, size_t max, std::chrono::microseconds wait) {
  using Clock = std::chrono::steady_clock;
  const auto until = Clock::now() + wait;
  while (true) {
    const auto wake = std::min(until, CancelExpired());
    const auto slice =
        std::max(std::chrono::microseconds(0),
                 std::chrono::duration_cast<std::chrono::microseconds>(wake - Clock::now()));
    const size_t n = DoPoll(out, max, slice);
    for (size_t i = 0; i < n; ++i) {
      auto found = tracked_.find(out[i].user_data);
      if (found == tracked_.end()) continue;
      const Tracked& t = found->second;
      if (t.cancelled && out[i].status.code() == StatusCode::kCancelled) {
        out[i].status = DeadlineExceededError(StrCat(
            name(), ": ", t.request.op == IoOp::kRead ? "read" : "write", " of ", t.request.bytes,
            " bytes at offset ", t.request.offset, " of '", FilePath(t.request.file),
            "' did not complete within ", deadline_.count() / 1000, " ms; cancelled"));
      }
      tracked_.erase(found);
    }
    if (n > 0 || Clock::now() >= until) return n;
  }
}

namespace {
Status Transfer(IoEngine& engine, IoOp op, IoFileId file, uint64_t offset, void* buffer,
                size_t bytes) {
  if (engine.in_flight() != 0) {
    return FailedPreconditionError(StrCat(engine.name(), ": synchronous transfer while ",
                                          engine.in_flight(), " requests are in flight"));
  }
  ECSS_RETURN_IF_ERROR(engine.Submit(IoRequest{op, file, offset, buffer, bytes, 0}));
  IoCompletion completion;
  while (engine.Poll(&completion, 1, std::chrono::seconds(1)) == 0) {
  }
  return completion.status;
}
}  // namespace

Status ReadAt(IoEngine& engine, IoFileId file, uint64_t offset, void* buffer, size_t bytes) {
  return Transfer(engine, IoOp::kRead, file, offset, buffer, bytes);
}

Status WriteAt(IoEngine& engine, IoFileId file, uint64_t offset, const void* buffer, size_t bytes) {
  return Transfer(engine, IoOp::kWrite, file, offset, const_cast<void*>(buffer), bytes);
}

std::string_view IoEngineKindName(IoEngineKind kind) {
  switch (kind) {
    case IoEngineKind::kUring:
      return "uring";
    case IoEngineKind::kPosix:
      return "posix";
    case IoEngineKind::kMemory:
      return "memory";
  }
  return "invalid";
}

StatusOr<IoEngineKind> ParseIoEngineKind(std::string_view name) {
  for (IoEngineKind kind : {IoEngineKind::kUring, IoEngineKind::kPosix, IoEngineKind::kMemory}) {
    if (IoEngineKindName(kind) == name) return kind;
  }
  return InvalidArgumentError(StrCat("unknown io engine '", name, "' (uring, posix, memory)"));
}

StatusOr<std::unique_ptr<IoEngine>> CreateIoEngine(IoEngineKind kind,
                                                   const IoEngineOptions& options) {
  if (options.queue_depth == 0) return InvalidArgumentError("io engine queue_depth must be >= 1");
  if (options.direct && options.max_transfer_bytes % 4096 != 0) {
    return InvalidArgumentError(StrCat("io engine max_transfer_bytes ", options.max_transfer_bytes,
                                       " is not a multiple of 4096 (O_DIRECT)"));
  }
  StatusOr<std::unique_ptr<IoEngine>> engine = InvalidArgumentError("unknown io engine kind");
  switch (kind) {
    case IoEngineKind::kUring:
      engine = CreateUringIoEngine(options);
      break;
    case IoEngineKind::kPosix:
      engine = CreatePosixIoEngine(options);
      break;
    case IoEngineKind::kMemory:
      engine = CreateMemoryIoEngine(options.queue_depth);
      break;
  }
  if (engine.ok()) (*engine)->set_request_deadline(options.request_deadline);
  return engine;
}

StatusOr<std::unique_ptr<IoEngine>> CreateFileIoEngine(const IoEngineOptions& options) {
  StatusOr<std::unique_ptr<IoEngine>> engine = CreateIoEngine(IoEngineKind::kUring, options);
  if (engine.ok() || engine.status().code() != StatusCode::kUnavailable) return engine;
  return CreateIoEngine(IoEngineKind::kPosix, options);  // io_uring disabled here
}

StatusOr<std::unique_ptr<IoEngine>> CreateIoEngine(const IoEngineFactory& factory) {
  if (factory) return factory();
  IoEngineOptions options;
  options.queue_depth = 8;
  return CreateFileIoEngine(options);
}

StatusOr<double> TransferGbps(IoEngine& engine, IoFileId file, IoOp op, bool random,
                              uint64_t blocks, size_t block, uint8_t* buffers) {
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  if (random) {
    CounterRng rng(7, 7);
    for (uint64_t i = blocks - 1; i > 0; --i) {
      std::swap(order[i], order[rng.Uniform(static_cast<uint32_t>(i + 1))]);
    }
  }
  const uint32_t depth = engine.queue_depth();
  std::vector<uint32_t> free_slots;
  for (uint32_t s = 0; s < depth; ++s) free_slots.push_back(s);
  uint64_t next = 0, done = 0;
  std::vector<IoCompletion> completions(depth);
  const auto start = std::chrono::steady_clock::now();
  while (done < blocks) {
    while (next < blocks && !free_slots.empty()) {
      const uint32_t slot = free_slots.back();
      const Status submitted =
          engine.Submit({op, file, order[next] * block, buffers + static_cast<size_t>(slot) * block,
                         block, slot});
      if (!submitted.ok()) {
        if (submitted.retryable()) break;
        return submitted;
      }
      free_slots.pop_back();
      ++next;
    }
    const size_t n = engine.Poll(completions.data(), completions.size(), std::chrono::seconds(10));
    for (size_t i = 0; i < n; ++i) {
      if (!completions[i].status.ok()) return completions[i].status;
      free_slots.push_back(static_cast<uint32_t>(completions[i].user_data));
      ++done;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(blocks * block) / seconds / 1e9;
}

StatusOr<SequentialRates> MeasureSequentialRates(const std::string& path,
                                                 const IoEngineOptions& options, size_t block,
                                                 uint64_t bytes, int passes) {
  if (block == 0 || block % 4096 != 0 || passes < 1) {
    return InvalidArgumentError("rate measurement: block a multiple of 4 KiB, passes >= 1");
  }
  // The buffers outlive the engine (declared first): it drains what is in flight as it goes.
  std::unique_ptr<ArenaAllocator> memory;
  Buffer buffers;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> engine, CreateFileIoEngine(options));
  // The same kind of memory as the pinned pools' staging (huge-page-backed where the kernel
  // allows), so the rates are what the store's own transfers can reach.
  ArenaOptions arena;
  arena.name = "rate measurement buffers";
  arena.capacity_bytes = size_t{engine->queue_depth()} * block;
  arena.alignment = 4096;
  arena.huge_pages = true;
  ECSS_ASSIGN_OR_RETURN(memory, ArenaAllocator::Create(arena));
  ECSS_ASSIGN_OR_RETURN(buffers, memory->Allocate(arena.capacity_bytes, MemoryTag::kStaging));
  CounterRng(1, 1).FillBytes(buffers.data(), buffers.size());  // incompressible, as fio's
  auto* data = buffers.as<uint8_t>();
  ECSS_ASSIGN_OR_RETURN(IoFileId file, engine->Open(path, OpenMode::kCreate));
  const uint64_t blocks = std::max<uint64_t>(1, bytes / block);
  std::vector<double> reads, writes, fresh_writes;
  auto measure = [&]() -> Status {
    for (int pass = 0; pass < passes; ++pass) {
      // Emptied and made sparse again (as a store's files are made), so the first write
      // allocates as it goes; the second overwrites what it wrote.
      ECSS_RETURN_IF_ERROR(engine->Resize(file, 0));
      ECSS_RETURN_IF_ERROR(engine->Resize(file, blocks * block));
      ECSS_ASSIGN_OR_RETURN(double fresh,
                            TransferGbps(*engine, file, IoOp::kWrite, false, blocks, block, data));
      // Its allocations committed before the overwrite is timed.
      ECSS_RETURN_IF_ERROR(engine->Sync(file));
      ECSS_ASSIGN_OR_RETURN(double w,
                            TransferGbps(*engine, file, IoOp::kWrite, false, blocks, block, data));
      ECSS_RETURN_IF_ERROR(engine->Sync(file));
      ECSS_ASSIGN_OR_RETURN(double r,
                            TransferGbps(*engine, file, IoOp::kRead, false, blocks, block, data));
      fresh_writes.push_back(fresh);
      writes.push_back(w);
      reads.push_back(r);
    }
    return Status::Ok();
  }();
  const Status closed = engine->Close(file);
  ::unlink(path.c_str());
  ECSS_RETURN_IF_ERROR(measure.Annotate(StrCat("measuring the drive's rates with '", path, "'")));
  ECSS_RETURN_IF_ERROR(closed);
  return SequentialRates{Median(reads), Median(writes), Median(fresh_writes)};
}

}  // namespace ecss
