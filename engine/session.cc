#include "engine/session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/checkpoint_record.h"
#include "engine/expert_table.h"
#include "engine/memory_plan.h"
#include "engine/plan_recorder.h"
#include "engine/step_executor.h"
#include "engine/step_metrics.h"
#include "engine/step_plan.h"
#include "kernels/kernel_runner.h"
#include "router/rre_router.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/backend.h"

namespace ecss {
namespace {

using Clock = std::chrono::steady_clock;

KernelRunnerOptions KernelOptionsOf(const SessionOptions& options) {
  KernelRunnerOptions kernel_options;
  kernel_options.cpu.threads = options.kernel_threads;
  kernel_options.profile = options.device_profile;
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
    case Strategy::kZeroOffload:
      return "zero-offload";
  }
  return "?";
}

StatusOr<Strategy> ParseStrategy(std::string_view name) {
  for (Strategy s :
       {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive, Strategy::kZeroOffload}) {
    if (StrategyName(s) == name) return s;
  }
  return InvalidArgumentError(
      StrCat("unknown strategy '", name, "' (ecss, no-overlap, naive, zero-offload)"));
}

// The session: its options checked once, the expert table (every expert's state) and the
// step executor (what runs a step), and the state machine of the calls: a step is open
// between BeginStep (or BeginEvaluation) and EndStep, each (micro-batch, layer) runs Forward
// once and then Backward once, in an order that keeps gradient sums deterministic.
struct Session::Impl {
  Impl(Backend& b, const SessionOptions& o) : backend(b), options(o) {}

  Backend& backend;
  SessionOptions options;
  std::optional<RreRouter> router;  // RRE routing only
  MemoryPlan memory;                // every byte the session allocates
  // Declared before the table's updater, whose threads report to them until it is destroyed:
  // the executed plans, and when each expert update ran (the optimizer's busy time, for
  // StepStats::metrics; taken by each step's statistics).
  PlanRecorder recorder;
  UpdateIntervals update_intervals;
  std::unique_ptr<ExpertTable> table;
  std::unique_ptr<StepExecutor> executor;  // uses the table: declared after it
  // A save StartCheckpoint began whose result WaitForCheckpoint has not taken (it reads the
  // table's store: declared after it), and the training steps begun since it began (refused
  // ones too: a BeginStep may have started the delayed update before it failed).
  std::unique_ptr<CheckpointSave> save;
  uint32_t steps_since_save = 0;

  bool in_step = false;
  bool evaluating = false;  // the open step is an evaluation: Forward only
  uint64_t step = 0;        // steps opened
  // The counters at the start of a step's window (the previous EndStep's return), so that a
  // step's statistics cover exactly the time its `seconds` measures.
  Clock::time_point last_end;
  bool has_last_end = false;
  CopyStats copies_at_begin;
  CacheStats cache_at_begin;
  EngineBusyTimes engines_at_begin;
  double optimizer_busy_at_begin = 0;
  uint64_t nvme_at_begin = 0;
  ExpertStore::IoBytes nvme_io_at_begin;

  bool gated() const { return options.routing == Routing::kLearnedGate; }
  uint64_t elem() const { return DTypeSize(options.model.dtype); }
  Status CreateAll();
  Status CreateRouter();
  Status ResumeRecords();
  // Waits until the save in progress is durable or failed, and stops preserving experts for
  // it; its result (which stays for WaitForCheckpoint). REQUIRES: save.
  StatusOr<CheckpointStats> FinishSave() {
    StatusOr<CheckpointStats> saved = save->Wait();
    table->set_before_host_update({});
    return saved;
  }
  void Snapshot() {
    copies_at_begin = backend.copy_stats();
    cache_at_begin = executor->cache().stats();
    engines_at_begin = backend.busy_times();
    optimizer_busy_at_begin = executor->optimizer_busy_seconds();
    nvme_at_begin = executor->nvme_bytes();
    nvme_io_at_begin = executor->nvme_io();
  }
  Status Begin(const std::vector<MicroBatch>& micro_batches, float loss_scale);
  Status Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                 const GateChoices* gate, void* choice_outputs);
  Status CheckBatches(const std::vector<MicroBatch>& batches) const;
  Status CheckLayer(const char* call, uint32_t micro_batch, uint32_t layer) const;
  Status CheckActivation(const void* ptr, uint32_t micro_batch, const char* what) const;
  Status CheckView(uint32_t micro_batch, const TensorView& view, const char* what) const;
  Status CheckGate(uint32_t micro_batch, uint32_t layer, const GateChoices& gate,
                   const void* choice_outputs) const;
  StepStats StatsOf(const StepExecutor::StepRecord& record);
  StepMetrics MetricsOf(Clock::time_point begin, Clock::time_point end);
};

