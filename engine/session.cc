#include "engine/session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>

#include "engine/expert_table.h"
#include "engine/memory_plan.h"
#include "engine/plan_recorder.h"
#include "engine/step_plan.h"
#include "kernels/kernel_runner.h"
#include "offload/device_cache.h"
#include "offload/expert_store.h"
#include "offload/prefetcher.h"
#include "offload/state_file.h"
#include "offload/weight_stager.h"
#include "router/rre_router.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/base/trace.h"
#include "runtime/device/backend.h"
#include "runtime/device/pinned_pool.h"

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

// A sparse layer of one micro-batch as the kernels see it.
struct LayerWork {
  std::vector<uint32_t> experts;  // global expert ids within the layer (the grouped FFN's groups)
  std::vector<uint32_t> offsets;  // [experts + 1] rows of each
  TokenPermutation device_perm;   // arrays in the device copy of the plan
  uint64_t first_position = 0;    // of the forward accesses in the step's sequence
  uint64_t backward_position = 0;
  bool forwarded = false, backwarded = false;
  // Learned gates: the layer's own plan, made at Forward from the gate's choices, and its
  // device copy (in the session's plan region).
  std::optional<RoutingPlan> plan;
  void* device_plan = nullptr;
};

struct MicroBatchWork {
  std::vector<uint32_t> token_ids, domain_ids;
  uint32_t num_tokens = 0;
  MicroBatch batch;
  std::optional<RoutingPlan> plan;
  void* device_plan = nullptr;  // its device copy, in the session's plan region
  std::vector<LayerWork> layers;
};

// The cache keys of a layer's experts, in the grouped FFN's order.
std::vector<ExpertId> LayerKeys(uint32_t layer, const LayerWork& lw) {
  std::vector<ExpertId> keys;
  keys.reserve(lw.experts.size());
  for (uint32_t e : lw.experts) keys.push_back(ExpertId{layer, e});
  return keys;
}

// The grouped FFN of the model (activations recomputed in backward) over `rows` rows.
GroupedFfnProblem FfnProblemOf(const SessionOptions& options, uint32_t rows) {
  GroupedFfnProblem p;
  p.d_model = options.model.d_model;
  p.d_ff = options.model.d_ff;
  p.activation = options.model.activation;
  p.dtype = options.model.dtype;
  p.saved = SavedActivation::kRecompute;
  p.rows = rows;
  return p;
}

KernelRunnerOptions KernelOptionsOf(const SessionOptions& options) {
  KernelRunnerOptions kernel_options;
  kernel_options.cpu.threads = options.kernel_threads;
  return kernel_options;
}

// The session's memory plan on `kernels`' backend: its allocation rules and the grouped FFN's
// scratch for a micro-batch layer of max_rows rows, forward or backward.
StatusOr<MemoryPlan> PlanOn(const BackendCapabilities& caps, const KernelRunner& kernels,
                            const SessionOptions& options) {
  const GroupedFfnProblem sizing = FfnProblemOf(options, MaxRows(options));
  return PlanMemory(options, DeviceMemoryRules::Of(caps),
                    std::max(kernels.FfnForwardWorkspaceBytes(sizing),
                             kernels.FfnBackwardWorkspaceBytes(sizing)));
}

}  // namespace

std::string_view StrategyName(Strategy strategy) {
  switch (strategy) {
    case Strategy::kEcss:
      return "ecss";
    case Strategy::kNoOverlap:
      return "no-overlap";
    case Strategy::kNaive:
      return "naive";
  }
  return "?";
}

StatusOr<Strategy> ParseStrategy(std::string_view name) {
  for (Strategy s : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    if (StrategyName(s) == name) return s;
  }
  return InvalidArgumentError(StrCat("unknown strategy '", name, "' (ecss, no-overlap, naive)"));
}

struct Session::Impl {
  Impl(Backend& b, const SessionOptions& o) : backend(b), options(o) {}

  Backend& backend;
  SessionOptions options;
  std::optional<RreRouter> router;
  // Declared before the table's updater, whose threads report to it until it is destroyed.
  PlanRecorder recorder;
  std::unique_ptr<KernelRunner> kernels;
  // Every expert and its states; declared before what uses it (the prefetcher reads its
  // stager; the gradient staging is carved from its pinned pool).
  std::unique_ptr<ExpertTable> table;
  std::unique_ptr<DeviceCache> cache;
  std::unique_ptr<Prefetcher> prefetcher;
  OwnedStream compute, h2d, d2h;
  OwnedEvent dw_ready, dw_free;
  std::vector<OwnedEvent> layer_grads_done;  // per layer
  MemoryPlan memory;                         // every byte the session allocates
  uint64_t params = 0;                       // per expert
  uint64_t expert_bytes = 0;                 // compute weights of one expert
  uint32_t max_rows = 0;
  uint32_t max_groups = 0;

  // Device buffers sized at creation.
  std::vector<Buffer> saved_x;  // [micro-batch * layers + layer]: the permuted forward input
  Buffer perm_a, perm_b, workspace, dw;
  Buffer plans;  // the step's routing plans (MemoryPlan::plan_slots of plan_slot_bytes)
  uint64_t workspace_bytes = 0;
  Buffer grad_tmp;  // pinned: later micro-batches' gradients before they are added

  // The step.
  bool in_step = false;
  uint64_t step = 0;
  std::vector<MicroBatchWork> micro;
  std::vector<ExpertId> sequence;
  // The step's plan (learned gates: growing as layers are routed), what of it was issued on
  // which stream (for its host-wait edges), and when its ops ran.
  std::optional<StepPlan> plan;
  std::map<uint32_t, Stream> issued_on;
  std::map<uint64_t, uint32_t> fetch_at;  // sequence position -> the plan's fetch there
  uint64_t recording = 0;                 // the step whose ops are being recorded
  // The cache's contents after the last step's plan, least recently used first.
  std::vector<ExpertId> last_resident;
  bool evaluating = false;              // the step is an evaluation: Forward only
  std::deque<uint32_t> pending_layers;  // gradients complete once d2h passes
  StallStats stalls;
  Clock::time_point last_end;
  bool has_last_end = false;
  CopyStats copies_at_begin;
  CacheStats cache_at_begin;
  EngineBusyTimes engines_at_begin;
  double optimizer_busy_at_begin = 0;
  uint64_t nvme_at_begin = 0;
  uint64_t gradient_bytes = 0;
  uint32_t submitted = 0;

  // Delayed update (DPU): the gradients of the step before (layer, expert), held until the
  // next BeginStep; the experts whose update started at the last BeginStep (published at the
  // next); the loss scale of the held gradients; the updater's step count; the report of the
  // update started in this step; time Backward waited for an update to release a gradient
  // buffer.
  std::vector<ExpertId> held, started;
  float held_loss_scale = 1;
  uint64_t updater_steps = 0;
  StepReport started_report;
  double gradient_fence_seconds = 0;

  uint32_t d_in() const {
    return options.model.activation == Activation::kSwiGlu ? 2 * options.model.d_ff
                                                           : options.model.d_ff;
  }
  uint64_t elem() const { return DTypeSize(options.model.dtype); }
  bool gated() const { return options.routing == Routing::kLearnedGate; }
  bool delayed() const { return options.delayed_update; }
  ExpertUpdater& updater() { return table->updater(); }
  Status Publish();
  Status StartHeldUpdate();

