// StrCat: builds a string from any values that have an ostream operator<<.
// Used for error messages and logs, where readability beats the last nanosecond.
// Thread-safe (no shared state); never blocks.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace ecss {

template <typename... Args>
std::string StrCat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// "1.50 GiB", "512 B": a byte count for humans, exact below 1 KiB.
std::string HumanBytes(uint64_t bytes);

// A whole token of decimal digits as a number no larger than `max`: false for anything else
// (a sign, spaces, other characters, an empty token, overflow).
bool ParseUint(std::string_view token, uint64_t max, uint64_t* value);

}  // namespace ecss