// ---- Creation -------------------------------------------------------------------------------

Status Session::Impl::CreateAll() {
  ECSS_RETURN_IF_ERROR(options.Validate());
  const BackendCapabilities& caps = backend.capabilities();
  if (options.budgets.device_bytes == 0 ||
      options.budgets.device_bytes > caps.device_memory_bytes) {
    return InvalidArgumentError(
        StrCat("session: budgets.device_bytes ", options.budgets.device_bytes, " must be in (0, ",
               caps.device_memory_bytes, "] (the backend's device memory)"));
  }
  if (options.optimizer.trace == nullptr) options.optimizer.trace = options.trace;
  // When each expert's update ran: the optimizer's busy time, and (recording op times) the
  // executed plans' update ops.
  options.optimizer.on_update = [this, user = options.optimizer.on_update](
                                    uint32_t id, uint64_t updater_step, Clock::time_point start,
                                    Clock::time_point end) {
    update_intervals.Ended(id, start, end);
    if (options.record_op_times) {
      recorder.UpdateRan(updater_step, table->index().Id(id).layer, start, end);
    }
    if (user) user(id, updater_step, start, end);
  };
  options.optimizer.on_update_start = [this, user = options.optimizer.on_update_start](
                                          uint32_t id, uint64_t updater_step,
                                          Clock::time_point start) {
    update_intervals.Started(id, start);
    if (user) user(id, updater_step, start);
  };
  ECSS_RETURN_IF_ERROR(CreateRouter());
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<KernelRunner> kernels,
                        KernelRunner::Create(backend, KernelOptionsOf(options)));
  ECSS_ASSIGN_OR_RETURN(memory, PlanOn(caps, *kernels, options));
  ECSS_ASSIGN_OR_RETURN(table, ExpertTable::Create(backend, options, memory));
  ECSS_ASSIGN_OR_RETURN(executor,
                        StepExecutor::Create(backend, options, memory, std::move(kernels),
                                             router ? &*router : nullptr, *table, recorder));
  return ResumeRecords();
}

// placement.resume_from: the session as it was at the save (its records were checked before
// anything was restored): its step count, hyper-parameters and held gradients.
Status Session::Impl::ResumeRecords() {
  std::optional<SessionState> resumed = table->TakeResumedSession();
  if (!resumed) return Status::Ok();  // none, or a checkpoint of a build before the record
  const SessionRecord& record = resumed->record;
  step = record.steps;
  ECSS_RETURN_IF_ERROR(table->updater().SetHyperParams(record.hyper_params));
  if (record.held.empty()) return Status::Ok();
  return executor->RestoreHeld(record.held, record.held_loss_scale, resumed->held_gradients, step)
      .Annotate("placement.resume_from: the delayed update's held gradients");
}

// The RRE tables (and the domain map, with every domain's group in every layer).
Status Session::Impl::CreateRouter() {
  if (gated()) return Status::Ok();
  ECSS_ASSIGN_OR_RETURN(RreRouter built, RouterOf(options.model));
  router.emplace(std::move(built));
  return Status::Ok();
}

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

