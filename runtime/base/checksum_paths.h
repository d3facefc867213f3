// Internal to runtime/base, its tests and bench/micro: the ways Crc32c (checksum.h) computes a
// checksum, so that each one a machine runs is checked against the definition and timed there,
// whichever Crc32c picks on it. Every path gives the same value for the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ecss::checksum_internal {

enum class Crc32cPath : uint8_t {
  kTable,       // a byte at a time through a 256-entry table: any CPU
  kCrc32,       // SSE4.2's crc32 instruction, eight bytes at a time in one chain
  kCrc32Lanes,  // three crc32 chains over thirds of the buffer, joined (Crc32c: from 64 KiB,
                // without the fold)
  // VPCLMULQDQ folding, 256 bytes a step, where it runs (then Crc32c takes it at every size);
  // a buffer under 256 bytes goes through one crc32 chain instead.
  kClmulFold,
};
inline constexpr Crc32cPath kCrc32cPaths[] = {Crc32cPath::kTable, Crc32cPath::kCrc32,
                                              Crc32cPath::kCrc32Lanes, Crc32cPath::kClmulFold};

std::string_view Crc32cPathName(Crc32cPath path);
// Whether this CPU runs the path.
bool Crc32cPathRuns(Crc32cPath path);
// Crc32c by that path. REQUIRES: Crc32cPathRuns(path).
uint32_t Crc32cWith(Crc32cPath path, const void* data, size_t bytes, uint32_t crc = 0);

}  // namespace ecss::checksum_internal
