// The fault-injection wrapper: real faults on top of any engine, for the tests that prove an
// injected error surfaces as a Status naming what failed and never as good data.
#include <algorithm>
#include <cerrno>
#include <deque>
#include <map>
#include <thread>
#include <vector>

#include "offload/io/io_engines.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss {

using Clock = std::chrono::steady_clock;

struct FaultInjectionIoEngine::State {
  explicit State(const FaultOptions& o) : options(o), rng(o.seed, 0xFA17) {}

  struct Outer {
    IoRequest request;
    int parts_left = 0;
    size_t bytes = 0;
    Status status;  // first error of a part
    Status forced;  // an injected error that replaces the result (torn writes)
    Clock::time_point submitted;
    bool flip = false;  // Fault::kBitFlip: a bit of the data read is flipped on completion
  };
  struct Ready {
    IoCompletion completion;
    Clock::time_point due;
  };

  FaultOptions options;
  FaultCounters counters;
  CounterRng rng;
  uint64_t written = 0;
  uint64_t next_key = 1;
  std::map<uint64_t, Outer> outers;        // by key
  std::map<uint64_t, uint64_t> inner_key;  // inner user_data -> outer key
  std::deque<Ready> ready;                 // completions waiting for their latency
  std::vector<IoRequest> hung;             // Fault::kHang: until cancelled

  Clock::time_point Due(Clock::time_point submitted) const {
    return submitted + std::chrono::microseconds(options.latency_us);
  }
};

FaultInjectionIoEngine::FaultInjectionIoEngine(std::unique_ptr<IoEngine> inner,
                                               const FaultOptions& options)
    : inner_(std::move(inner)), state_(std::make_unique<State>(options)) {}

FaultInjectionIoEngine::~FaultInjectionIoEngine() {
  IoCompletion sink[16];
  while (inner_->in_flight() > 0) inner_->Poll(sink, 16, std::chrono::milliseconds(100));
}

void FaultInjectionIoEngine::set_options(const FaultOptions& options) {
  state_->options = options;
  state_->rng = CounterRng(options.seed, 0xFA17);
}

FaultCounters FaultInjectionIoEngine::counters() const { return state_->counters; }

Status FaultInjectionIoEngine::CheckFile(IoFileId file) const {
  return inner_->FileSize(file).status();
}

Status FaultInjectionIoEngine::Allocate(IoFileId file, uint64_t bytes) {
  if (bytes > state_->options.enospc_after_bytes) {
    ++state_->counters.injected_enospc;
    return ErrnoError(ENOSPC, StrCat("injected: cannot reserve ", bytes, " bytes"));
  }
  return inner_->Allocate(file, bytes);
}

Status FaultInjectionIoEngine::Sync(IoFileId file) {
  if (state_->options.fail_sync) {
    ++state_->counters.injected_eio;
    return ErrnoError(EIO, "injected: fdatasync failed");
  }
  return inner_->Sync(file);
}

Status FaultInjectionIoEngine::DoSubmit(const IoRequest& r) {
  State& s = *state_;
  const uint64_t index = ++s.counters.requests;
  const bool picked = s.options.fail_nth == index ||
                      (s.options.fail_one_in > 0 && s.rng.Uniform(s.options.fail_one_in) == 0);
  const Fault fault = s.options.fault;
  if (picked && fault == Fault::kHang) {
    ++s.counters.hung;
    s.hung.push_back(r);
    return Status::Ok();
  }
  if (picked && fault == Fault::kLostWrite && r.op == IoOp::kWrite) {
    ++s.counters.lost_writes;
    s.ready.push_back({IoCompletion{r.user_data, Status::Ok(), r.bytes}, s.Due(Clock::now())});
    return Status::Ok();
  }
  const bool eio = picked && fault == Fault::kEio;
  const bool enospc = r.op == IoOp::kWrite && s.written + r.bytes > s.options.enospc_after_bytes;
  const char* what = r.op == IoOp::kRead ? "read" : "write";
  Status injected;
  if (eio) {
    ++s.counters.injected_eio;
    injected =
        ErrnoError(EIO, StrCat("injected: ", what, " of ", r.bytes, " bytes at offset ", r.offset));
  } else if (enospc) {
    ++s.counters.injected_enospc;
    injected =
        ErrnoError(ENOSPC, StrCat("injected: write of ", r.bytes, " bytes at offset ", r.offset));
  }
  State::Outer outer{r,
                     0,
                     0,
                     Status::Ok(),
                     injected,
                     Clock::now(),
                     picked && fault == Fault::kBitFlip && r.op == IoOp::kRead};
  const uint64_t key = s.next_key++;
  // The parts that really reach the inner engine.
  std::vector<std::pair<uint64_t, size_t>> parts;  // (offset into the request, bytes)
  const size_t align = alignment();
  if (!injected.ok()) {
    const size_t half = r.bytes / 2 / align * align;
    if (r.op == IoOp::kWrite && s.options.torn_writes && half > 0) {
      parts.emplace_back(0, half);  // the crash happened half way through
      ++s.counters.torn_writes;
    }
  } else if (r.op == IoOp::kRead && s.options.split_reads && r.bytes >= 2 * align) {
    const size_t half = r.bytes / 2 / align * align;
    parts.emplace_back(0, half);
    parts.emplace_back(half, r.bytes - half);
  } else {
    parts.emplace_back(0, r.bytes);
  }
  for (const auto& [start, bytes] : parts) {
    const uint64_t inner_id = (key << 1) | (start == 0 ? 0 : 1);
    Status submitted = inner_->Submit(IoRequest{
        r.op, r.file, r.offset + start, static_cast<char*>(r.buffer) + start, bytes, inner_id});
    if (!submitted.ok()) {
      if (outer.parts_left == 0) return submitted;  // nothing reached the engine: refuse cleanly
      outer.status = submitted;  // the first half is in flight: report on completion
      break;
    }
    s.inner_key[inner_id] = key;
    ++outer.parts_left;
  }
  if (r.op == IoOp::kWrite && injected.ok()) s.written += r.bytes;
  if (outer.parts_left == 0) {
    s.ready.push_back({IoCompletion{r.user_data, injected, 0}, s.Due(outer.submitted)});
  } else {
    s.outers.emplace(key, std::move(outer));
  }
  return Status::Ok();
}

