// ECSS_CHECK: invariants of the program itself, never user input (bad input from a user or a
// file is a Status naming what was wrong; see status.h). A failed check prints the condition,
// file, line and streamed message, then aborts.
//   ECSS_CHECK(slot < slots_.size()) << "slot " << slot;
//   ECSS_CHECK_OK(stream.Synchronize());
// Thread-safe; a failing check does not return.
#pragma once

#include <sstream>

#include "runtime/base/status.h"
#include "runtime/base/voidify.h"

namespace ecss::internal {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  CheckFailure(const CheckFailure&) = delete;
  CheckFailure& operator=(const CheckFailure&) = delete;
  // Prints and aborts.
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

}  // namespace ecss::internal

// NOLINTBEGIN(bugprone-macro-parentheses): the stream operands must bind after the macro.
#define ECSS_CHECK(condition)                 \
  (condition) ? static_cast<void>(0)          \
              : ::ecss::internal::Voidify() & \
                    ::ecss::internal::CheckFailure(__FILE__, __LINE__, #condition).stream()

#define ECSS_CHECK_OK(expr)                                                             \
  do {                                                                                  \
    ::ecss::Status ecss_check_status_ = (expr);                                         \
    ECSS_CHECK(ecss_check_status_.ok()) << #expr << " returned " << ecss_check_status_; \
  } while (0)

// NOLINTEND(bugprone-macro-parentheses)

#ifdef NDEBUG
#define ECSS_DCHECK(condition) \
  while (false) ECSS_CHECK(condition)
#else
#define ECSS_DCHECK(condition) ECSS_CHECK(condition)
#endif