Session::~Session() {  // then the executor waits for the device and the updates
  if (impl_->save == nullptr) return;
  StatusOr<CheckpointStats> saved = impl_->FinishSave();
  if (!saved.ok()) ECSS_LOG(Error) << "a checkpoint no one waited for failed: " << saved.status();
}

// ---- Checks ----------------------------------------------------------------------------------

Status Session::Impl::CheckBatches(const std::vector<MicroBatch>& batches) const {
  if (batches.empty() || batches.size() > options.limits.max_micro_batches) {
    return InvalidArgumentError(StrCat("BeginStep: ", batches.size(),
                                       " micro-batches; the session takes 1 to ",
                                       options.limits.max_micro_batches));
  }
  for (uint32_t b = 0; b < batches.size(); ++b) {
    const MicroBatch& in = batches[b];
    const uint64_t tokens = uint64_t{in.batch_size} * in.seq_len;
    if (tokens == 0 || tokens > options.limits.max_tokens_per_micro_batch ||
        (!gated() && (in.token_ids == nullptr || in.domain_ids == nullptr))) {
      return InvalidArgumentError(
          StrCat("BeginStep: micro-batch ", b, " has ", tokens, " tokens (1 to ",
                 options.limits.max_tokens_per_micro_batch, ") or null arrays"));
    }
  }
  return Status::Ok();
}

// A (micro-batch, layer) of the open step.
Status Session::Impl::CheckLayer(const char* call, uint32_t micro_batch, uint32_t layer) const {
  if (!in_step) return FailedPreconditionError(StrCat(call, " outside a step (call BeginStep)"));
  if (micro_batch >= executor->micro_batches() || layer >= options.model.layers) {
    return InvalidArgumentError(StrCat(call, ": micro-batch ", micro_batch, " layer ", layer,
                                       " out of range (", executor->micro_batches(),
                                       " micro-batches, ", options.model.layers, " layers)"));
  }
  return Status::Ok();
}

Status Session::Impl::CheckActivation(const void* ptr, uint32_t micro_batch,
                                      const char* what) const {
  const uint64_t bytes = uint64_t{executor->tokens(micro_batch)} * options.model.d_model * elem();
  return backend.device_memory().CheckRange(ptr, bytes, what);
}

// A typed activation of micro-batch `micro_batch`: the model's dtype, [tokens, d_model], on
// this session's device.
Status Session::Impl::CheckView(uint32_t micro_batch, const TensorView& view,
                                const char* what) const {
  if (!in_step) return FailedPreconditionError(StrCat(what, ": outside a step (call BeginStep)"));
  if (micro_batch >= executor->micro_batches()) {
    return InvalidArgumentError(StrCat(what, ": micro-batch ", micro_batch, " out of range (",
                                       executor->micro_batches(), " micro-batches)"));
  }
  const Shape want{static_cast<int64_t>(executor->tokens(micro_batch)),
                   static_cast<int64_t>(options.model.d_model)};
  if (view.dtype != options.model.dtype || view.shape != want || view.device != backend.device()) {
    return InvalidArgumentError(StrCat(what, " of micro-batch ", micro_batch, ": ", view.ToString(),
                                       " given, ", DTypeName(options.model.dtype), want.ToString(),
                                       "@", backend.device().ToString(), " expected"));
  }
  return Status::Ok();
}

// A learned gate's choices for the layer (the experts themselves are checked as the layer's
// plan is made from them) and the room for its outputs.
Status Session::Impl::CheckGate(uint32_t micro_batch, uint32_t layer, const GateChoices& gate,
                                const void* choice_outputs) const {
  const auto where = [&] { return StrCat("Forward: micro-batch ", micro_batch, " layer ", layer); };
  if (gate.experts == nullptr || gate.weights == nullptr || gate.k != options.gate_k) {
    return InvalidArgumentError(StrCat(where(), ": gate choices need experts and weights with k = ",
                                       options.gate_k, " (got k = ", gate.k, ")"));
  }
  const uint64_t slots = uint64_t{executor->tokens(micro_batch)} * gate.k;
  for (uint64_t i = 0; i < slots; ++i) {
    if (!std::isfinite(gate.weights[i])) {
      return InvalidArgumentError(StrCat(where(), ": token ", i / gate.k, " choice ", i % gate.k,
                                         " has a non-finite weight"));
    }
  }
  if (choice_outputs == nullptr) return Status::Ok();
  return backend.device_memory().CheckRange(choice_outputs, slots * options.model.d_model * elem(),
                                            "Forward choice outputs");
}

