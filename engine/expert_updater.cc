#include "engine/expert_updater.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "engine/store_state_tier.h"
#include "offload/state_file.h"
#include "optimizer/state_pipeline.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"
#include "runtime/base/trace.h"

namespace ecss {

// ---- HostUpdater ----------------------------------------------------------------------------

StatusOr<std::unique_ptr<HostUpdater>> HostUpdater::Create(const CpuOptimizerOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CpuOptimizer> optimizer, CpuOptimizer::Create(options));
  return std::unique_ptr<HostUpdater>(new HostUpdater(std::move(optimizer)));
}

StatusOr<uint32_t> HostUpdater::Register(const ExpertArrays& arrays) {
  ECSS_ASSIGN_OR_RETURN(uint32_t id, optimizer_->RegisterExpert(arrays));
  if (id != entries_.size()) return InternalError("HostUpdater: ids out of order");
  entries_.push_back({arrays, 0});
  return id;
}

Status HostUpdater::BeginStep(float loss_scale) { return optimizer_->BeginStep(loss_scale); }

Status HostUpdater::Submit(uint32_t id, const void* grad, DType dtype) {
  Entry& entry = entries_[id];
  if (before_update_) before_update_(id);
  ECSS_RETURN_IF_ERROR(optimizer_->SubmitGradient(id, grad, dtype));
  entry.submitted_step = optimizer_->current_step();
  return Status::Ok();
}

StatusOr<StepReport> HostUpdater::FinishStep() { return optimizer_->FinishStep(); }

// An update that was skipped, failed or aborted has been processed too: nothing of it still
// reads the gradient or rewrites the weights.
bool HostUpdater::Pending(uint32_t id) const {
  const Entry& entry = entries_[id];
  return entry.submitted_step > 0 && optimizer_->processed_step(id) < entry.submitted_step;
}

Status HostUpdater::Wait(uint32_t id) {
  const Entry& entry = entries_[id];
  if (entry.submitted_step == 0) return Status::Ok();
  Status waited = optimizer_->WaitForExpert(id, entry.submitted_step);
  // An update that ran and failed has passed its fence (the expert's arrays are as they
  // were); its error reaches the session once, through TakeError.
  if (optimizer_->processed_step(id) >= entry.submitted_step) return Status::Ok();
  return waited;
}

// A failed update has passed its fence too; its error reaches the session through TakeError.
Status HostUpdater::WaitForStep(uint64_t step) { return optimizer_->WaitForSteps(step); }

Status HostUpdater::Synchronize() { return optimizer_->Synchronize(); }
double HostUpdater::busy_seconds() const { return optimizer_->busy_seconds(); }

StatusOr<std::vector<float>> HostUpdater::Master(uint32_t id) {
  const ExpertArrays& a = entries_[id].arrays;
  return std::vector<float>(a.master, a.master + a.size);
}

// ---- NvmeUpdater ----------------------------------------------------------------------------

namespace {

// Arrays an update reads and writes: the master weights and the optimizer's states.
uint32_t FileArrays(OptimizerKind kind) { return 1 + static_cast<uint32_t>(StateArrays(kind)); }

}  // namespace

struct NvmeUpdater::Impl {
  NvmeUpdaterOptions options;
  std::unique_ptr<StoreStateTier> tier;
  Buffer workspace;  // the pipeline's staging slots, in the caller's pinned memory
  // Resume's and Master's block (ScratchBytes), held for the updater's life so that the
  // session's pinned peak is its memory plan, and neither call can fail for want of room.
  std::mutex scratch_mutex;
  Buffer scratch;  // GUARDED_BY(scratch_mutex)
  // The scratch block behind the master: its moments, or the weights (ScratchBytes).
  void* BehindMaster() {
    return static_cast<char*>(scratch.data()) + StateArrayBytes(options.expert_elements);
  }
  std::unique_ptr<StateStreamingUpdater> updater;
  Allocator* staging = nullptr;
  std::vector<BFloat16*> compute_copies;

  // The batch being collected by the driving thread.
  std::vector<StreamedGradient> batch;
  float loss_scale = 1;
  HyperParams step_params;  // as the step began
  uint64_t step = 0;
  uint32_t submitted = 0;