size_t FaultInjectionIoEngine::DoPoll(IoCompletion* out, size_t max,
                                      std::chrono::microseconds wait) {
  State& s = *state_;
  const Clock::time_point deadline = Clock::now() + wait;
  while (true) {
    IoCompletion inner[32];
    const bool have_ready = !s.ready.empty() && s.ready.front().due <= Clock::now();
    const size_t got = inner_->in_flight() == 0
                           ? 0
                           : inner_->Poll(inner, 32,
                                          have_ready ? std::chrono::microseconds(0)
                                                     : std::chrono::microseconds(200));
    for (size_t i = 0; i < got; ++i) {
      auto found = s.inner_key.find(inner[i].user_data);
      if (found == s.inner_key.end()) continue;
      const uint64_t key = found->second;
      s.inner_key.erase(found);
      State::Outer& outer = s.outers.at(key);
      outer.bytes += inner[i].bytes;
      if (outer.status.ok() && !inner[i].status.ok()) outer.status = inner[i].status;
      if (--outer.parts_left > 0) continue;
      Status final_status = !outer.forced.ok() ? outer.forced : outer.status;
      if (outer.flip && final_status.ok()) {  // one bit, somewhere in the data read
        const uint64_t bit = s.rng.Uniform(
            static_cast<uint32_t>(std::min<uint64_t>(outer.request.bytes * 8, UINT32_MAX)));
        static_cast<uint8_t*>(outer.request.buffer)[bit / 8] ^= uint8_t{1} << (bit % 8);
        ++s.counters.bit_flips;
      }
      s.ready.push_back({IoCompletion{outer.request.user_data, std::move(final_status),
                                      outer.forced.ok() ? outer.bytes : 0},
                         s.Due(outer.submitted)});
      s.outers.erase(key);
    }
    // Hand out what is due, in order of readiness.
    std::stable_sort(s.ready.begin(), s.ready.end(),
                     [](const State::Ready& a, const State::Ready& b) { return a.due < b.due; });
    size_t n = 0;
    while (n < max && !s.ready.empty() && s.ready.front().due <= Clock::now()) {
      out[n++] = std::move(s.ready.front().completion);
      s.ready.pop_front();
    }
    if (n > 0 || Clock::now() >= deadline) return n;
    if (!s.ready.empty()) {
      std::this_thread::sleep_until(std::min(deadline, s.ready.front().due));
    } else if (inner_->in_flight() == 0) {  // only hung requests: nothing can come before then
      std::this_thread::sleep_until(deadline);
    }
  }
}

Status FaultInjectionIoEngine::DoCancel(uint64_t user_data) {
  std::vector<IoRequest>& hung = state_->hung;
  for (auto it = hung.begin(); it != hung.end(); ++it) {
    if (it->user_data != user_data) continue;
    state_->ready.push_back(
        {IoCompletion{
             user_data,
             CancelledError(StrCat("fault-injection: hung request ", user_data, " cancelled")), 0},
         Clock::now()});
    hung.erase(it);
    return Status::Ok();
  }
  for (const auto& [key, outer] : state_->outers) {
    if (outer.request.user_data == user_data) return inner_->Cancel(key << 1);
  }
  return NotFoundError(StrCat("fault-injection: request ", user_data, " is not in flight"));
}

}  // namespace ecss
