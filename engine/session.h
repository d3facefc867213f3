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
// updated, every step: plain heterogeneous training).
//
// Determinism: kernels, gradient accumulation and updates are deterministic, so every
// strategy, budget and thread count gives bit-identical weights (touched experts only for
// ecss and no-overlap; every expert for naive).
// Thread-compatible: one thread drives a session. Calls enqueue on the session's streams and
// return; Forward's output and Backward's input gradient are ready when compute_stream() has
// passed them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/step_plan.h"
#include "kernels/expert_ops.h"
#include "offload/io/io_engine.h"
#include "offload/prefetcher.h"
#include "optimizer/cpu_optimizer.h"
#include "router/routing_plan.h"
#include "runtime/device/backend.h"

namespace ecss {

struct DomainSpec {
  std::string name;
  uint32_t experts = 0;  // experts of the domain's group in every sparse layer
};

struct ModelSpec {
  uint32_t layers = 0;  // sparse layers
  uint32_t d_model = 0;
  uint32_t d_ff = 0;
  Activation activation = Activation::kGelu;
  DType dtype = DType::kBF16;       // compute weights and activations: bf16 or f32
  std::vector<DomainSpec> domains;  // domain id = index
  uint32_t vocab = 0;
  uint64_t seed = 1;  // expert initialisation and RRE tables
  TableBuilder builder = TableBuilder::kRreUniform;
  float init_scale = 0;  // weights ~ U(-s, s); 0: 1/sqrt(fan-in)
};

enum class Strategy : uint8_t { kEcss, kNoOverlap, kNaive };

// Where the experts' fp32 master weights and optimizer moments live.
enum class StatesPlacement : uint8_t {
  kHost,  // host memory, updated in place by the CPU optimizer
  kNvme,  // NVMe files (striped over nvme_dirs), streamed through pinned staging per update
};
// How a sparse layer's tokens choose their experts.
enum class Routing : uint8_t {
  // Random Routed Experts: fixed token id -> expert tables per domain. The step's expert
  // accesses are known at BeginStep: fetched ahead, evicted by exact next use (Belady).
  kRre,
  // A learned gate the loop runs on the layer's input (router/gates.h, or its own), handing
  // its top-k choices to Forward. Reactive: a layer's experts are known, and fetched, only
  // once its gate has run; nothing is fetched ahead; eviction is LRU (the baseline RRE is
  // measured against).
  kLearnedGate,
};
// Where the experts' compute weights (what the device fetches) live.
enum class WeightsPlacement : uint8_t {
  kPinned,  // pinned host memory, updated in place by the optimizer
  // NVMe, in an ExpertStore (offload/expert_store.h) in nvme_dirs: fetches read them into
  // pinned staging blocks first (offload/weight_stager.h), ahead of use within the pinned
  // budget; each update writes the new bf16 copy there. Needs states on NVMe.
  kNvme,
};
std::string_view StrategyName(Strategy strategy);  // "ecss", "no-overlap", "naive"
StatusOr<Strategy> ParseStrategy(std::string_view name);

struct SessionOptions {
  ModelSpec model;
  Strategy strategy = Strategy::kEcss;
  Routing routing = Routing::kRre;
  uint32_t gate_k = 2;  // kLearnedGate: experts per token (sizes the row buffers)
  // Device bytes the session may use (activations it keeps, workspaces, the expert cache);
  // at most the backend's device memory.
  uint64_t device_budget_bytes = 0;
  // Pinned host bytes: every expert's compute weights and gradient buffers. 0 = exactly what
  // the model needs.
  uint64_t pinned_budget_bytes = 0;
  // Pageable host bytes for the states in host memory (StatesPlacement::kHost): the fp32
  // master weights (bf16 models; f32 ones keep them in the pinned weights) and the optimizer's
  // moments, from a HostAllocator (jemalloc arena) with this budget. 0 = exactly what the
  // model needs; less is refused at creation with the bytes needed.
  uint64_t host_budget_bytes = 0;
  uint32_t max_tokens_per_micro_batch = 0;  // sizes the activation buffers
  uint32_t max_micro_batches = 1;
  // The most experts one layer of a micro-batch may activate: sizes the device gradient
  // region (this many experts' fp32 gradients) and the least device cache Create accepts
  // (a budget whose cache holds fewer slots is refused, naming the bytes needed). 0 = every
  // expert of the widest layer, capped by the rows of a micro-batch (naive always needs every
  // expert); a step that activates more is refused by BeginStep.
  uint32_t max_active_experts_per_layer = 0;
  // Experts fetched ahead of use (ecss): 0 = as many as the device cache has free slots.
  uint32_t prefetch_window_experts = 0;
  StatesPlacement states = StatesPlacement::kHost;
  WeightsPlacement weights = WeightsPlacement::kPinned;
  // Weights on NVMe: pinned blocks the weights are read into ahead of their copy to the
  // device (the NVMe -> pinned window); 0 = the device cache's slots. Counted in the pinned
  // budget.
  uint32_t weight_staging_blocks = 0;
  // kNvme: one or more directories for the state files (created, space reserved up front).
  // Needs dtype bf16 (the pinned weights are the bf16 copy). With clipping the step's
  // updates start at EndStep (after the global norm) instead of per layer.
  std::vector<std::string> nvme_dirs;
  // kNvme: open the state files an earlier session of the same model left in nvme_dirs
  // (after its Synchronize) instead of creating them: the experts continue from the master
  // weights, moments and update counts stored there. Files of another model are refused.
  // With weights on NVMe their store is opened too (a new session refuses a directory that
  // holds one: resume it or remove it).
  bool resume_states = false;
  CpuOptimizerOptions optimizer;  // threads, kind, hyper-parameters, clipping
  // ZeRO-Offload's one-step delayed parameter update (DPU), opt-in. It CHANGES THE MATH: step
  // t computes with the weights after the updates of step t-2, not t-1. The update of step
  // t's gradients starts at BeginStep(t+1) and overlaps all of step t+1 without any fetch
  // waiting for it; its result is published at BeginStep(t+2). The device copies from a
  // second pinned copy of every expert's compute weights (one more compute-dtype array per
  // expert), so an update never tears what a fetch reads. Synchronize outside a step applies
  // the held update (its weights are published at once). StepStats.optimizer and
  // updated_* then describe the update started in that step (of the previous step's
  // gradients).
  bool delayed_update = false;
  int kernel_threads = 0;  // the sim's real-mode kernels; 0 = all cores
  // Makes the IoEngines that every NVMe file of the session (states, weights) goes through;
  // empty = io_uring where the kernel allows it, else pread/pwrite. Tests wrap it in a
  // FaultInjectionIoEngine (offload/io/io_engines.h).
  std::function<StatusOr<std::unique_ptr<IoEngine>>()> io_engines;
  // Optional, not owned, must outlive the session: the optimizer threads' and the NVMe state
  // streaming's lanes (give the sim backend the same recorder for the device lanes).
  TraceRecorder* trace = nullptr;
};

// Time the driving thread waited, by cause.
struct StallStats {
  double update_fence_seconds = 0;   // a fetch waited for the expert's previous update
  double gradient_copy_seconds = 0;  // waiting for gradients to reach host memory
  double stage_sync_seconds = 0;     // no-overlap / naive: a stage waiting for the previous
  double optimizer_seconds = 0;      // no-overlap / naive: EndStep waiting for the updates
  // ecss: BeginStep waiting for the step before last's updates (one step of overlap at most,
  // so that a slower optimizer shows in the step time instead of a growing backlog)
  double update_backlog_seconds = 0;
  double total() const {
    return update_fence_seconds + gradient_copy_seconds + stage_sync_seconds + optimizer_seconds +
           update_backlog_seconds;
  }
};

struct StepStats {
  uint64_t step = 0;
  uint64_t tokens = 0;
  double seconds = 0;  // since the previous EndStep returned (the first: since BeginStep)
  double tokens_per_s = 0;
  uint64_t h2d_bytes = 0;  // every host-to-device byte of the backend in this step
  uint64_t d2h_bytes = 0;
  uint64_t expert_fetch_bytes = 0;  // of which expert weights
  uint64_t gradient_bytes = 0;      // of which expert gradients
  uint64_t nvme_bytes = 0;          // master and moments read + written (states on NVMe)
  uint64_t cache_hits = 0, cache_misses = 0;
  double hit_rate = 0;
  StallStats stalls;
  std::vector<StallRecord> stall_records;  // every fetch that waited: who, on what, how long
  double stall_fraction = 0;               // stalls.total() / seconds
  // Busy seconds of each resource in this step; overlap efficiency = the busiest / seconds.
  double compute_busy_seconds = 0, h2d_busy_seconds = 0, d2h_busy_seconds = 0;
  double optimizer_busy_seconds = 0;
  double overlap_efficiency = 0;
  uint32_t updated_experts = 0;
  uint64_t updated_params = 0;
  StepReport optimizer;  // norm, clipping, skipped
};

// A learned gate's choices for one micro-batch's layer: host arrays [tokens, k], k distinct
// experts of the layer per token (ascending or not) and their combine weights.
struct GateChoices {
  const uint32_t* experts = nullptr;
  const float* weights = nullptr;
  uint32_t k = 0;
};

class Session {
 public:
  // InvalidArgument naming a bad spec or option; ResourceExhausted naming the bytes needed
  // when the device budget cannot hold one layer's experts for a step, or a host budget is too
  // small. `backend` must outlive the session.
  static StatusOr<std::unique_ptr<Session>> Create(Backend& backend, const SessionOptions& options);
  ~Session();  // waits for the updates in flight

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
  Status Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y);
  // Routing::kLearnedGate: the gate's choices route this layer (InvalidArgument naming a bad
  // expert, a repeated choice, a non-finite weight or k != gate_k; ResourceExhausted when
  // they activate more experts than the session was sized for). Its experts are fetched now.
  // choice_outputs (optional, device [tokens * k, d_model]): each choice's unweighted expert
  // output, slot = token * k + choice, from which the loop computes its gate's gradient
  // (dLoss/dweight[t][j] = dot(dy[t], choice_outputs[t * k + j])).
  Status Forward(uint32_t micro_batch, uint32_t layer, const void* x, void* y,
                 const GateChoices& gate, void* choice_outputs = nullptr);
  // dy, dx: device [tokens, d_model]. Requires that (micro-batch, layer)'s Forward.
  Status Backward(uint32_t micro_batch, uint32_t layer, const void* dy, void* dx);
  // Requires every Backward of the step; FailedPrecondition otherwise (the step stays open).
  // Any other failure (an update's, see above) is returned after the step has ended.
  StatusOr<StepStats> EndStep();
  // Waits for every update in flight; returns the first optimizer error. With delayed_update
  // and outside a step it first starts the held update and publishes its result.
  Status Synchronize();

  // The stream the session computes on: the loop orders its own device work against it.
  Stream compute_stream() const;
  // After Synchronize: the expert's fp32 master weights, [W_in (d_model x d_in) | W_out
  // (d_ff x d_model)] row-major.
  StatusOr<std::vector<float>> MasterWeights(uint32_t layer, uint32_t expert);
  // The plan step `step` (StepStats::step) ran, as it ran: every op with its resource, bytes
  // or FLOPs and edges, and start_s / end_s (seconds since its BeginStep) for the ops the
  // session saw run; updates still running have none yet (Synchronize first for all). The
  // last few steps are kept (NotFound for older ones). The plan's fetches are the cache's for
  // calls in the step's order (per micro-batch: Forward 0..L-1, then Backward L-1..0); other
  // orders work, and fetch again what their order evicted, which the plan does not list.
  StatusOr<StepPlan> ExecutedPlan(uint64_t step) const;
  uint32_t experts_in_layer(uint32_t layer) const;
  uint32_t cache_slots() const;
  uint64_t expert_params() const;  // parameters per expert

 private:
  struct Impl;
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
