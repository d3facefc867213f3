#include "engine/step_executor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_set>

#include "runtime/base/dtype.h"
#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Adds a stall to `counter` for the lifetime of the scope.
class StallTimer {
 public:
  explicit StallTimer(double* counter) : counter_(counter), start_(Clock::now()) {}
  ~StallTimer() { *counter_ += Since(start_); }
  StallTimer(const StallTimer&) = delete;
  StallTimer& operator=(const StallTimer&) = delete;

 private:
  double* counter_;
  Clock::time_point start_;
};

// The cache keys of a layer's experts, in the grouped FFN's order.
std::vector<ExpertId> LayerKeys(uint32_t layer, const std::vector<uint32_t>& experts) {
  std::vector<ExpertId> keys;
  keys.reserve(experts.size());
  for (uint32_t e : experts) keys.push_back(ExpertId{layer, e});
  return keys;
}

}  // namespace

// ---- Creation -------------------------------------------------------------------------------

StepExecutor::StepExecutor(Backend& backend, const SessionOptions& options,
                           const MemoryPlan& memory, std::unique_ptr<KernelRunner> kernels,
                           const RreRouter* router, ExpertTable& table, PlanRecorder& recorder)
    : backend_(backend),
      options_(options),
      memory_(memory),
      kernels_(std::move(kernels)),
      router_(router),
      table_(table),
      recorder_(recorder) {}

StatusOr<std::unique_ptr<StepExecutor>> StepExecutor::Create(
    Backend& backend, const SessionOptions& options, const MemoryPlan& memory,
    std::unique_ptr<KernelRunner> kernels, const RreRouter* router, ExpertTable& table,
    PlanRecorder& recorder) {
  if ((router == nullptr) != (options.routing == Routing::kLearnedGate)) {
    return InvalidArgumentError("step executor: RRE routing needs its router, a learned gate none");
  }
  std::unique_ptr<StepExecutor> executor(
      new StepExecutor(backend, options, memory, std::move(kernels), router, table, recorder));
  ECSS_RETURN_IF_ERROR(executor->CreateStreams());
  ECSS_RETURN_IF_ERROR(executor->CreateDeviceBuffers());
  ECSS_RETURN_IF_ERROR(executor->CreateCache());
  return executor;
}

StepExecutor::~StepExecutor() {
  if (prefetcher_ != nullptr) prefetcher_->Clear();
  backend_.SynchronizeAll().IgnoreError();  // the leases' streams, before the cache goes
  updater().Synchronize().IgnoreError();
}

Status StepExecutor::CreateStreams() {
  ECSS_ASSIGN_OR_RETURN(compute_, CreateOwnedStream(backend_, "compute"));
  ECSS_ASSIGN_OR_RETURN(h2d_, CreateOwnedStream(backend_, "h2d experts"));
  ECSS_ASSIGN_OR_RETURN(d2h_, CreateOwnedStream(backend_, "d2h gradients"));
  ECSS_ASSIGN_OR_RETURN(add_, CreateOwnedStream(backend_, "gradient additions"));
  ECSS_ASSIGN_OR_RETURN(dw_ready_, CreateOwnedEvent(backend_));
  ECSS_ASSIGN_OR_RETURN(dw_free_, CreateOwnedEvent(backend_));
  ECSS_ASSIGN_OR_RETURN(copied_, CreateOwnedEvent(backend_));
  for (uint32_t l = 0; l < options_.model.layers; ++l) {
    ECSS_ASSIGN_OR_RETURN(OwnedEvent event, CreateOwnedEvent(backend_));
    layer_grads_done_.push_back(std::move(event));
  }
  return Status::Ok();
}

