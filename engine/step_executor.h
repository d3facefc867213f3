// StepExecutor: runs a session's steps on any Backend (internal to engine). Per step it
// routes the micro-batches (RRE at Begin; a learned gate's choices at each Forward), builds
// the StepPlan from the routing, the strategy's policy and what the device cache holds, and
// issues the plan's ops: routing-plan uploads, NVMe stages and fetches through the prefetcher
// and the device cache, the grouped FFN forward and backward, gradient copies and their
// accumulation, the optimizer updates of the expert table's updater, and with the delayed
// update the held update and its publication. The plan's host-wait edges (no-overlap, naive)
// become stream synchronisations; with SessionOptions::record_op_times it records when each
// op was issued and ended (PlanRecorder).
//
// The executor trusts its caller (the session) for the call order and the arguments the
// session checks: a step is open between Begin and Finish; Forward and Backward come in an
// order the session accepted, on activations it checked.
// Thread-compatible: one driving thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "engine/expert_table.h"
#include "engine/memory_plan.h"
#include "engine/plan_inputs.h"
#include "engine/plan_recorder.h"
#include "engine/session_options.h"
#include "engine/step_plan.h"
#include "engine/step_stats.h"
#include "kernels/kernel_runner.h"
#include "offload/device_cache.h"
#include "offload/prefetcher.h"
#include "router/routing_plan.h"
#include "router/rre_router.h"
#include "runtime/device/backend.h"

namespace ecss {

class StepExecutor {
 public:
  // Allocates the device buffers the memory plan lists (activations, workspace, gradient
  // region, routing plans, cache slots) and the pinned gradient staging. `router`: the RRE
  // tables, null exactly when options.routing is kLearnedGate (InvalidArgument otherwise).
  // Held, not copied: `backend`, `options`, `memory`, `router`, `table` and `recorder` must
  // outlive the executor (the session's members do).
  static StatusOr<std::unique_ptr<StepExecutor>> Create(Backend& backend,
                                                        const SessionOptions& options,
                                                        const MemoryPlan& memory,
                                                        std::unique_ptr<KernelRunner> kernels,
                                                        const RreRouter* router, ExpertTable& table,
                                                        PlanRecorder& recorder);
  // Drops the prefetcher's leases and waits for the device (the leases' streams), then for the
  // updates in flight.
  ~StepExecutor();
  StepExecutor(const StepExecutor&) = delete;
  StepExecutor& operator=(const StepExecutor&) = delete;

  // Opens step `step` (recorded under that number): routes the micro-batches (checked by the
  // caller: 1 to max_micro_batches, each 1 to max_tokens_per_micro_batch tokens), builds its
  // plan, and starts it: the plans' uploads, the optimizer's step (or with the delayed update
  // the held update of the step before, after publishing the one before that), the overlap
  // bound, the first fetches. An evaluation runs Forward only and updates nothing. Errors
  // name the micro-batch; after one, Discard. `opened` says whether the step was opened (the
  // session's step count moves), also when a later part failed.
  Status Begin(const std::vector<MicroBatch>& batches, float loss_scale, bool evaluation,
               uint64_t step, bool* opened);
  // Drops a step Begin refused: its plans' uploads may still be queued on the compute stream,
  // so the stream passes them before their buffers go. `opened`: Begin's.
  void Discard(bool opened);

  Status Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                 const GateChoices* gate, void* choice_outputs);
  Status Backward(uint32_t micro_batch, uint32_t layer, const void* dy, void* dx);

  // What a micro-batch's layers have run (for the session's order checks).
  struct LayerProgress {
    bool forwarded = false, backwarded = false;
  };
  uint32_t micro_batches() const { return static_cast<uint32_t>(micro_.size()); }
  uint32_t tokens(uint32_t micro_batch) const { return micro_[micro_batch].num_tokens; }
  LayerProgress progress(uint32_t micro_batch, uint32_t layer) const;

