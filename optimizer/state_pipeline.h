// State streaming: when master weights and optimizer states live off-memory (NVMe, through
// offload/'s tier moves), updates run as a pipeline of three stages on their own threads,
//   load (tier -> staging slot)  ->  update (the TBB arena)  ->  store (slot -> tier)
// with `buffers` staging slots, so that one expert's I/O overlaps another's update,
// `loads_in_flight` loads at once and `stores_in_flight` stores at once (a thread and a slot
// each; the update stage still takes the experts in order, and stores may finish out of it).
// StateTier is the interface offload/ implements; InMemoryStateTier is the reference
// implementation the pipeline is tested against.
// Data safety: an expert whose load fails, whose loaded arrays do not match the checksums its
// tier recorded (SlotChecksums; read again, they still do not), or whose gradient is not
// finite, is neither updated nor stored (its tier copy stays as it was); a failed store leaves
// the tier's previous copy. Every failure is reported with the expert; the other experts
// proceed.
// Thread-safety: Run is called from one thread at a time and blocks until the pipeline drains.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "optimizer/optimizer_config.h"
#include "optimizer/update_kernels.h"

namespace ecss {

// The checksums a tier that TakesChecksums exchanges with the pipeline, per expert
// (StateSlot::checksums), so that neither reads an expert's arrays only to checksum them.
struct SlotChecksums {
  // Set by the tier's Load: the CRC-32C the slot's master (its `size` elements) and state
  // arrays (state0's `size` elements, then state1's when the kind has one, as one run of
  // bytes; 0 without) must have, as their storage recorded them. The update checks the slot
  // against them before anything uses it (one pass over the expert, which leaves it in cache
  // for the update when it fits); on a mismatch it loads the expert again through the tier
  // without checksums, so that the tier checks it and its error names where the damage is.
  uint32_t loaded_master = 0;
  uint32_t loaded_states = 0;
  // Set by the update for the tier's Store: the CRC-32C of each array it wrote, taken chunk by
  // chunk as it wrote them (compute_copy: always the slot's compute array, read again when
  // the update's copy went to the caller; 0 for a null array).
  ParamChecksums written;
};

// A staging slot: room for one expert's master and state arrays, and (with
// StreamingOptions::stage_compute_copy) the new bf16 compute copy, which the tier stores.
// master, the state arrays (together, state1 right after state0's max_expert_elements) and
// the compute copy each start on a 4 KiB boundary.
struct StateSlot {
  float* master = nullptr;
  float* state0 = nullptr;
  float* state1 = nullptr;      // null for one-state optimizers
  BFloat16* compute = nullptr;  // null unless stage_compute_copy
  size_t size = 0;              // elements of the expert currently in the slot
  // In Load and Store of a tier that TakesChecksums, the expert's (see SlotChecksums); null
  // otherwise.
  SlotChecksums* checksums = nullptr;
};

// The CRC-32C of a slot's state arrays as one run of bytes (state0's `size` elements, then
// state1's when it has one), from each array's in `checksums`: what
// SlotChecksums::loaded_states holds, and a tier storing the two as one block writes.
uint32_t StatesChecksum(const StateSlot& slot, const ParamChecksums& checksums);

class StateTier {
 public:
  virtual ~StateTier() = default;
  // NotFound for an unknown expert.
  virtual StatusOr<size_t> ExpertSize(uint32_t expert) const = 0;
  // Fills the slot (slot.size elements) and the expert's update count. Blocking; thread-safe
  // for distinct experts.
  virtual Status Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) = 0;
  virtual Status Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) = 0;
  // Whether Load and Store use StateSlot::checksums: Load then leaves checking what it read to
  // the update, and Store writes the checksums the update took.
  virtual bool TakesChecksums() const { return false; }
};

// States kept in host vectors: the reference tier.
class InMemoryStateTier final : public StateTier {
 public:
  explicit InMemoryStateTier(OptimizerKind kind) : kind_(kind) {}
  // Adds an expert with these master weights and zeroed states; returns its id.
  uint32_t AddExpert(std::vector<float> master);

  StatusOr<size_t> ExpertSize(uint32_t expert) const override;
  Status Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) override;
  Status Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) override;

  // Copies of an expert's arrays and count (for checks).
  std::vector<float> master(uint32_t expert) const;
  std::vector<float> state(uint32_t expert, int index) const;
  uint64_t update_count(uint32_t expert) const;
  uint64_t loads() const;
  uint64_t stores() const;

 private:
  struct Entry {
    std::vector<float> master, state0, state1;
    uint64_t updates = 0;
  };
  const OptimizerKind kind_;
  mutable std::mutex mutex_;
  std::vector<Entry> experts_;  // GUARDED_BY(mutex_)
  uint64_t loads_ = 0;          // GUARDED_BY(mutex_)
  uint64_t stores_ = 0;         // GUARDED_BY(mutex_)
};

