// Small file helpers shared by everything that writes results (traces, bench reports).
// WriteFileAtomically never leaves a half-written file under `path`: it writes a temporary file
// beside it, fsyncs it, and renames it over `path`. Blocking; thread-safe for distinct paths.
#pragma once

#include <string>
#include <string_view>

#include "runtime/base/status.h"

namespace ecss {

Status WriteFileAtomically(const std::string& path, std::string_view contents);
StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace ecss
