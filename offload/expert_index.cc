#include "offload/expert_index.h"

#include <algorithm>

#include "runtime/base/str_cat.h"

namespace ecss {

ExpertIndex::ExpertIndex(std::vector<uint32_t> experts_per_layer)
    : counts_(std::move(experts_per_layer)) {
  first_.reserve(counts_.size() + 1);
  first_.push_back(0);
  for (uint32_t count : counts_) first_.push_back(first_.back() + count);
}

ExpertId ExpertIndex::Id(uint32_t index) const {
  // The last layer whose first index is <= index.
  const auto after = std::upper_bound(first_.begin(), first_.end(), index);
  const auto layer = static_cast<uint32_t>(after - first_.begin() - 1);
  return {layer, index - first_[layer]};
}

std::string ExpertIndex::Name(uint32_t index) const {
  const ExpertId id = Id(index);
  return StrCat("expert (", id.layer, ", ", id.expert, ")");
}

}  // namespace ecss