  // Shared with the worker.
  mutable std::mutex mutex;
  std::condition_variable cv;
  struct Job {
    std::vector<StreamedGradient> work;
    float loss_scale;
    uint64_t step;
    float clip_coefficient;
    HyperParams params;
  };
  // Clipping needs the step's global norm before any update, and skipping a step on a
  // non-finite gradient needs every gradient checked first: the step's gradients are then
  // held until FinishStep, as CpuOptimizer holds them.
  bool deferred() const {
    return options.optimizer.max_grad_norm > 0 || options.optimizer.skip_step_on_nonfinite;
  }
  std::deque<Job> jobs;                  // GUARDED_BY(mutex)
  bool running = false;                  // GUARDED_BY(mutex): a job is being processed
  uint64_t running_step = 0;             // GUARDED_BY(mutex): that job's step
  bool stop = false;                     // GUARDED_BY(mutex)
  std::vector<uint64_t> submitted_step;  // GUARDED_BY(mutex), per expert
  std::vector<uint64_t> done_step;       // GUARDED_BY(mutex), per expert
  Status first_error;                    // GUARDED_BY(mutex): not reported yet
  uint64_t more_errors = 0;              // GUARDED_BY(mutex): failures after first_error
  double busy = 0;                       // GUARDED_BY(mutex)
  uint64_t bytes = 0;                    // GUARDED_BY(mutex)
  std::thread worker;

  bool weights_in_store() const {
    return options.store->placement(ExpertState::kWeights) == Tier::kNvme;
  }
  ExpertId Id(uint32_t id) const { return options.store->index().Id(id); }

  // An expert's fence only moves forward. A job ends after the next step has begun, and
  // that step may already have settled one of the job's experts (skipped or aborted it): the
  // job's own end must not take the expert back to its step, or the next wait for it never
  // returns. REQUIRES: mutex held.
  void MarkDone(uint32_t expert, uint64_t at_step) {
    done_step[expert] = std::max(done_step[expert], at_step);
  }

  void RecordError(Status error) {  // REQUIRES: mutex held
    if (first_error.ok()) {
      first_error = std::move(error);
    } else {
      ++more_errors;
    }
  }

  void Work() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      cv.wait(lock, [&] { return stop || !jobs.empty(); });
      if (jobs.empty()) return;
      Job job = std::move(jobs.front());
      jobs.pop_front();
      running = true;
      running_step = job.step;
      lock.unlock();
      const auto start = std::chrono::steady_clock::now();
      // When each expert's batch entered the pipeline (the job's, or a later job's of the
      // same step that joined it: the load stage adds those), its update's start; and every
      // expert of the run.
      std::mutex run_mutex;
      std::unordered_map<uint32_t, std::chrono::steady_clock::time_point> started;
      std::vector<uint32_t> streamed;
      auto start_batch = [&](const std::vector<StreamedGradient>& joined, auto at) {
        {
          std::lock_guard<std::mutex> guard(run_mutex);
          for (const StreamedGradient& g : joined) {
            started[g.expert] = at;
            streamed.push_back(g.expert);
          }
        }
        if (options.optimizer.on_update_start) {
          for (const StreamedGradient& g : joined) {
            options.optimizer.on_update_start(g.expert, job.step, at);
          }
        }
      };
      start_batch(job.work, start);
      StreamingHooks hooks;
      // The step's next layers' batches, queued meanwhile, join the run: the pipeline stays
      // full across layers instead of draining after each.
      hooks.more = [&](std::vector<StreamedGradient>* more) {
        {
          std::lock_guard<std::mutex> guard(mutex);
          if (jobs.empty() || jobs.front().step != job.step) return false;
          *more = std::move(jobs.front().work);
          jobs.pop_front();
        }
        start_batch(*more, std::chrono::steady_clock::now());
        return true;
      };
      // Each expert counts as done as soon as it is stored; its times are reported first, so
      // that whoever waited for it sees them.
      hooks.done = [&](uint32_t expert) {
        if (options.optimizer.on_update) {
          std::chrono::steady_clock::time_point at;
          {
            std::lock_guard<std::mutex> guard(run_mutex);
            at = started[expert];
          }
          options.optimizer.on_update(expert, job.step, at, std::chrono::steady_clock::now());
        }
        std::lock_guard<std::mutex> guard(mutex);
        MarkDone(expert, job.step);
        cv.notify_all();
      };
      TraceRecorder* trace = options.optimizer.trace;
      TraceScope scope(trace, trace ? trace->Lane("nvme states") : 0, "load-update-store", "nvme",
                       {{"experts", static_cast<double>(job.work.size())}});
      StatusOr<StreamingReport> report =
          updater->Run(job.work, job.loss_scale, job.clip_coefficient, &job.params, hooks);
      const auto end = std::chrono::steady_clock::now();
      const double seconds = std::chrono::duration<double>(end - start).count();
      lock.lock();
      running = false;
      busy += seconds;
      // Each update reads and writes every state array once, and writes the bf16 weights
      // when they live on NVMe.
      bytes += (2ull * FileArrays(options.optimizer.kind) * 4 + (weights_in_store() ? 2 : 0)) *
               options.expert_elements * (report.ok() ? report->updated : 0);
      if (!report.ok()) {
        RecordError(report.status().Annotate(StrCat("update of step ", job.step)));
      } else if (report->skipped_nonfinite > 0) {  // only without skip_step_on_nonfinite
        RecordError(FailedPreconditionError(
            StrCat("update of step ", job.step, ": ", report->skipped_nonfinite,
                   " experts had a gradient with NaN or Inf and were not updated")));
      }
      for (uint32_t expert : streamed) MarkDone(expert, job.step);  // a run refused whole
      cv.notify_all();
    }
  }
};