  // What a step did beyond the backend's and the cache's counters.
  struct StepRecord {
    uint64_t tokens = 0;
    uint64_t gradient_bytes = 0;
    uint32_t updated_experts = 0;
    double begin_seconds = 0;  // BuildStep's: routing and planning, before anything was issued
    StallStats stalls;
    std::vector<StallRecord> stall_records;
    StepReport report;  // the optimizer's (delayed: of the update Begin started)
  };
  // Ends the open step whatever fails: the last gradients to the optimizer, the optimizer's
  // step ended, compute drained and (no-overlap, naive) the updates waited for; nothing of the
  // step stays in flight. Returns the first failure (an update's too); `record` is filled
  // either way.
  Status Finish(StepRecord* record);
  // Waits for the device and every update (with the delayed update outside a step: starts
  // the held one and publishes everything).
  Status Synchronize(bool in_step);
  // Between steps, for a checkpoint: waits for the device and every update started (with the
  // delayed update, publishes them) but keeps the held gradients held, so that the next Begin
  // goes on as if nothing had happened.
  Status Quiesce();
  // The delayed update's held experts (the last step's, for the next Begin's update), in
  // submission order, and the loss scale their gradients carry; their accumulators are
  // ExpertTable::GradientOf.
  const std::vector<ExpertId>& held() const { return held_; }
  float held_loss_scale() const { return held_loss_scale_; }
  // A checkpoint's held experts (before the first step): each takes an accumulator as step
  // `step`'s, filled from `gradients` (held.size() consecutive accumulators' bytes).
  // ResourceExhausted when the accumulators run short (MemoryPlan::gradient_slots).
  Status RestoreHeld(const std::vector<ExpertId>& held, float loss_scale,
                     std::string_view gradients, uint64_t step);
  // An update that failed since the last call, reported once with its step and expert.
  Status TakeUpdateError();

  Stream compute_stream() const { return compute_.get(); }
  const DeviceCache& cache() const { return *cache_; }
  // The optimizer's busy seconds and NVMe bytes since creation (the stats' counters).
  double optimizer_busy_seconds() const { return table_.updater().busy_seconds(); }
  uint64_t nvme_bytes() const { return table_.nvme_bytes(); }
  ExpertStore::IoBytes nvme_io() const { return table_.nvme_io(); }

 private:
  // A sparse layer of one micro-batch as the kernels see it.
  struct LayerWork {
    std::vector<uint32_t> experts;  // expert ids within the layer (the grouped FFN's groups)
    std::vector<uint32_t> offsets;  // [experts + 1] rows of each
    TokenPermutation device_perm;   // arrays in the device copy of the plan
    uint64_t first_position = 0;    // of the forward accesses in the step's sequence
    uint64_t backward_position = 0;
    bool forwarded = false, backwarded = false;
    // Learned gates: the layer's own plan, made at Forward from the gate's choices, and its
    // device copy (in the plan region).
    std::optional<RoutingPlan> plan;
    void* device_plan = nullptr;
  };
  // A micro-batch's token and domain ids, copied at BeginStep: the caller's arrays may go.
  struct MicroBatchIds {
    std::vector<uint32_t> tokens, domains;
  };
  struct MicroBatchWork {
    MicroBatchIds ids;
    uint32_t num_tokens = 0;
    MicroBatch batch;
    std::optional<RoutingPlan> plan;
    void* device_plan = nullptr;  // its device copy, in the plan region
    std::vector<LayerWork> layers;
  };

  StepExecutor(Backend& backend, const SessionOptions& options, const MemoryPlan& memory,
               std::unique_ptr<KernelRunner> kernels, const RreRouter* router, ExpertTable& table,
               PlanRecorder& recorder);
  Status CreateStreams();
  Status CreateDeviceBuffers();
  Status CreateCache();

  bool gated() const { return options_.routing == Routing::kLearnedGate; }
  bool delayed() const { return options_.delayed_update; }
  ExpertUpdater& updater() { return table_.updater(); }
  uint64_t elem() const { return DTypeSize(options_.model.dtype); }
  // A step's micro-batches done with (a new step's build, Discard, Finish): their buffers kept.
  void ClearMicroBatches();

  // Begin's parts: the routing and plan; the optimizer's side.
  Status BuildStep(const std::vector<MicroBatch>& batches);
  Status IssuePlanUploads();
  void Expedite();  // Note [Updates in fetch order]
  Status StartUpdates(float loss_scale);
  StatusOr<StepPlan> BuildPlan() const;
  void IndexFetches();
  Status CheckWidth(uint32_t b, uint32_t layer, size_t width) const;
  StatusOr<void*> PlanSlot(uint32_t slot, uint64_t bytes) const;
  void FillLayer(const LayerPlan& dp, const PlanOp& forward, LayerWork& lw) const;
  Status RouteGated(uint32_t micro_batch, uint32_t layer, const GateChoices& gate);
  // The grouped FFN of one layer of one micro-batch.
  GroupedFfnProblem ProblemFor(const LayerWork& lw) const;
  const PlanOp& ComputeOp(OpKind kind, uint32_t micro_batch, uint32_t layer) const {
    return *plan_->Compute(kind, micro_batch, layer);
  }