  Status CreateAll();
  Status CreateRouter();
  Status CreateStreams();
  Status CreateDeviceBuffers();
  Status CreateCache();
  Status StartStep(const std::vector<MicroBatch>& micro_batches, float loss_scale);
  void DiscardStep();
  Status TakeUpdateError();
  Status FinishStepWork(StepReport* report);
  Status BuildStep(const std::vector<MicroBatch>& batches);
  Status CheckWidth(uint32_t b, uint32_t layer, size_t width) const;
  StatusOr<void*> PlanSlot(uint32_t slot, uint64_t bytes) const;
  void FillLayer(const LayerPlan& dp, const PlanOp& forward, LayerWork& lw) const;
  Status RouteGated(uint32_t micro_batch, uint32_t layer, const GateChoices& gate);
  Status RunForward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                    const GateChoices* gate, void* choice_outputs);
  Status Prefetch();
  StatusOr<std::vector<Lease>> LeasesFor(const PlanOp& op, uint64_t first);
  Status ReleaseAll(std::vector<Lease>& leases);
  Status StageSync(Stream stream);
  // The plan, from the step's routing (RRE: every micro-batch, built at BeginStep).
  StatusOr<StepPlan> BuildPlan() const;
  void IndexFetches();
  // Issues op `id` on `stream`: recorded now, ended when the stream passes what was enqueued.
  Status Record(uint32_t id, Stream stream);
  // The plan's edges the host waits on before issuing `op` (no-overlap, naive).
  Status HostWait(const PlanOp& op);
  // Before an access's leases: the host waits of its fetches (and of the compute op itself).
  Status HostWaitAccess(const PlanOp& compute);
  const PlanOp& ComputeOp(OpKind kind, uint32_t micro_batch, uint32_t layer) const {
    return *plan->Compute(kind, micro_batch, layer);
  }
  Status CopyGradients(uint32_t micro_batch, uint32_t layer, const LayerWork& lw);
  Status SubmitLayer(uint32_t layer);
  Status SubmitReady(bool wait);
  Status CheckActivation(const void* ptr, uint32_t micro_batch, const char* what) const;
  Status CheckView(uint32_t micro_batch, const TensorView& view, const char* what) const;
  // Counters at the start of a step's window (the previous EndStep's return), so that a
  // step's statistics cover exactly the time its `seconds` measures.
  void Snapshot() {
    copies_at_begin = backend.copy_stats();
    cache_at_begin = cache->stats();
    engines_at_begin = backend.busy_times();
    optimizer_busy_at_begin = updater().busy_seconds();
    nvme_at_begin = table->nvme_bytes();
  }
  // The grouped FFN of one layer of one micro-batch.
  GroupedFfnProblem ProblemFor(const LayerWork& lw) const {
    GroupedFfnProblem p = FfnProblemOf(options, lw.offsets.back());
    p.num_groups = static_cast<uint32_t>(lw.experts.size());
    p.group_offsets = lw.offsets.data();
    p.rows = lw.offsets.back();
    return p;
  }
};

// ---- Creation -------------------------------------------------------------------------------

Status Session::Impl::CreateAll() {
  ECSS_RETURN_IF_ERROR(options.Validate());
  const BackendCapabilities& caps = backend.capabilities();
  if (options.device_budget_bytes == 0 || options.device_budget_bytes > caps.device_memory_bytes) {
    return InvalidArgumentError(StrCat("session: device_budget_bytes ", options.device_budget_bytes,
                                       " must be in (0, ", caps.device_memory_bytes,
                                       "] (the backend's device memory)"));
  }
  if (options.optimizer.trace == nullptr) options.optimizer.trace = options.trace;
  if (options.record_op_times) {  // when each expert's update ran, for the executed plans
    options.optimizer.on_update = [this, user = options.optimizer.on_update](
                                      uint32_t id, uint64_t updater_step, Clock::time_point start,
                                      Clock::time_point end) {
      recorder.UpdateRan(updater_step, table->index().Id(id).layer, start, end);
      if (user) user(id, updater_step, start, end);
    };
  }
  ECSS_RETURN_IF_ERROR(CreateRouter());
  ECSS_ASSIGN_OR_RETURN(kernels, KernelRunner::Create(backend, KernelOptionsOf(options)));
  ECSS_ASSIGN_OR_RETURN(memory, PlanOn(caps, *kernels, options));
  params = memory.params;
  expert_bytes = memory.expert_bytes;
  max_rows = memory.max_rows;
  max_groups = memory.max_groups;
  ECSS_RETURN_IF_ERROR(CreateStreams());
  ECSS_ASSIGN_OR_RETURN(table, ExpertTable::Create(backend, options, memory));
  ECSS_RETURN_IF_ERROR(CreateDeviceBuffers());
  return CreateCache();
}

// The RRE tables (and the domain map, with every domain's group in every layer).
Status Session::Impl::CreateRouter() {
  const ModelSpec& m = options.model;
  ECSS_ASSIGN_OR_RETURN(DomainMap map, DomainMap::Create(m.layers));
  for (uint32_t d = 0; d < m.domains.size(); ++d) {
    ECSS_RETURN_IF_ERROR(map.AddDomainUniform(m.domains[d].name, d, m.domains[d].experts));
  }
  ECSS_ASSIGN_OR_RETURN(RreRouter built, RreRouter::Create(map, {m.vocab, m.seed, m.builder}));
  router.emplace(std::move(built));
  return Status::Ok();
}

Status Session::Impl::CreateStreams() {
  ECSS_ASSIGN_OR_RETURN(compute, CreateOwnedStream(backend, "compute"));
  ECSS_ASSIGN_OR_RETURN(h2d, CreateOwnedStream(backend, "h2d experts"));
  ECSS_ASSIGN_OR_RETURN(d2h, CreateOwnedStream(backend, "d2h gradients"));
  ECSS_ASSIGN_OR_RETURN(dw_ready, CreateOwnedEvent(backend));
  ECSS_ASSIGN_OR_RETURN(dw_free, CreateOwnedEvent(backend));
  for (uint32_t l = 0; l < options.model.layers; ++l) {
    ECSS_ASSIGN_OR_RETURN(OwnedEvent event, CreateOwnedEvent(backend));
    layer_grads_done.push_back(std::move(event));
  }
  return Status::Ok();
}

