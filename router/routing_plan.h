// RoutingPlan: everything the device needs to compute the sparse layers of one micro-batch,
// built on the host before the forward pass (RRE) or right after a gate ran (learned gates):
// per layer, the active experts, the stable permutation that sorts token slots by expert, its
// inverse, per-expert offsets and the combine weights. All of it lives in one contiguous,
// relocatable buffer (offsets, not pointers), so the CUDA side copies a plan in one transfer
// and views it with DeviceLayer(layer, device_copy).
// Also: the step's expert access sequence (forward layers 0..L-1, backward L-1..0, per
// micro-batch) that the prefetcher and the device cache plan with.
// Thread-compatible; building allocates (but in a recycled plan's buffer where it is large
// enough), views never do. C++17 (nvcc sees it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "router/rre_router.h"
#include "runtime/base/status.h"

namespace ecss {

// One micro-batch of token ids: [batch_size, seq_len] row-major, and a domain id per sample.
struct MicroBatch {
  const uint32_t* token_ids = nullptr;
  uint32_t batch_size = 0;
  uint32_t seq_len = 0;
  const uint32_t* domain_ids = nullptr;
};

// A learned gate's choices for one micro-batch's layer: host arrays [tokens, k], k distinct
// experts of the layer per token (ascending or not) and their combine weights.
struct GateChoices {
  const uint32_t* experts = nullptr;
  const float* weights = nullptr;
  uint32_t k = 0;
};

// A view of one layer's plan. "Slots" are (token, choice) pairs, slot = token * k + choice;
// "rows" are slots sorted by expert (stable: by slot within an expert).
struct LayerPlan {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  uint32_t k = 0;                            // experts per token
  uint32_t num_active = 0;                   // experts with at least one row
  const uint32_t* active_experts = nullptr;  // [num_active] ascending global expert ids
  const uint32_t* expert_offsets = nullptr;  // [num_active + 1] first row of each expert
  const uint32_t* permutation = nullptr;     // [rows] row -> slot
  const uint32_t* inverse = nullptr;         // [rows] slot -> row
  const float* combine_weights = nullptr;    // [rows] weight of each row in its token's output

  uint32_t rows() const { return num_tokens * k; }
  uint32_t count(uint32_t active_index) const {
    return expert_offsets[active_index + 1] - expert_offsets[active_index];
  }
};

class RoutingPlan {
 public:
  // Plans for every layer of `router` at once. InvalidArgument names the sample and position
  // of a token id out of the vocabulary; NotFound names a sample's unknown domain.
  // `recycled`: a plan no longer needed, whose buffer this one is built in (no allocation, and
  // no page faults, where it is large enough: a session's plan of a micro-batch is a few MiB
  // each step). Once the new plan is built it is as if moved from; on an error, untouched.
  static StatusOr<RoutingPlan> BuildRre(const RreRouter& router, const MicroBatch& batch,
                                        RoutingPlan* recycled = nullptr);

  // A one-layer plan from explicit choices (a learned gate's top-k): experts and weights are
  // [num_tokens, k]. InvalidArgument for an expert >= num_experts or a token choosing the same
  // expert twice.
  static StatusOr<RoutingPlan> FromAssignments(uint32_t layer, uint32_t num_experts,
                                               uint32_t num_tokens, uint32_t k,
                                               const uint32_t* experts, const float* weights);

  uint32_t num_layers() const;
  uint32_t num_tokens() const;
  LayerPlan layer(uint32_t index) const { return LayerAt(data(), index); }

  // The bytes of the largest plan of `layers` layers of at most `rows` rows and `active` active
  // experts each (the most a buffer a plan was built in holds).
  static uint64_t MostBytes(uint64_t layers, uint64_t rows, uint64_t active);

  // The whole plan as bytes, for one transfer.
  const void* data() const { return storage_.data(); }
  size_t bytes() const { return storage_.size() * sizeof(uint32_t); }
  // A view of layer `index` of a plan copied to host memory at `base`, valid as long as the
  // copy is. REQUIRES: base holds bytes() bytes copied from data(). (It reads the copy, so it
  // cannot be given device memory: use DeviceLayer.)
  static LayerPlan LayerAt(const void* base, uint32_t index);
  // Layer `index` with its arrays pointing into a copy of the whole plan at `device_base` (any
  // memory, never read here): the view device code uses after one transfer of data().
  LayerPlan DeviceLayer(uint32_t index, const void* device_base) const;

 private:
  explicit RoutingPlan(std::vector<uint32_t> storage) : storage_(std::move(storage)) {}
  std::vector<uint32_t> storage_;  // uint32 words; combine weights stored as their bits
};

enum class Pass : uint8_t { kForward = 0, kBackward = 1 };

struct ExpertAccess {
  uint32_t micro_batch = 0;
  uint32_t layer = 0;
  uint32_t expert = 0;
  uint32_t rows = 0;  // token slots routed to the expert
  Pass pass = Pass::kForward;
};

// The ordered expert accesses of a step: for each micro-batch, forward over layers 0..L-1, then
// backward over L-1..0, each layer's active experts ascending.
std::vector<ExpertAccess> StepAccessSequence(const std::vector<RoutingPlan>& micro_batches);

// Per-expert routed-row counts, for the current step and summed over the run.
class RoutingStats {
 public:
  // One counter per expert index of each layer of `domains`.
  explicit RoutingStats(const DomainMap& domains);

  // REQUIRES: the plan's layers and experts fit the domain map given at construction
  // (checked: InvalidArgument otherwise).
  Status Add(const RoutingPlan& plan);
  // Folds the step's counts into the run's and clears the step's.
  void EndStep();

  const std::vector<uint64_t>& step_counts(uint32_t layer) const { return step_[layer]; }
  const std::vector<uint64_t>& run_counts(uint32_t layer) const { return run_[layer]; }
  // Max/mean over the experts of `group` (e.g. one domain's group).
  static LoadSummary Summarize(const std::vector<uint64_t>& counts, ExpertRange group);

 private:
  std::vector<std::vector<uint64_t>> step_;
  std::vector<std::vector<uint64_t>> run_;
};

}  // namespace ecss