namespace {

// The streaming pipeline's options for these updater options. `stage_compute_copy`: the
// compute weights live in a store on NVMe, and the slots stage their new bf16 copy.
StreamingOptions StreamingOptionsFor(const NvmeUpdaterOptions& options, bool stage_compute_copy) {
  StreamingOptions streaming;
  streaming.kind = options.optimizer.kind;
  streaming.params = options.optimizer.groups.empty() ? HyperParams{} : options.optimizer.groups[0];
  streaming.threads = options.optimizer.threads;
  streaming.chunk_elements = options.optimizer.chunk_elements;
  streaming.buffers = StagingSlots(options);
  streaming.loads_in_flight = options.loads_in_flight;
  streaming.stores_in_flight = options.stores_in_flight;
  streaming.max_expert_elements = options.expert_elements;
  streaming.isa = options.optimizer.isa;
  streaming.stage_compute_copy = stage_compute_copy;
  return streaming;
}

}  // namespace

int StagingSlots(const NvmeUpdaterOptions& options) {
  if (options.staging_buffers > 0) return options.staging_buffers;
  constexpr uint64_t kSmallExpertBytes = uint64_t{32} << 20;
  const uint64_t state_bytes =
      StateArrayBytes(options.expert_elements) * FileArrays(options.optimizer.kind);
  return state_bytes <= kSmallExpertBytes
             ? options.loads_in_flight + options.stores_in_flight + 1
             : std::max({3, options.loads_in_flight, options.stores_in_flight});
}

NvmeUpdaterOptions NvmeOptionsFor(const SessionOptions& options, uint64_t params) {
  NvmeUpdaterOptions nvme;
  nvme.optimizer = options.optimizer;
  nvme.expert_elements = params;
  return nvme;
}

ExpertStoreOptions StoreOptionsFor(const SessionOptions& options, uint64_t params) {
  const Placement& p = options.placement;
  const auto arrays = static_cast<uint32_t>(StateArrays(options.optimizer.kind));
  ExpertStoreOptions store;
  store.layout.experts_per_layer = options.ExpertsPerLayer();
  store.layout.params_per_expert = params;
  store.layout.weights_dtype = options.model.dtype;
  store.layout.moments = p.states_on_nvme() ? arrays : std::max(1u, arrays);
  // f32 models update their compute weights in place: those are the master.
  const Tier master = options.model.dtype == DType::kF32 ? Tier::kNone : p.master;
  store.placement = {p.weights, master, p.moments, Tier::kNone};  // gradients: the session's
  if (p.states_on_nvme()) store.dirs = p.nvme_dirs;
  store.durable_memory_states = false;
  store.lock_pinned_pages = options.budgets.lock_pinned;  // as the session's own pool
  store.io_engines = p.io_engines;
  store.max_file_bytes = p.max_file_bytes;
  return store;
}

