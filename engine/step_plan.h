// StepPlan: one training step as data (DESIGN.md section 3). BuildStepPlan is a pure function
// (no device, no allocation beyond the plan) from the step's routing, the strategy, where the
// states and weights live and the device cache's slots. The plan lists the step's operations:
// plan uploads, NVMe -> pinned stages, host -> device fetches and the evictions that make room
// for them (the cache simulated exactly: Belady over the step's known accesses, or LRU for
// learned gates), forward and backward per (micro-batch, layer), gradient copies and their
// accumulation, and per layer the optimizer update with its NVMe state reads and writes. Each
// op names the resource it occupies, its bytes or FLOPs, and the ops it waits for.
//
// The strategies are shapes of the plan, not branches of the executor (Note [Plan shapes]):
//  - ecss: the routed experts; a fetch waits only for its expert's update of step t-1 (a
//    carried-in edge), so fetches run ahead of compute; the step waits for step t-2's updates.
//  - no-overlap: the same operations, each waiting for the one issued before it to complete.
//  - naive: every expert of every layer in every access, with no-overlap's edges.
//  - zero-offload: naive's accesses with ecss's edges within the step (fetches ahead, each
//    layer's update as its gradients complete); the step waits for its own updates, as a
//    trainer that does not know which experts the next step routes to must.
//  - delayed update (DPU): the step's gradients are updated in the next step's plan; this
//    step's plan starts the updates of step t-1's gradients, and its fetches wait on t-2's.
// Learned gates: a layer's routing is known at its Forward, so BuildStepPlan makes the plan
// of the uploads only and AppendLayer adds a layer's part when its Forward runs.
//
// The executor fills start_s / end_s of the ops it ran (seconds since the step began) and
// the plan is written as JSON (`ecss-bench step --dump-plan`). A value; thread-compatible.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "offload/expert_index.h"
#include "runtime/base/status.h"