// Device memory: what a step keeps and works in, as the memory plan lists it.
Status Session::Impl::CreateDeviceBuffers() {
  Allocator& device = backend.device_memory();
  for (uint32_t i = 0; i < options.max_micro_batches * options.model.layers; ++i) {
    ECSS_ASSIGN_OR_RETURN(Buffer b,
                          device.Allocate(memory.activation_bytes, MemoryTag::kActivations));
    saved_x.push_back(std::move(b));
  }
  ECSS_ASSIGN_OR_RETURN(perm_a, device.Allocate(memory.activation_bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(perm_b, device.Allocate(memory.activation_bytes, MemoryTag::kActivations));
  workspace_bytes = memory.workspace_bytes;
  ECSS_ASSIGN_OR_RETURN(workspace, device.Allocate(workspace_bytes, MemoryTag::kWorkspace));
  ECSS_ASSIGN_OR_RETURN(dw,
                        device.Allocate(uint64_t{max_groups} * params * 4, MemoryTag::kGradients));
  ECSS_ASSIGN_OR_RETURN(plans, device.Allocate(uint64_t{memory.plan_slots} * memory.plan_slot_bytes,
                                               MemoryTag::kOther));
  ECSS_ASSIGN_OR_RETURN(
      grad_tmp, table->pinned().Allocate(uint64_t{max_groups} * params * 4, MemoryTag::kGradients));
  return Status::Ok();
}

// The expert cache in the slots the memory plan left, and the prefetcher over it.
Status Session::Impl::CreateCache() {
  ECSS_ASSIGN_OR_RETURN(
      cache, DeviceCache::Create(backend, {expert_bytes, memory.cache_slots}, MakeLruPolicy()));
  PrefetcherHooks hooks;
  hooks.host_weights = [this](ExpertId key) { return table->FetchSource(key); };
  // The delayed update never rewrites what fetches read during a step: no fence to wait on.
  hooks.fence_pending = [this](ExpertId key) {
    return !delayed() && updater().Pending(table->at(key).id);
  };
  hooks.wait_fence = [this](ExpertId key) { return updater().Wait(table->at(key).id); };
  // The plan's fetch at that position was issued; its end is when h2d passes the copy.
  hooks.on_copy = [this](uint64_t position) {
    auto fetch = fetch_at.find(position);
    if (fetch != fetch_at.end()) Record(fetch->second, h2d.get()).IgnoreError();
  };
  prefetcher = std::make_unique<Prefetcher>(*cache, h2d.get(), std::move(hooks),
                                            options.prefetch_window_experts, table->stager());
  return Status::Ok();
}

// Delayed update: the update started at the previous BeginStep has finished (the caller
// waited); its experts' weights become what the device fetches. Nothing reads the published
// copies now: the step's copies out of them completed (h2d is synchronised first).
Status Session::Impl::Publish() {
  ECSS_RETURN_IF_ERROR(backend.SynchronizeStream(h2d.get()));
  for (ExpertId id : started) {
    table->Publish(id);
    ECSS_RETURN_IF_ERROR(cache->Invalidate(id));
  }
  started.clear();
  return Status::Ok();
}

// Delayed update: starts the update of the held gradients (the step before's).
Status Session::Impl::StartHeldUpdate() {
  started_report = StepReport{};
  if (held.empty()) return Status::Ok();
  ECSS_RETURN_IF_ERROR(updater().BeginStep(held_loss_scale));
  ++updater_steps;
  for (ExpertId id : held) {
    const ExpertTable::Entry& x = table->at(id);
    Status submitted_one = updater().Submit(x.id, static_cast<const float*>(x.grad.data()));
    if (!submitted_one.ok()) {
      updater().AbortStep().IgnoreError();  // the held gradients stay held: BeginStep retries
      return submitted_one;
    }
  }
  submitted = static_cast<uint32_t>(held.size());
  ECSS_ASSIGN_OR_RETURN(started_report, updater().FinishStep());
  started = std::move(held);
  held.clear();
  return Status::Ok();
}

// ---- A step ----------------------------------------------------------------------------------

// A layer of micro-batch `b` whose plan has `width` groups fits the session's gradient
// region (the plan itself refuses more than the device cache holds).
// The device room of routing plan `slot` (a micro-batch's; with gates a micro-batch layer's)
// in the plan region the memory plan sized. Compute passes a plan's copy before the same slot
// is written again (one stream orders both), so a slot needs no fence.
StatusOr<void*> Session::Impl::PlanSlot(uint32_t slot, uint64_t bytes) const {
  if (slot >= memory.plan_slots || bytes > memory.plan_slot_bytes) {
    return InternalError(StrCat("routing plan ", slot, " of ", bytes, " bytes does not fit the ",
                                memory.plan_slots, " slots of ", memory.plan_slot_bytes,
                                " bytes the memory plan reserved"));
  }
  return static_cast<char*>(plans.data()) + uint64_t{slot} * memory.plan_slot_bytes;
}

Status Session::Impl::CheckWidth(uint32_t b, uint32_t layer, size_t width) const {
  if (width > max_groups) {
    return ResourceExhaustedError(StrCat("micro-batch ", b, " layer ", layer, " activates ", width,
                                         " experts; the session was sized for ", max_groups,
                                         " (SessionOptions.max_active_experts_per_layer)"));
  }
  return Status::Ok();
}

// The layer's groups as the plan's forward op has them (the routed experts; naive: every
// expert, unrouted ones with no rows) and its device permutation (`dp`, the plan's copy).
void Session::Impl::FillLayer(const LayerPlan& dp, const PlanOp& forward, LayerWork& lw) const {
  lw.device_perm = {dp.num_tokens, dp.k, dp.permutation, dp.inverse, dp.combine_weights};
  lw.experts = forward.experts;
  lw.offsets.assign(1, 0);
  for (uint32_t rows : forward.rows) lw.offsets.push_back(lw.offsets.back() + rows);
}

LayerRoute RouteOf(const LayerPlan& lp) {
  LayerRoute route;
  route.experts.assign(lp.active_experts, lp.active_experts + lp.num_active);
  for (uint32_t a = 0; a < lp.num_active; ++a) route.rows.push_back(lp.count(a));
  return route;
}

StatusOr<StepPlan> Session::Impl::BuildPlan() const {
  const ModelSpec& m = options.model;
  StepPlanInputs in;
  in.model.d_model = m.d_model;
  in.model.d_ff = m.d_ff;
  in.model.d_in = d_in();
  in.model.params = params;
  in.model.weight_bytes = static_cast<uint32_t>(elem());
  in.model.state_arrays = 1 + static_cast<uint32_t>(StateArrays(options.optimizer.kind));
  for (uint32_t l = 0; l < m.layers; ++l)
    in.model.experts_per_layer.push_back(table->experts_in_layer(l));
  PlanPolicy& p = in.policy;
  p.strategy = options.strategy == Strategy::kEcss        ? PlanStrategy::kEcss
               : options.strategy == Strategy::kNoOverlap ? PlanStrategy::kNoOverlap
                                                          : PlanStrategy::kNaive;
  p.learned_gate = gated();
  p.delayed_update = delayed();
  p.deferred_updates =
      options.optimizer.max_grad_norm > 0 || options.optimizer.skip_step_on_nonfinite;
  p.states_on_nvme = options.states == StatesPlacement::kNvme;
  p.weights_on_nvme = options.weights == WeightsPlacement::kNvme;
  p.cache_slots = cache->slots();
  p.evaluation = evaluating;
  for (const MicroBatchWork& w : micro) {
    MicroBatchRoute route;
    route.tokens = w.num_tokens;
    if (w.plan) {
      route.plan_bytes = w.plan->bytes();
      for (uint32_t l = 0; l < m.layers; ++l) route.layers.push_back(RouteOf(w.plan->layer(l)));
    }
    in.micro_batches.push_back(std::move(route));
  }
  // What the cache holds as the step begins, least recently used first (the last plan knows
  // the order), less what publishing the delayed update is about to drop.
  std::vector<ExpertId> resident = cache->ResidentKeys();
  auto held_now = [&](ExpertId key) {
    if (std::find(resident.begin(), resident.end(), key) == resident.end()) return false;
    return !delayed() || std::find(started.begin(), started.end(), key) == started.end();
  };
  for (const auto& key : last_resident) {
    if (held_now(key)) in.resident.push_back(key);
  }
  for (ExpertId key : resident) {
    if (held_now(key) &&
        std::find(in.resident.begin(), in.resident.end(), key) == in.resident.end()) {
      in.resident.push_back(key);
    }
  }
  in.held_experts = held.size();
  return BuildStepPlan(in);
}

// Which of the plan's fetches is at each access position (what the prefetcher reports).
void Session::Impl::IndexFetches() {
  fetch_at.clear();
  for (const PlanOp* fetch : plan->Find(OpKind::kFetch)) fetch_at[fetch->position] = fetch->id;
}

Status Session::Impl::BuildStep(const std::vector<MicroBatch>& batches) {
  if (batches.empty() || batches.size() > options.max_micro_batches) {
    return InvalidArgumentError(StrCat("BeginStep: ", batches.size(),
                                       " micro-batches; the session takes 1 to ",
                                       options.max_micro_batches));
  }
  micro.clear();
  micro.resize(batches.size());
  sequence.clear();
  const uint32_t layers = options.model.layers;
  for (uint32_t b = 0; b < batches.size(); ++b) {
    const MicroBatch& in = batches[b];
    const uint64_t tokens = uint64_t{in.batch_size} * in.seq_len;
    if (tokens == 0 || tokens > options.max_tokens_per_micro_batch ||
        (!gated() && (in.token_ids == nullptr || in.domain_ids == nullptr))) {
      return InvalidArgumentError(StrCat("BeginStep: micro-batch ", b, " has ", tokens,
                                         " tokens (1 to ", options.max_tokens_per_micro_batch,
                                         ") or null arrays"));
    }
    MicroBatchWork& w = micro[b];
    w.num_tokens = static_cast<uint32_t>(tokens);
    w.layers.resize(layers);
    if (gated()) continue;  // routed layer by layer, as the gates run
    w.token_ids.assign(in.token_ids, in.token_ids + tokens);
    w.domain_ids.assign(in.domain_ids, in.domain_ids + in.batch_size);
    w.batch = {w.token_ids.data(), in.batch_size, in.seq_len, w.domain_ids.data()};
    StatusOr<RoutingPlan> routed = RoutingPlan::BuildRre(*router, w.batch);
    if (!routed.ok()) return routed.status().Annotate(StrCat("micro-batch ", b));
    w.plan.emplace(std::move(routed).value());
    ECSS_ASSIGN_OR_RETURN(w.device_plan, PlanSlot(b, w.plan->bytes()));
  }
  StatusOr<StepPlan> built = BuildPlan();
  if (!built.ok()) return built.status().Annotate("BeginStep");
  plan.emplace(std::move(built).value());
  issued_on.clear();
  for (const PlanOp* forward : plan->Find(OpKind::kForward)) {
    ECSS_RETURN_IF_ERROR(CheckWidth(static_cast<uint32_t>(forward->micro_batch),
                                    static_cast<uint32_t>(forward->layer), forward->experts.size())
                             .Annotate("BeginStep"));
  }
  if (gated()) return Status::Ok();
  // The step's access sequence (per micro-batch, forward 0..L-1 then backward L-1..0) and
  // each layer's groups, as the plan has them.
  for (uint32_t b = 0; b < micro.size(); ++b) {
    for (uint32_t l = 0; l < layers; ++l) {
      FillLayer(micro[b].plan->DeviceLayer(l, micro[b].device_plan),
                ComputeOp(OpKind::kForward, b, l), micro[b].layers[l]);
    }
  }
  for (const PlanOp& op : plan->ops()) {
    if (op.kind != OpKind::kForward && op.kind != OpKind::kBackward) continue;
    LayerWork& lw =
        micro[static_cast<uint32_t>(op.micro_batch)].layers[static_cast<uint32_t>(op.layer)];
    (op.kind == OpKind::kForward ? lw.first_position : lw.backward_position) = sequence.size();
    for (uint32_t e : op.experts) sequence.push_back(ExpertId{static_cast<uint32_t>(op.layer), e});
  }
  IndexFetches();
  // Every micro-batch routed: only now is anything enqueued, so a refused step leaves no
  // copy in flight out of (or into) the buffers it frees.
  for (const PlanOp* upload : plan->Find(OpKind::kPlanUpload)) {
    ECSS_RETURN_IF_ERROR(HostWait(*upload));
    MicroBatchWork& w = micro[static_cast<uint32_t>(upload->micro_batch)];
    ECSS_RETURN_IF_ERROR(backend.CopyAsync(compute.get(), w.device_plan, w.plan->data(),
                                           w.plan->bytes(), CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(Record(upload->id, compute.get()));
  }
  return Status::Ok();
}

// Where the plan lets fetches run ahead of compute (ecss): lease ahead of use, in sequence
// order, while the window and free slots allow.
Status Session::Impl::Prefetch() {
  if (!plan->fetches_ahead()) return Status::Ok();
  return prefetcher->Advance();
}

// The leases of compute op `op`'s access, at positions [first, first + its experts), after
// the host waits its fetches and it have in the plan; compute waits for their copies.
StatusOr<std::vector<Lease>> Session::Impl::LeasesFor(const PlanOp& op, uint64_t first) {
  ECSS_RETURN_IF_ERROR(HostWaitAccess(op));
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, prefetcher->Take(first, op.experts.size()));
  ECSS_RETURN_IF_ERROR(HostWait(op));
  for (const Lease& lease : leases) {
    ECSS_RETURN_IF_ERROR(backend.WaitEvent(compute.get(), lease.ready()));
  }
  return leases;
}

Status Session::Impl::ReleaseAll(std::vector<Lease>& leases) {
  for (Lease& lease : leases) ECSS_RETURN_IF_ERROR(lease.Release(compute.get()));
  return Status::Ok();
}

Status Session::Impl::StageSync(Stream stream) {
  StallTimer timer(&stalls.stage_sync_seconds);
  return backend.SynchronizeStream(stream);
}

// Layer `layer`'s gradients are in host memory: hand them to the optimizer and drop the
// experts' device copies (their weights are about to change).
Status Session::Impl::SubmitLayer(uint32_t layer) {
  for (uint32_t e = 0; e < table->experts_in_layer(layer); ++e) {
    ExpertTable::Entry& expert = table->at({layer, e});
    if (!expert.touched) continue;
    expert.touched = false;
    if (delayed()) {  // held until the next BeginStep
      held.push_back({layer, e});
      continue;
    }
    ECSS_RETURN_IF_ERROR(cache->Invalidate(ExpertId{layer, e}));
    ECSS_RETURN_IF_ERROR(
        updater().Submit(expert.id, static_cast<const float*>(expert.grad.data())));
    ++submitted;
  }
  if (!plan->policy().deferred_updates) {  // the layer's update starts now
    for (const PlanOp* update : plan->Find(OpKind::kUpdate, -1, static_cast<int32_t>(layer))) {
      if (update->step_offset == 0) recorder.Issued(recording, update->id);
    }
  }
  return updater().Flush();
}

// Submits the layers whose gradient copies completed (all of them when `wait`).
Status Session::Impl::SubmitReady(bool wait) {
  while (!pending_layers.empty()) {
    const uint32_t layer = pending_layers.front();
    Event done = layer_grads_done[layer].get();
    if (wait) {
      StallTimer timer(&stalls.gradient_copy_seconds);
      ECSS_RETURN_IF_ERROR(backend.SynchronizeEvent(done));
    } else {
      ECSS_ASSIGN_OR_RETURN(bool ready, backend.QueryEvent(done));
      if (!ready) return Status::Ok();
    }
    pending_layers.pop_front();
    ECSS_RETURN_IF_ERROR(SubmitLayer(layer));
  }
  return Status::Ok();
}

Status Session::Impl::CheckActivation(const void* ptr, uint32_t micro_batch,
                                      const char* what) const {
  const uint64_t bytes = uint64_t{micro[micro_batch].num_tokens} * options.model.d_model * elem();
  return backend.device_memory().CheckRange(ptr, bytes, what);
}

// ---- Session ---------------------------------------------------------------------------------

StatusOr<MemoryPlan> Session::PlanMemoryOn(Backend& backend, const SessionOptions& options) {
  ECSS_RETURN_IF_ERROR(options.Validate());
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<KernelRunner> kernels,
                        KernelRunner::Create(backend, KernelOptionsOf(options)));
  return PlanOn(backend.capabilities(), *kernels, options);
}

StatusOr<std::unique_ptr<Session>> Session::Create(Backend& backend,
                                                   const SessionOptions& options) {
  auto impl = std::make_unique<Impl>(backend, options);
  ECSS_RETURN_IF_ERROR(impl->CreateAll());
  return std::unique_ptr<Session>(new Session(std::move(impl)));
}

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Session::~Session() {
  if (impl_ == nullptr) return;
  impl_->prefetcher->Clear();
  impl_->backend.SynchronizeAll().IgnoreError();  // the leases' streams, before the cache goes
  impl_->updater().Synchronize().IgnoreError();
}

Status Session::BeginEvaluation(const std::vector<MicroBatch>& micro_batches) {
  if (impl_->in_step) {
    return FailedPreconditionError("BeginEvaluation: the previous step was not ended");
  }
  impl_->evaluating = true;
  Status begun = BeginStep(micro_batches, 1.0f);
  if (!begun.ok() && !impl_->in_step) impl_->evaluating = false;
  return begun;
}

Status Session::BeginStep(const std::vector<MicroBatch>& micro_batches, float loss_scale) {
  Impl& s = *impl_;
  if (s.in_step) return FailedPreconditionError("BeginStep: the previous step was not ended");
  ECSS_RETURN_IF_ERROR(s.TakeUpdateError());
  if (!(loss_scale > 0) || !std::isfinite(loss_scale)) {
    return InvalidArgumentError(
        StrCat("BeginStep: loss scale ", loss_scale, " must be finite and > 0"));
  }
  if (!s.has_last_end) {
    s.last_end = Clock::now();
    s.has_last_end = true;
    s.Snapshot();
  }
  Status begun = s.StartStep(micro_batches, loss_scale);
  if (!begun.ok()) s.DiscardStep();
  return begun;
}

// Drops a step that BeginStep refused: its plans' device copies may still be queued on the
// compute stream, so the stream passes them before their buffers are freed.
void Session::Impl::DiscardStep() {
  backend.SynchronizeStream(compute.get()).IgnoreError();  // its error is the caller's
  prefetcher->Clear();
  if (in_step && !delayed() && !evaluating) {
    // The optimizer's step began with no submissions: ending it updates nothing, and keeps
    // its step count equal to the session's.
    updater().FinishStep().status().IgnoreError();
  }
  micro.clear();
  in_step = false;
  evaluating = false;
}

// An update that failed since the last call, reported once with its step and expert.
Status Session::Impl::TakeUpdateError() {
  return updater().TakeError().Annotate("an expert update failed (its states are unchanged)");
}

Status Session::Impl::StartStep(const std::vector<MicroBatch>& micro_batches, float loss_scale) {
  Impl& s = *this;
  s.recording = s.step + 1;
  s.recorder.BeginStep(s.recording, Clock::now());
  ECSS_RETURN_IF_ERROR(s.BuildStep(micro_batches));
  s.recorder.SetPlan(s.recording, *s.plan);
  s.stalls = {};
  s.gradient_bytes = 0;
  s.submitted = 0;
  s.gradient_fence_seconds = 0;
  if (s.evaluating) {  // forward only: the updater's steps go on untouched
    if (s.delayed()) {
      // The weights the next training step computes with: the update in flight finishes
      // and is published, as that BeginStep would (which then has nothing to publish).
      StallTimer timer(&s.stalls.update_backlog_seconds);
      ECSS_RETURN_IF_ERROR(s.updater().WaitForStep(s.updater_steps));
      ECSS_RETURN_IF_ERROR(s.Publish());
    }
    s.in_step = true;
    ++s.step;
  } else if (s.delayed()) {
    // The update started at the previous BeginStep finishes, its weights are published, and
    // the update of the previous step's gradients starts: it overlaps this whole step.
    {
      StallTimer timer(&s.stalls.update_backlog_seconds);
      ECSS_RETURN_IF_ERROR(s.updater().WaitForStep(s.updater_steps));
    }
    ECSS_RETURN_IF_ERROR(s.Publish());
    ECSS_RETURN_IF_ERROR(s.StartHeldUpdate());
    s.held_loss_scale = loss_scale;
    if (!s.started.empty()) {  // the plan's held update (step_offset -1) runs now
      s.recorder.MapUpdaterStep(s.updater_steps, s.recording, -1);
      for (const PlanOp* held_update : s.plan->Find(OpKind::kUpdate)) {
        if (held_update->step_offset == -1) s.recorder.Issued(s.recording, held_update->id);
      }
    }
  } else {
    ECSS_RETURN_IF_ERROR(s.updater().BeginStep(loss_scale));
    ++s.updater_steps;
    s.recorder.MapUpdaterStep(s.updater_steps, s.recording, 0);
  }
  if (!s.evaluating) {
    s.in_step = true;
    ++s.step;
  }
  if (!s.evaluating && !s.delayed() && s.updater_steps >= 3) {
    // Step t's device work may overlap step t-1's updates, not step t-2's.
    StallTimer timer(&s.stalls.update_backlog_seconds);
    ECSS_RETURN_IF_ERROR(s.updater().WaitForStep(s.updater_steps - 2));
  }
  if (s.gated()) {
    s.prefetcher->BeginReactiveStep();
    return Status::Ok();
  }
  s.prefetcher->BeginStep(s.sequence);
  return s.Prefetch();
}

// A typed activation of micro-batch `micro_batch`: the model's dtype, [tokens, d_model], on
// this session's device.
Status Session::Impl::CheckView(uint32_t micro_batch, const TensorView& view,
                                const char* what) const {
  if (!in_step) return FailedPreconditionError(StrCat(what, ": outside a step (call BeginStep)"));
  if (micro_batch >= micro.size()) {
    return InvalidArgumentError(StrCat(what, ": micro-batch ", micro_batch, " out of range (",
                                       micro.size(), " micro-batches)"));
  }
  const Shape want{static_cast<int64_t>(micro[micro_batch].num_tokens),
                   static_cast<int64_t>(options.model.d_model)};
  if (view.dtype != options.model.dtype || view.shape != want || view.device != backend.device()) {
    return InvalidArgumentError(StrCat(what, " of micro-batch ", micro_batch, ": ", view.ToString(),
                                       " given, ", DTypeName(options.model.dtype), want.ToString(),
                                       "@", backend.device().ToString(), " expected"));
  }
  return Status::Ok();
}

Status Session::Forward(uint32_t micro_batch, uint32_t layer, const TensorView& x,
                        const TensorView& y) {
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch, x, "Forward input"));
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch, y, "Forward output"));
  return Forward(micro_batch, layer, x.data, y.data);
}