// ---- A step ----------------------------------------------------------------------------------

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
  ECSS_RETURN_IF_ERROR(s.executor->TakeUpdateError());
  if (!(loss_scale > 0) || !std::isfinite(loss_scale)) {
    return InvalidArgumentError(
        StrCat("BeginStep: loss scale ", loss_scale, " must be finite and > 0"));
  }
  ECSS_RETURN_IF_ERROR(s.CheckBatches(micro_batches));
  if (!s.has_last_end) {
    s.last_end = Clock::now();
    s.has_last_end = true;
    s.Snapshot();
  }
  return s.Begin(micro_batches, loss_scale);
}

// Opens the step in the executor; a step it refused is dropped whole.
Status Session::Impl::Begin(const std::vector<MicroBatch>& micro_batches, float loss_scale) {
  // A save started before the previous training step reads the versions that step's updates
  // left in place (memory: preserved; NVMe: the other shadow slot); this step's would
  // overwrite them.
  if (!evaluating && save != nullptr && steps_since_save++ > 0) {
    FinishSave().status().IgnoreError();  // for WaitForCheckpoint
  }
  bool opened = false;
  Status begun = executor->Begin(micro_batches, loss_scale, evaluating, step + 1, &opened);
  if (opened) ++step;
  if (begun.ok()) {
    in_step = true;
    return begun;
  }
  executor->Discard(opened);
  in_step = false;
  evaluating = false;
  return begun;
}

Status Session::Forward(MicroBatchIndex micro_batch, LayerIndex layer, const TensorView& x,
                        const TensorView& y) {
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch.value, x, "Forward input"));
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch.value, y, "Forward output"));
  return Forward(micro_batch, layer, x.data, y.data);
}

Status Session::Backward(MicroBatchIndex micro_batch, LayerIndex layer, const TensorView& dy,
                         const TensorView& dx) {
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch.value, dy, "Backward output gradient"));
  ECSS_RETURN_IF_ERROR(impl_->CheckView(micro_batch.value, dx, "Backward input gradient"));
  return Backward(micro_batch, layer, dy.data, dx.data);
}

Status Session::Forward(MicroBatchIndex micro_batch, LayerIndex layer, const void* x, void* y) {
  if (impl_->gated()) {
    return FailedPreconditionError(
        "Forward: this session routes with a learned gate; pass the gate's choices");
  }
  return impl_->Forward(micro_batch.value, layer.value, x, y, nullptr, nullptr);
}

Status Session::Forward(MicroBatchIndex micro_batch, LayerIndex layer, const void* x, void* y,
                        const GateChoices& gate, void* choice_outputs) {
  if (!impl_->gated()) {
    return FailedPreconditionError(
        "Forward: this session routes with RRE tables; gate choices are for Routing::kLearnedGate");
  }
  return impl_->Forward(micro_batch.value, layer.value, x, y, &gate, choice_outputs);
}

Status Session::Impl::Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                              const GateChoices* gate, void* choice_outputs) {
  ECSS_RETURN_IF_ERROR(CheckLayer("Forward", micro_batch, layer));
  if (executor->progress(micro_batch, layer).forwarded) {
    return FailedPreconditionError(StrCat("Forward: micro-batch ", micro_batch, " layer ", layer,
                                          " already ran forward in this step"));
  }
  ECSS_RETURN_IF_ERROR(CheckActivation(x, micro_batch, "Forward input"));
  ECSS_RETURN_IF_ERROR(CheckActivation(y, micro_batch, "Forward output"));
  if (gate != nullptr) ECSS_RETURN_IF_ERROR(CheckGate(micro_batch, layer, *gate, choice_outputs));
  return executor->Forward(micro_batch, layer, x, y, gate, choice_outputs);
}

