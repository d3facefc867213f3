#include "engine/store_state_tier.h"

#include <vector>

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<size_t> StoreStateTier::ExpertSize(uint32_t expert) const {
  if (expert >= store_->index().size()) {
    return NotFoundError(StrCat("state tier: no expert ", expert));
  }
  return store_->layout().params_per_expert;
}

Status StoreStateTier::Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) {
  void* blocks[2] = {slot.master, slot.state0};
  std::vector<ExpertState> states = {ExpertState::kMaster};
  if (has_moments()) states.push_back(ExpertState::kMoments);
  return store_->ReadStates(store_->index().Id(expert), states, blocks, update_count);
}

Status StoreStateTier::Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) {
  std::vector<ExpertState> states = {ExpertState::kMaster};
  std::vector<const void*> blocks = {slot.master};
  if (has_moments()) {
    states.push_back(ExpertState::kMoments);
    blocks.push_back(slot.state0);
  }
  if (store_->placement(ExpertState::kWeights) == Tier::kNvme) {
    states.push_back(ExpertState::kWeights);
    blocks.push_back(slot.compute);
  }
  return store_->WriteStates(store_->index().Id(expert), states, blocks.data(), update_count);
}

}  // namespace ecss
