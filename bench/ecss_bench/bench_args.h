// BenchArgs: the options of one ecss-bench suite, "--name value" or "--name=value".
// Every read names its option in the error; options a suite never read are reported as
// unknown, so a typo never silently runs the defaults. Not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "runtime/base/status.h"

namespace ecss::bench {

class BenchArgs {
 public:
  // Parses argv after the suite name. `--json` and `--help` are flags; every other option
  // takes a value.
  static StatusOr<BenchArgs> Parse(const std::vector<std::string>& args);

  bool json() const { return json_; }
  bool help() const { return help_; }

  StatusOr<uint64_t> Uint(const std::string& name, uint64_t default_value);
  StatusOr<double> Double(const std::string& name, double default_value);
  StatusOr<std::string> String(const std::string& name, const std::string& default_value);
  // A comma-separated list of byte sizes with optional K, M or G suffix (powers of 1024).
  StatusOr<std::vector<uint64_t>> Sizes(const std::string& name,
                                        const std::vector<uint64_t>& default_value);

  // InvalidArgument naming every option that no read asked for.
  Status CheckAllUsed() const;

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
  bool json_ = false;
  bool help_ = false;
};

// "64M" -> 67108864.
StatusOr<uint64_t> ParseByteSize(const std::string& text);

}  // namespace ecss::bench