Status Session::Backward(MicroBatchIndex micro_batch_index, LayerIndex layer_index, const void* dy,
                         void* dx) {
  Impl& s = *impl_;
  const uint32_t micro_batch = micro_batch_index.value, layer = layer_index.value;
  if (s.in_step && s.evaluating) {
    return FailedPreconditionError(
        "Backward in an evaluation step (BeginEvaluation runs Forward only)");
  }
  ECSS_RETURN_IF_ERROR(s.CheckLayer("Backward", micro_batch, layer));
  const StepExecutor::LayerProgress done = s.executor->progress(micro_batch, layer);
  if (!done.forwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " has not run forward in this step"));
  }
  if (done.backwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " already ran backward in this step"));
  }
  // Gradients accumulate in micro-batch order, which keeps the sum deterministic.
  if (micro_batch > 0 && !s.executor->progress(micro_batch - 1, layer).backwarded) {
    return FailedPreconditionError(StrCat("Backward: micro-batch ", micro_batch, " layer ", layer,
                                          " before micro-batch ", micro_batch - 1,
                                          "'s backward of that layer"));
  }
  ECSS_RETURN_IF_ERROR(s.CheckActivation(dy, micro_batch, "Backward output gradient"));
  ECSS_RETURN_IF_ERROR(s.CheckActivation(dx, micro_batch, "Backward input gradient"));
  return s.executor->Backward(micro_batch, layer, dy, dx);
}

StatusOr<StepStats> Session::EndStep() {
  Impl& s = *impl_;
  if (!s.in_step) return FailedPreconditionError("EndStep: no step is open (BeginStep first)");
  for (uint32_t b = 0; b < s.executor->micro_batches(); ++b) {
    for (uint32_t l = 0; l < s.options.model.layers; ++l) {
      const StepExecutor::LayerProgress done = s.executor->progress(b, l);
      if (!(s.evaluating ? done.forwarded : done.backwarded)) {
        return FailedPreconditionError(
            StrCat("EndStep: micro-batch ", b, " layer ", l, " has not run ",
                   s.evaluating ? "forward" : "backward", "; the step stays open"));
      }
    }
  }
  // Whatever fails from here on, the step ends: its work is drained and the next BeginStep
  // starts clean. The first failure (an update's too) is what EndStep returns.
  StepExecutor::StepRecord record;
  Status ended = s.executor->Finish(&record);
  s.in_step = false;
  s.evaluating = false;
  if (!ended.ok()) {
    s.Snapshot();
    return ended.Annotate(StrCat("EndStep of step ", s.step));
  }
  StepStats stats = s.StatsOf(record);
  s.Snapshot();
  return stats;
}

// The metrics of the step [begin, end]: the device engines' intervals where the backend keeps
// them, and the optimizer's updates in the window (UpdateIntervals).
StepMetrics Session::Impl::MetricsOf(Clock::time_point begin, Clock::time_point end) {
  std::vector<ResourceBusy> resources;
  if (backend.busy_times().measured) {
    resources = {{"compute", {}}, {"h2d", {}}, {"d2h", {}}};
    for (const EngineInterval& each : backend.engine_intervals(begin)) {
      resources[static_cast<size_t>(each.engine)].intervals.push_back({each.start, each.end});
    }
  }
  resources.push_back({"optimizer", update_intervals.Take(end)});
  return ComputeStepMetrics(begin, end, resources);
}