struct StreamingOptions {
  OptimizerKind kind = OptimizerKind::kAdamW;
  HyperParams params;
  int threads = 1;                    // update arena threads (>= 1)
  size_t chunk_elements = 64 * 1024;  // per update task (>= 1024)
  int buffers = 2;                    // staging slots (>= 2)
  // Loads at once (1 .. buffers), on a thread each. Each load, update and store holds a slot
  // until its expert is stored, so every stage can be busy at once only with loads + stores +
  // 1 slots (a session's rule: engine/expert_updater.h, StagingSlots).
  int loads_in_flight = 1;
  // Stores at once (1 .. buffers), on a thread each: a store's writes and then, a round trip
  // later, its header leave the drive idle between them with one. Tiers take stores of
  // distinct experts at once.
  int stores_in_flight = 1;
  size_t max_expert_elements = 0;  // slot capacity (> 0)
  // Each slot also holds the new bf16 compute copy (StateSlot::compute) of an update whose
  // gradient gives no compute_copy: for tiers that store the compute weights themselves.
  bool stage_compute_copy = false;
  std::optional<SimdIsa> isa;  // default: the best the CPU runs
};

// One expert's gradient for the pipeline. compute_copy (optional) receives the new bf16 copy
// (else the slot's compute array does, when the slots stage one).
struct StreamedGradient {
  uint32_t expert = 0;
  const void* grad = nullptr;
  DType dtype = DType::kF32;
  BFloat16* compute_copy = nullptr;
};

// Optional hooks of a Run, called from its stages' threads.
struct StreamingHooks {
  // The load stage, having reached the end of the work so far: appends gradients to stream
  // next, in the same run (same scale, clip coefficient and hyper-parameters), and returns
  // whether it did. So a caller whose work arrives in batches keeps one pipeline busy instead
  // of draining it between batches. Each appended gradient is checked as Run's are; a bad one
  // fails alone (reported in Run's result). Called from any of the load threads, never two
  // at once, with a slot held for the next gradient.
  std::function<bool(std::vector<StreamedGradient>* more)> more;
  // The store stage, after each expert's store (or its skip or failure): the expert's update
  // is over. Called from the store threads: with stores_in_flight above 1, two at once and
  // not necessarily in the work's order, so it must be thread-safe (one that blocks holds up
  // only its own thread).
  std::function<void(uint32_t expert)> done;
};

struct StreamingReport {
  size_t updated = 0;
  size_t skipped_nonfinite = 0;
  double load_seconds = 0;  // busy time of each stage (the load and store stages' threads summed)
  double update_seconds = 0;
  double store_seconds = 0;
  double wall_seconds = 0;
};

class StateStreamingUpdater {
 public:
  // The staging Create needs (can implement -> workspace size -> run): per buffer, the master
  // and the state arrays of max_expert_elements floats each, plus the bf16 compute copy with
  // stage_compute_copy, as laid out in StateSlot. InvalidArgument for bad options.
  static StatusOr<uint64_t> WorkspaceBytes(const StreamingOptions& options);
  // Carves the slots from `workspace` (WorkspaceBytes(options) bytes, 4 KiB aligned: with the
  // caller's pinned memory every array is O_DIRECT-ready). InvalidArgument for bad options or
  // a null, misaligned or short workspace. REQUIRES: tier and workspace outlive the updater.
  static StatusOr<std::unique_ptr<StateStreamingUpdater>> Create(const StreamingOptions& options,
                                                                 StateTier* tier, void* workspace,
                                                                 uint64_t workspace_bytes);
  ~StateStreamingUpdater();

  // Streams every gradient's expert through load -> update -> store, in order, with `params`
  // (default: the options'; a schedule passes each step's). Returns the report, or the error
  // of the earliest failed expert in the work's order (after the pipeline drained; other
  // experts were processed). An expert is in a run
  // once: InvalidArgument for a repeat in `work` (nothing runs), and one that hooks.more
  // appends fails alone.
  StatusOr<StreamingReport> Run(const std::vector<StreamedGradient>& work, float grad_scale,
                                float clip_coefficient, const HyperParams* params = nullptr,
                                const StreamingHooks& hooks = {});

 private:
  struct Impl;
  explicit StateStreamingUpdater(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
