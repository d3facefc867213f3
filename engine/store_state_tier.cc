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

// Each state is one block of the store: the slot's arrays must be it, byte for byte.
Status StoreStateTier::CheckSlot(uint32_t expert, const StateSlot& slot, bool store) const {
  const ExpertStoreLayout& layout = store_->layout();
  const uint64_t n = slot.size;
  const bool weights = store && store_->placement(ExpertState::kWeights) == Tier::kNvme;
  const bool moments = (slot.state0 != nullptr) == (layout.moments > 0) &&
                       (slot.state1 != nullptr) == (layout.moments == 2) &&
                       (slot.state1 == nullptr || slot.state1 == slot.state0 + n);
  if (n == layout.params_per_expert && moments &&
      (!weights || (slot.compute != nullptr && layout.weights_dtype == DType::kBF16))) {
    return Status::Ok();
  }
  return FailedPreconditionError(StrCat("state tier: expert ", expert, "'s staging slot (", n,
                                        " elements) is not laid out as the store's blocks (",
                                        layout.params_per_expert, " elements, ", layout.moments,
                                        " moment arrays, the second right after the first",
                                        weights ? ", bf16 weights" : "", ")"));
}

Status StoreStateTier::Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) {
  ECSS_RETURN_IF_ERROR(CheckSlot(expert, slot, /*store=*/false));
  void* blocks[2] = {slot.master, slot.state0};
  std::vector<ExpertState> states = {ExpertState::kMaster};
  if (has_moments()) states.push_back(ExpertState::kMoments);
  const ExpertId id = store_->index().Id(expert);
  if (slot.checksums == nullptr) return store_->ReadStates(id, states, blocks, update_count);
  uint32_t checksums[2] = {0, 0};  // the master's; the moments' (m, then v: one block)
  ECSS_RETURN_IF_ERROR(store_->ReadStates(id, states, blocks, update_count, checksums));
  slot.checksums->loaded_master = checksums[0];
  slot.checksums->loaded_states = checksums[1];
  return Status::Ok();
}

Status StoreStateTier::Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) {
  ECSS_RETURN_IF_ERROR(CheckSlot(expert, slot, /*store=*/true));
  const bool weights = store_->placement(ExpertState::kWeights) == Tier::kNvme;
  const ParamChecksums* crcs = slot.checksums != nullptr ? &slot.checksums->written : nullptr;
  std::vector<ExpertState> states = {ExpertState::kMaster};
  std::vector<const void*> blocks = {slot.master};
  std::vector<uint32_t> checksums;
  if (crcs != nullptr) checksums.push_back(crcs->master);
  if (has_moments()) {
    states.push_back(ExpertState::kMoments);
    blocks.push_back(slot.state0);
    if (crcs != nullptr) checksums.push_back(StatesChecksum(slot, *crcs));  // one block
  }
  if (weights) {
    states.push_back(ExpertState::kWeights);
    blocks.push_back(slot.compute);
    if (crcs != nullptr) checksums.push_back(crcs->compute_copy);
  }
  return store_->WriteStates(store_->index().Id(expert), states, blocks.data(), update_count,
                             crcs != nullptr ? checksums.data() : nullptr);
}

}  // namespace ecss
