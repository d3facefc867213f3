// ExpertKey: (layer, expert) packed into one integer, the unit the device cache, the
// prefetcher and the stager key their tables by. Only these helpers pack and unpack it.
#pragma once

#include <cstdint>

namespace ecss {

using ExpertKey = uint64_t;
inline ExpertKey MakeExpertKey(uint32_t layer, uint32_t expert) {
  return (uint64_t{layer} << 32) | expert;
}
inline uint32_t LayerOf(ExpertKey key) { return static_cast<uint32_t>(key >> 32); }
inline uint32_t ExpertOf(ExpertKey key) { return static_cast<uint32_t>(key); }

}  // namespace ecss
