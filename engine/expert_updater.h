// ExpertUpdater: how the session updates experts whose gradients are complete, wherever their
// master weights and moments live (internal to engine).
//  - HostUpdater: states in host memory, CpuOptimizer (per-expert updates from its run queue,
//    in its TBB arena).
//  - NvmeUpdater: states on NVMe, in the session's ExpertStore (offload/expert_store.h), streamed
//    load -> update -> store through pinned staging (optimizer/state_pipeline.h) by a worker
//    thread, one batch per sparse layer, in submission order.
// Both write each updated expert's bf16 compute copy into the pinned weights the device cache
// fetches from, and give the per-expert fence (Pending/Wait) the next step's fetch waits on.
// Both mean the same by the optimizer's options: with clipping or skip_step_on_nonfinite the
// step's updates start at FinishStep (after the global norm), else as experts are submitted.
// Errors: an update that fails (an I/O error, a damaged state block, a non-finite gradient
// without skip_step_on_nonfinite) leaves the expert's states as they were, passes its fence,
// and is reported once by TakeError (and Synchronize), naming the step and the expert.
// Thread-compatible: the session's driving thread calls everything.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/session_options.h"
#include "offload/expert_store.h"
#include "optimizer/cpu_optimizer.h"
#include "runtime/base/dtype.h"
#include "runtime/device/allocator.h"

namespace ecss {

class ExpertUpdater {
 public:
  virtual ~ExpertUpdater() = default;
  virtual Status BeginStep(float loss_scale) = 0;
  // The hyper-parameters of the steps that begin after this call (InvalidArgument naming the
  // field); the updates of steps already begun keep theirs.
  virtual Status SetHyperParams(const HyperParams& params) = 0;
  // Those in force now: what a checkpoint records.
  virtual HyperParams hyper_params() const = 0;
  // Expert `id`'s gradient (f32 or bf16, valid until its update finished) is complete.
  virtual Status Submit(uint32_t id, const void* grad, DType dtype) = 0;
  // The submissions so far may start (NvmeUpdater batches them per layer).
  virtual Status Flush() = 0;
  virtual StatusOr<StepReport> FinishStep() = 0;
  // Ends the step without the updates it still holds back (CpuOptimizer::AbortStep).
  virtual Status AbortStep() = 0;
  // True while the expert's latest submitted update has not finished.
  virtual bool Pending(uint32_t id) const = 0;
  virtual Status Wait(uint32_t id) = 0;
  // Moves the submitted, not yet started updates of `ids` ahead of the others, in that order
  // (CpuOptimizer::Expedite): the next step's fetches wait on them first. Returns how many
  // moved. Never changes a result, only when an update runs.
  virtual uint32_t Expedite(const std::vector<uint32_t>& ids) = 0;
  // Blocks until every update submitted in steps <= `step` has finished (backpressure: the
  // session lets one step's updates overlap the next step, never more).
  virtual Status WaitForStep(uint64_t step) = 0;
  // The first update failure not reported yet (then OK until another fails). Never blocks.
  virtual Status TakeError() = 0;
  // Waits for every update submitted so far; returns TakeError().
  virtual Status Synchronize() = 0;
  virtual double busy_seconds() const = 0;
  virtual uint64_t nvme_bytes() const = 0;  // read + written since creation
  // After Synchronize: the expert's fp32 master weights.
  virtual StatusOr<std::vector<float>> Master(uint32_t id) = 0;
};

// States in host memory. Register in id order.
class HostUpdater final : public ExpertUpdater {
 public:
  static StatusOr<std::unique_ptr<HostUpdater>> Create(const CpuOptimizerOptions& options);
  StatusOr<uint32_t> Register(const ExpertArrays& arrays);

  Status BeginStep(float loss_scale) override;
  Status SetHyperParams(const HyperParams& params) override {
    return optimizer_->SetHyperParams(0, params);
  }
  HyperParams hyper_params() const override { return optimizer_->hyper_params(0); }
  Status Submit(uint32_t id, const void* grad, DType dtype) override;
  Status Flush() override { return Status::Ok(); }
  StatusOr<StepReport> FinishStep() override;
  Status AbortStep() override { return optimizer_->AbortStep(); }
  bool Pending(uint32_t id) const override;
  Status Wait(uint32_t id) override;
  uint32_t Expedite(const std::vector<uint32_t>& ids) override { return optimizer_->Expedite(ids); }
  Status WaitForStep(uint64_t step) override;
  Status TakeError() override { return optimizer_->TakeError(); }
  Status Synchronize() override;
  double busy_seconds() const override;
  uint64_t nvme_bytes() const override { return 0; }
  StatusOr<std::vector<float>> Master(uint32_t id) override;
  // The updates expert `id` received (its optimizer's version): after Synchronize, the version
  // of its states, which it updates in place.
  uint64_t version(uint32_t id) const { return optimizer_->version(id); }
  // Called by Submit before the expert's update is queued (its arrays change after it
  // returns). Empty: nothing is called.
  void set_before_update(std::function<void(uint32_t id)> hook) {
    before_update_ = std::move(hook);
  }

