#include "runtime/base/stop_request.h"

#include <signal.h>

#include <atomic>
#include <cerrno>

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

std::atomic<int> requested_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the handler must not take a lock");

// The first signal is recorded; a second one, of any installed kind, has its default effect
// (the first's handler is already reset by SA_RESETHAND; another's is reset here). signal and
// raise are async-signal-safe.
extern "C" void RecordStopSignal(int signal) {
  int none = 0;
  if (!requested_signal.compare_exchange_strong(none, signal, std::memory_order_relaxed)) {
    ::signal(signal, SIG_DFL);
    ::raise(signal);
  }
}

}  // namespace

Status StopRequest::Install(const std::vector<int>& signals) {
  for (int signal : signals) {
    if (signal <= 0 || signal >= NSIG || signal == SIGKILL || signal == SIGSTOP) {
      return InvalidArgumentError(StrCat("signal ", signal, " cannot be caught"));
    }
    struct sigaction action = {};
    action.sa_handler = RecordStopSignal;
    sigemptyset(&action.sa_mask);
    // One-shot, so that a second signal has its default effect; restart interrupted calls.
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    if (sigaction(signal, &action, nullptr) != 0) {
      return ErrnoError(errno, "installing the stop handler for signal ", signal);
    }
  }
  return Status::Ok();
}

int StopRequest::requested() { return requested_signal.load(std::memory_order_relaxed); }

void StopRequest::Clear() { requested_signal.store(0, std::memory_order_relaxed); }

}  // namespace ecss