StatusOr<uint64_t> NvmeUpdater::PipelineBytes(const NvmeUpdaterOptions& options,
                                              bool weights_on_nvme) {
  return StateStreamingUpdater::WorkspaceBytes(StreamingOptionsFor(options, weights_on_nvme));
}

// The master at the block's head; behind it its moments (a load), and after the load the bf16
// weights Resume reads and writes there (no heap: the block is in the memory plan).
uint64_t NvmeUpdater::ScratchBytes(const NvmeUpdaterOptions& options) {
  const uint64_t n = options.expert_elements;
  return StateArrayBytes(n) + std::max(StateBlockBytes(n * 4 * StateArrays(options.optimizer.kind)),
                                       StateBlockBytes(n * sizeof(BFloat16)));
}

StatusOr<std::unique_ptr<NvmeUpdater>> NvmeUpdater::Create(const NvmeUpdaterOptions& options,
                                                           Allocator* staging) {
  ExpertStore* store = options.store;
  const uint32_t moments = static_cast<uint32_t>(StateArrays(options.optimizer.kind));
  if (store == nullptr || store->placement(ExpertState::kMaster) != Tier::kNvme ||
      (moments > 0 && store->placement(ExpertState::kMoments) != Tier::kNvme) ||
      store->layout().moments != moments ||
      store->layout().params_per_expert != options.expert_elements) {
    return InvalidArgumentError(
        StrCat("states on NVMe need a store that keeps the master weights and ", moments,
               " moment arrays of ", options.expert_elements, " parameters per expert on NVMe"));
  }
  if (options.optimizer.groups.size() != 1) {
    return InvalidArgumentError("states on NVMe: one parameter group only");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->staging = staging;
  impl->tier = std::make_unique<StoreStateTier>(store);
  const StreamingOptions streaming = StreamingOptionsFor(options, impl->weights_in_store());
  ECSS_ASSIGN_OR_RETURN(const uint64_t workspace_bytes,
                        StateStreamingUpdater::WorkspaceBytes(streaming));
  ECSS_ASSIGN_OR_RETURN(impl->workspace, staging->Allocate(workspace_bytes, MemoryTag::kStaging));
  ECSS_ASSIGN_OR_RETURN(impl->scratch,
                        staging->Allocate(ScratchBytes(options), MemoryTag::kStaging));
  ECSS_ASSIGN_OR_RETURN(impl->updater,
                        StateStreamingUpdater::Create(streaming, impl->tier.get(),
                                                      impl->workspace.data(), workspace_bytes));
  const uint32_t experts = store->index().size();
  impl->compute_copies.assign(experts, nullptr);
  impl->submitted_step.assign(experts, 0);
  impl->done_step.assign(experts, 0);
  Impl* raw = impl.get();
  impl->worker = std::thread([raw] { raw->Work(); });
  return std::unique_ptr<NvmeUpdater>(new NvmeUpdater(std::move(impl)));
}

NvmeUpdater::NvmeUpdater(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NvmeUpdater::~NvmeUpdater() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  impl_->worker.join();  // finishes the queued jobs first
  Status synced = impl_->options.store->Flush();
  if (!synced.ok()) ECSS_LOG(Error) << "NVMe states: " << synced;
}

Status NvmeUpdater::Attach(uint32_t id, BFloat16* compute_copy) {
  impl_->compute_copies[id] = compute_copy;
  return Status::Ok();
}

Status NvmeUpdater::WriteInitialStates() {
  Impl& s = *impl_;
  ExpertStore& store = *s.options.store;
  std::lock_guard<std::mutex> hold(s.scratch_mutex);
  for (ExpertState state : {ExpertState::kWeights, ExpertState::kMaster, ExpertState::kMoments}) {
    if (store.placement(state) != Tier::kNvme) continue;
    if (store.BlockBytes(state) > s.scratch.size()) {
      return InternalError(StrCat("the updater's block (", s.scratch.size(),
                                  " bytes) is smaller than a ", ExpertStateName(state), " block (",
                                  store.BlockBytes(state), ")"));
    }
    for (uint32_t flat = 0; flat < store.index().size(); ++flat) {
      const ExpertId id = store.index().Id(flat);
      ECSS_RETURN_IF_ERROR(store.ReadBlock(state, id, s.scratch.data()));
      for (int copy = 0; copy < 2; ++copy) {
        ECSS_RETURN_IF_ERROR(store.WriteBlock(state, id, s.scratch.data(), 0));
      }
    }
  }
  return Status::Ok();
}

Status NvmeUpdater::Resume(uint32_t id, BFloat16* compute_copy) {
  Impl& s = *impl_;
  s.compute_copies[id] = compute_copy;
  std::lock_guard<std::mutex> hold(s.scratch_mutex);
  ECSS_ASSIGN_OR_RETURN(const uint64_t updates, LoadMaster(id));
  // The weights follow from the master. In memory they start at the initial ones, which an
  // unwritten master's are; on NVMe a crash between an update's stores may leave them at
  // another version than the master's. Weights as of the master's version cost no write:
  // resuming a store whose experts are mostly unwritten stays cheap. Weights that do not read
  // back (damaged) are derived data: they are rewritten from the master. So are those of a
  // master written at version 0 (grown from a dense FFN): their version cannot tell them
  // from the initial weights a shared expert's copy on write leaves at version 0.
  bool master_written = false;
  ECSS_RETURN_IF_ERROR(
      s.options.store->Version(ExpertState::kMaster, s.Id(id), &master_written).status());
  bool current = !master_written;
  if (s.weights_in_store() && (updates != 0 || !master_written)) {
    uint64_t weights_version = 0;
    bool weights_written = false;
    Status read = s.options.store->ReadBlock(ExpertState::kWeights, s.Id(id), s.BehindMaster(),
                                             &weights_version);
    if (read.ok()) {
      read = s.options.store->Version(ExpertState::kWeights, s.Id(id), &weights_written).status();
    }
    if (!read.ok()) ECSS_LOG(Warning) << "rewriting weights from the master: " << read;
    current = read.ok() && weights_version == updates && weights_written == master_written;
  }
  if (current) return Status::Ok();
  return WriteWeights(id, s.scratch.as<float>(), updates);
}

// Nothing may update `id` meanwhile (Master synchronises first; Resume runs before any step).
StatusOr<uint64_t> NvmeUpdater::LoadMaster(uint32_t id) {
  Impl& s = *impl_;
  // Loaded as the pipeline loads it: the master as of the version the moments have too.
  StateSlot slot;
  slot.master = s.scratch.as<float>();
  slot.state0 = static_cast<float*>(s.BehindMaster());
  if (StateArrays(s.options.optimizer.kind) == 2) {
    slot.state1 = slot.state0 + s.options.expert_elements;  // one block: m, then v
  }
  slot.size = s.options.expert_elements;
  uint64_t updates = 0;
  ECSS_RETURN_IF_ERROR(s.tier->Load(id, slot, &updates));
  return updates;
}

Status NvmeUpdater::WriteWeights(uint32_t id, const float* master, uint64_t version) {
  Impl& s = *impl_;
  if (!s.weights_in_store()) {
    ConvertF32ToBf16(master, s.compute_copies[id], s.options.expert_elements);
    return Status::Ok();
  }
  auto* weights = static_cast<BFloat16*>(s.BehindMaster());
  ConvertF32ToBf16(master, weights, s.options.expert_elements);
  return s.options.store->Write(ExpertState::kWeights, s.Id(id), weights, version);
}

Status NvmeUpdater::BeginStep(float loss_scale) {
  Impl& s = *impl_;
  if (!(loss_scale > 0)) return InvalidArgumentError("loss scale must be > 0");
  s.loss_scale = loss_scale;
  ++s.step;
  s.submitted = 0;
  s.step_params = s.options.optimizer.groups[0];
  return Status::Ok();
}

Status NvmeUpdater::SetHyperParams(const HyperParams& params) {
  ECSS_RETURN_IF_ERROR(ValidateHyperParams(impl_->options.optimizer.kind, params));
  impl_->options.optimizer.groups[0] = params;  // the worker reads each job's own copy
  return Status::Ok();
}

HyperParams NvmeUpdater::hyper_params() const { return impl_->options.optimizer.groups[0]; }

Status NvmeUpdater::Submit(uint32_t id, const void* grad, DType dtype) {
  Impl& s = *impl_;
  s.batch.push_back({id, grad, dtype, s.compute_copies[id]});
  std::lock_guard<std::mutex> lock(s.mutex);
  s.submitted_step[id] = s.step;
  ++s.submitted;
  return Status::Ok();
}

Status NvmeUpdater::Flush() {
  Impl& s = *impl_;
  if (s.deferred()) return Status::Ok();  // FinishStep starts the step's updates
  return Start(1.0f);
}

Status NvmeUpdater::Start(float clip_coefficient) {
  Impl& s = *impl_;
  if (s.batch.empty()) return Status::Ok();
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.jobs.push_back({std::move(s.batch), s.loss_scale, s.step, clip_coefficient, s.step_params});
  }
  s.batch.clear();
  s.cv.notify_all();
  return Status::Ok();
}

