#include "engine/file_state_tier.h"

#include "runtime/base/str_cat.h"

namespace ecss {

StatusOr<size_t> FileStateTier::ExpertSize(uint32_t expert) const {
  if (expert >= experts_.size()) return NotFoundError(StrCat("state tier: no expert ", expert));
  return expert_elements_;
}

Status FileStateTier::Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) {
  void* arrays[3] = {slot.master, slot.state0, slot.state1};
  return reader_->Load(expert, arrays, slot.size, update_count).Annotate(experts_.Name(expert));
}

Status FileStateTier::Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) {
  const void* arrays[3] = {slot.master, slot.state0, slot.state1};
  ECSS_RETURN_IF_ERROR(
      writer_->Store(expert, arrays, slot.size, update_count).Annotate(experts_.Name(expert)));
  if (weights_ == nullptr) return Status::Ok();
  const ExpertId id = experts_.Id(expert);
  return weights_->WriteBlock(ExpertState::kWeights, id.layer, id.expert, slot.compute);
}

}  // namespace ecss
