#include "runtime/base/env.h"

#include <cstdlib>

namespace ecss {

namespace {
std::optional<std::string> Read(const char* name) {
  const char* value = std::getenv(name);  // the only getenv in the library
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}
}  // namespace

const EnvOverrides& GetEnvOverrides() {
  static const EnvOverrides overrides = [] {
    EnvOverrides o;
    o.log_level = Read("ECSS_LOG_LEVEL");
    return o;
  }();
  return overrides;
}

}  // namespace ecss