StatusOr<StepReport> NvmeUpdater::FinishStep() {
  Impl& s = *impl_;
  StepReport report;
  report.step = s.step;
  report.experts_submitted = s.submitted;
  if (!s.deferred()) {
    ECSS_RETURN_IF_ERROR(Start(1.0f));
    return report;
  }
  // The norm as CpuOptimizer computes it: per-expert sums added in expert order.
  std::sort(
      s.batch.begin(), s.batch.end(),
      [](const StreamedGradient& a, const StreamedGradient& b) { return a.expert < b.expert; });
  std::vector<double> sums;
  sums.reserve(s.batch.size());
  for (const StreamedGradient& g : s.batch) {
    sums.push_back(
        GradientSumOfSquares(s.options.optimizer, g.grad, g.dtype, s.options.expert_elements));
  }
  const StepReport norm = GlobalNormReport(s.options.optimizer, sums, s.loss_scale);
  report.global_norm = norm.global_norm;
  report.clip_coefficient = norm.clip_coefficient;
  if (norm.skipped) {  // a non-finite gradient: no expert is updated this step
    report.skipped = true;
    std::lock_guard<std::mutex> lock(s.mutex);
    for (const StreamedGradient& g : s.batch) s.MarkDone(g.expert, s.step);
    s.batch.clear();
    s.cv.notify_all();
    return report;
  }
  ECSS_RETURN_IF_ERROR(Start(report.clip_coefficient));
  return report;
}