namespace ecss {

class EvictionPolicy;
class JsonWriter;

// How a step moves experts and overlaps its work (the strategies above; engine/session.h too).
enum class Strategy : uint8_t { kEcss, kNoOverlap, kNaive, kZeroOffload };

enum class OpKind : uint8_t {
  kPlanUpload,    // a micro-batch's routing plan, host -> device
  kStage,         // an expert's compute weights NVMe -> a pinned staging block
  kFetch,         // an expert's compute weights host -> a device cache slot
  kEvict,         // a cache slot given up for a fetch (no transfer)
  kForward,       // permute, grouped FFN, combine of one (micro-batch, layer)
  kBackward,      // the same backward (the forward recomputed), dX and dW
  kGradientCopy,  // the (micro-batch, layer)'s expert gradients device -> host
  // A later micro-batch's gradients added to earlier ones' (those experts only), one at a time
  // on the host; their copy went to one of two pinned staging halves, in turn, so a copy that
  // stages gradients depends on the addition two before it too.
  kAccumulate,
  kStateRead,   // a layer's experts' master weights and moments NVMe -> staging
  kUpdate,      // the CPU optimizer over a layer's experts
  kStateWrite,  // their states (and weights on NVMe) back to NVMe
  kPublish,     // delayed update: updated weights become what fetches read
};
std::string_view OpKindName(OpKind kind);  // "plan_upload", "fetch", ...

enum class PlanResource : uint8_t {
  kH2d,           // the host-to-device copy engine
  kD2h,           // the device-to-host copy engine
  kCompute,       // the device's compute
  kCpuOptimizer,  // the CPU optimizer's threads
  kNvmeRead,
  kNvmeWrite,
  kNone,  // bookkeeping (evictions, publishing): occupies no resource
};
std::string_view PlanResourceName(PlanResource resource);  // "h2d", "cpu_optimizer", ...
inline constexpr int kPlanResources = 6;                   // all but kNone

struct PlanOp {
  uint32_t id = 0;  // index in StepPlan::ops
  OpKind kind = OpKind::kFetch;
  PlanResource resource = PlanResource::kNone;
  int32_t micro_batch = -1;  // -1: not of one micro-batch
  int32_t layer = -1;        // -1: not of one layer
  // Updates only: 0 = of this step's gradients; -1, -2 = carried in from step t-1 / t-2
  // (they ran before or during this step; listed so that edges can name them).
  int32_t step_offset = 0;
  std::vector<uint32_t> experts;  // within the layer (compute: the grouped FFN's groups)
  std::vector<uint32_t> rows;     // compute: rows (token slots) of each group
  uint64_t position = 0;          // fetch, evict, stage: the access position in the sequence
  uint64_t bytes = 0;
  double flops = 0;
  std::vector<uint32_t> deps;  // ids of the ops this one waits for (always lower ids)
  // The executor waits on the host for every dep to complete before issuing this op
  // (no-overlap and naive); otherwise deps are met by stream order and events.
  bool host_waits = false;
  // Filled by the executor (-1: not run, or not observed): when the host issued the op (a
  // stage: when its NVMe read began, on the weight stager's thread), and when it started and
  // ended.
  double issued_s = -1, start_s = -1, end_s = -1;
};

// The model as the plan needs it.
struct PlanModel {
  uint32_t d_model = 0;
  uint32_t d_ff = 0;
  uint32_t d_in = 0;            // W_in's columns: d_ff, or 2 d_ff for SwiGLU
  uint64_t params = 0;          // per expert
  uint32_t weight_bytes = 2;    // compute weights per parameter (bf16 2, f32 4)
  uint32_t gradient_bytes = 4;  // a gradient per parameter on its way to the host (f32 4, bf16 2)
  uint32_t state_arrays = 3;    // fp32 arrays an update reads and writes (master,
                                // moments)
  std::vector<uint32_t> experts_per_layer;
  uint32_t layers() const { return static_cast<uint32_t>(experts_per_layer.size()); }
};

struct PlanPolicy {
  Strategy strategy = Strategy::kEcss;
  bool learned_gate = false;     // reactive routing: AppendLayer, LRU
  bool delayed_update = false;   // DPU
  bool deferred_updates = true;  // clipping or skip_step_on_nonfinite: updates wait for every
                                 // gradient of the step (the global norm)
  bool states_on_nvme = false;
  bool weights_on_nvme = false;
  uint32_t cache_slots = 0;  // > 0
  // An evaluation step: forward only (no backward, no gradients, no updates, no carried
  // updates started), for validation loss and comparing models.
  bool evaluation = false;
};

// One layer of one micro-batch as the router planned it: active experts ascending, rows of each.
struct LayerRoute {
  std::vector<uint32_t> experts;
  std::vector<uint32_t> rows;
};

struct MicroBatchRoute {
  uint32_t tokens = 0;
  uint64_t plan_bytes = 0;         // its routing plan's upload (0: uploaded per layer, gates)
  std::vector<LayerRoute> layers;  // [layer]; empty with learned gates (AppendLayer)
};

struct StepPlanInputs {
  PlanModel model;
  PlanPolicy policy;
  std::vector<MicroBatchRoute> micro_batches;
  // (layer, expert) resident in the device cache when the step begins, least recently used
  // first.
  std::vector<ExpertId> resident;
  // Delayed update: experts whose held gradients (of step t-1) this step starts updating.
  uint64_t held_experts = 0;
};

class StepPlan {
 public:
  const std::vector<PlanOp>& ops() const { return ops_; }
  std::vector<PlanOp>& mutable_ops() { return ops_; }  // the executor's record
  // An executed plan: the step's length on its ops' clock, from its begin to its EndStep
  // (-1: not known, the step has not ended).
  double seconds() const { return seconds_; }
  void set_seconds(double seconds) { seconds_ = seconds; }
  const PlanPolicy& policy() const { return policy_; }
  // Ops of one kind (and, >= 0, of one micro-batch / layer), in plan order.
  std::vector<const PlanOp*> Find(OpKind kind, int32_t micro_batch = -1, int32_t layer = -1) const;
  // The compute op of (micro-batch, layer) in one direction; null when not planned yet.
  const PlanOp* Compute(OpKind kind, uint32_t micro_batch, uint32_t layer) const;
  // The access sequence the cache and the prefetcher follow: per compute op in plan order,
  // its experts as (layer, expert).
  std::vector<ExpertId> AccessSequence() const;
  // The groups a layer routed so gets in this plan's shape (naive, zero-offload: every expert
  // of the layer).
  uint32_t Width(uint32_t layer, const LayerRoute& route) const;
  // The device cache's contents after the plan's accesses, least recently used first (the
  // next step's StepPlanInputs::resident, less what was invalidated meanwhile).
  std::vector<ExpertId> ResidentAfter() const;
  // Bytes over ops of `kind` (this step's: step_offset 0).
  uint64_t Bytes(OpKind kind) const;
  size_t Count(OpKind kind) const;
  // Whether fetches run ahead of compute (ecss, zero-offload), or each stage waits on the host
  // for the one before it (no-overlap, naive).
  bool fetches_ahead() const { return !Chained(policy_.strategy); }
  static bool Chained(Strategy strategy) {
    return strategy == Strategy::kNoOverlap || strategy == Strategy::kNaive;
  }
  // Whether every expert of a layer is in every access (naive, zero-offload).
  static bool EveryExpert(Strategy strategy) {
    return strategy == Strategy::kNaive || strategy == Strategy::kZeroOffload;
  }
  // Whether the step ends only once its updates finished (all but ecss), or they overlap the
  // next step (ecss: the step after waits for them, the carried-in edges).
  bool step_waits_for_updates() const {
    return StepWaitsForUpdates(policy_.strategy) && !policy_.evaluation;
  }
  static bool StepWaitsForUpdates(Strategy strategy) { return strategy != Strategy::kEcss; }

