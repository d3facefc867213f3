// The io_uring engine: the only file in ECSS that includes liburing. O_DIRECT files, a
// registered file table, an optional registered buffer region (fixed-buffer reads and writes),
// and batched submission: Submit only fills SQEs; Poll submits them all in one system call and
// reaps completions. Short transfers and EINTR/EAGAIN are resubmitted here, so a completion is
// the whole request or an error.
#include <liburing.h>

#include <cerrno>
#include <optional>
#include <vector>

#include "offload/io/io_engines.h"
#include "offload/io/posix_files.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

constexpr uint64_t kCancelTag = ~uint64_t{0};
constexpr unsigned kRegisteredFiles = 256;

class UringEngine final : public io_internal::FileBackedEngine {
 public:
  static StatusOr<std::unique_ptr<UringEngine>> Create(const IoEngineOptions& options) {
    std::unique_ptr<UringEngine> engine(new UringEngine(options));
    const int result = io_uring_queue_init(options.queue_depth, &engine->ring_, 0);
    if (result < 0) {
      return UnavailableError(StrCat("io_uring is not available here: ",
                                     ErrnoError(-result, "io_uring_queue_init").message()))
          .WithErrno(-result);
    }
    engine->ring_ready_ = true;
    engine->fixed_files_ = io_uring_register_files_sparse(&engine->ring_, kRegisteredFiles) == 0;
    engine->files_.set_listener([raw = engine.get()](IoFileId id, int fd) {
      if (raw->fixed_files_ && id < kRegisteredFiles)
        io_uring_register_files_update(&raw->ring_, id, &fd, 1);
    });
    return engine;
  }

  ~UringEngine() override {
    if (!ring_ready_) return;
    // Drain what is in flight so that no kernel write lands in freed memory.
    IoCompletion sink[16];
    while (in_flight() > 0) {
      if (DoPoll(sink, 16, std::chrono::milliseconds(100)) == 0 && pending_submit_ == 0 &&
          Outstanding() == 0)
        break;
    }
    io_uring_queue_exit(&ring_);
  }

  std::string_view name() const override { return "uring"; }
  size_t alignment() const override { return 4096; }
  uint32_t queue_depth() const override { return static_cast<uint32_t>(slots_.size()); }

  Status RegisterBuffer(void* base, size_t bytes) {
    if (buffer_registered_) io_uring_unregister_buffers(&ring_);
    buffer_registered_ = false;
    iovec region{base, bytes};
    const int result = io_uring_register_buffers(&ring_, &region, 1);
    if (result < 0)
      return ErrnoError(-result, StrCat("uring: cannot register ", bytes, " bytes of buffers"));
    buffer_ = region;
    buffer_registered_ = true;
    return Status::Ok();
  }