Status Session::Backward(uint32_t micro_batch, uint32_t layer, const TensorView& dy,
                         const TensorView& dx) {
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch, dy, "Backward output gradient"));
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch, dx, "Backward input gradient"));
  return Backward(micro_batch, layer, dy.data, dx.data);
}

Status Session::Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y) {
  if (impl_->gated()) {
    return FailedPreconditionError(
        "Forward: this session routes with a learned gate; pass the gate's choices");
  }
  return impl_->RunForward(micro_batch, layer, x, y, nullptr, nullptr);
}

Status Session::Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                        const GateChoices& gate, void* choice_outputs) {
  if (!impl_->gated()) {
    return FailedPreconditionError(
        "Forward: this session routes with RRE tables; gate choices are for Routing::kLearnedGate");
  }
  return impl_->RunForward(micro_batch, layer, x, y, &gate, choice_outputs);
}

// The layer's plan from the gate's choices, uploaded; its experts join the step's sequence.
Status Session::Impl::RouteGated(uint32_t micro_batch, uint32_t layer, const GateChoices& gate) {
  MicroBatchWork& w = micro[micro_batch];
  LayerWork& lw = w.layers[layer];
  const auto where = [&] { return StrCat("Forward: micro-batch ", micro_batch, " layer ", layer); };
  if (gate.experts == nullptr || gate.weights == nullptr || gate.k != options.gate_k) {
    return InvalidArgumentError(StrCat(where(), ": gate choices need experts and weights with k = ",
                                       options.gate_k, " (got k = ", gate.k, ")"));
  }
  const uint64_t slots = uint64_t{w.num_tokens} * gate.k;
  for (uint64_t i = 0; i < slots; ++i) {
    if (!std::isfinite(gate.weights[i])) {
      return InvalidArgumentError(StrCat(where(), ": token ", i / gate.k, " choice ", i % gate.k,
                                         " has a non-finite weight"));
    }
  }
  StatusOr<RoutingPlan> routed = RoutingPlan::FromAssignments(
      layer, table->experts_in_layer(layer), w.num_tokens, gate.k, gate.experts, gate.weights);
  if (!routed.ok()) return routed.status().Annotate(where());
  const LayerRoute route = RouteOf(routed->layer(0));
  ECSS_RETURN_IF_ERROR(CheckWidth(micro_batch, layer, plan->Width(layer, route)).Annotate(where()));
  ECSS_ASSIGN_OR_RETURN(void* device_plan,
                        PlanSlot(micro_batch * options.model.layers + layer, routed->bytes()));
  Status appended = plan->AppendForward(micro_batch, layer, route, routed->bytes());
  if (!appended.ok()) return appended.Annotate(where());
  IndexFetches();
  const PlanOp& forward = ComputeOp(OpKind::kForward, micro_batch, layer);
  FillLayer(routed->DeviceLayer(0, device_plan), forward, lw);
  const std::vector<const PlanOp*> uploads = plan->Find(
      OpKind::kPlanUpload, static_cast<int32_t>(micro_batch), static_cast<int32_t>(layer));
  if (!uploads.empty()) ECSS_RETURN_IF_ERROR(HostWait(*uploads.back()));
  ECSS_RETURN_IF_ERROR(backend.CopyAsync(compute.get(), device_plan, routed->data(),
                                         routed->bytes(), CopyKind::kHostToDevice));
  if (!uploads.empty()) ECSS_RETURN_IF_ERROR(Record(uploads.back()->id, compute.get()));
  lw.plan.emplace(std::move(routed).value());
  lw.device_plan = device_plan;
  lw.first_position = prefetcher->Append(LayerKeys(layer, lw));
  return Status::Ok();
}

