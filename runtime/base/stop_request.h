// StopRequest: a request, by a signal, that a training loop stop at its next step boundary
// (save a checkpoint, then exit) instead of dying mid-step: what a batch scheduler's SIGTERM
// before preemption, or a user's Ctrl-C, should mean for a run that takes months.
//
// Install(signals) sets handlers that only record which signal came (async-signal-safe: a
// lock-free atomic store); the loop polls requested() between steps. Only the first signal
// is a request: after it, a second one of any installed kind has its default effect, so a
// second SIGTERM or Ctrl-C ends the process as usual when the loop does not stop in time.
// Process-wide, as signals are. Thread-safe.
#pragma once

#include <vector>

#include "runtime/base/status.h"

namespace ecss {

class StopRequest {
 public:
  // InvalidArgument for a signal that cannot be caught (SIGKILL, SIGSTOP) or out of range;
  // the errno error of sigaction otherwise. Installing again replaces the handlers.
  static Status Install(const std::vector<int>& signals);
  // The signal that asked to stop, or 0 when none has.
  static int requested();
  // Forgets the request (the handlers stay one-shot: Install again to catch another).
  static void Clear();
};

}  // namespace ecss
