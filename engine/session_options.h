// SessionOptions: what a session is created from (engine/session.h): the model, the strategy
// and routing, the step limits, the budgets, where each state lives (Placement) and the
// optimizer. Every field documents its default and unit. A plain value.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/step_plan.h"  // Strategy
#include "kernels/expert_ops.h"
#include "optimizer/cpu_optimizer.h"
#include "router/rre_router.h"
#include "runtime/base/dtype.h"
#include "runtime/base/status.h"
#include "runtime/base/tier.h"
#include "runtime/device/device_profile.h"

namespace ecss {

class IoEngine;
class TraceRecorder;

struct DomainSpec {
  DomainSpec() = default;
  DomainSpec(std::string domain_name, uint32_t group_experts)  // {"code", 8}
      : name(std::move(domain_name)), experts(group_experts) {}

  std::string name;
  uint32_t experts = 0;  // experts of the domain's group in every sparse layer
  // The domain's id: what a micro-batch's domain_ids name it by, and its routing tables' key
  // (router/rre_router.h); ids ascend in the domains' order. Unset: its index in
  // ModelSpec::domains. A sub-model ecss-extract
  // cut out keeps the ids of the model it came from, so its tokens route as they did there.
  std::optional<uint32_t> id;
  // The key of the group's experts' initial values: the index its first expert had in the
  // model it came from (a sub-model's experts never updated are what they were there).
  // Unset: the group's own first expert index.
  std::optional<uint32_t> source_first_expert;
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
  // The layers whose initial values the model's layers repeat: layer l's experts start as
  // layer l % initial_layers's would (a deep model grown from a shallow one, M6's
  // Pseudo-to-Real: ecss-extract --repeat-layers). 0: every layer its own.
  uint32_t initial_layers = 0;