Status Session::Impl::Record(uint32_t id, Stream stream) {
  issued_on[id] = stream;
  if (!options.record_op_times) return Status::Ok();
  recorder.Issued(recording, id);
  PlanRecorder* r = &recorder;
  const uint64_t s = recording;
  return backend.LaunchHostFunction(stream, "plan op", [r, s, id] {
    r->Ended(s, id);
    return Status::Ok();
  });
}

Status Session::Impl::HostWait(const PlanOp& op) {
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
    auto issued = issued_on.find(dep);
    if (issued == issued_on.end()) {
      const PlanOp& unissued = plan->ops()[dep];
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

Status Session::Impl::HostWaitAccess(const PlanOp& compute_op) {
  for (uint32_t dep : compute_op.deps) {
    const PlanOp& op = plan->ops()[dep];
    if (op.kind == OpKind::kFetch || op.kind == OpKind::kStage) ECSS_RETURN_IF_ERROR(HostWait(op));
  }
  return Status::Ok();
}

Status Session::Impl::RunForward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                                 const GateChoices* gate, void* choice_outputs) {
  Impl& s = *this;
  if (!s.in_step) return FailedPreconditionError("Forward outside a step (call BeginStep)");
  if (micro_batch >= s.micro.size() || layer >= s.options.model.layers) {
    return InvalidArgumentError(StrCat("Forward: micro-batch ", micro_batch, " layer ", layer,
                                       " out of range (", s.micro.size(), " micro-batches, ",
                                       s.options.model.layers, " layers)"));
  }
  MicroBatchWork& w = s.micro[micro_batch];
  LayerWork& lw = w.layers[layer];
  if (lw.forwarded) {
    return FailedPreconditionError(StrCat("Forward: micro-batch ", micro_batch, " layer ", layer,
                                          " already ran forward in this step"));
  }
  ECSS_RETURN_IF_ERROR(s.CheckActivation(x, micro_batch, "Forward input"));
  ECSS_RETURN_IF_ERROR(s.CheckActivation(y, micro_batch, "Forward output"));
  if (gate != nullptr) {
    if (choice_outputs != nullptr) {
      ECSS_RETURN_IF_ERROR(s.backend.device_memory().CheckRange(
          choice_outputs,
          uint64_t{w.num_tokens} * s.options.gate_k * s.options.model.d_model * s.elem(),
          "Forward choice outputs"));
    }
    ECSS_RETURN_IF_ERROR(s.RouteGated(micro_batch, layer, *gate));
  }
  const ModelSpec& m = s.options.model;
  const PlanOp& op = s.ComputeOp(OpKind::kForward, micro_batch, layer);
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, s.LeasesFor(op, lw.first_position));
  std::vector<const void*> w_in, w_out;
  for (const Lease& lease : leases) {
    w_in.push_back(lease.weights());
    w_out.push_back(static_cast<char*>(lease.weights()) +
                    uint64_t{m.d_model} * s.d_in() * s.elem());
  }
  void* saved = s.saved_x[micro_batch * m.layers + layer].data();
  const Stream c = s.compute.get();
  ECSS_RETURN_IF_ERROR(
      s.kernels->Permute(c, lw.device_perm, {m.d_model, m.dtype, false}, x, saved));
  const GroupedFfnProblem p = s.ProblemFor(lw);
  ECSS_RETURN_IF_ERROR(
      s.kernels->FfnForward(c, p, {saved, w_in.data(), w_out.data(), s.perm_a.data(), nullptr},
                            {s.workspace.data(), s.workspace_bytes}));
  ECSS_RETURN_IF_ERROR(
      s.kernels->Combine(c, lw.device_perm, {m.d_model, m.dtype, true}, s.perm_a.data(), y));
  if (choice_outputs != nullptr) {
    // Each slot's row, unweighted: a combine over one choice per "token" (= slot).
    const TokenPermutation slots{lw.device_perm.rows(), 1, lw.device_perm.row_to_slot,
                                 lw.device_perm.slot_to_row, lw.device_perm.row_weights};
    ECSS_RETURN_IF_ERROR(
        s.kernels->Combine(c, slots, {m.d_model, m.dtype, false}, s.perm_a.data(), choice_outputs));
  }
  ECSS_RETURN_IF_ERROR(s.Record(op.id, c));
  ECSS_RETURN_IF_ERROR(s.ReleaseAll(leases));
  lw.forwarded = true;
  ECSS_RETURN_IF_ERROR(s.SubmitReady(false));
  return s.Prefetch();
}

