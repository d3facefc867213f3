// Test helper: damages a file on disk the way bit rot would, for the checksum tests.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace ecss {

// XORs the byte at `offset` of `path` with `mask`; false when the file cannot be changed.
inline bool FlipByte(const std::string& path, uint64_t offset, uint8_t mask) {
  FILE* raw = std::fopen(path.c_str(), "r+b");
  if (raw == nullptr) return false;
  const bool flipped = std::fseek(raw, static_cast<long>(offset), SEEK_SET) == 0 && [&] {
    const int byte = std::fgetc(raw);
    return byte != EOF && std::fseek(raw, static_cast<long>(offset), SEEK_SET) == 0 &&
           std::fputc(byte ^ mask, raw) != EOF;
  }();
  return std::fclose(raw) == 0 && flipped;
}

}  // namespace ecss
