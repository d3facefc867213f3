#include "runtime/base/tier.h"

#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view TierName(Tier tier) {
  switch (tier) {
    case Tier::kDevice:
      return "device";
    case Tier::kPinned:
      return "pinned";
    case Tier::kHost:
      return "host";
    case Tier::kNvme:
      return "nvme";
    case Tier::kNone:
      return "none";
  }
  return "?";
}

StatusOr<Tier> ParseTier(std::string_view name) {
  for (Tier tier : {Tier::kDevice, Tier::kPinned, Tier::kHost, Tier::kNvme, Tier::kNone}) {
    if (TierName(tier) == name) return tier;
  }
  return InvalidArgumentError(
      StrCat("unknown tier '", name, "' (device, pinned, host, nvme or none)"));
}

}  // namespace ecss
