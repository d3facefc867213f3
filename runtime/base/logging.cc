#include "runtime/base/logging.h"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "runtime/base/env.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

std::atomic<int> g_level{-1};  // -1: not yet configured
std::mutex g_sink_mutex;
LogSink& Sink() {
  static LogSink sink;
  return sink;
}

LogLevel LevelFromEnvironment() {
  const auto& value = GetEnvOverrides().log_level;
  if (!value) return LogLevel::kWarning;
  StatusOr<LogLevel> parsed = ParseLogLevel(*value);
  if (!parsed.ok()) {
    std::fprintf(stderr, "ECSS: ignoring ECSS_LOG_LEVEL: %s\n", parsed.status().ToString().c_str());
    return LogLevel::kWarning;
  }
  return *parsed;
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
    case LogLevel::kOff:
      return "off";
  }
  return "invalid";
}

StatusOr<LogLevel> ParseLogLevel(std::string_view name) {
  for (LogLevel level :
       {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning, LogLevel::kError, LogLevel::kOff}) {
    if (LogLevelName(level) == name) return level;
  }
  return InvalidArgumentError(
      StrCat("unknown log level '", name, "' (expected debug, info, warning, error or off)"));
}

LogLevel GetLogLevel() {
  int level = g_level.load(std::memory_order_relaxed);
  if (level < 0) {
    int expected = -1;
    g_level.compare_exchange_strong(expected, static_cast<int>(LevelFromEnvironment()));
    level = g_level.load(std::memory_order_relaxed);
  }
  return static_cast<LogLevel>(level);
}

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }

void SetLogSink(LogSink sink) {
  std::lock_guard<std::mutex> lock(g_sink_mutex);
  Sink() = std::move(sink);
}

namespace internal {

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level), file_(file), line_(line) {}

LogMessage::~LogMessage() {
  const std::string message = stream_.str();
  std::lock_guard<std::mutex> lock(g_sink_mutex);
  if (Sink()) {
    Sink()(level_, file_, line_, message);
    return;
  }
  std::string_view file(file_);
  if (auto slash = file.rfind('/'); slash != std::string_view::npos) file.remove_prefix(slash + 1);
  std::fprintf(stderr, "[ecss %s %.*s:%d] %s\n", LogLevelName(level_).data(),
               static_cast<int>(file.size()), file.data(), line_, message.c_str());
}

}  // namespace internal
}  // namespace ecss