// Device memory: what a step keeps and works in, as the memory plan lists it; and the pinned
// staging of later micro-batches' gradients.
Status StepExecutor::CreateDeviceBuffers() {
  Allocator& device = backend_.device_memory();
  const MemoryPlan& m = memory_;
  for (uint32_t i = 0; i < options_.limits.max_micro_batches * options_.model.layers; ++i) {
    ECSS_ASSIGN_OR_RETURN(Buffer b, device.Allocate(m.activation_bytes, MemoryTag::kActivations));
    saved_x_.push_back(std::move(b));
  }
  ECSS_ASSIGN_OR_RETURN(perm_a_, device.Allocate(m.activation_bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(perm_b_, device.Allocate(m.activation_bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(workspace_, device.Allocate(m.workspace_bytes, MemoryTag::kWorkspace));
  const uint64_t gradient_region = uint64_t{m.max_groups} * m.params * 4;
  ECSS_ASSIGN_OR_RETURN(dw_, device.Allocate(gradient_region, MemoryTag::kGradients));
  const uint64_t host_region =
      uint64_t{m.max_groups} * m.params * DTypeSize(options_.gradient_dtype);
  if (options_.gradient_dtype != DType::kF32) {
    ECSS_ASSIGN_OR_RETURN(dw_cast_, device.Allocate(host_region, MemoryTag::kGradients));
  }
  ECSS_ASSIGN_OR_RETURN(
      plans_, device.Allocate(uint64_t{m.plan_slots} * m.plan_slot_bytes, MemoryTag::kOther));
  for (uint32_t i = 0; i < m.gradient_staging_halves; ++i) {
    StagingHalf half;
    ECSS_ASSIGN_OR_RETURN(half.block, table_.pinned().Allocate(host_region, MemoryTag::kGradients));
    ECSS_ASSIGN_OR_RETURN(half.free, CreateOwnedEvent(backend_));
    staging_.push_back(std::move(half));
  }
  return Status::Ok();
}

// The expert cache in the slots the memory plan left, and the prefetcher over it.
Status StepExecutor::CreateCache() {
  ECSS_ASSIGN_OR_RETURN(
      cache_,
      DeviceCache::Create(backend_, {memory_.expert_bytes, memory_.cache_slots}, MakeLruPolicy()));
  PrefetcherHooks hooks;
  hooks.host_weights = [this](ExpertId key) { return table_.FetchSource(key); };
  // The delayed update never rewrites what fetches read during a step: no fence to wait on.
  hooks.fence_pending = [this](ExpertId key) {
    return !delayed() && updater().Pending(table_.at(key).id);
  };
  hooks.wait_fence = [this](ExpertId key) { return updater().Wait(table_.at(key).id); };
  // The plan's fetch at that position was issued; its end is when h2d passes the copy.
  hooks.on_copy = [this](uint64_t position) {
    auto fetch = fetch_at_.find(position);
    if (fetch != fetch_at_.end()) Record(fetch->second, h2d_.get()).IgnoreError();
  };
  // The weights of that fetch were read from NVMe then: the plan's stage before it ran.
  if (options_.record_op_times) {
    hooks.on_staged = [this](uint64_t position, Clock::time_point start, Clock::time_point end) {
      auto fetch = fetch_at_.find(position);
      if (fetch == fetch_at_.end()) return;
      for (uint32_t dep : plan_->ops()[fetch->second].deps) {
        if (plan_->ops()[dep].kind == OpKind::kStage) recorder_.Ran(recording_, dep, start, end);
      }
    };
  }
  prefetcher_ = std::make_unique<Prefetcher>(*cache_, h2d_.get(), std::move(hooks),
                                             options_.prefetch_window_experts, table_.stager());
  return Status::Ok();
}

GroupedFfnProblem StepExecutor::ProblemFor(const LayerWork& lw) const {
  GroupedFfnProblem p = FfnProblemOf(options_, lw.offsets.back());
  p.num_groups = static_cast<uint32_t>(lw.experts.size());
  p.group_offsets = lw.offsets.data();
  return p;
}

StepExecutor::LayerProgress StepExecutor::progress(uint32_t micro_batch, uint32_t layer) const {
  const LayerWork& lw = micro_[micro_batch].layers[layer];
  return {lw.forwarded, lw.backwarded};
}

// ---- Beginning a step ------------------------------------------------------------------------

Status StepExecutor::Begin(const std::vector<MicroBatch>& batches, float loss_scale,
                           bool evaluation, uint64_t step, bool* opened) {
  *opened = false;
  evaluating_ = evaluation;
  recording_ = step;
  const Clock::time_point begun = Clock::now();
  recorder_.BeginStep(recording_, begun);
  ECSS_RETURN_IF_ERROR(BuildStep(batches));
  begin_seconds_ = std::chrono::duration<double>(Clock::now() - begun).count();
  ECSS_RETURN_IF_ERROR(IssuePlanUploads());
  recorder_.SetPlan(recording_, *plan_);
  stalls_ = {};
  gradient_bytes_ = 0;
  submitted_ = 0;
  gradient_fence_seconds_ = 0;
  ECSS_RETURN_IF_ERROR(StartUpdates(loss_scale));
  *opened = true;
  if (!evaluating_ && !delayed() && updater_steps_ >= 3) {
    // Step t's device work may overlap step t-1's updates, not step t-2's.
    StallTimer timer(&stalls_.update_backlog_seconds);
    ECSS_RETURN_IF_ERROR(updater().WaitForStep(updater_steps_ - 2));
  }
  if (gated()) {
    prefetcher_->BeginReactiveStep();
    return Status::Ok();
  }
  Expedite();
  prefetcher_->BeginStep(sequence_);
  return Prefetch();
}

// Note [Updates in fetch order]: the updates of step t-1 still queued when step t begins run
// in the order step t first fetches their experts (forward: layer 0 first), ahead of the
// others. As submitted they run in backward order (layer L-1 first; deferred updates: in
// expert order from FinishStep), so a fetch of layer 0 that needs its expert's update waited
// for nearly all of them, the prefetcher stops at the first fetch that waits, and the
// optimizer ran dry during step t's device work. Routing is known before the step, so the
// order is too. (The NVMe updater keeps its order: see NvmeUpdater::Expedite.)
void StepExecutor::Expedite() {
  std::vector<uint32_t> ids;
  ids.reserve(sequence_.size());
  std::vector<bool> named(table_.index().size(), false);
  for (const ExpertId key : sequence_) {
    const uint32_t id = table_.at(key).id;
    if (named[id]) continue;  // its first use counts
    named[id] = true;
    ids.push_back(id);
  }
  updater().Expedite(ids);
}

// The optimizer's side of a step's beginning. An evaluation leaves the updater's steps alone
// (with the delayed update, the update in flight finishes and is published, as the next
// training step's Begin would). The delayed update finishes and publishes the update started
// at the previous Begin and starts the update of the previous step's gradients, which
// overlaps this whole step. Otherwise the optimizer's step begins.
Status StepExecutor::StartUpdates(float loss_scale) {
  // The plan's update ops carried in name the optimizer's last steps (Map below).
  const auto map = [&](uint64_t back, int32_t step_offset) {
    if (updater_steps_ > back) {
      recorder_.MapUpdaterStep(updater_steps_ - back, recording_, step_offset);
    }
  };
  if (evaluating_) {
    map(0, -1);  // the last updates, which its fetches wait for
    if (!delayed()) return Status::Ok();
    StallTimer timer(&stalls_.update_backlog_seconds);
    ECSS_RETURN_IF_ERROR(updater().WaitForStep(updater_steps_));
    return Publish();
  }
  if (!delayed()) {
    ECSS_RETURN_IF_ERROR(updater().BeginStep(loss_scale));
    ++updater_steps_;
    map(0, 0);
    map(1, -1);
    map(2, -2);
    return Status::Ok();
  }
  map(0, -2);  // the update held at the last Begin, whose weights this step publishes
  {
    StallTimer timer(&stalls_.update_backlog_seconds);
    ECSS_RETURN_IF_ERROR(updater().WaitForStep(updater_steps_));
  }
  ECSS_RETURN_IF_ERROR(Publish());
  ECSS_RETURN_IF_ERROR(StartHeldUpdate());
  held_loss_scale_ = loss_scale;
  if (!started_.empty()) {  // the plan's held update (step_offset -1) runs now
    recorder_.MapUpdaterStep(updater_steps_, recording_, -1);
    for (const PlanOp* held_update : plan_->Find(OpKind::kUpdate)) {
      if (held_update->step_offset == -1) recorder_.Issued(recording_, held_update->id);
    }
  }
  return Status::Ok();
}

void StepExecutor::Discard(bool opened) {
  backend_.SynchronizeStream(compute_.get()).IgnoreError();  // its error is the caller's
  prefetcher_->Clear();
  if (opened && !delayed() && !evaluating_) {
    // The optimizer's step began with no submissions: ending it updates nothing, and keeps
    // its step count equal to the session's.
    updater().FinishStep().status().IgnoreError();
  }
  ClearMicroBatches();
  evaluating_ = false;
}

// The step's micro-batches are done with. Their routing plans' buffers (RoutingPlan::BuildRre's
// `recycled`) and token and domain id copies are kept for the next step's, as many as a step has
// micro-batches at most: a step's plans are a few MiB, and new buffers each step cost their
// page faults where the allocator had given the pages back (385 faults, 9 ms more of a step's
// 2 ms routing here, `small ecss-host-4x32k`). The memory plan lists both in the heap. (A
// learned gate's micro-batches have neither; one whose routing failed has no plan.)
void StepExecutor::ClearMicroBatches() {
  const size_t most = options_.limits.max_micro_batches;
  for (MicroBatchWork& w : micro_) {
    if (w.plan.has_value() && spare_.plans.size() < most) {
      spare_.plans.push_back(std::move(*w.plan));
    }
    if (w.ids.tokens.capacity() > 0 && spare_.ids.size() < most) {
      spare_.ids.push_back(std::move(w.ids));
    }
  }
  micro_.clear();
}

// The device room of routing plan `slot` (a micro-batch's; with gates a micro-batch layer's)
// in the plan region the memory plan sized. Compute passes a plan's copy before the same slot
// is written again (one stream orders both), so a slot needs no fence.
StatusOr<void*> StepExecutor::PlanSlot(uint32_t slot, uint64_t bytes) const {
  if (slot >= memory_.plan_slots || bytes > memory_.plan_slot_bytes) {
    return InternalError(StrCat("routing plan ", slot, " of ", bytes, " bytes does not fit the ",
                                memory_.plan_slots, " slots of ", memory_.plan_slot_bytes,
                                " bytes the memory plan reserved"));
  }
  return static_cast<char*>(plans_.data()) + uint64_t{slot} * memory_.plan_slot_bytes;
}

// A layer of micro-batch `b` whose plan has `width` groups fits the gradient region (the plan
// itself refuses more than the device cache holds).
Status StepExecutor::CheckWidth(uint32_t b, uint32_t layer, size_t width) const {
  if (width > memory_.max_groups) {
    return ResourceExhaustedError(StrCat("micro-batch ", b, " layer ", layer, " activates ", width,
                                         " experts; the session was sized for ", memory_.max_groups,
                                         " (SessionOptions.limits.max_active_experts_per_layer)"));
  }
  return Status::Ok();
}

// The layer's groups as the plan's forward op has them (the routed experts; naive: every
// expert, unrouted ones with no rows) and its device permutation (`dp`, the plan's copy).
void StepExecutor::FillLayer(const LayerPlan& dp, const PlanOp& forward, LayerWork& lw) const {
  lw.device_perm = {dp.num_tokens, dp.k, dp.permutation, dp.inverse, dp.combine_weights};
  lw.experts = forward.experts;
  lw.offsets.assign(1, 0);
  for (uint32_t rows : forward.rows) lw.offsets.push_back(lw.offsets.back() + rows);
}

StatusOr<StepPlan> StepExecutor::BuildPlan() const {
  StepPlanInputs in;
  in.model = PlanModelOf(options_, memory_);
  in.policy = PlanPolicyOf(options_, cache_->slots(), evaluating_);
  for (const MicroBatchWork& w : micro_) {
    MicroBatchRoute route;
    if (w.plan) route = RouteOf(*w.plan);
    route.tokens = w.num_tokens;
    in.micro_batches.push_back(std::move(route));
  }
  // What the cache holds as the step begins, least recently used first (the last plan knows
  // the order), less what publishing the delayed update is about to drop.
  const std::vector<ExpertId> cached = cache_->ResidentKeys();
  std::unordered_set<ExpertId> kept(cached.begin(), cached.end());
  if (delayed()) {
    for (ExpertId key : started_) kept.erase(key);
  }
  for (ExpertId key : last_resident_) {
    if (kept.erase(key) != 0) in.resident.push_back(key);
  }
  for (ExpertId key : cached) {
    if (kept.erase(key) != 0) in.resident.push_back(key);
  }
  in.held_experts = held_.size();
  return BuildStepPlan(in);
}

// Which of the plan's fetches is at each access position (what the prefetcher reports).
void StepExecutor::IndexFetches() {
  fetch_at_.clear();
  for (const PlanOp* fetch : plan_->Find(OpKind::kFetch)) fetch_at_[fetch->position] = fetch->id;
}

Status StepExecutor::BuildStep(const std::vector<MicroBatch>& batches) {
  ClearMicroBatches();
  micro_.resize(batches.size());
  sequence_.clear();
  const uint32_t layers = options_.model.layers;
  for (uint32_t b = 0; b < batches.size(); ++b) {
    const MicroBatch& in = batches[b];
    MicroBatchWork& w = micro_[b];
    w.num_tokens = static_cast<uint32_t>(uint64_t{in.batch_size} * in.seq_len);  // checked
    w.layers.resize(layers);
    if (gated()) continue;  // routed layer by layer, as the gates run
    if (!spare_.ids.empty()) {
      w.ids = std::move(spare_.ids.back());
      spare_.ids.pop_back();
    }
    w.ids.tokens.assign(in.token_ids, in.token_ids + w.num_tokens);
    w.ids.domains.assign(in.domain_ids, in.domain_ids + in.batch_size);
    w.batch = {w.ids.tokens.data(), in.batch_size, in.seq_len, w.ids.domains.data()};
    RoutingPlan* recycled = spare_.plans.empty() ? nullptr : &spare_.plans.back();
    StatusOr<RoutingPlan> routed = RoutingPlan::BuildRre(*router_, w.batch, recycled);
    if (!routed.ok()) return routed.status().Annotate(StrCat("micro-batch ", b));
    if (recycled != nullptr) spare_.plans.pop_back();
    w.plan.emplace(std::move(routed).value());
    ECSS_ASSIGN_OR_RETURN(w.device_plan, PlanSlot(b, w.plan->bytes()));
  }
  StatusOr<StepPlan> built = BuildPlan();
  if (!built.ok()) return built.status().Annotate("BeginStep");
  plan_.emplace(std::move(built).value());
  issued_on_.clear();
  for (const PlanOp* forward : plan_->Find(OpKind::kForward)) {
    ECSS_RETURN_IF_ERROR(CheckWidth(static_cast<uint32_t>(forward->micro_batch),
                                    static_cast<uint32_t>(forward->layer), forward->experts.size())
                             .Annotate("BeginStep"));
  }
  if (gated()) return Status::Ok();
  // The step's access sequence (per micro-batch, forward 0..L-1 then backward L-1..0) and
  // each layer's groups, as the plan has them.
  for (uint32_t b = 0; b < micro_.size(); ++b) {
    for (uint32_t l = 0; l < layers; ++l) {
      FillLayer(micro_[b].plan->DeviceLayer(l, micro_[b].device_plan),
                ComputeOp(OpKind::kForward, b, l), micro_[b].layers[l]);
    }
  }
  for (const PlanOp& op : plan_->ops()) {
    if (op.kind != OpKind::kForward && op.kind != OpKind::kBackward) continue;
    LayerWork& lw =
        micro_[static_cast<uint32_t>(op.micro_batch)].layers[static_cast<uint32_t>(op.layer)];
    (op.kind == OpKind::kForward ? lw.first_position : lw.backward_position) = sequence_.size();
    for (uint32_t e : op.experts) sequence_.push_back(ExpertId{static_cast<uint32_t>(op.layer), e});
  }
  IndexFetches();
  return Status::Ok();
}

// Every micro-batch routed (BuildStep): only now is anything enqueued, so a refused step
// leaves no copy in flight out of (or into) the buffers it frees. (A learned gate routes, and
// uploads its plans, at each forward.)
Status StepExecutor::IssuePlanUploads() {
  if (gated()) return Status::Ok();
  for (const PlanOp* upload : plan_->Find(OpKind::kPlanUpload)) {
    ECSS_RETURN_IF_ERROR(HostWait(*upload));
    MicroBatchWork& w = micro_[static_cast<uint32_t>(upload->micro_batch)];
    ECSS_RETURN_IF_ERROR(backend_.CopyAsync(compute_.get(), w.device_plan, w.plan->data(),
                                            w.plan->bytes(), CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(Record(upload->id, compute_.get()));
  }
  return Status::Ok();
}

// ---- Issuing the plan's ops ------------------------------------------------------------------

// Where the plan lets fetches run ahead of compute (ecss): lease ahead of use, in sequence
// order, while the window and free slots allow.
Status StepExecutor::Prefetch() {
  if (!plan_->fetches_ahead()) return Status::Ok();
  return prefetcher_->Advance();
}

// After the host waits its fetches and it have in the plan; compute waits for their copies.
StatusOr<std::vector<Lease>> StepExecutor::LeasesFor(const PlanOp& op, uint64_t first) {
  ECSS_RETURN_IF_ERROR(HostWaitAccess(op));
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, prefetcher_->Take(first, op.experts.size()));
  ECSS_RETURN_IF_ERROR(HostWait(op));
  for (const Lease& lease : leases) {
    ECSS_RETURN_IF_ERROR(backend_.WaitEvent(compute_.get(), lease.ready()));
  }
  return leases;
}

Status StepExecutor::ReleaseAll(std::vector<Lease>& leases) {
  for (Lease& lease : leases) ECSS_RETURN_IF_ERROR(lease.Release(compute_.get()));
  return Status::Ok();
}

Status StepExecutor::StageSync(Stream stream) {
  StallTimer timer(&stalls_.stage_sync_seconds);
  return backend_.SynchronizeStream(stream);
}

Status StepExecutor::Record(uint32_t id, Stream stream) {
  issued_on_[id] = stream;
  if (!options_.record_op_times) return Status::Ok();
  recorder_.Issued(recording_, id);
  PlanRecorder* r = &recorder_;
  const uint64_t s = recording_;
  return backend_.LaunchHostFunction(stream, "plan op", [r, s, id] {
    r->Ended(s, id);
    return Status::Ok();
  });
}

Status StepExecutor::HostWait(const PlanOp& op) {
  if (!op.host_waits) return Status::Ok();
  // The streams of the deps; a dep that ran on no stream (an NVMe stage, a fetch the cache
  // did not need) stands for what it waited for in turn.
  std::vector<Stream> streams;
  std::vector<uint32_t> todo = op.deps;
  std::set<uint32_t> seen;
  while (!todo.empty()) {
    const uint32_t dep = todo.back();
    todo.pop_back();
    if (!seen.insert(dep).second) continue;
    const PlanOp& dep_op = plan_->ops()[dep];
    if (dep_op.kind == OpKind::kUpdate && dep_op.step_offset == 0) {
      ECSS_RETURN_IF_ERROR(WaitUpdate(dep_op));  // a chained update: ran on no stream
      continue;
    }
    auto issued = issued_on_.find(dep);
    if (issued == issued_on_.end()) {
      const PlanOp& unissued = plan_->ops()[dep];
      if (unissued.step_offset == 0)
        todo.insert(todo.end(), unissued.deps.begin(), unissued.deps.end());
      continue;
    }
    if (std::find(streams.begin(), streams.end(), issued->second) == streams.end()) {
      streams.push_back(issued->second);
    }
  }
  for (Stream stream : streams) ECSS_RETURN_IF_ERROR(StageSync(stream));
  return Status::Ok();
}

// A chained update (no-overlap, naive with immediate updates): its layer's gradients go to
// the optimizer now, and the host waits until every expert of it is updated.
Status StepExecutor::WaitUpdate(const PlanOp& update) {
  ECSS_RETURN_IF_ERROR(SubmitReady(/*wait=*/true));
  StallTimer timer(&stalls_.stage_sync_seconds);
  for (uint32_t e : update.experts) {
    ECSS_RETURN_IF_ERROR(updater().Wait(table_.at({static_cast<uint32_t>(update.layer), e}).id));
  }
  return Status::Ok();
}

Status StepExecutor::HostWaitAccess(const PlanOp& compute_op) {
  for (uint32_t dep : compute_op.deps) {
    const PlanOp& op = plan_->ops()[dep];
    if (op.kind == OpKind::kFetch || op.kind == OpKind::kStage) ECSS_RETURN_IF_ERROR(HostWait(op));
  }
  return Status::Ok();
}

// ---- Forward and backward --------------------------------------------------------------------

// The layer's plan from the gate's choices (checked by the session), uploaded; its experts
// join the step's sequence.
Status StepExecutor::RouteGated(uint32_t micro_batch, uint32_t layer, const GateChoices& gate) {
  MicroBatchWork& w = micro_[micro_batch];
  LayerWork& lw = w.layers[layer];
  const auto where = [&] { return StrCat("Forward: micro-batch ", micro_batch, " layer ", layer); };
  StatusOr<RoutingPlan> routed = RoutingPlan::FromAssignments(
      layer, table_.experts_in_layer(layer), w.num_tokens, gate.k, gate.experts, gate.weights);
  if (!routed.ok()) return routed.status().Annotate(where());
  const LayerRoute route = RouteOf(routed->layer(0));
  ECSS_RETURN_IF_ERROR(
      CheckWidth(micro_batch, layer, plan_->Width(layer, route)).Annotate(where()));
  ECSS_ASSIGN_OR_RETURN(void* device_plan,
                        PlanSlot(micro_batch * options_.model.layers + layer, routed->bytes()));
  Status appended = plan_->AppendForward(micro_batch, layer, route, routed->bytes());
  if (!appended.ok()) return appended.Annotate(where());
  IndexFetches();
  const PlanOp& forward = ComputeOp(OpKind::kForward, micro_batch, layer);
  FillLayer(routed->DeviceLayer(0, device_plan), forward, lw);
  const std::vector<const PlanOp*> uploads = plan_->Find(
      OpKind::kPlanUpload, static_cast<int32_t>(micro_batch), static_cast<int32_t>(layer));
  if (!uploads.empty()) ECSS_RETURN_IF_ERROR(HostWait(*uploads.back()));
  ECSS_RETURN_IF_ERROR(backend_.CopyAsync(compute_.get(), device_plan, routed->data(),
                                          routed->bytes(), CopyKind::kHostToDevice));
  if (!uploads.empty()) ECSS_RETURN_IF_ERROR(Record(uploads.back()->id, compute_.get()));
  lw.plan.emplace(std::move(routed).value());
  lw.device_plan = device_plan;
  lw.first_position = prefetcher_->Append(LayerKeys(layer, lw.experts));
  return Status::Ok();
}

Status StepExecutor::Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                             const GateChoices* gate, void* choice_outputs) {
  LayerWork& lw = micro_[micro_batch].layers[layer];
  if (gate != nullptr) ECSS_RETURN_IF_ERROR(RouteGated(micro_batch, layer, *gate));
  const ModelSpec& m = options_.model;
  const PlanOp& op = ComputeOp(OpKind::kForward, micro_batch, layer);
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, LeasesFor(op, lw.first_position));
  std::vector<const void*> w_in, w_out;
  for (const Lease& lease : leases) {
    w_in.push_back(lease.weights());
    w_out.push_back(static_cast<char*>(lease.weights()) + uint64_t{m.d_model} * m.d_in() * elem());
  }
  void* saved = saved_x_[micro_batch * m.layers + layer].data();
  const Stream c = compute_.get();
  ECSS_RETURN_IF_ERROR(kernels_->Permute(c, lw.device_perm, {m.d_model, m.dtype, false}, x, saved));
  const GroupedFfnProblem p = ProblemFor(lw);
  ECSS_RETURN_IF_ERROR(
      kernels_->FfnForward(c, p, {saved, w_in.data(), w_out.data(), perm_a_.data(), nullptr},
                           {workspace_.data(), memory_.workspace_bytes}));
  ECSS_RETURN_IF_ERROR(
      kernels_->Combine(c, lw.device_perm, {m.d_model, m.dtype, true}, perm_a_.data(), y));
  if (choice_outputs != nullptr) {
    // Each slot's row, unweighted: a combine over one choice per "token" (= slot).
    const TokenPermutation slots{lw.device_perm.rows(), 1, lw.device_perm.row_to_slot,
                                 lw.device_perm.slot_to_row, lw.device_perm.row_weights};
    ECSS_RETURN_IF_ERROR(
        kernels_->Combine(c, slots, {m.d_model, m.dtype, false}, perm_a_.data(), choice_outputs));
  }
  ECSS_RETURN_IF_ERROR(Record(op.id, c));
  ECSS_RETURN_IF_ERROR(ReleaseAll(leases));
  lw.forwarded = true;
  ECSS_RETURN_IF_ERROR(SubmitReady(false));
  return Prefetch();
}

Status StepExecutor::Backward(uint32_t micro_batch, uint32_t layer, const void* dy, void* dx) {
  LayerWork& lw = micro_[micro_batch].layers[layer];
  if (gated()) {  // reactive: the layer's experts are fetched now, again if evicted
    ECSS_RETURN_IF_ERROR(plan_->AppendBackward(micro_batch, layer));
    IndexFetches();
    lw.backward_position = prefetcher_->Append(LayerKeys(layer, lw.experts));
  }
  const ModelSpec& m = options_.model;
  const Stream c = compute_.get();
  const PlanOp& op = ComputeOp(OpKind::kBackward, micro_batch, layer);
  // dy_perm = dy of each row's token, scaled by the row's combine weight.
  ECSS_RETURN_IF_ERROR(
      kernels_->Permute(c, lw.device_perm, {m.d_model, m.dtype, true}, dy, perm_a_.data()));
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, LeasesFor(op, lw.backward_position));
  std::vector<const void*> w_in, w_out;
  std::vector<float*> dw_in, dw_out;
  const uint64_t in_elems = uint64_t{m.d_model} * m.d_in();
  for (size_t i = 0; i < leases.size(); ++i) {
    w_in.push_back(leases[i].weights());
    w_out.push_back(static_cast<char*>(leases[i].weights()) + in_elems * elem());
    float* base = static_cast<float*>(dw_.data()) + i * memory_.params;
    dw_in.push_back(base);
    dw_out.push_back(base + in_elems);
  }
  // The gradient region is reused: wait until the previous copies out of it finished.
  ECSS_RETURN_IF_ERROR(backend_.WaitEvent(c, dw_free_.get()));
  const GroupedFfnProblem p = ProblemFor(lw);
  const void* saved = saved_x_[micro_batch * m.layers + layer].data();
  ECSS_RETURN_IF_ERROR(
      kernels_->FfnBackward(c, p,
                            {saved, w_in.data(), w_out.data(), nullptr, perm_a_.data(),
                             perm_b_.data(), dw_in.data(), dw_out.data(), false},
                            {workspace_.data(), memory_.workspace_bytes}));
  ECSS_RETURN_IF_ERROR(
      kernels_->Combine(c, lw.device_perm, {m.d_model, m.dtype, false}, perm_b_.data(), dx));
  ECSS_RETURN_IF_ERROR(Record(op.id, c));
  ECSS_RETURN_IF_ERROR(ReleaseAll(leases));
  lw.backwarded = true;

  ECSS_RETURN_IF_ERROR(CopyGradients(micro_batch, layer, lw));
  // The last micro-batch's backward of a layer completes its experts' gradients: once its
  // copies passed, and (several micro-batches) every addition before them.
  if (micro_batch + 1 == micro_.size()) {
    const Stream done = micro_.size() > 1 ? add_.get() : d2h_.get();  // add_ follows d2h_
    ECSS_RETURN_IF_ERROR(backend_.RecordEvent(layer_grads_done_[layer].get(), done));
    pending_layers_.push_back(layer);
  }
  ECSS_RETURN_IF_ERROR(SubmitReady(false));
  return Prefetch();
}

namespace {

// acc += add over `count` gradients of `dtype`; bf16 sums are rounded to bf16 again (to
// nearest even), as SessionOptions::gradient_dtype documents.
void AccumulateGradient(void* acc, const void* add, uint64_t count, DType dtype) {
  if (dtype == DType::kF32) {
    float* a = static_cast<float*>(acc);
    const float* b = static_cast<const float*>(add);
    for (uint64_t i = 0; i < count; ++i) a[i] += b[i];
    return;
  }
  BFloat16* a = static_cast<BFloat16*>(acc);
  const BFloat16* b = static_cast<const BFloat16*>(add);
  for (uint64_t i = 0; i < count; ++i) a[i] = FloatToBf16(Bf16ToFloat(a[i]) + Bf16ToFloat(b[i]));
}

}  // namespace

// The layer's expert gradients (in the gradient region) to pinned memory: the first
// micro-batch that touches an expert copies into its accumulator; later ones copy to a
// staging half and are added on the host on add_, in micro-batch order, which keeps the sum
// deterministic. The region is free for the next backward once the copies passed, and the
// half for the next copies into it once its additions ended.
Status StepExecutor::CopyGradients(uint32_t micro_batch, uint32_t layer, const LayerWork& lw) {
  const Stream d = d2h_.get();
  const Stream c = compute_.get();
  const auto mb = static_cast<int32_t>(micro_batch);
  const PlanOp& copy_op = *plan_->Find(OpKind::kGradientCopy, mb, static_cast<int32_t>(layer))[0];
  ECSS_RETURN_IF_ERROR(HostWait(copy_op));
  const uint64_t params = memory_.params;
  const DType dtype = options_.gradient_dtype;
  const uint64_t grad_bytes = params * DTypeSize(dtype);
  const char* region = static_cast<const char*>(dw_.data());
  if (dtype != DType::kF32) {  // one cast of the layer's gradients, behind its backward
    ECSS_RETURN_IF_ERROR(kernels_->Cast(c, dw_.data(), DType::kF32, dw_cast_.data(), dtype,
                                        uint64_t{params} * lw.experts.size()));
    region = static_cast<const char*>(dw_cast_.data());
  }
  ECSS_RETURN_IF_ERROR(backend_.RecordEvent(dw_ready_.get(), c));
  ECSS_RETURN_IF_ERROR(backend_.WaitEvent(d, dw_ready_.get()));
  std::vector<std::pair<void*, const void*>> adds;
  const uint32_t half = staging_turn_;
  for (size_t i = 0; i < lw.experts.size(); ++i) {
    ExpertTable::Entry& expert = table_.at({layer, lw.experts[i]});
    const void* src = region + i * grad_bytes;
    if (!expert.touched && delayed() && updater().Pending(expert.id)) {
      // The update started at Begin may still read this buffer (the previous gradient).
      StallTimer timer(&gradient_fence_seconds_);
      ECSS_RETURN_IF_ERROR(updater().Wait(expert.id));
    }
    if (!expert.touched) {
      void* grad = nullptr;
      {
        StallTimer timer(&gradient_fence_seconds_);  // waits only when every slot is in use
        ECSS_ASSIGN_OR_RETURN(grad, table_.TakeGradient({layer, lw.experts[i]}, recording_));
      }
      expert.touched = true;  // from here on a failed step releases it (ClearTouched)
      ECSS_RETURN_IF_ERROR(backend_.CopyAsync(d, grad, src, grad_bytes, CopyKind::kDeviceToHost));
    } else {
      if (adds.empty()) ECSS_RETURN_IF_ERROR(backend_.WaitEvent(d, staging_[half].free.get()));
      char* staging = static_cast<char*>(staging_[half].block.data()) + i * grad_bytes;
      ECSS_RETURN_IF_ERROR(
          backend_.CopyAsync(d, staging, src, grad_bytes, CopyKind::kDeviceToHost));
      adds.emplace_back(table_.GradientOf({layer, lw.experts[i]}), staging);
    }
    gradient_bytes_ += grad_bytes;
  }
  ECSS_RETURN_IF_ERROR(Record(copy_op.id, d));
  ECSS_RETURN_IF_ERROR(backend_.RecordEvent(dw_free_.get(), d));
  if (micro_.size() == 1) return Status::Ok();
  // With several micro-batches add_ follows the copies, whether or not this call adds.
  const Stream a = add_.get();
  ECSS_RETURN_IF_ERROR(backend_.RecordEvent(copied_.get(), d));
  ECSS_RETURN_IF_ERROR(backend_.WaitEvent(a, copied_.get()));
  if (adds.empty()) return Status::Ok();
  ECSS_RETURN_IF_ERROR(
      backend_.LaunchHostFunction(a, "accumulate gradients", [adds, params, dtype] {
        for (const auto& [acc, add] : adds) AccumulateGradient(acc, add, params, dtype);
        return Status::Ok();
      }));
  staging_turn_ = 1 - half;
  ECSS_RETURN_IF_ERROR(backend_.RecordEvent(staging_[half].free.get(), a));
  const std::vector<const PlanOp*> add_op =
      plan_->Find(OpKind::kAccumulate, mb, static_cast<int32_t>(layer));
  if (!add_op.empty()) ECSS_RETURN_IF_ERROR(Record(add_op[0]->id, a));
  return Status::Ok();
}

// ---- Updates ---------------------------------------------------------------------------------

// Layer `layer`'s gradients are in host memory: hand them to the optimizer and drop the
// experts' device copies (their weights are about to change).
Status StepExecutor::SubmitLayer(uint32_t layer) {
  for (uint32_t e = 0; e < table_.experts_in_layer(layer); ++e) {
    ExpertTable::Entry& expert = table_.at({layer, e});
    if (!expert.touched) continue;
    expert.touched = false;
    if (delayed()) {  // held until the next Begin
      held_.push_back({layer, e});
      continue;
    }
    Status submitted = cache_->Invalidate(ExpertId{layer, e});
    if (submitted.ok()) {
      submitted =
          updater().Submit(expert.id, table_.GradientOf({layer, e}), options_.gradient_dtype);
    }
    table_.ReleaseGradient({layer, e}, recording_);  // submitted, or dropped with the step
    ECSS_RETURN_IF_ERROR(submitted);
    ++submitted_;
  }
  if (!plan_->policy().deferred_updates) {  // the layer's update starts now
    for (const PlanOp* update : plan_->Find(OpKind::kUpdate, -1, static_cast<int32_t>(layer))) {
      if (update->step_offset == 0) recorder_.Issued(recording_, update->id);
    }
  }
  return updater().Flush();
}

// Submits the layers whose gradient copies completed (all of them when `wait`).
Status StepExecutor::SubmitReady(bool wait) {
  while (!pending_layers_.empty()) {
    const uint32_t layer = pending_layers_.front();
    Event done = layer_grads_done_[layer].get();
    if (wait) {
      StallTimer timer(&stalls_.gradient_copy_seconds);
      ECSS_RETURN_IF_ERROR(backend_.SynchronizeEvent(done));
    } else {
      ECSS_ASSIGN_OR_RETURN(bool ready, backend_.QueryEvent(done));
      if (!ready) return Status::Ok();
    }
    pending_layers_.pop_front();
    ECSS_RETURN_IF_ERROR(SubmitLayer(layer));
  }
  return Status::Ok();
}

// Delayed update: the update started at the previous Begin has finished (the caller
// waited); its experts' weights become what the device fetches. Nothing reads the published
// copies now: the step's copies out of them completed (h2d is synchronised first).
Status StepExecutor::Publish() {
  ECSS_RETURN_IF_ERROR(backend_.SynchronizeStream(h2d_.get()));
  for (ExpertId id : started_) {
    table_.Publish(id);
    ECSS_RETURN_IF_ERROR(cache_->Invalidate(id));
  }
  started_.clear();
  return Status::Ok();
}

// Delayed update: starts the update of the held gradients (the step before's).
Status StepExecutor::StartHeldUpdate() {
  started_report_ = StepReport{};
  if (held_.empty()) return Status::Ok();
  ECSS_RETURN_IF_ERROR(updater().BeginStep(held_loss_scale_));
  ++updater_steps_;
  for (ExpertId id : held_) {
    const ExpertTable::Entry& x = table_.at(id);
    Status submitted_one = updater().Submit(x.id, table_.GradientOf(id), options_.gradient_dtype);
    if (!submitted_one.ok()) {
      updater().AbortStep().IgnoreError();  // the held gradients stay held: Begin retries
      return submitted_one;
    }
  }
  submitted_ = static_cast<uint32_t>(held_.size());
  StatusOr<StepReport> finished = updater().FinishStep();
  if (!finished.ok()) {
    updater().AbortStep().IgnoreError();  // nothing of it applied: Begin retries them once
    return finished.status();
  }
  started_report_ = *finished;
  // Released as the previous step's: their update has started, so a later Take may wait.
  for (ExpertId id : held_) table_.ReleaseGradient(id, recording_ - 1);
  started_ = std::move(held_);
  held_.clear();
  return Status::Ok();
}

Status StepExecutor::Quiesce() {
  ECSS_RETURN_IF_ERROR(backend_.SynchronizeAll());
  if (delayed()) {
    ECSS_RETURN_IF_ERROR(updater().WaitForStep(updater_steps_));
    ECSS_RETURN_IF_ERROR(Publish());
  }
  return updater().Synchronize().Annotate("an expert update failed (its states are unchanged)");
}

Status StepExecutor::RestoreHeld(const std::vector<ExpertId>& held, float loss_scale,
                                 std::string_view gradients, uint64_t step) {
  const uint64_t bytes = memory_.params * DTypeSize(options_.gradient_dtype);
  for (size_t i = 0; i < held.size(); ++i) {
    ECSS_ASSIGN_OR_RETURN(void* grad, table_.TakeGradient(held[i], step));
    std::memcpy(grad, gradients.data() + i * bytes, bytes);
  }
  held_ = held;
  held_loss_scale_ = loss_scale;
  return Status::Ok();
}

Status StepExecutor::TakeUpdateError() {
  return updater().TakeError().Annotate("an expert update failed (its states are unchanged)");
}

// ---- Ending a step ---------------------------------------------------------------------------

Status StepExecutor::Finish(StepRecord* record) {
  StepReport report = started_report_;  // delayed: the update Begin started
  Status ended = FinishWork(&report);
  stalls_.update_fence_seconds = prefetcher_->stall_seconds() + gradient_fence_seconds_;
  prefetcher_->Clear();
  record->tokens = 0;
  for (const MicroBatchWork& w : micro_) record->tokens += w.num_tokens;
  ClearMicroBatches();  // the plans' device copies: compute has passed them
  last_resident_ = plan_->ResidentAfter();
  evaluating_ = false;
  record->gradient_bytes = gradient_bytes_;
  record->updated_experts = submitted_;
  record->begin_seconds = begin_seconds_;
  record->stalls = stalls_;
  record->stall_records = prefetcher_->stalls();
  record->report = report;
  return ended;
}

// The last gradients to the optimizer, the step's end for it, compute drained, and
// (no-overlap, naive) the updates waited for. Runs every part even after a failure, so that
// nothing of the step is left in flight; returns the first failure.
Status StepExecutor::FinishWork(StepReport* report) {
  Status first = SubmitReady(true);
  plan_->Finish();  // learned gates: the updates that wait for the whole step
  recorder_.SetPlan(recording_, *plan_);
  if (!first.ok()) {
    // The gradients not submitted are dropped with the step, and what the optimizer holds
    // back is not applied with a norm of part of the step.
    // No copy or addition may land in an accumulator once it is released.
    backend_.SynchronizeStream(d2h_.get()).IgnoreError();
    backend_.SynchronizeStream(add_.get()).IgnoreError();
    table_.ClearTouched(recording_);
    pending_layers_.clear();
    if (!delayed() && !evaluating_) updater().AbortStep().IgnoreError();
    // The delayed update holds the layers submitted so far: dropped too, never applied (or
    // saved) as a whole step's.
    for (ExpertId id : held_) table_.ReleaseGradient(id, recording_);
    held_.clear();
  } else if (!delayed() && !evaluating_) {
    for (const PlanOp* update : plan_->Find(OpKind::kUpdate)) {
      if (update->step_offset == 0 && plan_->policy().deferred_updates) {
        recorder_.Issued(recording_, update->id);  // they start now, after the global norm
      }
    }
    StatusOr<StepReport> finished = updater().FinishStep();
    if (finished.ok()) {
      *report = *finished;
    } else if (first.ok()) {
      first = finished.status();
    }
  }
  {
    StallTimer timer(&stalls_.stage_sync_seconds);
    Status synced = backend_.SynchronizeStream(compute_.get());
    if (first.ok()) first = synced;
  }
  if (plan_->step_waits_for_updates()) {
    StallTimer timer(&stalls_.optimizer_seconds);
    Status updated = updater().Synchronize();
    if (first.ok()) first = updated.Annotate("an expert update failed (its states are unchanged)");
  } else if (first.ok()) {
    first = TakeUpdateError();
  }
  recorder_.EndStep(recording_, Clock::now());  // the step's end for its executed plan
  return first;
}

Status StepExecutor::Synchronize(bool in_step) {
  ECSS_RETURN_IF_ERROR(backend_.SynchronizeAll());
  if (delayed() && !in_step) {  // drain: start the held update, publish everything
    ECSS_RETURN_IF_ERROR(updater().WaitForStep(updater_steps_));
    ECSS_RETURN_IF_ERROR(Publish());
    ECSS_RETURN_IF_ERROR(StartHeldUpdate());
    ECSS_RETURN_IF_ERROR(updater().Synchronize());
    return Publish();
  }
  return updater().Synchronize().Annotate("an expert update failed (its states are unchanged)");
}

}  // namespace ecss
