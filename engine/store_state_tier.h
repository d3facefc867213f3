// StoreStateTier: the tier moves of master weights and moments between an ExpertStore and the
// pinned staging slots of the optimizer's streaming pipeline (optimizer/state_pipeline.h). A
// load reads the master and the moments as of one version (ExpertStore::ReadStates); a store
// writes them with the expert's new update count, and, when the store keeps the compute
// weights on NVMe, the slot's new bf16 copy (ExpertStore::WriteStates), with the checksums
// the update took as it wrote them; a load leaves checking what it read to the update. It lives in
// the engine because it joins two folders that do not depend on each other. Expert ids are
// `experts`' dense indices; errors name the expert as (layer, expert). Thread-safety: as the
// pipeline uses it (loads on its load threads, stores on its store threads, of distinct experts);
// the store lets them run at once.
#pragma once

#include <cstdint>

#include "offload/expert_index.h"
#include "offload/expert_store.h"
#include "optimizer/state_pipeline.h"

namespace ecss {

class StoreStateTier final : public StateTier {
 public:
  // REQUIRES: the store keeps master weights (and moments, when the optimizer has them) and
  // outlives the tier.
  explicit StoreStateTier(ExpertStore* store) : store_(store) {}

  StatusOr<size_t> ExpertSize(uint32_t expert) const override;
  // Both need the slot's arrays laid out as the store's blocks (the expert's full size; as
  // many moment arrays as the store keeps, the second right after the first; for a store
  // with weights on NVMe, a bf16 compute array): FailedPrecondition naming the expert
  // otherwise. With StateSlot::checksums, Load leaves checking what it read to the update (the
  // checksums the store's headers record), and Store writes the update's into the headers.
  Status Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) override;
  Status Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) override;
  bool TakesChecksums() const override { return true; }

 private:
  bool has_moments() const { return store_->layout().moments > 0; }
  // `store`: the weights' array too (a load reads none).
  Status CheckSlot(uint32_t expert, const StateSlot& slot, bool store) const;
  ExpertStore* store_;
};

}  // namespace ecss
