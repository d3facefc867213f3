// Session: the training-loop API of ECSS (DESIGN.md section 3). A loop creates one session
// for its sparse layers, then per step: BeginStep(micro-batches) routes every micro-batch (RRE:
// the step's expert accesses are known now), Forward and Backward per micro-batch and sparse
// layer move activations through the experts on the device, EndStep submits the last
// gradients and returns the step's statistics. The loop owns its dense layers and its
// activations (device memory of the session's backend); the session owns the experts: their
// fp32 master weights and optimizer moments in host memory or on NVMe, their compute weights in
// pinned host memory, a device cache of them within the device budget, and their CPU updates.
//
// Inside a step, for every sparse layer call: the experts the plan activates are leased from
// the device cache (fetched ahead of use, Belady eviction on the step's known sequence), the
// tokens are permuted, one grouped FFN runs, the outputs are combined; backward copies each
// expert's weight gradient to pinned memory, accumulated over micro-batches in order, and the
// expert's CPU update starts as soon as its gradient is complete. The next step's fetch of an
// expert waits only for that expert's update (its version fence).
//
// Strategies (one engine, a setting): ecss (routed experts only, fetches ahead, updates
// overlapped with the next step), no-overlap (the same traffic, every stage waits for the
// previous), naive (every expert's weights to the device, every gradient back, every expert
// updated, every step: plain heterogeneous training, every stage waiting for the previous),
// zero-offload (what DeepSpeed ZeRO-Offload does with an MoE model, which it does not know to
// be one: naive's traffic and updates, with the weights fetched ahead of use and each layer's
// update started as its gradients arrive, overlapping the rest of the backward; the step
// ends when its updates have).
//
// Determinism: kernels, gradient accumulation and updates are deterministic, so every
// strategy, budget and thread count gives bit-identical weights (touched experts only for
// ecss and no-overlap; every expert for naive and zero-offload, which match each other).
// Thread-compatible: one thread drives a session. Calls enqueue on the session's streams and
// return; Forward's output and Backward's input gradient are ready when compute_stream() has
// passed them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/memory_plan.h"
#include "engine/session_options.h"
#include "engine/step_plan.h"
#include "engine/step_stats.h"
#include "offload/checkpoint.h"
#include "offload/expert_store.h"
#include "router/routing_plan.h"
#include "runtime/base/tensor.h"
#include "runtime/device/handles.h"

namespace ecss {

class Backend;

// The micro-batch of a step and the sparse layer a call is for: distinct types, so that the
// two cannot be swapped by accident: Forward(MicroBatchIndex{0}, LayerIndex{l}, x, y).
struct MicroBatchIndex {
  constexpr explicit MicroBatchIndex(uint32_t v) : value(v) {}
  uint32_t value;
};
struct LayerIndex {
  constexpr explicit LayerIndex(uint32_t v) : value(v) {}
  uint32_t value;
};

class Session {
 public:
  // InvalidArgument naming a bad spec or option; ResourceExhausted naming the bytes needed
  // when the device budget cannot hold one layer's experts for a step, or a host budget is too
  // small. `backend` must outlive the session.
  static StatusOr<std::unique_ptr<Session>> Create(Backend& backend, const SessionOptions& options);
  // The memory plan by which Create would allocate on `backend` (its allocation rules and
  // kernels' scratch), without allocating: to size budgets.device_bytes before creating, e.g. with
  // MemoryPlan::DeviceBudgetFor. The budget is not checked against the backend's memory.
  // Create's errors otherwise.
  static StatusOr<MemoryPlan> PlanMemoryOn(Backend& backend, const SessionOptions& options);
  ~Session();  // waits for a save StartCheckpoint began, then for the updates in flight

