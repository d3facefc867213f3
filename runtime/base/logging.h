// Leveled logging, configured in one place (SetLogLevel / SetLogSink, or ECSS_LOG_LEVEL).
//   ECSS_LOG(Warning) << "pinned pool could not lock " << HumanBytes(bytes);
// Messages below the level cost one atomic load and no formatting. The default sink writes one
// line per message to stderr under a mutex. Thread-safe; the sink is called synchronously.
#pragma once

#include <functional>
#include <sstream>
#include <string_view>

#include "runtime/base/status.h"
#include "runtime/base/voidify.h"

namespace ecss {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kOff = 4 };

std::string_view LogLevelName(LogLevel level);
StatusOr<LogLevel> ParseLogLevel(std::string_view name);

// The active level; the first call applies ECSS_LOG_LEVEL (default kWarning).
LogLevel GetLogLevel();
void SetLogLevel(LogLevel level);

using LogSink =
    std::function<void(LogLevel level, std::string_view file, int line, std::string_view message)>;
// Replaces the sink; an empty function restores the stderr sink.
void SetLogSink(LogSink sink);

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace ecss

// NOLINTBEGIN(bugprone-macro-parentheses): the stream operands must bind after the macro.
#define ECSS_LOG(level)                                \
  (::ecss::LogLevel::k##level < ::ecss::GetLogLevel()) \
      ? static_cast<void>(0)                           \
      : ::ecss::internal::Voidify() &                  \
            ::ecss::internal::LogMessage(::ecss::LogLevel::k##level, __FILE__, __LINE__).stream()
// NOLINTEND(bugprone-macro-parentheses)
