// FileStateTier: the tier moves of master weights and moments between NVMe and pinned staging,
// as the optimizer's streaming pipeline (optimizer/state_pipeline.h) asks for them: an
// ExpertStateFile (offload/state_file.h) seen as a StateTier. Loads and stores go through two
// handles of the same files, because the pipeline's load and store stages run on different
// threads and a handle drives its IoEngine from one thread at a time. It lives in the engine
// because it joins two folders that do not depend on each other.
// With a weight store (compute weights on NVMe), Store also writes the slot's new bf16
// compute copy into it, after the master and moments. Expert ids are `experts`' dense
// indices; errors name the expert as (layer, expert).
// Thread-safety: Load from one thread and Store from another at a time, as the pipeline does.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/expert_index.h"
#include "offload/expert_store.h"
#include "offload/state_file.h"
#include "optimizer/state_pipeline.h"

namespace ecss {

class FileStateTier final : public StateTier {
 public:
  // Every expert has `expert_elements` elements. reader and writer must outlive the tier.
  FileStateTier(ExpertStateFile* reader, ExpertStateFile* writer, ExpertIndex experts,
                size_t expert_elements, ExpertStore* weights = nullptr)
      : reader_(reader),
        writer_(writer),
        experts_(std::move(experts)),
        expert_elements_(expert_elements),
        weights_(weights) {}

  StatusOr<size_t> ExpertSize(uint32_t expert) const override;
  Status Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) override;
  Status Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) override;

 private:
  ExpertStateFile* reader_;
  ExpertStateFile* writer_;
  ExpertIndex experts_;
  size_t expert_elements_;
  ExpertStore* weights_;
};

}  // namespace ecss