 protected:
  Status DoSubmit(const IoRequest& request) override {
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].used) continue;
      slots_[i] = Slot{request, 0, true};
      return Prepare(i);
    }
    return InternalError("uring: no free slot although the queue is not full");
  }

  size_t DoPoll(IoCompletion* out, size_t max, std::chrono::microseconds wait) override {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    size_t n = 0;
    while (true) {
      if (pending_submit_ > 0) {
        io_uring_submit(&ring_);
        pending_submit_ = 0;
      }
      io_uring_cqe* cqe = nullptr;
      while (n < max && io_uring_peek_cqe(&ring_, &cqe) == 0) {
        const uint64_t tag = cqe->user_data;
        const int result = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        if (tag == kCancelTag) continue;
        if (auto completion = Reap(static_cast<size_t>(tag), result))
          out[n++] = std::move(*completion);
      }
      if (n > 0 || std::chrono::steady_clock::now() >= deadline) return n;
      if (pending_submit_ > 0) continue;  // resubmitted remainders: send them first
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(
          deadline - std::chrono::steady_clock::now());
      __kernel_timespec timeout{left.count() / 1000000, (left.count() % 1000000) * 1000};
      if (io_uring_wait_cqe_timeout(&ring_, &cqe, &timeout) != 0) return n;
    }
  }

  Status DoCancel(uint64_t user_data) override {
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (!slots_[i].used || slots_[i].request.user_data != user_data) continue;
      io_uring_sqe* sqe = GetSqe();
      if (sqe == nullptr)
        return UnavailableError("uring: submission queue full").WithRetryable(true);
      io_uring_prep_cancel64(sqe, i, 0);
      io_uring_sqe_set_data64(sqe, kCancelTag);
      ++pending_submit_;
      return Status::Ok();
    }
    return NotFoundError(StrCat("uring: request ", user_data, " is not in flight"));
  }

 private:
  struct Slot {
    IoRequest request;
    size_t done = 0;
    bool used = false;
  };

  explicit UringEngine(const IoEngineOptions& options)
      : FileBackedEngine(options.direct),
        slots_(std::max(1u, options.queue_depth)),
        max_transfer_bytes_(options.max_transfer_bytes) {
    set_request_deadline(options.request_deadline);
  }

  size_t Outstanding() const {
    size_t used = 0;
    for (const Slot& s : slots_) used += s.used ? 1 : 0;
    return used;
  }

  io_uring_sqe* GetSqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {  // the ring holds unsent SQEs: send them and retry
      io_uring_submit(&ring_);
      pending_submit_ = 0;
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  // Queues (the rest of) slot i's transfer.
  Status Prepare(size_t i) {
    Slot& slot = slots_[i];
    const IoRequest& r = slot.request;
    io_uring_sqe* sqe = GetSqe();
    if (sqe == nullptr) return UnavailableError("uring: submission queue full").WithRetryable(true);
    char* buffer = static_cast<char*>(r.buffer) + slot.done;
    auto remaining = static_cast<unsigned>(r.bytes - slot.done);
    if (max_transfer_bytes_ > 0) remaining = std::min(remaining, max_transfer_bytes_);
    const uint64_t offset = r.offset + slot.done;
    const bool fixed_file = fixed_files_ && r.file < kRegisteredFiles;
    const int fd = fixed_file ? static_cast<int>(r.file) : files_.fd(r.file);
    const bool fixed_buffer =
        buffer_registered_ && buffer >= static_cast<char*>(buffer_.iov_base) &&
        buffer + remaining <= static_cast<char*>(buffer_.iov_base) + buffer_.iov_len;
    if (r.op == IoOp::kRead) {
      if (fixed_buffer)
        io_uring_prep_read_fixed(sqe, fd, buffer, remaining, offset, 0);
      else
        io_uring_prep_read(sqe, fd, buffer, remaining, offset);
    } else {
      if (fixed_buffer)
        io_uring_prep_write_fixed(sqe, fd, buffer, remaining, offset, 0);
      else
        io_uring_prep_write(sqe, fd, buffer, remaining, offset);
    }
    if (fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, i);
    ++pending_submit_;
    return Status::Ok();
  }

  // One CQE of slot i: a completion, or nullopt when the transfer continues.
  std::optional<IoCompletion> Reap(size_t i, int result) {
    Slot& slot = slots_[i];
    const IoRequest& r = slot.request;
    auto finish = [&](Status status) {
      slot.used = false;
      return IoCompletion{r.user_data, std::move(status), slot.done};
    };
    const char* what = r.op == IoOp::kRead ? "read" : "write";
    if (result == -EINTR || result == -EAGAIN) {
      if (Prepare(i).ok()) return std::nullopt;
      return finish(ErrnoError(-result, "uring: resubmission failed"));
    }
    if (result == -ECANCELED)
      return finish(CancelledError(StrCat("uring: request ", r.user_data, " cancelled")));
    if (result < 0) {
      return finish(
          ErrnoError(-result, StrCat("uring: ", what, " of ", r.bytes, " bytes at offset ",
                                     r.offset, " of '", files_.path(r.file), "'")));
    }
    if (result == 0) {
      return finish(r.op == IoOp::kRead
                        ? OutOfRangeError(StrCat("uring: read of ", r.bytes, " bytes at offset ",
                                                 r.offset, " of '", files_.path(r.file),
                                                 "' reaches its end after ", slot.done))
                        : ErrnoError(ENOSPC, StrCat("uring: write to '", files_.path(r.file),
                                                    "' made no progress")));
    }
    slot.done += static_cast<size_t>(result);
    if (slot.done < r.bytes) {  // a short transfer: continue with the rest
      CountShortTransfer();
      if (Prepare(i).ok()) return std::nullopt;
      return finish(UnavailableError("uring: could not resubmit a short transfer"));
    }
    return finish(Status::Ok());
  }

  io_uring ring_{};
  bool ring_ready_ = false;
  bool fixed_files_ = false;
  bool buffer_registered_ = false;
  iovec buffer_{};
  std::vector<Slot> slots_;
  const unsigned max_transfer_bytes_;  // IoEngineOptions::max_transfer_bytes
  unsigned pending_submit_ = 0;
};

}  // namespace

StatusOr<std::unique_ptr<IoEngine>> CreateUringIoEngine(const IoEngineOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<UringEngine> engine, UringEngine::Create(options));
  return std::unique_ptr<IoEngine>(std::move(engine));
}

Status RegisterIoBuffers(IoEngine& engine, void* base, size_t bytes) {
  auto* uring = dynamic_cast<UringEngine*>(&engine);
  if (uring == nullptr) {
    return InvalidArgumentError(StrCat("engine '", engine.name(), "' has no registered buffers"));
  }
  return uring->RegisterBuffer(base, bytes);
}

}  // namespace ecss