  // W_in's columns: d_ff, or 2 d_ff for SwiGLU (its gate and up projections side by side).
  uint32_t d_in() const { return activation == Activation::kSwiGlu ? 2 * d_ff : d_ff; }
  // Parameters of one expert: W_in [d_model, d_in] and W_out [d_ff, d_model].
  uint64_t expert_params() const { return uint64_t{d_model} * d_in() + uint64_t{d_ff} * d_model; }
  // Experts of every sparse layer: the domains' groups together.
  uint32_t experts_per_layer() const;
  // Domain `index`'s id (DomainSpec::id, or the index).
  uint32_t DomainId(size_t index) const {
    return domains[index].id.value_or(static_cast<uint32_t>(index));
  }
  // The key of expert `expert`'s (of a sparse layer) initial values: its index, or where its
  // group has a source_first_expert, the index it had there. REQUIRES: expert < the layer's.
  uint32_t InitialKey(uint32_t expert) const;
  // The layer whose initial values layer `layer` starts with (initial_layers).
  uint32_t InitialLayer(uint32_t layer) const {
    return initial_layers == 0 ? layer : layer % initial_layers;
  }
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
// Where each state of every expert lives (Tier, runtime/base/tier.h), and what NVMe needs.
// The combinations a session accepts (Validate refuses the rest, naming the field), and what
// DeepSpeed calls the closest configuration (ZeRO stage 3, zero_optimization.offload_optimizer
// .device / offload_param.device). The device holds only the expert cache in every one.
//   weights  master  moments  gradients  DeepSpeed
//   pinned   host    host     pinned     offload_optimizer cpu, offload_param cpu (ZeRO-Offload's
//                                        CPU update; with a device budget that holds every
//                                        expert, ZeRO-Offload itself)
//   pinned   nvme    nvme     pinned     offload_optimizer nvme, offload_param cpu
//   nvme     nvme    nvme     pinned     offload_optimizer nvme, offload_param nvme
//                                        (ZeRO-Infinity); not with delayed_update
// Refused: weights on the device (the device holds the cache, not the model) or in pageable
// memory (fetches copy from pinned memory); master and moments apart (the optimizer streams
// them together); master or moments on the device or pinned; weights on NVMe with the states
// in memory (the update that writes NVMe weights streams the states); gradients anywhere but
// pinned memory (the device copies them there as backward runs). NVMe states need bf16
// compute weights; with f32 the compute weights are the master weights, in pinned memory.
// Every expert's compute weights, master weights and moments live in one expert store
// (offload/expert_store.h) on those tiers; the gradients are the session's.
struct Placement {
  Tier weights = Tier::kPinned;    // the compute weights the device fetches: pinned or nvme
  Tier master = Tier::kHost;       // fp32 master weights (bf16 models): host or nvme
  Tier moments = Tier::kHost;      // the optimizer's moments: with the master
  Tier gradients = Tier::kPinned;  // fp32 gradient accumulators: pinned
  // NVMe: one or more directories (striped) for the expert store that holds what lives on
  // NVMe. It is created in constant time and space: an expert's states take disk space at
  // their first update, and read as the expert's initial values until then; a full disk fails
  // the update that needs the space (the session logs a warning at creation when the
  // directories' free space is below the model's full size). A directory that already holds
  // a store is refused (AlreadyExists): resume it or remove it. With clipping the step's
  // updates start at EndStep (after the global norm) instead of per layer.
  std::vector<std::string> nvme_dirs;
  // The largest state file in nvme_dirs: each state's files are split at it (0: 1 TiB, well
  // under ext4's 16 TiB per file). A resumed store keeps the split it was made with.
  uint64_t max_file_bytes = 0;
  // A new store writes every expert's initial NVMe states at creation, into both shadow
  // slots, instead of at their first update: creation then takes time (two writes of the
  // model's states) and the store's whole disk space (a full disk is found at creation), and
  // the first steps read states from the disk and overwrite them as every later one does
  // (what a benchmark of steady-state training wants). The experts are then written
  // (at version 0), so the session's first checkpoint stores each of them once.
  bool write_initial_states = false;
  // Open the store an earlier session of the same model left in nvme_dirs (after its
  // Synchronize) instead of creating one: the experts continue from the master weights,
  // moments and update counts stored there. A store of another model or format version is
  // refused naming the difference, and so are the state files of builds before the store
  // (ecss-states-*.bin), which are not migrated.
  bool resume = false;
  // A new store (not `resume`) replaces the one an earlier session left in nvme_dirs instead
  // of refusing it (AlreadyExists): that store's manifest and the state files this session's
  // store would use are removed once every check passed (resume_from's records, the
  // budgets), under the directories' lock (FailedPrecondition naming the holder's pid while
  // another session or store has them open). That run's states are lost, also when a block of
  // resume_from's checkpoint is then found damaged.
  bool overwrite = false;
  // Start from a checkpoint Session::SaveCheckpoint wrote (its directory, ROOT/NAME): a new
  // store is made (in nvme_dirs, which must hold none, when states live on NVMe; else in
  // memory) and the checkpoint's master weights and moments restored into it; the compute
  // weights and update counts follow from them, and training continues as with `resume`, bit
  // for bit as if never stopped, in any placement (the checkpoint's and this session's may
  // differ). Not with `resume` or `write_initial_states`. The checkpoint's loop state is
  // Session::loop_state(). A Create that fails removes the store it made, so a retry starts
  // over. The checkpoint records the model, its initial values and the optimizer kind, which
  // must match (FailedPrecondition naming what differs); the session continues its step count
  // (StepStats::step) and the hyper-parameters in force at the save, which replace
  // optimizer.groups[0] (SetHyperParams after Create changes them). A checkpoint with the
  // delayed update's held gradients needs delayed_update and the same gradient_dtype; their
  // update runs at the first BeginStep, as it would have. A learned gate's routing is the
  // loop's (its loop state).
  std::string resume_from;
  // Weights on NVMe: pinned blocks the weights are read into ahead of their copy to the device
  // (the NVMe -> pinned window, in the pinned budget); 0 = max_active_experts_per_layer.
  uint32_t weight_staging_blocks = 0;
  // Makes the IoEngines that every NVMe file of the session goes through; empty = io_uring
  // where the kernel allows it, else pread/pwrite. Tests wrap it in a FaultInjectionIoEngine
  // (offload/io/io_engines.h).
  std::function<StatusOr<std::unique_ptr<IoEngine>>()> io_engines;