 private:
  explicit HostUpdater(std::unique_ptr<CpuOptimizer> optimizer)
      : optimizer_(std::move(optimizer)) {}
  std::unique_ptr<CpuOptimizer> optimizer_;
  std::function<void(uint32_t id)> before_update_;
  struct Entry {
    ExpertArrays arrays;
    uint64_t submitted_step = 0;
  };
  std::vector<Entry> entries_;
};

struct NvmeUpdaterOptions {
  // kind, groups[0], threads; with clipping (max_grad_norm > 0) or skip_step_on_nonfinite the
  // step's updates start at FinishStep, after the global norm, instead of per layer at Flush.
  CpuOptimizerOptions optimizer;
  uint64_t expert_elements = 0;  // every expert's size
  // The pipeline's slots, its loads and its stores at once (StreamingOptions::buffers,
  // loads_in_flight, stores_in_flight). Every load, update and store holds a slot until its
  // expert is stored. 0 slots: StagingSlots' rule. Stores of experts of the same parity take
  // turns (ExpertStore's writers).
  int staging_buffers = 0;
  int loads_in_flight = 2;
  int stores_in_flight = 2;
  // Where every expert's master weights and moments live, on NVMe; when it keeps the compute
  // weights on NVMe too, each update's bf16 copy goes there (through the pipeline's slots)
  // instead of into a compute copy in memory. Ids are its index's. Not owned; outlives the
  // updater. PipelineBytes and ScratchBytes do not need it.
  ExpertStore* store = nullptr;
};

// The pipeline's slots: `options.staging_buffers` when set; else loads + stores + 1, every stage
// busy at once, while an expert's master and moments take at most 32 MiB (each of its loads
// and stores is then a few requests and a header round trip, too short to keep the drive's
// queue full alone), and otherwise the most of 3, loads and stores (each transfer keeps the
// drive busy; more slots would cost pinned memory for nothing). Measured in bench/README.md.
int StagingSlots(const NvmeUpdaterOptions& options);

// The NVMe updater of a session with these options and `params` parameters per expert (its
// optimizer and sizes; not its store).
NvmeUpdaterOptions NvmeOptionsFor(const SessionOptions& options, uint64_t params);

// The expert store of a session with these options, the one owner of every expert's compute
// weights (pinned, or NVMe), master weights (NVMe; else host memory, or with f32 weights the
// weights themselves: not kept) and moments (NVMe or host; host: one array at least). Its
// memory states are not durable (the session re-derives the weights from the master at
// resume); without NVMe it needs no directory. Gradients stay with the session (a step's
// accumulators). Budgets are left at 0 (exactly what it needs).
ExpertStoreOptions StoreOptionsFor(const SessionOptions& options, uint64_t params);

class NvmeUpdater final : public ExpertUpdater {
 public:
  // The staging slots in `staging`; InvalidArgument when the store does not keep master
  // weights (and moments, when the optimizer has them) on NVMe.
  static StatusOr<std::unique_ptr<NvmeUpdater>> Create(const NvmeUpdaterOptions& options,
                                                       Allocator* staging);
  // Waits for the updates, then makes the store durable (ExpertStore::Flush; a failure is
  // logged).
  ~NvmeUpdater() override;
  // A new store: expert `id` starts from the store's initial values (nothing is written
  // before its first update); before any step. `compute_copy` (which holds the initial bf16
  // weights) receives the bf16 copy of each update (null: the store has it).
  Status Attach(uint32_t id, BFloat16* compute_copy);
  // A new store: every expert's states on NVMe written at their initial values into both of
  // their slots, as after two updates (placement.write_initial_states: a benchmark's store,
  // whose every measured store then overwrites), through the block Resume uses, so that the
  // process's memory stays the session's; before any step.
  Status WriteInitialStates();
  // An opened store: reads expert `id`'s master weights and, unless the weights are already
  // as of the master's version, writes their bf16 copy into `compute_copy` or the store
  // (which receive every later update too).
  Status Resume(uint32_t id, BFloat16* compute_copy);
  // The pinned staging the updater takes from `staging`: the pipeline's slots, one block
  // (with a weight store they also stage the bf16 copy: `weights_on_nvme`, which the caller
  // can size before it creates the store; InvalidArgument for bad optimizer options) ...
  static StatusOr<uint64_t> PipelineBytes(const NvmeUpdaterOptions& options, bool weights_on_nvme);
  // ... and one expert's arrays, a block it holds for its life, which Resume and Master use.
  static uint64_t ScratchBytes(const NvmeUpdaterOptions& options);

  Status BeginStep(float loss_scale) override;
  Status SetHyperParams(const HyperParams& params) override;
  HyperParams hyper_params() const override;
  Status Submit(uint32_t id, const void* grad, DType dtype) override;
  Status Flush() override;
  StatusOr<StepReport> FinishStep() override;
  Status AbortStep() override;
  bool Pending(uint32_t id) const override;
  Status Wait(uint32_t id) override;
  // Keeps submission order, returns 0: a job is a layer's batch, which the pipeline streams at
  // its best whole and in order. Moving single experts into jobs of their own, or whole jobs
  // ahead, made ecss-bench step with states and weights on NVMe 7-35% slower (the device's
  // work, which the order lets start early, is under 1% of such a step).
  uint32_t Expedite(const std::vector<uint32_t>&) override { return 0; }
  Status WaitForStep(uint64_t step) override;
  Status TakeError() override;
  // Also makes the store durable (ExpertStore::Flush).
  Status Synchronize() override;
  double busy_seconds() const override;
  uint64_t nvme_bytes() const override;
  StatusOr<std::vector<float>> Master(uint32_t id) override;

 private:
  struct Impl;
  explicit NvmeUpdater(std::unique_ptr<Impl> impl);
  Status Start(float clip_coefficient);  // queues the batch collected so far
  // Expert `id`'s bf16 weights from its master (as of `version`): into its compute copy, or
  // the weight store through the scratch block behind the master. scratch_mutex held.
  Status WriteWeights(uint32_t id, const float* master, uint64_t version);
  // Expert `id`'s master (as of the version its moments hold too) into the scratch block's
  // head, its moments behind it; returns that version (its update count). scratch_mutex held.
  StatusOr<uint64_t> LoadMaster(uint32_t id);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