// The layer's expert gradients (in the gradient region) to pinned memory: the first
// micro-batch that touches an expert copies into its accumulator; later ones copy to staging
// and are added on the host, in micro-batch order, which keeps the sum deterministic.
Status Session::Impl::CopyGradients(uint32_t micro_batch, uint32_t layer, const LayerWork& lw) {
  const Stream d = d2h.get();
  const Stream c = compute.get();
  const auto mb = static_cast<int32_t>(micro_batch);
  const PlanOp& copy_op = *plan->Find(OpKind::kGradientCopy, mb, static_cast<int32_t>(layer))[0];
  ECSS_RETURN_IF_ERROR(HostWait(copy_op));
  ECSS_RETURN_IF_ERROR(backend.RecordEvent(dw_ready.get(), c));
  ECSS_RETURN_IF_ERROR(backend.WaitEvent(d, dw_ready.get()));
  const uint64_t grad_bytes = params * 4;
  std::vector<std::pair<float*, const float*>> adds;
  for (size_t i = 0; i < lw.experts.size(); ++i) {
    ExpertTable::Entry& expert = table->at({layer, lw.experts[i]});
    const void* src = static_cast<const float*>(dw.data()) + i * params;
    if (!expert.touched && delayed() && updater().Pending(expert.id)) {
      // The update started at BeginStep may still read this buffer (the previous gradient).
      StallTimer timer(&gradient_fence_seconds);
      ECSS_RETURN_IF_ERROR(updater().Wait(expert.id));
    }
    if (!expert.touched) {
      ECSS_RETURN_IF_ERROR(
          backend.CopyAsync(d, expert.grad.data(), src, grad_bytes, CopyKind::kDeviceToHost));
      expert.touched = true;
    } else {
      float* staging = static_cast<float*>(grad_tmp.data()) + i * params;
      ECSS_RETURN_IF_ERROR(backend.CopyAsync(d, staging, src, grad_bytes, CopyKind::kDeviceToHost));
      adds.emplace_back(static_cast<float*>(expert.grad.data()), staging);
    }
    gradient_bytes += grad_bytes;
  }
  ECSS_RETURN_IF_ERROR(Record(copy_op.id, d));
  if (!adds.empty()) {
    const uint64_t n = params;
    ECSS_RETURN_IF_ERROR(backend.LaunchHostFunction(d, "accumulate gradients", [adds, n] {
      for (const auto& [acc, add] : adds) {
        for (uint64_t i = 0; i < n; ++i) acc[i] += add[i];
      }
      return Status::Ok();
    }));
    const std::vector<const PlanOp*> add_op =
        plan->Find(OpKind::kAccumulate, mb, static_cast<int32_t>(layer));
    if (!add_op.empty()) ECSS_RETURN_IF_ERROR(Record(add_op[0]->id, d));
  }
  return Status::Ok();
}