  bool states_on_nvme() const { return master == Tier::kNvme; }
  bool weights_on_nvme() const { return weights == Tier::kNvme; }
};

// How large a step may be: sizes the activation buffers, the routing plans and the gradient
// region.
struct StepLimits {
  uint32_t max_tokens_per_micro_batch = 0;  // required
  uint32_t max_micro_batches = 1;
  // The most experts one layer of a micro-batch may activate: sizes the device gradient
  // region (this many experts' fp32 gradients) and the least device cache Create accepts
  // (a budget whose cache holds fewer slots is refused, naming the bytes needed). 0 = every
  // expert of the widest layer, capped by the rows of a micro-batch (naive always needs every
  // expert); a step that activates more is refused by BeginStep.
  uint32_t max_active_experts_per_layer = 0;
};

// The memory a session may take, per tier, in bytes. Less than its memory plan needs is
// refused at creation, naming the bytes needed (engine/memory_plan.h).
struct Budgets {
  // Required: what a step keeps and works in (activations, workspace, gradient region,
  // routing plans) and the expert cache in the rest; at most the backend's device memory.
  uint64_t device_bytes = 0;
  // Every expert's pinned compute weights (unless on NVMe), the gradient accumulators of a
  // step's experts (MemoryPlan::gradient_slots), and the staging the placement needs.
  // 0 = exactly what the model needs.
  uint64_t pinned_bytes = 0;
  // Pageable host memory for states on Tier::kHost: the fp32 master weights (bf16 models) and
  // the moments. 0 = exactly what the model needs.
  uint64_t host_bytes = 0;
  // Pinned memory is faulted in at creation and page-locked (mlock) where the system allows:
  // as root always, otherwise up to RLIMIT_MEMLOCK, beyond which it stays pageable and a
  // warning says so. Locked pages are never swapped out, so a copy from them never waits for
  // the disk (cudaHostAlloc's memory behaves so). false: faulted in but pageable, what an
  // unprivileged process with a small memlock limit gets; under memory pressure the kernel
  // may then page it out, and the copy that next touches it pays the fault.
  bool lock_pinned = true;
};

// "ecss", "no-overlap", "naive", "zero-offload"
std::string_view StrategyName(Strategy strategy);
StatusOr<Strategy> ParseStrategy(std::string_view name);

// What a session is created from: the model, how steps run, how large they may be, the
// budgets, where each state lives and the optimizer. Defaults as documented per field.
struct SessionOptions {
  ModelSpec model;
  Strategy strategy = Strategy::kEcss;
  Routing routing = Routing::kRre;
  uint32_t gate_k = 2;  // kLearnedGate: experts per token (sizes the row buffers)
  StepLimits limits;
  Budgets budgets;
  Placement placement;
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
  // The dtype expert gradients leave the device in and the optimizer reads: kF32, or kBF16
  // (DeepSpeed's 16-bit gradients: half the device-to-host bytes and half the optimizer's
  // gradient reads, with a bf16 gradient's precision). kBF16 rounds each micro-batch's gradient
  // on the device (to nearest even); a later micro-batch's is added to the accumulator on the
  // host, in micro-batch order, each sum rounded to bf16 again.
  DType gradient_dtype = DType::kF32;
  // Experts fetched ahead of use (ecss): 0 = as many as the device cache has free slots.
  uint32_t prefetch_window_experts = 0;
  int kernel_threads = 0;  // the sim's real-mode kernels; 0 = all cores
  // The device whose time the sim's timed mode charges the session's kernels (a built-in
  // profile, runtime/device/device_profile.h); an empty name: h100-sxm. The sim's copy engines
  // take their bandwidths from SimOptions: give both the same profile.
  DeviceProfile device_profile;
  // Record when each op of each step's plan ran (Session::ExecutedPlan's start_s / end_s):
  // a host callback per device op (on CUDA a cudaLaunchHostFunc each) and a timestamp per
  // update, so it is off by default; the plans themselves are kept either way.
  bool record_op_times = false;
  // Optional, not owned, must outlive the session: the optimizer threads' and the NVMe state
  // streaming's lanes (give the sim backend the same recorder for the device lanes).
  TraceRecorder* trace = nullptr;

  // Every cross-field rule of the options, in one place: InvalidArgument naming the field
  // (the model's sizes, dtype and domains; the step limits; gate_k; the placement and what it
  // needs: bf16, nvme_dirs, no delayed update with weights on NVMe, resume with states on
  // NVMe). Session::Create calls it; the budgets are checked against the memory plan
  // (engine/memory_plan.h).
  Status Validate() const;
  // Experts of each sparse layer (every layer holds every domain's group).
  std::vector<uint32_t> ExpertsPerLayer() const;

 private:
  Status ValidatePlacement() const;
};

}  // namespace ecss
