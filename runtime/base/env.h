// Environment overrides, read in this one place. Every ECSS_* variable the library honours is
// listed here with its meaning; no other file calls getenv.
//   ECSS_LOG_LEVEL   debug | info | warning | error | off   (default: warning)
// Thread-safe: the environment is read once, on first use.
#pragma once

#include <optional>
#include <string>

namespace ecss {

struct EnvOverrides {
  std::optional<std::string> log_level;  // ECSS_LOG_LEVEL
};

// The overrides as they were when first called.
const EnvOverrides& GetEnvOverrides();

}  // namespace ecss
