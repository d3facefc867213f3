// Tier: where a piece of state lives: the device's memory, pinned or pageable host memory,
// NVMe, or nowhere (its owner keeps it elsewhere). The expert store places each expert state
// on one (offload/expert_store.h), and a session's options name one per state.
#pragma once

#include <cstdint>
#include <string_view>

#include "runtime/base/status.h"

namespace ecss {

enum class Tier : uint8_t { kDevice, kPinned, kHost, kNvme, kNone };
std::string_view TierName(Tier tier);  // "device", "pinned", "host", "nvme", "none"
StatusOr<Tier> ParseTier(std::string_view name);

}  // namespace ecss