Status Session::Backward(uint32_t micro_batch, uint32_t layer, const void* dy, void* dx) {
  Impl& s = *impl_;
  if (!s.in_step) return FailedPreconditionError("Backward outside a step (call BeginStep)");
  if (s.evaluating) {
    return FailedPreconditionError(
        "Backward in an evaluation step (BeginEvaluation runs Forward only)");
  }
  if (micro_batch >= s.micro.size() || layer >= s.options.model.layers) {
    return InvalidArgumentError(
        StrCat("Backward: micro-batch ", micro_batch, " layer ", layer, " out of range"));
  }
  MicroBatchWork& w = s.micro[micro_batch];
  LayerWork& lw = w.layers[layer];
  if (!lw.forwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " has not run forward in this step"));
  }
  if (lw.backwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " already ran backward in this step"));
  }
  // Gradients accumulate in micro-batch order, which keeps the sum deterministic.
  if (micro_batch > 0 && !s.micro[micro_batch - 1].layers[layer].backwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " before micro-batch ", micro_batch - 1,
                                          "'s backward of that layer"));
  }
  ECSS_RETURN_IF_ERROR(s.CheckActivation(dy, micro_batch, "Backward output gradient"));
  ECSS_RETURN_IF_ERROR(s.CheckActivation(dx, micro_batch, "Backward input gradient"));
  if (s.gated()) {  // reactive: the layer's experts are fetched now, again if evicted
    ECSS_RETURN_IF_ERROR(s.plan->AppendBackward(micro_batch, layer));
    s.IndexFetches();
    lw.backward_position = s.prefetcher->Append(LayerKeys(layer, lw));
  }
  const ModelSpec& m = s.options.model;
  const Stream c = s.compute.get();
  const PlanOp& op = s.ComputeOp(OpKind::kBackward, micro_batch, layer);
  // dy_perm = dy of each row's token, scaled by the row's combine weight.
  ECSS_RETURN_IF_ERROR(
      s.kernels->Permute(c, lw.device_perm, {m.d_model, m.dtype, true}, dy, s.perm_a.data()));
  ECSS_ASSIGN_OR_RETURN(std::vector<Lease> leases, s.LeasesFor(op, lw.backward_position));
  std::vector<const void*> w_in, w_out;
  std::vector<float*> dw_in, dw_out;
  const uint64_t in_elems = uint64_t{m.d_model} * s.d_in();
  for (size_t i = 0; i < leases.size(); ++i) {
    w_in.push_back(leases[i].weights());
    w_out.push_back(static_cast<char*>(leases[i].weights()) + in_elems * s.elem());
    float* base = static_cast<float*>(s.dw.data()) + i * s.params;
    dw_in.push_back(base);
    dw_out.push_back(base + in_elems);
  }
  // The gradient region is reused: wait until the previous copies out of it finished.
  ECSS_RETURN_IF_ERROR(s.backend.WaitEvent(c, s.dw_free.get()));
  const GroupedFfnProblem p = s.ProblemFor(lw);
  const void* saved = s.saved_x[micro_batch * m.layers + layer].data();
  ECSS_RETURN_IF_ERROR(
      s.kernels->FfnBackward(c, p,
                             {saved, w_in.data(), w_out.data(), nullptr, s.perm_a.data(),
                              s.perm_b.data(), dw_in.data(), dw_out.data(), false},
                             {s.workspace.data(), s.workspace_bytes}));
  ECSS_RETURN_IF_ERROR(
      s.kernels->Combine(c, lw.device_perm, {m.d_model, m.dtype, false}, s.perm_b.data(), dx));
  ECSS_RETURN_IF_ERROR(s.Record(op.id, c));
  ECSS_RETURN_IF_ERROR(s.ReleaseAll(leases));
  lw.backwarded = true;

  ECSS_RETURN_IF_ERROR(s.CopyGradients(micro_batch, layer, lw));
  const Stream d = s.d2h.get();
  ECSS_RETURN_IF_ERROR(s.backend.RecordEvent(s.dw_free.get(), d));
  // The last micro-batch's backward of a layer completes its experts' gradients.
  if (micro_batch + 1 == s.micro.size()) {
    ECSS_RETURN_IF_ERROR(s.backend.RecordEvent(s.layer_grads_done[layer].get(), d));
    s.pending_layers.push_back(layer);
  }
  ECSS_RETURN_IF_ERROR(s.SubmitReady(false));
  return s.Prefetch();
}