// The statistics of the step that just ended: its record, and the counters since the
// previous EndStep returned.
StepStats Session::Impl::StatsOf(const StepExecutor::StepRecord& record) {
  StepStats stats;
  stats.step = step;
  stats.tokens = record.tokens;
  const Clock::time_point now = Clock::now();
  const Clock::time_point begin = last_end;
  stats.seconds = std::chrono::duration<double>(now - begin).count();
  stats.begin_seconds = record.begin_seconds;
  last_end = now;
  stats.tokens_per_s = stats.seconds > 0 ? static_cast<double>(record.tokens) / stats.seconds : 0;
  const CopyStats copies = backend.copy_stats();
  stats.h2d_bytes = copies.bytes[0] - copies_at_begin.bytes[0];
  stats.d2h_bytes = copies.bytes[1] - copies_at_begin.bytes[1];
  const CacheStats& cache = executor->cache().stats();
  stats.expert_fetch_bytes = cache.bytes_moved - cache_at_begin.bytes_moved;
  stats.gradient_bytes = record.gradient_bytes;
  stats.cache_hits = cache.hits - cache_at_begin.hits;
  stats.cache_misses = cache.misses - cache_at_begin.misses;
  const uint64_t accesses = stats.cache_hits + stats.cache_misses;
  stats.hit_rate = accesses ? static_cast<double>(stats.cache_hits) / accesses : 0;
  stats.stalls = record.stalls;
  stats.stall_records = record.stall_records;
  stats.stall_fraction = stats.seconds > 0 ? record.stalls.total() / stats.seconds : 0;
  const EngineBusyTimes e = backend.busy_times();  // all 0 where the backend keeps none
  stats.compute_busy_seconds = e.compute_busy_seconds - engines_at_begin.compute_busy_seconds;
  stats.h2d_busy_seconds = e.h2d_busy_seconds - engines_at_begin.h2d_busy_seconds;
  stats.d2h_busy_seconds = e.d2h_busy_seconds - engines_at_begin.d2h_busy_seconds;
  stats.optimizer_busy_seconds = executor->optimizer_busy_seconds() - optimizer_busy_at_begin;
  stats.nvme_bytes = executor->nvme_bytes() - nvme_at_begin;
  const ExpertStore::IoBytes io = executor->nvme_io().Since(nvme_io_at_begin);
  stats.nvme_read_bytes = io.read;
  stats.nvme_written_bytes = io.written;
  stats.nvme_fresh_written_bytes = io.fresh_written;
  stats.metrics = MetricsOf(begin, now);
  stats.updated_experts = record.updated_experts;
  stats.updated_params = uint64_t{record.updated_experts} * memory.params;
  stats.optimizer = record.report;
  return stats;
}

Status Session::Synchronize() {
  if (impl_->save != nullptr) {                  // with delayed_update it starts an update
    impl_->FinishSave().status().IgnoreError();  // for WaitForCheckpoint
  }
  return impl_->executor->Synchronize(impl_->in_step);
}

StatusOr<CheckpointStats> Session::SaveCheckpoint(const std::string& root, const std::string& name,
                                                  const std::vector<CheckpointBlob>& loop_state) {
  ECSS_RETURN_IF_ERROR(StartCheckpoint(root, name, loop_state));
  return WaitForCheckpoint();
}

StatusOr<CheckpointStats> Session::WaitForCheckpoint() {
  Impl& s = *impl_;
  if (s.save == nullptr) return FailedPreconditionError("WaitForCheckpoint: no save was started");
  StatusOr<CheckpointStats> saved = s.FinishSave();
  s.save.reset();
  return saved;
}