  // Issuing ops.
  Status Prefetch();
  // The leases of compute op `op`'s access, at positions [first, first + its experts).
  StatusOr<std::vector<Lease>> LeasesFor(const PlanOp& op, uint64_t first);
  Status ReleaseAll(std::vector<Lease>& leases);
  Status StageSync(Stream stream);
  // Issues op `id` on `stream`: recorded now, ended when the stream passes what was enqueued.
  Status Record(uint32_t id, Stream stream);
  // The plan's edges the host waits on before issuing `op` (no-overlap, naive).
  Status HostWait(const PlanOp& op);
  // A chained update dep of such an edge: its layer submitted and every expert updated.
  Status WaitUpdate(const PlanOp& update);
  // Before an access's leases: the host waits of its fetches (and of the compute op itself).
  Status HostWaitAccess(const PlanOp& compute);
  Status CopyGradients(uint32_t micro_batch, uint32_t layer, const LayerWork& lw);
  Status SubmitLayer(uint32_t layer);
  Status SubmitReady(bool wait);
  // Delayed update: publishes the update started at the last Begin; starts the held one.
  Status Publish();
  Status StartHeldUpdate();
  Status FinishWork(StepReport* report);

  Backend& backend_;
  const SessionOptions& options_;  // the session's; outlives the executor
  const MemoryPlan& memory_;       // likewise
  std::unique_ptr<KernelRunner> kernels_;
  const RreRouter* router_;
  ExpertTable& table_;
  PlanRecorder& recorder_;
  std::unique_ptr<DeviceCache> cache_;
  std::unique_ptr<Prefetcher> prefetcher_;
  // add_: the host's additions of later micro-batches' gradients, off d2h_ so that its
  // copies (and the backwards that wait for the gradient region) go on meanwhile.
  OwnedStream compute_, h2d_, d2h_, add_;
  OwnedEvent dw_ready_, dw_free_, copied_;
  std::vector<OwnedEvent> layer_grads_done_;  // per layer

  // Device buffers sized at creation.
  std::vector<Buffer> saved_x_;  // [micro-batch * layers + layer]: the permuted forward input
  Buffer perm_a_, perm_b_, workspace_, dw_;
  Buffer dw_cast_;  // bf16 gradients: the region's gradients cast for the copy out
  Buffer plans_;    // the step's routing plans (MemoryPlan::plan_slots of plan_slot_bytes)
  // Pinned: later micro-batches' gradients before they are added, in halves that take turns
  // (one is added while the next layer's copies fill the other; MemoryPlan::
  // gradient_staging_halves). `free`: the half's last addition ended.
  struct StagingHalf {
    Buffer block;
    OwnedEvent free;
  };
  std::vector<StagingHalf> staging_;
  uint32_t staging_turn_ = 0;

  // The step.
  bool evaluating_ = false;
  std::vector<MicroBatchWork> micro_;
  struct SpareBuffers {  // the last steps' micro-batches' (ClearMicroBatches)
    std::vector<RoutingPlan> plans;
    std::vector<MicroBatchIds> ids;
  } spare_;
  std::vector<ExpertId> sequence_;
  // The step's plan (learned gates: growing as layers are routed), what of it was issued on
  // which stream (for its host-wait edges), and when its ops ran.
  std::optional<StepPlan> plan_;
  std::map<uint32_t, Stream> issued_on_;
  std::map<uint64_t, uint32_t> fetch_at_;  // sequence position -> the plan's fetch there
  uint64_t recording_ = 0;                 // the step whose ops are being recorded
  // The cache's contents after the last step's plan, least recently used first.
  std::vector<ExpertId> last_resident_;
  std::deque<uint32_t> pending_layers_;  // gradients complete once d2h passes
  StallStats stalls_;
  uint64_t gradient_bytes_ = 0;
  uint32_t submitted_ = 0;

  // Delayed update (DPU): the gradients of the step before, held until the next Begin; the
  // experts whose update started at the last Begin (published at the next); the loss scale of
  // the held gradients; the report of the update started in this step; time Backward waited
  // for an update to release a gradient buffer.
  std::vector<ExpertId> held_, started_;
  float held_loss_scale_ = 1;
  StepReport started_report_;
  double gradient_fence_seconds_ = 0;
  double begin_seconds_ = 0;
  uint64_t updater_steps_ = 0;  // the optimizer's steps begun
};

}  // namespace ecss