  // Update failures: an expert update that fails in the background (an I/O error, a damaged
  // state block, a non-finite gradient without skip_step_on_nonfinite) leaves that expert's
  // states as they were and is returned once, naming the step and the expert, by the first
  // BeginStep, EndStep or Synchronize after it was detected. The session stays usable: a
  // BeginStep that returned it began no step (call it again); an EndStep that returned it
  // ended the step.
  //
  // Routes the micro-batches (InvalidArgument naming a token id out of the vocabulary,
  // NotFound naming an unknown domain; ResourceExhausted when a layer activates more experts
  // than the device cache holds) and starts fetching. FailedPrecondition inside a step.
  // The micro-batches' arrays are copied. With a learned gate only the token counts are used
  // (domain_ids may be null); routing comes with each Forward.
  Status BeginStep(const std::vector<MicroBatch>& micro_batches, float loss_scale = 1.0f);
  // x, y: device [tokens, d_model] of the model's dtype (tokens of that micro-batch). Each
  // (micro-batch, layer) once per step. RRE routing only.
  Status Forward(MicroBatchIndex micro_batch, LayerIndex layer, const void* x, void* y);
  // The same with typed views, checked before anything is read: each must be of the model's
  // dtype, shaped [tokens of the micro-batch, d_model] and on this session's device
  // (InvalidArgument naming the tensor, what was given and what is expected); the ranges are
  // then checked against device memory as above. RRE routing only.
  Status Forward(MicroBatchIndex micro_batch, LayerIndex layer, const TensorView& x,
                 const TensorView& y);
  // Routing::kLearnedGate: the gate's choices route this layer (InvalidArgument naming a bad
  // expert, a repeated choice, a non-finite weight or k != gate_k; ResourceExhausted when
  // they activate more experts than the session was sized for). Its experts are fetched now.
  // choice_outputs (optional, device [tokens * k, d_model]): each choice's unweighted expert
  // output, slot = token * k + choice, from which the loop computes its gate's gradient
  // (dLoss/dweight[t][j] = dot(dy[t], choice_outputs[t * k + j])).
  Status Forward(MicroBatchIndex micro_batch, LayerIndex layer, const void* x, void* y,
                 const GateChoices& gate, void* choice_outputs = nullptr);
  // An evaluation step (validation loss, checking a model against another): Forward only,
  // with the weights the next training step computes with (with delayed_update the update in
  // flight finishes and is published first), and no backward, gradient or update; EndStep
  // requires every Forward. Errors as BeginStep's.
  Status BeginEvaluation(const std::vector<MicroBatch>& micro_batches);
  // dy, dx: device [tokens, d_model]. Requires that (micro-batch, layer)'s Forward; not in an
  // evaluation step (FailedPrecondition).
  Status Backward(MicroBatchIndex micro_batch, LayerIndex layer, const void* dy, void* dx);
  // The same with typed views, checked as Forward's are.
  Status Backward(MicroBatchIndex micro_batch, LayerIndex layer, const TensorView& dy,
                  const TensorView& dx);
  // Requires every Backward of the step; FailedPrecondition otherwise (the step stays open).
  // Any other failure (an update's, see above) is returned after the step has ended.
  StatusOr<StepStats> EndStep();
  // Waits for every update in flight; returns the first optimizer error. With delayed_update
  // and outside a step it first starts the held update and publishes its result.
  Status Synchronize();
  // The optimizer's hyper-parameters (learning rate and the rest) for the updates of the
  // steps that begin after this call, so that a schedule works: updates already started keep
  // theirs (with delayed_update, the update a BeginStep starts is of the step before's
  // gradients, with the hyper-parameters in force at that BeginStep). InvalidArgument naming
  // the field; FailedPrecondition inside a step.
  Status SetHyperParams(const HyperParams& params);