  // Learned gates, as the loop's calls come: a layer's forward once its gate routed it (its
  // plan's upload, its fetches, its compute), its backward (fetches again, compute, gradient
  // copies, and the layer's update once its last micro-batch is done), and, at EndStep, the
  // updates that wait for the whole step. InvalidArgument naming a layer out of range, a
  // forward given twice or a backward before its forward; FailedPrecondition on an RRE plan
  // (built whole).
  Status AppendForward(uint32_t micro_batch, uint32_t layer, const LayerRoute& route,
                       uint64_t plan_bytes);
  Status AppendBackward(uint32_t micro_batch, uint32_t layer);
  void Finish();

  // {"ops": [{"id", "kind", "resource", "micro_batch", "layer", "experts", "bytes", "flops",
  //  "deps": [...], "start_s", "end_s"}, ...]}, fields that do not apply omitted.
  void WriteJson(JsonWriter& json) const;

 private:
  friend StatusOr<StepPlan> BuildStepPlan(const StepPlanInputs& inputs);
  class Builder;
  // FailedPrecondition unless the plan is appended layer by layer (learned gates).
  Status Appendable() const;
  // Where the builder stands, so that the Append calls continue it.
  struct Cursor {
    // No-overlap's chain: the ops the next device-side op waits for (the last stage), and,
    // while a stage of several ops is open (an access's fetches), its ops so far.
    std::vector<uint32_t> chain_tail;
    bool stage_open = false;
    std::vector<uint32_t> stage_ops;
    int64_t last_compute = -1;  // the compute stream's order
    // The last backward's gradient copy: the next backward writes the same device region.
    int64_t last_gradient_copy = -1;
    int64_t held_update = -1;  // the delayed update's update of step t-1's gradients
    uint32_t step_gate = 0;    // what the step's first ops wait for
    uint32_t fetch_gate = 0;   // what every fetch waits for
    bool finished = false;
    std::map<uint32_t, uint32_t> upload;             // micro-batch -> its plan upload
    std::map<uint32_t, uint32_t> gradient;           // layer -> its last gradient op so far
    std::map<uint32_t, std::set<uint32_t>> touched;  // layer -> experts with a gradient
    std::vector<uint32_t> additions;  // the step's gradient additions so far, in order
    std::map<std::pair<uint32_t, uint32_t>, LayerRoute>
        groups;  // (micro-batch, layer) -> its groups
    std::map<ExpertId, uint32_t> last_fetch, last_use;
    // The cache as the plan leaves it: each resident and when it was last used (a stamp that
    // grows with each use; ResidentAfter's order).
    std::unordered_map<ExpertId, uint64_t> recency;
    uint64_t stamps = 0;
    // Which resident leaves, as the device cache decides, told of the residents and their
    // uses as the cache tells its own: its Belady policy over the step's sequence while an
    // RRE plan is built (dropped once it is whole), or its LRU policy over the stamps while
    // a learned-gate plan is appended (each copy of the plan goes on with a copy of it).
    struct Eviction {
      std::shared_ptr<EvictionPolicy> policy;
      Eviction() = default;
      Eviction(const Eviction& other);
      Eviction& operator=(const Eviction& other);
      Eviction(Eviction&&) noexcept = default;
      Eviction& operator=(Eviction&&) noexcept = default;
      ~Eviction() = default;
    } eviction;
    uint64_t positions = 0;
  };
  PlanModel model_;
  PlanPolicy policy_;
  uint32_t micro_batches_ = 0;
  std::vector<PlanOp> ops_;
  double seconds_ = -1;
  Cursor cursor_;
};

// InvalidArgument naming what is inconsistent (a layer's experts not ascending, an expert
// outside its layer, rows and experts of different lengths, no cache slots);
// ResourceExhausted naming the micro-batch, layer and bytes for a layer whose experts exceed
// the cache's slots.
StatusOr<StepPlan> BuildStepPlan(const StepPlanInputs& inputs);

}  // namespace ecss
