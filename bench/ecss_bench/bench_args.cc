#include "bench/ecss_bench/bench_args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "runtime/base/str_cat.h"

namespace ecss::bench {

StatusOr<BenchArgs> BenchArgs::Parse(const std::vector<std::string>& args) {
  BenchArgs parsed;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--json") {
      parsed.json_ = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      parsed.help_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      return InvalidArgumentError(
          StrCat("unexpected argument '", arg, "' (options are --name value)"));
    }
    std::string name = arg.substr(2);
    std::string value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return InvalidArgumentError(StrCat("option --", name, " needs a value"));
    }
    parsed.values_[name] = value;
  }
  return parsed;
}

StatusOr<uint64_t> BenchArgs::Uint(const std::string& name, uint64_t default_value) {
  used_.insert(name);
  auto it = values_.find(name);
  if (it == values_.end()) return default_value;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(it->second.c_str(), &end, 10);
  if (errno != 0 || end == it->second.c_str() || *end != '\0' || it->second[0] == '-') {
    return InvalidArgumentError(
        StrCat("option --", name, " = '", it->second, "' is not a non-negative integer"));
  }
  return static_cast<uint64_t>(value);
}

StatusOr<double> BenchArgs::Double(const std::string& name, double default_value) {
  used_.insert(name);
  auto it = values_.find(name);
  if (it == values_.end()) return default_value;
  char* end = nullptr;
  const double value = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end != '\0' || !std::isfinite(value)) {
    return InvalidArgumentError(
        StrCat("option --", name, " = '", it->second, "' is not a finite number"));
  }
  return value;
}

StatusOr<std::string> BenchArgs::String(const std::string& name, const std::string& default_value) {
  used_.insert(name);
  auto it = values_.find(name);
  return it == values_.end() ? default_value : it->second;
}

StatusOr<std::vector<uint64_t>> BenchArgs::Sizes(const std::string& name,
                                                 const std::vector<uint64_t>& default_value) {
  used_.insert(name);
  auto it = values_.find(name);
  if (it == values_.end()) return default_value;
  std::vector<uint64_t> sizes;
  size_t start = 0;
  const std::string& text = it->second;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    StatusOr<uint64_t> size = ParseByteSize(text.substr(start, comma - start));
    if (!size.ok()) return size.status().Annotate(StrCat("option --", name));
    sizes.push_back(*size);
    start = comma + 1;
  }
  return sizes;
}

Status BenchArgs::CheckAllUsed() const {
  std::string unknown;
  for (const auto& [name, value] : values_) {
    if (!used_.count(name)) unknown += StrCat(unknown.empty() ? "" : ", ", "--", name);
  }
  if (unknown.empty()) return Status::Ok();
  return InvalidArgumentError(StrCat("unknown option(s) for this suite: ", unknown));
}

StatusOr<uint64_t> ParseByteSize(const std::string& text) {
  if (text.empty()) return InvalidArgumentError("empty size");
  uint64_t multiplier = 1;
  std::string digits = text;
  switch (text.back()) {
    case 'K':
    case 'k':
      multiplier = uint64_t{1} << 10;
      digits.pop_back();
      break;
    case 'M':
    case 'm':
      multiplier = uint64_t{1} << 20;
      digits.pop_back();
      break;
    case 'G':
    case 'g':
      multiplier = uint64_t{1} << 30;
      digits.pop_back();
      break;
    default:
      break;
  }
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(digits.c_str(), &end, 10);
  if (digits.empty() || errno != 0 || *end != '\0' || digits[0] == '-' || value == 0 ||
      value > UINT64_MAX / multiplier) {
    return InvalidArgumentError(
        StrCat("size '", text, "' is not a positive byte count (e.g. 64M)"));
  }
  return static_cast<uint64_t>(value) * multiplier;
}

}  // namespace ecss::bench
