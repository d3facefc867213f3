#include "runtime/base/str_cat.h"

#include <charconv>
#include <cstdio>

namespace ecss {

std::string HumanBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return StrCat(bytes, " B");
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f %s", value, kUnits[unit]);
  return text;
}

bool ParseUint(std::string_view token, uint64_t max, uint64_t* value) {
  const char* end = token.data() + token.size();
  auto [stop, error] = std::from_chars(token.data(), end, *value);
  return !token.empty() && error == std::errc() && stop == end && *value <= max;
}

}  // namespace ecss