  // The stream the session computes on: the loop orders its own device work against it.
  Stream compute_stream() const;
  // Saves every expert's master weights and moments and the optimizer kind they belong to
  // (a resume with another is refused), the session's step count and hyper-parameters in
  // force, with the delayed update the last step's held gradients (and their loss scale), and
  // `loop_state` (what the training loop owns: its dense weights and optimizer, RNG, data
  // position, as named blobs; not named "ecss.*"), as checkpoint ROOT/NAME
  // (offload/checkpoint.h: crash-consistent, durable when it returns, incremental over the
  // newest checkpoint of this session's store; engine/checkpoint_record.h for the session's
  // records). Between steps; it waits for the updates in flight first (unlike Synchronize it
  // leaves the held gradients held, so the run goes on exactly as if no save had been taken).
  // A session with placement.resume_from = ROOT/NAME trains on from it bit for bit. Any
  // placement: master and moments on NVMe are read from their files; in host memory, their
  // versions are the optimizer's update counts of their updates in place. FailedPrecondition
  // inside a step or while a save StartCheckpoint began is not taken; an update failure; the
  // checkpoint's errors otherwise. Its reads count in the next step's statistics.
  // StartCheckpoint then WaitForCheckpoint.
  StatusOr<CheckpointStats> SaveCheckpoint(const std::string& root, const std::string& name,
                                           const std::vector<CheckpointBlob>& loop_state = {});
  // SaveCheckpoint in two parts, so that the save overlaps the next step. StartCheckpoint
  // returns once every expert's version is fixed (it waits for the updates in flight, as
  // SaveCheckpoint does, and reads only the NVMe states' headers); the experts are then copied
  // on a thread of the save's own while the loop trains on. The checkpoint is durable when
  // WaitForCheckpoint returns its figures, and at the latest before the second training step
  // after it begins (evaluation steps do not count): that BeginStep waits for the save (so do
  // Synchronize and the session's end), so a save started after step t is durable before step
  // t+2. It holds the experts exactly as they were at StartCheckpoint: an expert whose states
  // live in host memory is copied just before an update changes them (within the save's
  // buffer; beyond it the update waits until the save has written that expert); an NVMe
  // state keeps that version in its other shadow slot.
  // FailedPrecondition inside a step, or while the result of an earlier save has not been
  // taken by WaitForCheckpoint; SaveCheckpoint's errors otherwise.
  Status StartCheckpoint(const std::string& root, const std::string& name,
                         const std::vector<CheckpointBlob>& loop_state = {});
  // Waits for the save StartCheckpoint started and returns its figures, or why it failed
  // (nothing of it is then a checkpoint; earlier ones are intact). FailedPrecondition when no
  // save was started.
  StatusOr<CheckpointStats> WaitForCheckpoint();
  // The loop state of the checkpoint the session resumed from (empty otherwise).
  const std::vector<CheckpointBlob>& loop_state() const;
  // After Synchronize: the expert's fp32 master weights, [W_in (d_model x d_in) | W_out
  // (d_ff x d_model)] row-major.
  StatusOr<std::vector<float>> MasterWeights(LayerIndex layer, uint32_t expert);
  // The plan step `step` (StepStats::step) ran, as it ran: every op with its resource, bytes
  // or FLOPs and edges, and (with SessionOptions::record_op_times) start_s / end_s (seconds
  // since its BeginStep) of the ops it saw run, the updates carried in from the steps before
  // too; updates still running have none yet (Synchronize first for all); seconds() ends
  // where its EndStep finished waiting (no-overlap, naive, zero-offload: for its updates). The last
  // few steps are kept (NotFound for older ones). The plan's fetches are the cache's for calls in
  // the step's order (per micro-batch: Forward 0..L-1, then Backward L-1..0) unless ecss fills the
  // cache: its leases taken ahead pin slots, so the cache may evict (and fetch again) what the plan
  // kept; other orders work too, and fetch again what they evicted, but with RRE (whose plan is
  // built at BeginStep; a learned gate's follows the calls) the device runs their compute in the
  // calls' order: a later micro-batch's forward called before an earlier one's backwards ends
  // before the backward its edge names, and its start_s, taken from its edges, is clipped to its
  // end_s.
  StatusOr<StepPlan> ExecutedPlan(uint64_t step) const;
  // Every byte the session allocates, by tier and purpose (engine/memory_plan.h).
  const MemoryPlan& memory_plan() const;
  // The peaks its own pinned pools (with weights on NVMe, the weight store's too) and its host
  // states' allocator reached; the device's is the backend allocator's.
  struct HostMemoryPeaks {
    uint64_t pinned_bytes = 0;
    uint64_t host_bytes = 0;
  };
  HostMemoryPeaks host_memory_peaks() const;
  // The bytes the expert store's files read and wrote since the session began (all 0 without
  // NVMe states): with Synchronize around a span of steps, exactly that span's I/O, where
  // StepStats' per-step counts split an update running on into the next step by time.
  ExpertStore::IoBytes nvme_io() const;
  uint32_t experts_in_layer(uint32_t layer) const;
  uint32_t cache_slots() const;
  uint64_t expert_params() const;  // parameters per expert

 private:
  struct Impl;
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
