// ExpertTable: every expert of a session, and the one owner of their state (internal to
// engine). The expert store holds each expert's compute weights, master weights and moments
// on the tiers their placement names (StoreOptionsFor); the updater applies the optimizer to
// them; the table adds the pinned gradient accumulators and, with the delayed update, the
// published copy of each expert's weights that the device fetches. Create sizes everything
// as the session's memory plan lists it. Every expert starts from its own counter-based
// stream (so that every placement starts from the same weights), which the store reads as
// the initial value of an expert not written yet, or, with placement.resume, from the store's
// NVMe states.
// Gradient accumulators are the plan's gradient_slots, not one per expert: an expert takes one
// at its first gradient of a step and gives it back once its update no longer reads it, so
// host memory follows the experts a step activates, not the model's size.
// Thread-compatible: the session's driving thread calls it; the updater's threads reach the
// states through the store, and read index() (an update's observer maps its id).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "engine/checkpoint_record.h"
#include "engine/expert_updater.h"
#include "engine/gradient_pool.h"
#include "engine/memory_plan.h"
#include "engine/session_options.h"
#include "offload/checkpoint.h"
#include "offload/expert_index.h"
#include "offload/expert_store.h"
#include "offload/weight_stager.h"
#include "runtime/device/backend.h"
#include "runtime/device/pinned_pool.h"

namespace ecss {

class ExpertTable {
 public:
  struct Entry {
    uint32_t id = 0;          // the updater's id (the index's flat id)
    void* weights = nullptr;  // the store's pinned compute weights (null: they live on NVMe)
    Buffer front;             // delayed update: what the device copies (weights as last published)
    bool touched = false;     // has a gradient in the current step
  };

  // `options.optimizer` goes to the updater as it is (the caller sets its trace and
  // on_update). AlreadyExists (naming placement.resume) when the NVMe directory holds a store and
  // placement.resume is off; the store's and updater's errors otherwise.
  static StatusOr<std::unique_ptr<ExpertTable>> Create(Backend& backend,
                                                       const SessionOptions& options,
                                                       const MemoryPlan& memory);
  ~ExpertTable();  // waits for the updates in flight (they read the gradients)
  ExpertTable(const ExpertTable&) = delete;
  ExpertTable& operator=(const ExpertTable&) = delete;

  const ExpertIndex& index() const { return index_; }
  uint32_t experts_in_layer(uint32_t layer) const;
  Entry& at(ExpertId id) { return entries_[id.layer][id.expert]; }
  const Entry& at(ExpertId id) const { return entries_[id.layer][id.expert]; }
  // What the device fetches for `id`: its published copy with the delayed update, else the
  // store's pinned weights; null where they live on NVMe (the stager reads them).
  const void* FetchSource(ExpertId id) const;
  // Delayed update: `id`'s updated weights become what the device fetches. Nothing may read
  // its published copy meanwhile.
  void Publish(ExpertId id);
  // Drops every expert's gradient of the current step `step` (a step that failed).
  void ClearTouched(uint64_t step);
  // Expert `id`'s gradient accumulator (SessionOptions::gradient_dtype) for step `step`, and
  // its release when the step is done with it (GradientPool::Take and Release); GradientOf
  // is null while it holds none.
  StatusOr<void*> TakeGradient(ExpertId id, uint64_t step);
  void ReleaseGradient(ExpertId id, uint64_t step) { gradients_->Release(at(id).id, step); }
  void* GradientOf(ExpertId id) const { return gradients_->Of(at(id).id); }
  const GradientPool& gradients() const { return *gradients_; }

  // Called on the driving thread before an update changes expert `id`'s states in host
  // memory in place (never for states on NVMe, whose writes keep the version before): what a
  // checkpoint taken during training copies first. Empty: nothing is called.
  void set_before_host_update(std::function<void(ExpertId)> hook);
  ExpertUpdater& updater() { return *updater_; }
  const ExpertUpdater& updater() const { return *updater_; }
  WeightStager* stager() { return stager_.get(); }  // null unless the weights live on NVMe
  // The session's pinned pool, beside the store's own: gradients, the updater's staging.
  PinnedHostPool& pinned() { return *pinned_; }
  // NVMe bytes the updates (states read and written, weights written) and the stager moved
  // since creation; not the initial writes, nor Master's reads.
  uint64_t nvme_bytes() const;
  // The bytes the store's NVMe files read and wrote, as the I/O engines moved them.
  ExpertStore::IoBytes nvme_io() const { return store_->io_bytes(); }
  // After the updater's Synchronize: the expert's fp32 master weights.
  StatusOr<std::vector<float>> Master(ExpertId id) { return updater_->Master(at(id).id); }
  ExpertStore& store() { return *store_; }
  // The states a checkpoint of the session saves (the rest follows from them): the master
  // weights (f32 models: the compute weights, which are the master) and the moments.
  std::vector<ExpertState> CheckpointStates() const;
  // States in host memory, after the updater's Synchronize: the store's versions of them set
  // to the update counts of their in-place updates, so that Version and checkpoints see them.
  // Nothing to do with the states on NVMe (their writes carry their versions).
  Status RecordHostVersions();
  // What the checkpoint of placement.resume_from held for the training loop (empty without).
  const std::vector<CheckpointBlob>& loop_state() const { return loop_state_; }
  // The session state of that checkpoint (engine/checkpoint_record.h: its step count,
  // hyper-parameters and held gradients), checked against the options, handed over once.
  std::optional<SessionState> TakeResumedSession() { return std::move(resumed_); }
  // The peaks of the pinned pools (the session's and the store's) and of the store's host
  // memory.
  uint64_t pinned_peak_bytes() const;
  uint64_t host_peak_bytes() const;

 private:
  ExpertTable(Backend& backend, const SessionOptions& options, const MemoryPlan& memory);
  Status CreateStore(uint64_t pinned_bytes, uint32_t gradient_slots);
  Status CreateAll(const MemoryPlan& memory);
  // Exactly one of `host` (states in host memory) and `nvme` (states on NVMe) is given.
  Status InitExperts(HostUpdater* host, NvmeUpdater* nvme, uint32_t gradient_slots);
  void Initial(ExpertState state, ExpertId id, void* dst, uint64_t bytes) const;
  // Whether the experts continue from stored states (placement.resume or resume_from).
  bool resuming() const {
    return options_.placement.resume || !options_.placement.resume_from.empty();
  }

  Backend& backend_;
  const SessionOptions options_;
  const uint64_t params_;        // per expert
  const uint64_t expert_bytes_;  // compute weights of one expert
  ExpertIndex index_;
  // Declared before what uses them: the updater reads and writes the store, the stager reads
  // it; the entries' buffers and the updater's staging are carved from the pinned pool; the
  // updater reads the entries' gradients until its updates finish.
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<WeightStager> stager_;
  std::unique_ptr<PinnedHostPool> pinned_;
  std::vector<std::vector<Entry>> entries_;  // [layer][expert]
  std::unique_ptr<GradientPool> gradients_;  // the plan's gradient_slots accumulators
  std::unique_ptr<ExpertUpdater> updater_;
  HostUpdater* host_ = nullptr;  // updater_ when the states live in host memory
  std::vector<CheckpointBlob> loop_state_;
  std::optional<SessionState> resumed_;
};

}  // namespace ecss
