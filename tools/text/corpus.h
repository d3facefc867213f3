// A multi-domain text corpus built from files found on this machine (C headers, Python
// sources, licence texts, documentation, CMake modules), one domain per kind, with a small
// embedded corpus as fallback for any domain that finds no files. Used by the routing
// imbalance report and the training example. Reading is deterministic: files in sorted path
// order, up to a byte budget per domain. Blocking file I/O; thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/base/status.h"

namespace ecss::text {

struct CorpusDomain {
  std::string name;  // "c-headers", "python", "licenses", "docs", "cmake"
  std::string text;  // the concatenated files (or the embedded fallback)
  size_t files = 0;  // how many files were read (0: fallback)
};

struct CorpusOptions {
  uint64_t max_bytes_per_domain = uint64_t{4} << 20;  // stop reading a domain after this
  uint64_t max_file_bytes = uint64_t{256} << 10;      // skip larger files
};

// Every domain, in a fixed order. Never fails: unreadable files are skipped.
std::vector<CorpusDomain> LoadMachineCorpus(const CorpusOptions& options);

}  // namespace ecss::text
