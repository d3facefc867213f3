// Internal to offload/io: the completions an engine has produced and not yet handed out,
// filled by worker threads (posix) or at submit time (memory, fault injection), drained by
// Poll. Thread-safe; Pop blocks up to its timeout.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include "offload/io/io_engine.h"

namespace ecss::io_internal {

class CompletionQueue {
 public:
  void Push(IoCompletion completion) {
    std::lock_guard<std::mutex> lock(mutex_);
    done_.push_back(std::move(completion));
    cv_.notify_one();
  }

  size_t Pop(IoCompletion* out, size_t max, std::chrono::microseconds wait) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, wait, [&] { return !done_.empty(); });
    size_t n = 0;
    while (n < max && !done_.empty()) {
      out[n++] = std::move(done_.front());
      done_.pop_front();
    }
    return n;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<IoCompletion> done_;  // GUARDED_BY(mutex_)
};

}  // namespace ecss::io_internal