Status Session::StartCheckpoint(const std::string& root, const std::string& name,
                                const std::vector<CheckpointBlob>& loop_state) {
  Impl& s = *impl_;
  if (s.in_step) {
    return FailedPreconditionError("saving a checkpoint inside a step (call it between steps)");
  }
  if (s.save != nullptr) {
    return FailedPreconditionError(
        "saving a checkpoint while the last one's result is not taken (WaitForCheckpoint)");
  }
  for (const CheckpointBlob& blob : loop_state) {
    if (blob.name.rfind(kSessionBlobPrefix, 0) == 0) {
      return InvalidArgumentError(StrCat("checkpoint loop state '", blob.name,
                                         "': names starting with '", kSessionBlobPrefix,
                                         "' are the session's own"));
    }
  }
  // Not Synchronize: with the delayed update that would start the held update, which the
  // training that goes on after the save must start at its next BeginStep, as it would have.
  ECSS_RETURN_IF_ERROR(s.executor->Quiesce());
  ECSS_RETURN_IF_ERROR(s.table->RecordHostVersions());
  CheckpointOptions options;
  options.blobs = loop_state;
  SessionRecord record;
  record.steps = s.step;
  record.hyper_params = s.table->updater().hyper_params();
  record.held = s.executor->held();
  record.held_loss_scale = s.executor->held_loss_scale();
  record.gradient_dtype = s.options.gradient_dtype;
  options.blobs.push_back({std::string(kSessionBlob), FormatSessionRecord(record)});
  if (!record.held.empty()) {
    std::string& held = options.blobs.emplace_back().bytes;
    options.blobs.back().name = kHeldGradientsBlob;
    const uint64_t bytes = HeldGradientBytes(record, s.options.model);
    held.reserve(record.held.size() * bytes);
    for (ExpertId id : record.held) {
      held.append(static_cast<const char*>(s.table->GradientOf(id)), bytes);
    }
  }
  // What the moments mean: resuming them with another optimizer would be silently wrong.
  options.blobs.push_back(
      {std::string(kOptimizerBlob), std::string(OptimizerKindName(s.options.optimizer.kind))});
  // What the experts are (ids, sizes, initial values): checked at resume, read by ecss-extract.
  options.blobs.push_back({std::string(kModelBlob), FormatModelRecord(s.options.model)});
  options.states = s.table->CheckpointStates();
  options.io_engines = s.options.placement.io_engines;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointSave> save,
                        CheckpointSave::Begin(s.table->store(), root, name, std::move(options)));
  ECSS_RETURN_IF_ERROR(save->Start());  // else the save is abandoned
  s.save = std::move(save);
  s.steps_since_save = 0;
  s.table->set_before_host_update([save = s.save.get()](ExpertId id) { save->Preserve(id); });
  return Status::Ok();
}

const std::vector<CheckpointBlob>& Session::loop_state() const {
  return impl_->table->loop_state();
}

Status Session::SetHyperParams(const HyperParams& params) {
  if (impl_->in_step) {
    return FailedPreconditionError("SetHyperParams inside a step (call it between steps)");
  }
  return impl_->table->updater().SetHyperParams(params);
}

// ---- Accessors -------------------------------------------------------------------------------

Stream Session::compute_stream() const { return impl_->executor->compute_stream(); }

StatusOr<std::vector<float>> Session::MasterWeights(LayerIndex layer, uint32_t expert) {
  if (expert >= impl_->table->experts_in_layer(layer.value)) {
    return InvalidArgumentError(
        StrCat("MasterWeights: no expert (", layer.value, ", ", expert, ")"));
  }
  return impl_->table->Master({layer.value, expert});
}

StatusOr<StepPlan> Session::ExecutedPlan(uint64_t step) const {
  return impl_->recorder.ExecutedPlan(step);
}

const MemoryPlan& Session::memory_plan() const { return impl_->memory; }

Session::HostMemoryPeaks Session::host_memory_peaks() const {
  return {impl_->table->pinned_peak_bytes(), impl_->table->host_peak_bytes()};
}

ExpertStore::IoBytes Session::nvme_io() const { return impl_->executor->nvme_io(); }

uint32_t Session::experts_in_layer(uint32_t layer) const {
  return impl_->table->experts_in_layer(layer);
}
uint32_t Session::cache_slots() const { return impl_->executor->cache().slots(); }
uint64_t Session::expert_params() const { return impl_->memory.params; }

}  // namespace ecss
