// StallRecord: one wait of the step's driving thread for an expert's weights (who waited, on
// what, how long), as the prefetcher records them and the session's statistics report them.
#pragma once

#include <cstdint>
#include <string_view>

#include "offload/expert_index.h"

namespace ecss {

enum class StallCause : uint8_t {
  kUpdateFence,  // a fetch waited for the expert's update to finish rewriting its weights
  kNvmeRead,     // a fetch waited for the expert's weights to be read from NVMe
};
std::string_view StallCauseName(StallCause cause);  // "update_fence", "nvme_read"

struct StallRecord {
  uint64_t position = 0;  // in the step's sequence
  ExpertId key;           // who: (layer, expert)
  StallCause cause = StallCause::kUpdateFence;
  double seconds = 0;
};

}  // namespace ecss