StatusOr<StepStats> Session::EndStep() {
  Impl& s = *impl_;
  if (!s.in_step) return FailedPreconditionError("EndStep: no step is open (BeginStep first)");
  for (uint32_t b = 0; b < s.micro.size(); ++b) {
    for (uint32_t l = 0; l < s.options.model.layers; ++l) {
      const LayerWork& lw = s.micro[b].layers[l];
      if (!(s.evaluating ? lw.forwarded : lw.backwarded)) {
        return FailedPreconditionError(
            StrCat("EndStep: micro-batch ", b, " layer ", l, " has not run ",
                   s.evaluating ? "forward" : "backward", "; the step stays open"));
      }
    }
  }
  // Whatever fails from here on, the step ends: its work is drained and the next BeginStep
  // starts clean. The first failure (an update's too) is what EndStep returns.
  StepReport report = s.started_report;  // delayed: the update BeginStep started
  Status ended = s.FinishStepWork(&report);
  s.stalls.update_fence_seconds = s.prefetcher->stall_seconds() + s.gradient_fence_seconds;
  s.prefetcher->Clear();
  uint64_t tokens = 0;
  for (const MicroBatchWork& w : s.micro) tokens += w.num_tokens;
  s.micro.clear();  // the plans' device copies: compute has passed them
  s.last_resident = s.plan->ResidentAfter();
  s.in_step = false;
  s.evaluating = false;
  if (!ended.ok()) {
    s.Snapshot();
    return ended.Annotate(StrCat("EndStep of step ", s.step));
  }

  StepStats stats;
  stats.step = s.step;
  stats.tokens = tokens;
  const Clock::time_point now = Clock::now();
  stats.seconds = std::chrono::duration<double>(now - s.last_end).count();
  s.last_end = now;
  stats.tokens_per_s = stats.seconds > 0 ? static_cast<double>(tokens) / stats.seconds : 0;
  const CopyStats copies = s.backend.copy_stats();
  stats.h2d_bytes = copies.bytes[0] - s.copies_at_begin.bytes[0];
  stats.d2h_bytes = copies.bytes[1] - s.copies_at_begin.bytes[1];
  const CacheStats& cache = s.cache->stats();
  stats.expert_fetch_bytes = cache.bytes_moved - s.cache_at_begin.bytes_moved;
  stats.gradient_bytes = s.gradient_bytes;
  stats.cache_hits = cache.hits - s.cache_at_begin.hits;
  stats.cache_misses = cache.misses - s.cache_at_begin.misses;
  const uint64_t accesses = stats.cache_hits + stats.cache_misses;
  stats.hit_rate = accesses ? static_cast<double>(stats.cache_hits) / accesses : 0;
  stats.stalls = s.stalls;
  stats.stall_records = s.prefetcher->stalls();
  stats.stall_fraction = stats.seconds > 0 ? s.stalls.total() / stats.seconds : 0;
  const EngineBusyTimes e = s.backend.busy_times();  // all 0 where the backend keeps none
  stats.compute_busy_seconds = e.compute_busy_seconds - s.engines_at_begin.compute_busy_seconds;
  stats.h2d_busy_seconds = e.h2d_busy_seconds - s.engines_at_begin.h2d_busy_seconds;
  stats.d2h_busy_seconds = e.d2h_busy_seconds - s.engines_at_begin.d2h_busy_seconds;
  stats.optimizer_busy_seconds = s.updater().busy_seconds() - s.optimizer_busy_at_begin;
  stats.nvme_bytes = s.table->nvme_bytes() - s.nvme_at_begin;
  const double busiest = std::max({stats.compute_busy_seconds, stats.h2d_busy_seconds,
                                   stats.d2h_busy_seconds, stats.optimizer_busy_seconds});
  stats.overlap_efficiency = stats.seconds > 0 ? std::min(1.0, busiest / stats.seconds) : 0;
  stats.updated_experts = s.submitted;
  stats.updated_params = uint64_t{s.submitted} * s.params;
  stats.optimizer = report;
  s.Snapshot();
  return stats;
}

// EndStep's work: the last gradients to the optimizer, the step's end for it, compute drained,
// and (no-overlap, naive) the updates waited for. Runs every part even after a failure, so
// that nothing of the step is left in flight; returns the first failure.
Status Session::Impl::FinishStepWork(StepReport* report) {
  Status first = SubmitReady(true);
  plan->Finish();  // learned gates: the updates that wait for the whole step
  recorder.SetPlan(recording, *plan);
  if (!first.ok()) {
    // The gradients not submitted are dropped with the step, and what the optimizer holds
    // back is not applied with a norm of part of the step.
    table->ClearTouched();
    pending_layers.clear();
    if (!delayed() && !evaluating) updater().AbortStep().IgnoreError();
  } else if (!delayed() && !evaluating) {
    for (const PlanOp* update : plan->Find(OpKind::kUpdate)) {
      if (update->step_offset == 0 && plan->policy().deferred_updates) {
        recorder.Issued(recording, update->id);  // they start now, after the global norm
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
    StallTimer timer(&stalls.stage_sync_seconds);
    Status synced = backend.SynchronizeStream(compute.get());
    if (first.ok()) first = synced;
  }
  if (plan->step_waits_for_updates()) {
    StallTimer timer(&stalls.optimizer_seconds);
    Status updated = updater().Synchronize();
    if (first.ok()) first = updated.Annotate("an expert update failed (its states are unchanged)");
  } else if (first.ok()) {
    first = TakeUpdateError();
  }
  return first;
}

Status Session::Synchronize() {
  Impl& s = *impl_;
  ECSS_RETURN_IF_ERROR(s.backend.SynchronizeAll());
  if (s.delayed() && !s.in_step) {  // drain: start the held update, publish everything
    ECSS_RETURN_IF_ERROR(s.updater().WaitForStep(s.updater_steps));
    ECSS_RETURN_IF_ERROR(s.Publish());
    ECSS_RETURN_IF_ERROR(s.StartHeldUpdate());
    ECSS_RETURN_IF_ERROR(s.updater().Synchronize());
    return s.Publish();
  }
  return s.updater().Synchronize().Annotate("an expert update failed (its states are unchanged)");
}

Status Session::SetHyperParams(const HyperParams& params) {
  if (impl_->in_step) {
    return FailedPreconditionError("SetHyperParams inside a step (call it between steps)");
  }
  return impl_->updater().SetHyperParams(params);
}

Stream Session::compute_stream() const { return impl_->compute.get(); }

StatusOr<std::vector<float>> Session::MasterWeights(uint32_t layer, uint32_t expert) {
  if (expert >= impl_->table->experts_in_layer(layer)) {
    return InvalidArgumentError(StrCat("MasterWeights: no expert (", layer, ", ", expert, ")"));
  }
  return impl_->table->Master({layer, expert});
}

StatusOr<StepPlan> Session::ExecutedPlan(uint64_t step) const {
  return impl_->recorder.ExecutedPlan(step);
}

const MemoryPlan& Session::memory_plan() const { return impl_->memory; }

Session::HostMemoryPeaks Session::host_memory_peaks() const {
  return {impl_->table->pinned_peak_bytes(), impl_->table->host_peak_bytes()};
}

uint32_t Session::experts_in_layer(uint32_t layer) const {
  return impl_->table->experts_in_layer(layer);
}
uint32_t Session::cache_slots() const { return impl_->cache->slots(); }
uint64_t Session::expert_params() const { return impl_->params; }

}  // namespace ecss
