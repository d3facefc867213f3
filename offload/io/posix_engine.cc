// pread/pwrite on worker threads: the engine where io_uring is unavailable. Each request runs
// to completion on one worker, looping over short transfers and EINTR.
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "offload/io/completion_queue.h"
#include "offload/io/io_engines.h"
#include "offload/io/posix_files.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

class PosixEngine final : public io_internal::FileBackedEngine {
 public:
  explicit PosixEngine(const IoEngineOptions& options)
      : FileBackedEngine(options.direct),
        queue_depth_(options.queue_depth),
        max_transfer_bytes_(options.max_transfer_bytes) {
    set_request_deadline(options.request_deadline);
    for (uint32_t i = 0; i < std::max(1u, options.posix_threads); ++i) {
      workers_.emplace_back([this] { Work(); });
    }
  }

  ~PosixEngine() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      cv_.notify_all();
    }
    for (auto& worker : workers_) worker.join();
  }

  std::string_view name() const override { return "posix"; }
  size_t alignment() const override { return 4096; }
  uint32_t queue_depth() const override { return queue_depth_; }

 protected:
  Status DoSubmit(const IoRequest& request) override {
    Job job{request, files_.fd(request.file), files_.path(request.file)};
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(job));
    cv_.notify_one();
    return Status::Ok();
  }

  size_t DoPoll(IoCompletion* out, size_t max, std::chrono::microseconds wait) override {
    return done_.Pop(out, max, wait);
  }

  Status DoCancel(uint64_t user_data) override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->request.user_data == user_data) {
        done_.Push(IoCompletion{
            user_data, CancelledError(StrCat("posix: request ", user_data, " cancelled")), 0});
        queue_.erase(it);
        return Status::Ok();
      }
    }
    return NotFoundError(StrCat("posix: request ", user_data, " is running or done"));
  }

 private:
  struct Job {
    IoRequest request;
    int fd;
    std::string path;
  };

  IoCompletion Run(const Job& job) {
    const IoRequest& r = job.request;
    size_t done = 0;
    auto* bytes = static_cast<char*>(r.buffer);
    while (done < r.bytes) {
      if (done > 0) CountShortTransfer();
      const off_t offset = static_cast<off_t>(r.offset + done);
      size_t length = r.bytes - done;
      if (max_transfer_bytes_ > 0) length = std::min<size_t>(length, max_transfer_bytes_);
      const ssize_t n = r.op == IoOp::kRead ? ::pread(job.fd, bytes + done, length, offset)
                                            : ::pwrite(job.fd, bytes + done, length, offset);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return IoCompletion{
            r.user_data,
            ErrnoError(errno, "posix: ", r.op == IoOp::kRead ? "read" : "write", " of ", r.bytes,
                       " bytes at offset ", r.offset, " of '", job.path, "'"),
            done};
      }
      if (n == 0) {  // end of file (reads), or a device that takes nothing (writes)
        return IoCompletion{
            r.user_data,
            r.op == IoOp::kRead
                ? OutOfRangeError(StrCat("posix: read of ", r.bytes, " bytes at offset ", r.offset,
                                         " of '", job.path, "' reaches its end after ", done))
                : ErrnoError(ENOSPC, StrCat("posix: write to '", job.path, "' made no progress")),
            done};
      }
      done += static_cast<size_t>(n);
    }
    return IoCompletion{r.user_data, Status::Ok(), done};
  }

  void Work() {
    while (true) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      done_.Push(Run(job));
    }
  }

  const uint32_t queue_depth_;
  const uint32_t max_transfer_bytes_;  // IoEngineOptions::max_transfer_bytes
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Job> queue_;  // GUARDED_BY(mutex_)
  bool stopping_ = false;  // GUARDED_BY(mutex_)
  io_internal::CompletionQueue done_;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<IoEngine> CreatePosixIoEngine(const IoEngineOptions& options) {
  return std::make_unique<PosixEngine>(options);
}

}  // namespace ecss