Status NvmeUpdater::AbortStep() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  for (const StreamedGradient& g : s.batch) s.MarkDone(g.expert, s.step);
  s.batch.clear();
  s.cv.notify_all();
  return Status::Ok();
}

Status NvmeUpdater::WaitForStep(uint64_t step) {
  Impl& s = *impl_;
  ECSS_RETURN_IF_ERROR(Flush());
  std::unique_lock<std::mutex> lock(s.mutex);
  // Jobs run in submission order, so step's are done once neither the running job nor the
  // next queued one belongs to it or an earlier step.
  s.cv.wait(lock, [&] {
    return (!s.running || s.running_step > step) && (s.jobs.empty() || s.jobs.front().step > step);
  });
  return Status::Ok();
}

bool NvmeUpdater::Pending(uint32_t id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->done_step[id] < impl_->submitted_step[id];
}

Status NvmeUpdater::Wait(uint32_t id) {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mutex);
  s.cv.wait(lock, [&] { return s.done_step[id] >= s.submitted_step[id]; });
  return Status::Ok();
}

Status NvmeUpdater::TakeError() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  Status error = std::move(s.first_error);
  s.first_error = Status::Ok();
  if (!error.ok() && s.more_errors > 0) {
    error = error.Annotate(StrCat("first of ", s.more_errors + 1, " failed update batches"));
  }
  s.more_errors = 0;
  return error;
}

Status NvmeUpdater::Synchronize() {
  Impl& s = *impl_;
  ECSS_RETURN_IF_ERROR(Flush());
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.cv.wait(lock, [&] { return s.jobs.empty() && !s.running; });
  }
  ECSS_RETURN_IF_ERROR(TakeError());
  return s.options.store->Flush();
}

double NvmeUpdater::busy_seconds() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->busy;
}

uint64_t NvmeUpdater::nvme_bytes() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->bytes;
}

StatusOr<std::vector<float>> NvmeUpdater::Master(uint32_t id) {
  ECSS_RETURN_IF_ERROR(Synchronize());
  std::lock_guard<std::mutex> hold(impl_->scratch_mutex);
  ECSS_RETURN_IF_ERROR(LoadMaster(id).status());
  const float* master = impl_->scratch.as<float>();
  return std::vector<float>(master, master + impl_->options.expert_elements);
}

}  // namespace ecss
