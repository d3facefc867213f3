#include "engine/file_state_tier.h"

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<size_t> FileStateTier::ExpertSize(uint32_t expert) const {
  if (expert >= sizes_.size()) return NotFoundError(StrCat("state tier: no expert ", expert));
  return sizes_[expert];
}

Status FileStateTier::Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) {
  void* arrays[3] = {slot.master, slot.state0, slot.state1};
  return reader_->Load(expert, arrays, slot.size, update_count);
}

Status FileStateTier::Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) {
  const void* arrays[3] = {slot.master, slot.state0, slot.state1};
  ECSS_RETURN_IF_ERROR(writer_->Store(expert, arrays, slot.size, update_count));
  if (weights_ == nullptr) return Status::Ok();
  const uint32_t per_layer = weights_->layout().experts_per_layer;
  return weights_->WriteBlock(ExpertState::kWeights, expert / per_layer, expert % per_layer,
                              slot.compute);
}

}  // namespace ecss
