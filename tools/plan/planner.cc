#include "tools/plan/planner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <map>
#include <set>
#include <sstream>

#include "engine/plan_inputs.h"
#include "kernels/cpu/cpu_kernels.h"
#include "optimizer/optimizer_config.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/backend.h"
#include "tools/plan/step_simulator.h"

namespace ecss::plan {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// Without a device budget in the workload, a device gives its session this fraction of its
// memory, less the dense part: the rest is the runtime's context and the training loop's.
constexpr double kDefaultDeviceShare = 0.9;

uint64_t Bytes(double gib) { return static_cast<uint64_t>(gib * kGiB); }
uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// The grouped FFN's scratch for a micro-batch layer of max_rows rows, as the kernels size it.
StatusOr<uint64_t> WorkspaceBytes(const SessionOptions& options) {
  // The sim's kernels size their scratch by their threads (kernel_threads, 0 = every core).
  CpuKernelOptions cpu;
  cpu.threads = options.kernel_threads;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CpuKernels> kernels, CpuKernels::Create(cpu));
  const GroupedFfnProblem sizing = FfnProblemOf(options, MaxRows(options));
  return std::max(kernels->FfnForwardWorkspaceBytes(sizing),
                  kernels->FfnBackwardWorkspaceBytes(sizing));
}

DeviceMemoryRules RulesOf(const HardwareConfig& hardware) {
  return DeviceMemoryRules::Of(AllocationRulesOf(hardware.device_kind));
}

// The dense parameters on each device: split over the node's devices (tensor parallelism),
// compute weights and fp32 gradients, and their master weights and moments sharded over all
// devices (ZeRO stage 1).
uint64_t DenseDeviceBytes(const ModelConfig& model, const HardwareConfig& hardware) {
  const uint64_t p = model.dense_params;
  const uint64_t states = p * 4 * (1 + static_cast<uint64_t>(StateArrays(model.optimizer)));
  return CeilDiv(p * (DTypeSize(model.dtype) + 4), hardware.devices_per_node) +
         CeilDiv(states, hardware.devices());
}

// What the session's store keeps on NVMe, and a checkpoint of its states.
uint64_t NvmeBytes(const SessionOptions& options, const MemoryPlan& memory, uint32_t kept) {
  const uint64_t disk = memory.nvme_bytes;
  uint64_t experts = 0;
  for (uint32_t n : options.ExpertsPerLayer()) experts += n;
  const uint64_t checkpoint = experts * memory.params * 4 *
                              (1 + static_cast<uint64_t>(StateArrays(options.optimizer.kind)));
  return disk + uint64_t{kept} * checkpoint;
}

struct Fit {
  std::optional<MemoryPlan> memory;  // with the device budget, when the cache fits
  uint64_t dense = 0;                // the dense part's device bytes
  uint64_t device_needed = 0;        // the least device budget (max_groups cache slots)
  uint64_t device_budget = 0;
  uint64_t pinned = 0, host = 0, nvme = 0;  // per device
  std::vector<std::string> short_of;
};

uint64_t DeviceBudget(const ModelConfig& model, const HardwareConfig& hardware,
                      const WorkloadConfig& workload) {
  if (workload.device_budget_gib > 0) return Bytes(workload.device_budget_gib);
  const auto share = static_cast<uint64_t>(kDefaultDeviceShare * hardware.device_memory_gib * kGiB);
  const uint64_t dense = DenseDeviceBytes(model, hardware);
  return share > dense ? share - dense : 0;
}

// Whether the session of `options` fits the device's share of the hardware, per tier.
StatusOr<Fit> Assess(SessionOptions options, const ModelConfig& model,
                     const HardwareConfig& hardware, const WorkloadConfig& workload) {
  Fit fit;
  fit.dense = DenseDeviceBytes(model, hardware);
  ECSS_ASSIGN_OR_RETURN(const uint64_t workspace, WorkspaceBytes(options));
  const DeviceMemoryRules rules = RulesOf(hardware);
  fit.device_budget = options.budgets.device_bytes;
  options.budgets.device_bytes = uint64_t{1} << 62;  // room for every expert: the fixed part
  ECSS_ASSIGN_OR_RETURN(const MemoryPlan unbounded, PlanMemory(options, rules, workspace));
  fit.device_needed = unbounded.DeviceBudgetFor(unbounded.max_groups);
  const uint32_t per_node = hardware.devices_per_node;
  if (fit.device_budget < fit.device_needed) {
    fit.short_of.push_back(
        StrCat("device memory: the session needs a device budget of at least ",
               HumanBytes(fit.device_needed), ", has ", HumanBytes(fit.device_budget), " (",
               HumanBytes(Bytes(hardware.device_memory_gib)), " of device memory, ",
               HumanBytes(fit.dense), " of it the dense part)"));
  } else {
    options.budgets.device_bytes = fit.device_budget;
    ECSS_ASSIGN_OR_RETURN(MemoryPlan bounded, PlanMemory(options, rules, workspace));
    fit.memory = std::move(bounded);
  }
  const uint64_t device_memory = Bytes(hardware.device_memory_gib);
  if (fit.device_budget + fit.dense > device_memory) {
    fit.short_of.push_back(StrCat("device memory: the session's budget ",
                                  HumanBytes(fit.device_budget), " and the dense part ",
                                  HumanBytes(fit.dense), " exceed the device's ",
                                  HumanBytes(device_memory), " (workload.device_budget_gib)"));
  }
  const MemoryPlan& m = fit.memory ? *fit.memory : unbounded;
  fit.pinned = m.Total(MemoryTier::kPinned);
  // The node's memory holds the host allocator's budget and what owners keep in the heap.
  fit.host = m.Total(MemoryTier::kHost) + m.Total(MemoryTier::kHeap);
  fit.nvme =
      options.placement.states_on_nvme() ? NvmeBytes(options, m, workload.checkpoints_kept) : 0;
  const uint64_t pinned_node = fit.pinned * per_node,
                 host_node = (fit.pinned + fit.host) * per_node;
  if (pinned_node > Bytes(hardware.pinned_limit_gib)) {
    fit.short_of.push_back(StrCat("pinned memory: ", HumanBytes(pinned_node),
                                  " per node, the limit is ",
                                  HumanBytes(Bytes(hardware.pinned_limit_gib))));
  }
  if (host_node > Bytes(hardware.host_memory_gib)) {
    fit.short_of.push_back(StrCat("host memory: ", HumanBytes(host_node), " per node, has ",
                                  HumanBytes(Bytes(hardware.host_memory_gib))));
  }
  const double nvme_capacity = hardware.nvme_capacity_gib();
  if (fit.nvme * per_node > Bytes(nvme_capacity)) {
    fit.short_of.push_back(StrCat("NVMe: ", HumanBytes(fit.nvme * per_node), " per node, has ",
                                  HumanBytes(Bytes(nvme_capacity))));
  }
  return fit;
}

// The device's share of the node's optimizer threads and NVMe drives; the device's rates.
ResourceRates RatesFor(const HardwareConfig& hardware, const ModelConfig& model,
                       const WorkloadConfig& workload, const DeviceShard& shard) {
  const uint32_t layers = model.sparse_layers;
  ResourceRates rates;
  rates.device = hardware.device;
  rates.copy_latency_us = hardware.copy_latency_us;
  rates.host_wait_latency_us = hardware.host_wait_latency_us;
  // The node's optimizer threads shared evenly by its devices (fractions too: 1 thread for 8
  // devices is an eighth of one each).
  const double threads =
      static_cast<double>(hardware.optimizer_threads) / hardware.devices_per_node;
  rates.optimizer_params_per_s = hardware.OptimizerParamsPerSecond(threads);
  rates.optimizer_helped_params_per_s = hardware.OptimizerParamsPerSecond(threads + 1);
  // Each thread's gaps, on the device's timeline of its threads together (a thread shared by
  // 8 devices: 8 times as long, as its updates are).
  rates.optimizer_update_gap_seconds = hardware.optimizer_update_gap_us * 1e-6 / threads;
  // Each device's session adds on a host stream of its own, at one stream's rate.
  rates.gradient_add_gbps = hardware.gradient_add_gbps;
  rates.gradient_add_beside_optimizer_gbps = hardware.gradient_add_beside_optimizer_gbps;
  rates.optimizer_rate_beside_additions = hardware.optimizer_rate_beside_additions;
  for (const NvmeDrive& d : hardware.nvme) {
    rates.nvme_read_gbps += d.read_gbps * d.session_fraction / hardware.devices_per_node;
    rates.nvme_write_gbps += d.write_gbps * d.session_fraction / hardware.devices_per_node;
  }
  // An update's overhead is taken as one drive's busy time (calibrated as a session's elapsed
  // time per update, so what of it is latency is counted as busy): the device's share of the
  // drives takes its updates in parallel, and a device that shares a drive pays its share.
  if (!hardware.nvme.empty()) {
    double overhead_us = 0;
    for (const NvmeDrive& d : hardware.nvme) overhead_us += d.update_overhead_us;
    const double drives_per_device =
        static_cast<double>(hardware.nvme.size()) / hardware.devices_per_node;
    rates.nvme_update_overhead_seconds =
        overhead_us / static_cast<double>(hardware.nvme.size()) * 1e-6 / drives_per_device;
  }
  // The dense part: 2 FLOPs per parameter and token forward, 4 backward, spread over the
  // sparse layers' compute ops at the GEMM rate of the model's dtype.
  const double tflops = model.dtype == DType::kBF16 ? hardware.device.peak_tflops_bf16
                                                    : hardware.device.peak_tflops_f32;
  const double flops_per_s = tflops * 1e12 * hardware.device.gemm_efficiency;
  const double per_op = static_cast<double>(model.dense_params) / hardware.devices_per_node *
                        workload.tokens_per_micro_batch / layers / flops_per_s;
  if (model.routing == Routing::kRre) {  // a learned gate routes, and plans, at each forward
    const double tokens =
        static_cast<double>(workload.tokens_per_micro_batch) * workload.micro_batches;
    // The step's samples go to its domains in turn (StepSampler): fewer samples, fewer tables.
    const uint64_t samples =
        uint64_t{workload.tokens_per_micro_batch} / workload.seq_len * workload.micro_batches;
    const auto domains = static_cast<uint32_t>(std::min<uint64_t>(shard.domains_per_step, samples));
    rates.begin_step_seconds = hardware.routing_ns_per_token_layer * 1e-9 * tokens * layers +
                               hardware.routing_ns_per_table_line * 1e-9 *
                                   RoutingTableLines(tokens, domains, layers, model.vocab);
    rates.begin_step_seconds_per_op = hardware.step_begin_ns_per_op * 1e-9;
  }
  rates.dense_forward_seconds = 2 * per_op;
  rates.dense_backward_seconds = 4 * per_op;
  if (shard.remote_fraction > 0) {  // a compute op's rows out and back, at the device's share
    const double rows =
        static_cast<double>(workload.tokens_per_micro_batch) * std::max(1u, shard.gate_k);
    const double bytes = rows * model.d_model * DTypeSize(model.dtype) * shard.remote_fraction;
    rates.all_to_all_seconds =
        2 * bytes / (hardware.network_gbps * 1e9 / hardware.devices_per_node);
  }
  return rates;
}

}  // namespace

// ---- Shards and options -----------------------------------------------------------------------

double RoutingTableLines(double tokens, uint32_t domains, uint32_t layers, uint32_t vocab) {
  if (domains == 0 || vocab == 0) return 0;
  const double lines = std::ceil(vocab * sizeof(uint16_t) / 64.0);  // one table's
  const double reads = tokens / domains;                            // of each table
  return static_cast<double>(domains) * layers * lines * -std::expm1(-reads / lines);
}

StatusOr<DeviceShard> ShardFor(const ModelConfig& model, const HardwareConfig& hardware,
                               const WorkloadConfig& workload) {
  DeviceShard shard;
  ModelSpec& m = shard.model;
  m.layers = model.sparse_layers;
  m.d_model = model.d_model;
  m.d_ff = model.d_ff;
  m.activation = model.activation;
  m.dtype = model.dtype;
  m.vocab = model.vocab;
  m.seed = workload.seed;
  const uint32_t devices = hardware.devices();
  if (model.routing == Routing::kLearnedGate) {
    const auto experts = static_cast<uint32_t>(CeilDiv(model.gate_experts, devices));
    m.domains = {{"experts", experts}};
    shard.gate_k = std::min(model.gate_k, experts);
    if (devices > hardware.devices_per_node) {
      shard.remote_fraction = static_cast<double>(devices - hardware.devices_per_node) / devices;
    }
    shard.how = devices == 1 ? StrCat("all ", experts, " experts of each layer")
                             : StrCat(experts, " of each layer's ", model.gate_experts,
                                      " experts (the busiest of ", devices, " devices)");
    return shard;
  }
  const auto domains = static_cast<uint32_t>(model.domains.size());
  if (workload.domains_per_step > domains) {
    return InvalidArgumentError(StrCat("workload.domains_per_step: ", workload.domains_per_step,
                                       " is more than the model's ", domains, " domains"));
  }
  if (devices <= domains) {  // whole domains: the largest first onto the least loaded device
    std::vector<uint32_t> order(domains);
    for (uint32_t d = 0; d < domains; ++d) order[d] = d;
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
      return model.domains[a].experts > model.domains[b].experts;
    });
    std::vector<uint64_t> load(devices, 0);
    std::vector<std::vector<uint32_t>> held(devices);
    for (uint32_t d : order) {
      const auto least =
          static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      load[least] += model.domains[d].experts;
      held[least].push_back(d);
    }
    const auto busiest =
        static_cast<size_t>(std::max_element(load.begin(), load.end()) - load.begin());
    std::sort(held[busiest].begin(), held[busiest].end());
    for (uint32_t d : held[busiest]) m.domains.push_back(model.domains[d]);
    shard.domains_per_step =
        std::min<uint32_t>(workload.domains_per_step, static_cast<uint32_t>(m.domains.size()));
    shard.how = devices == 1 ? StrCat("all ", domains, " domains")
                             : StrCat(m.domains.size(), " of ", domains,
                                      " domains (the busiest of ", devices, " devices)");
    return shard;
  }
  // Each domain's group over devices / domains devices (at least one expert each).
  const uint32_t per_domain = devices / domains;
  uint32_t widest = 0;
  size_t which = 0;
  for (size_t d = 0; d < domains; ++d) {
    const auto share = static_cast<uint32_t>(CeilDiv(model.domains[d].experts, per_domain));
    if (share > widest) {
      widest = share;
      which = d;
    }
  }
  m.domains = {{model.domains[which].name, widest}};
  shard.domains_per_step = 1;
  if (per_domain > hardware.devices_per_node) {
    shard.remote_fraction =
        static_cast<double>(per_domain - hardware.devices_per_node) / per_domain;
  }
  shard.how = StrCat(widest, " of ", model.domains[which].name, "'s ", model.domains[which].experts,
                     " experts (each domain over ", per_domain, " devices)");
  return shard;
}

StatusOr<SessionOptions> SessionOptionsFor(const DeviceShard& shard, const ModelConfig& model,
                                           const HardwareConfig& hardware,
                                           const WorkloadConfig& workload, Strategy strategy) {
  SessionOptions o;
  o.model = shard.model;
  o.strategy = strategy;
  o.device_profile = hardware.device;
  o.gradient_dtype = model.gradient_dtype;
  o.optimizer.kind = model.optimizer;
  o.optimizer.threads = static_cast<int>(
      std::max<uint32_t>(1, hardware.optimizer_threads / hardware.devices_per_node));
  o.optimizer.skip_step_on_nonfinite = false;  // updates start as each layer's gradients arrive
  o.limits.max_tokens_per_micro_batch = workload.tokens_per_micro_batch;
  o.limits.max_micro_batches = workload.micro_batches;
  if (model.routing == Routing::kLearnedGate) {
    o.routing = Routing::kLearnedGate;
    o.gate_k = shard.gate_k;
  } else {  // the largest groups a step's domains may bring
    std::vector<uint32_t> sizes;
    for (const DomainSpec& d : shard.model.domains) sizes.push_back(d.experts);
    std::sort(sizes.rbegin(), sizes.rend());
    uint32_t most = 0;
    for (uint32_t i = 0; i < shard.domains_per_step && i < sizes.size(); ++i) most += sizes[i];
    o.limits.max_active_experts_per_layer = most;
  }
  o.prefetch_window_experts = workload.prefetch_window_experts;
  o.placement.weights = workload.weights;
  o.placement.master = o.placement.moments = workload.states;
  if (workload.states == Tier::kNvme) o.placement.nvme_dirs = {"<nvme>"};  // never created
  o.budgets.device_bytes = DeviceBudget(model, hardware, workload);
  ECSS_RETURN_IF_ERROR(o.Validate().Annotate("the device's session"));
  return o;
}

StatusOr<MemoryPlan> PlanMemoryFor(const SessionOptions& options, const HardwareConfig& hardware) {
  ECSS_ASSIGN_OR_RETURN(const uint64_t workspace, WorkspaceBytes(options));
  return PlanMemory(options, RulesOf(hardware), workspace);
}

// ---- Sampling and plans -----------------------------------------------------------------------

StepSampler::StepSampler(const SessionOptions& options, uint32_t domains_per_step, uint32_t seq_len,
                         uint64_t seed)
    : options_(options), domains_per_step_(domains_per_step), seq_len_(seq_len), rng_(seed, 0) {
  const uint32_t tokens = options.limits.max_tokens_per_micro_batch;
  samples_ = tokens / seq_len_;
  const uint32_t mbs = options.limits.max_micro_batches;
  ids_.assign(mbs, std::vector<uint32_t>(tokens));
  domains_.assign(mbs, std::vector<uint32_t>(samples_));
  picks_.resize(uint64_t{tokens} * std::max(1u, options.gate_k));
  pick_weights_.assign(picks_.size(), 1.0f / static_cast<float>(std::max(1u, options.gate_k)));
}

const std::vector<MicroBatch>& StepSampler::NextStep() {
  const auto domains = static_cast<uint32_t>(options_.model.domains.size());
  std::vector<uint32_t> chosen;
  while (chosen.size() < std::min(domains_per_step_, domains)) {
    const uint32_t d = rng_.Uniform(domains);
    if (std::find(chosen.begin(), chosen.end(), d) == chosen.end()) chosen.push_back(d);
  }
  batches_.clear();
  for (size_t m = 0; m < ids_.size(); ++m) {
    for (uint32_t s = 0; s < samples_; ++s) {
      domains_[m][s] = chosen[(m * samples_ + s) % chosen.size()];
    }
    for (uint32_t& id : ids_[m]) id = rng_.Uniform(options_.model.vocab);
    batches_.push_back({ids_[m].data(), samples_, seq_len_, domains_[m].data()});
  }
  return batches_;
}

GateChoices StepSampler::NextGate() {
  const uint32_t k = options_.gate_k;
  const uint32_t experts = options_.ExpertsPerLayer().at(0);  // every layer holds every group
  for (size_t t = 0; t < picks_.size() / k; ++t) {            // k distinct experts per token
    uint32_t* token = &picks_[t * k];
    for (uint32_t j = 0; j < k; ++j) {
      do {
        token[j] = rng_.Uniform(experts);
      } while (std::find(token, token + j, token[j]) != token + j);
    }
  }
  return {picks_.data(), pick_weights_.data(), k};
}

StatusOr<std::vector<StepPlan>> BuildStepPlans(const SessionOptions& options,
                                               const MemoryPlan& memory, StepSampler& sampler,
                                               uint32_t steps) {
  const bool gated = options.routing == Routing::kLearnedGate;
  std::optional<RreRouter> router;
  if (!gated) {
    ECSS_ASSIGN_OR_RETURN(RreRouter made, RouterOf(options.model));
    router.emplace(std::move(made));
  }
  std::vector<StepPlan> plans;
  std::vector<ExpertId> resident;
  uint64_t held = 0;
  std::set<ExpertId> published;  // delayed update: the experts whose update the step publishes
  const uint32_t layers = options.model.layers;
  for (uint32_t s = 0; s < steps; ++s) {
    const std::vector<MicroBatch>& batches = sampler.NextStep();
    StepPlanInputs in;
    in.model = PlanModelOf(options, memory);
    in.policy = PlanPolicyOf(options, memory.cache_slots, false);
    for (const MicroBatch& batch : batches) {
      MicroBatchRoute route;
      if (router) {
        ECSS_ASSIGN_OR_RETURN(const RoutingPlan routed, RoutingPlan::BuildRre(*router, batch));
        route = RouteOf(routed);
      }
      route.tokens = batch.batch_size * batch.seq_len;
      in.micro_batches.push_back(std::move(route));
    }
    in.resident = resident;
    in.held_experts = options.delayed_update ? held : 0;
    ECSS_ASSIGN_OR_RETURN(StepPlan plan, BuildStepPlan(in));
    if (gated) {
      const uint32_t experts = options.ExpertsPerLayer().at(0);
      for (uint32_t m = 0; m < batches.size(); ++m) {
        const uint32_t tokens = batches[m].batch_size * batches[m].seq_len;
        for (uint32_t l = 0; l < layers; ++l) {
          const GateChoices gate = sampler.NextGate();
          ECSS_ASSIGN_OR_RETURN(
              const RoutingPlan routed,
              RoutingPlan::FromAssignments(l, experts, tokens, gate.k, gate.experts, gate.weights));
          ECSS_RETURN_IF_ERROR(plan.AppendForward(m, l, RouteOf(routed.layer(0)), routed.bytes()));
        }
        for (uint32_t l = layers; l-- > 0;) ECSS_RETURN_IF_ERROR(plan.AppendBackward(m, l));
      }
      plan.Finish();
    }
    std::set<ExpertId> touched = TouchedExperts(plan);  // their device copies go stale
    held = touched.size();
    // An updated expert's device copy is dropped: at its update (ecss and the rest), or when
    // the next step publishes it (delayed update: the update this step started).
    const std::set<ExpertId>& dropped = options.delayed_update ? published : touched;
    resident.clear();
    for (const ExpertId& key : plan.ResidentAfter()) {
      if (dropped.count(key) == 0) resident.push_back(key);
    }
    published = std::move(touched);
    plans.push_back(std::move(plan));
  }
  return plans;
}

namespace {

// Note [Inputs drawn ahead]: RunSampledSteps draws every step's micro-batches (and a learned
// gate's choices) from the sampler before its first step, in the order the steps would draw
// them (BuildStepPlans' order), so that the window it measures holds the session's work alone.
// Drawn in the loop, the token ids of `small ecss-host-4x32k`'s steps (131,072 a step) took
// 0.6 ms a step on the driving thread between one step's end and the next one's begin on the
// 2-core development VM (2026-12-06), 3% of its step, which the planner's steps, one
// beginning where the last ended, do not have; a training loop's data comes from its loader.
// At most kMostDrawnBytes ahead (CheckDrawnInputs).
constexpr uint64_t kMostDrawnBytes = uint64_t{1} << 30;

// One step's draws, copied out of the sampler (which keeps only the current step's). Its
// batches and gates point into its own vectors, taken once they are complete: movable (a
// vector's buffer moves with it), not copyable.
struct DrawnStep {
  DrawnStep() = default;
  DrawnStep(DrawnStep&&) = default;
  DrawnStep& operator=(DrawnStep&&) = default;
  DrawnStep(const DrawnStep&) = delete;
  DrawnStep& operator=(const DrawnStep&) = delete;
  std::vector<uint32_t> ids, domains, gate_experts;  // per micro-batch (and layer), in turn
  std::vector<MicroBatch> batches;                   // into ids and domains
  std::vector<GateChoices> gates;                    // per micro-batch and layer, in turn
};

// What one DrawnStep holds for these options (the sampler's micro-batches: every one of
// max_tokens_per_micro_batch tokens in samples of seq_len).
uint64_t DrawnBytesPerStep(const SessionOptions& options, uint32_t seq_len) {
  const uint64_t tokens = options.limits.max_tokens_per_micro_batch;
  uint64_t per_batch = 4 * (tokens + tokens / seq_len) + sizeof(MicroBatch);
  if (options.routing == Routing::kLearnedGate) {
    per_batch += options.model.layers * (4 * tokens * options.gate_k + sizeof(GateChoices));
  }
  return sizeof(DrawnStep) + options.limits.max_micro_batches * per_batch;
}

StatusOr<std::vector<DrawnStep>> DrawSteps(const SessionOptions& options, StepSampler& sampler,
                                           uint32_t steps) {
  ECSS_RETURN_IF_ERROR(CheckDrawnInputs(options, sampler.seq_len(), steps));
  const bool gated = options.routing == Routing::kLearnedGate;
  const uint64_t tokens = options.limits.max_tokens_per_micro_batch;
  const uint64_t batches = options.limits.max_micro_batches;
  std::vector<DrawnStep> drawn(steps);
  for (DrawnStep& step : drawn) {
    // Reserved whole, so that the views taken while they fill stay valid.
    step.ids.reserve(batches * tokens);
    step.domains.reserve(batches * (tokens / sampler.seq_len()));
    if (gated) step.gate_experts.reserve(batches * options.model.layers * tokens * options.gate_k);
    for (const MicroBatch& b : sampler.NextStep()) {
      const uint64_t n = uint64_t{b.batch_size} * b.seq_len;
      const uint32_t* ids = step.ids.data() + step.ids.size();
      const uint32_t* domains = step.domains.data() + step.domains.size();
      step.ids.insert(step.ids.end(), b.token_ids, b.token_ids + n);
      step.domains.insert(step.domains.end(), b.domain_ids, b.domain_ids + b.batch_size);
      step.batches.push_back({ids, b.batch_size, b.seq_len, domains});
    }
    for (size_t mb = 0; gated && mb < step.batches.size(); ++mb) {
      const uint64_t n = uint64_t{step.batches[mb].batch_size} * step.batches[mb].seq_len;
      for (uint32_t l = 0; l < options.model.layers; ++l) {
        GateChoices gate = sampler.NextGate();  // its weights: the sampler's, alike in every call
        const uint32_t* experts = step.gate_experts.data() + step.gate_experts.size();
        step.gate_experts.insert(step.gate_experts.end(), gate.experts, gate.experts + n * gate.k);
        gate.experts = experts;
        step.gates.push_back(gate);
      }
    }
  }
  return drawn;
}

}  // namespace

Status CheckDrawnInputs(const SessionOptions& options, uint32_t seq_len, uint64_t steps) {
  const uint64_t per_step = DrawnBytesPerStep(options, seq_len);
  if (steps <= kMostDrawnBytes / per_step) return Status::Ok();
  return InvalidArgumentError(StrCat(
      "the inputs of ", steps, " steps take ", HumanBytes(per_step * steps),
      ", drawn before the first step so that the measured steps hold the session's "
      "work alone; at most ",
      HumanBytes(kMostDrawnBytes), ": at most ", kMostDrawnBytes / per_step, " steps of these"));
}

StatusOr<std::vector<StepStats>> RunSampledSteps(Session& session, Backend& backend,
                                                 const SessionOptions& options,
                                                 StepSampler& sampler, uint32_t steps,
                                                 MeasuredWindow* window) {
  ECSS_ASSIGN_OR_RETURN(const std::vector<DrawnStep> drawn, DrawSteps(options, sampler, steps));
  const ModelSpec& m = options.model;
  const uint64_t bytes =
      uint64_t{options.limits.max_tokens_per_micro_batch} * m.d_model * DTypeSize(m.dtype);
  ECSS_ASSIGN_OR_RETURN(Buffer x, backend.device_memory().Allocate(bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(Buffer y, backend.device_memory().Allocate(bytes, MemoryTag::kActivations));
  ECSS_RETURN_IF_ERROR(backend.MemsetAsync(session.compute_stream(), x.data(), 0, bytes));
  ECSS_RETURN_IF_ERROR(backend.MemsetAsync(session.compute_stream(), y.data(), 0, bytes));
  const bool gated = options.routing == Routing::kLearnedGate;
  std::vector<StepStats> stats;
  auto window_start = std::chrono::steady_clock::now();
  auto last_begin = window_start;  // when the last step began
  ExpertStore::IoBytes nvme_at_start;
  for (uint32_t step = 0; step < steps; ++step) {
    if (window != nullptr && step == window->warmup) {
      ECSS_RETURN_IF_ERROR(session.Synchronize());
      window_start = std::chrono::steady_clock::now();
      nvme_at_start = session.nvme_io();
    }
    const std::vector<MicroBatch>& batches = drawn[step].batches;
    last_begin = std::chrono::steady_clock::now();
    ECSS_RETURN_IF_ERROR(session.BeginStep(batches));
    for (uint32_t mb = 0; mb < batches.size(); ++mb) {  // the step's order (the plan's)
      for (uint32_t l = 0; l < m.layers; ++l) {
        ECSS_RETURN_IF_ERROR(
            gated ? session.Forward(MicroBatchIndex{mb}, LayerIndex{l}, x.data(), y.data(),
                                    drawn[step].gates.at(uint64_t{mb} * m.layers + l))
                  : session.Forward(MicroBatchIndex{mb}, LayerIndex{l}, x.data(), y.data()));
      }
      for (uint32_t l = m.layers; l-- > 0;) {
        ECSS_RETURN_IF_ERROR(
            session.Backward(MicroBatchIndex{mb}, LayerIndex{l}, y.data(), x.data()));
      }
    }
    ECSS_ASSIGN_OR_RETURN(StepStats s, session.EndStep());
    stats.push_back(std::move(s));
  }
  ECSS_RETURN_IF_ERROR(session.Synchronize());
  if (window != nullptr) {
    // Where the session records its ops' times, the window ends when the last step's last op
    // (its last update) ended, not when Synchronize returned: with NVMe states Synchronize
    // also makes the store durable (an fdatasync of every state file, which a training loop
    // pays at its checkpoints, not per step; 0.3-0.9 s on this project's development VM, a
    // fifth to a half of a six-step window). With the delayed update the last step's
    // gradients are updated in Synchronize, outside its plan: there the window ends after it.
    auto end = std::chrono::steady_clock::now();
    if (options.record_op_times && !options.delayed_update && !stats.empty()) {
      ECSS_ASSIGN_OR_RETURN(const StepPlan plan, session.ExecutedPlan(stats.back().step));
      double last_end = 0;
      for (const PlanOp& op : plan.ops()) last_end = std::max(last_end, op.end_s);
      end = last_begin + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(last_end));
    }
    window->seconds = std::chrono::duration<double>(end - window_start).count();
    window->nvme = session.nvme_io().Since(nvme_at_start);
  }
  return stats;
}

// ---- Plan -------------------------------------------------------------------------------------

namespace {

StatusOr<StrategyPrediction> Predict(const DeviceShard& shard, const ModelConfig& model,
                                     const HardwareConfig& hardware, const WorkloadConfig& workload,
                                     Strategy strategy) {
  StrategyPrediction p;
  p.strategy = strategy;
  ECSS_ASSIGN_OR_RETURN(const SessionOptions options,
                        SessionOptionsFor(shard, model, hardware, workload, strategy));
  ECSS_ASSIGN_OR_RETURN(const Fit fit, Assess(options, model, hardware, workload));
  if (!fit.memory) {
    p.why_not = fit.short_of.at(0);
    return p;
  }
  if (options.placement.states_on_nvme() && hardware.nvme.empty()) {
    p.why_not = "states on NVMe, but the hardware has no NVMe drives (hardware.nvme)";
    return p;
  }
  p.feasible = true;
  p.cache_slots = fit.memory->cache_slots;
  p.device_bytes = fit.memory->Total(MemoryTier::kDevice);
  p.pinned_bytes = fit.memory->Total(MemoryTier::kPinned);
  p.host_bytes = fit.memory->Total(MemoryTier::kHost);
  p.heap_bytes = fit.memory->Total(MemoryTier::kHeap);
  StepSampler sampler(options, shard.domains_per_step, workload.seq_len, workload.seed);
  ECSS_ASSIGN_OR_RETURN(std::vector<StepPlan> plans, BuildStepPlans(options, *fit.memory, sampler,
                                                                    kWarmupSteps + workload.steps));
  const ResourceRates rates = RatesFor(hardware, model, workload, shard);
  ECSS_ASSIGN_OR_RETURN(StepSimulator simulator, StepSimulator::Create(options, rates));
  std::vector<StepMetrics> steady;
  double seconds = 0;
  for (size_t s = 0; s < plans.size(); ++s) {
    ECSS_ASSIGN_OR_RETURN(const SimulatedStep step, simulator.Run(plans[s]));
    if (s < kWarmupSteps) continue;
    steady.push_back(step.metrics);
    seconds += step.seconds;
    p.begin_seconds += step.begin_work_s;
    for (size_t r = 0; r < kPlanResources; ++r) p.busy_per_step[r] += step.busy[r];
    p.network_seconds += step.network_busy;
    const StepPlan& plan = plans[s];
    p.h2d_bytes += plan.Bytes(OpKind::kFetch) + plan.Bytes(OpKind::kPlanUpload);
    p.d2h_bytes += plan.Bytes(OpKind::kGradientCopy);
    p.nvme_bytes += plan.Bytes(OpKind::kStage) + plan.Bytes(OpKind::kStateRead) +
                    plan.Bytes(OpKind::kStateWrite);
    for (const PlanOp* update : plan.Find(OpKind::kUpdate)) {
      if (update->step_offset == 0) p.updated_params += update->experts.size() * fit.memory->params;
    }
  }
  p.last_plan = std::move(plans.back());
  const auto n = static_cast<double>(steady.size());
  p.metrics = SumStepMetrics(steady);
  p.step_seconds = seconds / n;
  p.begin_seconds /= n;
  for (double& busy : p.busy_per_step) busy /= n;
  p.network_seconds /= n;
  p.h2d_bytes = static_cast<uint64_t>(static_cast<double>(p.h2d_bytes) / n);
  p.d2h_bytes = static_cast<uint64_t>(static_cast<double>(p.d2h_bytes) / n);
  p.nvme_bytes = static_cast<uint64_t>(static_cast<double>(p.nvme_bytes) / n);
  p.updated_params = static_cast<uint64_t>(static_cast<double>(p.updated_params) / n);
  const double tokens =
      static_cast<double>(workload.tokens_per_micro_batch) * workload.micro_batches;
  p.device_tokens_per_s = tokens / p.step_seconds;
  p.tokens_per_s = p.device_tokens_per_s * hardware.devices();
  p.dense_compute_seconds = (rates.dense_forward_seconds + rates.dense_backward_seconds) *
                            options.model.layers * workload.micro_batches;
  return p;
}

// The smallest changes of placement or budget that make an infeasible configuration fit.
StatusOr<std::vector<std::string>> Suggest(const DeviceShard& shard, const ModelConfig& model,
                                           const HardwareConfig& hardware,
                                           const WorkloadConfig& workload, const Fit& fit) {
  std::vector<std::string> out;
  auto fits = [&](const WorkloadConfig& changed) -> StatusOr<bool> {
    ECSS_ASSIGN_OR_RETURN(const SessionOptions o,
                          SessionOptionsFor(shard, model, hardware, changed, changed.strategy));
    ECSS_ASSIGN_OR_RETURN(const Fit f, Assess(o, model, hardware, changed));
    return f.short_of.empty();
  };
  if (workload.states == Tier::kHost) {
    WorkloadConfig changed = workload;
    changed.states = Tier::kNvme;
    ECSS_ASSIGN_OR_RETURN(const bool ok, fits(changed));
    if (ok)
      out.push_back("master weights and moments to NVMe (workload.placement.states \"nvme\")");
  }
  if (workload.weights == Tier::kPinned) {
    WorkloadConfig changed = workload;
    changed.states = changed.weights = Tier::kNvme;
    ECSS_ASSIGN_OR_RETURN(const bool ok, fits(changed));
    if (ok && out.empty()) {
      out.push_back("states and weights to NVMe (workload.placement.states and .weights \"nvme\")");
    }
  }
  const uint32_t per_node = hardware.devices_per_node;
  if (fit.device_budget < fit.device_needed) {
    const uint64_t memory = Bytes(hardware.device_memory_gib);
    if (fit.device_needed + fit.dense <= memory) {
      out.push_back(StrCat("device budget +", HumanBytes(fit.device_needed - fit.device_budget),
                           " (workload.device_budget_gib ",
                           std::ceil(static_cast<double>(fit.device_needed) / kGiB * 100) / 100,
                           ")"));
    } else {
      out.push_back(StrCat("device memory +", HumanBytes(fit.device_needed + fit.dense - memory),
                           " (a device of ",
                           std::ceil(static_cast<double>(fit.device_needed + fit.dense) / kGiB),
                           " GiB), or fewer tokens per micro-batch"));
    }
  }
  const uint64_t device_memory = Bytes(hardware.device_memory_gib);
  if (fit.device_budget + fit.dense > device_memory &&
      fit.device_needed + fit.dense <= device_memory) {
    out.push_back(StrCat("a device budget of at most ", HumanBytes(device_memory - fit.dense),
                         " (workload.device_budget_gib)"));
  }
  const uint64_t host_node = (fit.pinned + fit.host) * per_node;
  if (host_node > Bytes(hardware.host_memory_gib)) {
    out.push_back(StrCat("host memory +", HumanBytes(host_node - Bytes(hardware.host_memory_gib)),
                         " per node"));
  }
  if (fit.pinned * per_node > Bytes(hardware.pinned_limit_gib)) {
    out.push_back(StrCat("pinned limit +",
                         HumanBytes(fit.pinned * per_node - Bytes(hardware.pinned_limit_gib)),
                         " per node"));
  }
  const double nvme_capacity = hardware.nvme_capacity_gib();
  if (fit.nvme * per_node > Bytes(nvme_capacity)) {
    out.push_back(
        StrCat("NVMe +", HumanBytes(fit.nvme * per_node - Bytes(nvme_capacity)), " per node"));
  }
  return out;
}

}  // namespace

StatusOr<PlanReport> Plan(const ModelConfig& model, const HardwareConfig& hardware,
                          const WorkloadConfig& workload, Strategies strategies) {
  const auto began = std::chrono::steady_clock::now();
  PlanReport r;
  r.model = model;
  r.hardware = hardware;
  r.workload = workload;
  r.devices = hardware.devices();
  ECSS_ASSIGN_OR_RETURN(r.shard, ShardFor(model, hardware, workload));
  ECSS_ASSIGN_OR_RETURN(const SessionOptions options,
                        SessionOptionsFor(r.shard, model, hardware, workload, workload.strategy));
  ECSS_ASSIGN_OR_RETURN(const Fit fit, Assess(options, model, hardware, workload));
  if (fit.memory) {
    r.memory = *fit.memory;
  } else {  // the plan with the least budget, to show what would be where
    SessionOptions least = options;
    least.budgets.device_bytes = fit.device_needed;
    ECSS_ASSIGN_OR_RETURN(const uint64_t workspace, WorkspaceBytes(least));
    ECSS_ASSIGN_OR_RETURN(r.memory, PlanMemory(least, RulesOf(hardware), workspace));
  }
  r.dense_device_bytes = DenseDeviceBytes(model, hardware);
  r.nvme_bytes = fit.nvme;
  const uint32_t per_node = hardware.devices_per_node;
  const double nvme_capacity = hardware.nvme_capacity_gib();
  const uint64_t device_memory = Bytes(hardware.device_memory_gib);
  r.tiers = {
      {"device", r.memory.Total(MemoryTier::kDevice) + r.dense_device_bytes, device_memory,
       (r.memory.Total(MemoryTier::kDevice) + r.dense_device_bytes) * per_node,
       device_memory * per_node},
      {"pinned", fit.pinned, Bytes(hardware.pinned_limit_gib) / per_node, fit.pinned * per_node,
       Bytes(hardware.pinned_limit_gib)},
      // Pinned memory and the heap are host memory too: the host row holds all three.
      {"host", fit.pinned + fit.host, Bytes(hardware.host_memory_gib) / per_node,
       (fit.pinned + fit.host) * per_node, Bytes(hardware.host_memory_gib)},
      {"nvme", fit.nvme, Bytes(nvme_capacity) / per_node, fit.nvme * per_node,
       Bytes(nvme_capacity)},
  };
  r.short_of = fit.short_of;
  r.feasible = fit.short_of.empty();
  if (!r.feasible) {
    ECSS_ASSIGN_OR_RETURN(r.suggestions, Suggest(r.shard, model, hardware, workload, fit));
  }
  std::vector<Strategy> predicted = {workload.strategy};
  for (Strategy s :
       {Strategy::kEcss, Strategy::kZeroOffload, Strategy::kNoOverlap, Strategy::kNaive}) {
    if (s != workload.strategy && strategies == Strategies::kEvery) predicted.push_back(s);
  }
  for (Strategy s : predicted) {
    ECSS_ASSIGN_OR_RETURN(StrategyPrediction p, Predict(r.shard, model, hardware, workload, s));
    r.predictions.push_back(std::move(p));
  }
  r.plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  return r;
}

namespace {

std::string Describe(const WorkloadConfig& w) {
  return StrCat("weights ", w.weights == Tier::kNvme ? "nvme" : "pinned", ", states ",
                w.states == Tier::kNvme ? "nvme" : "host", ", ", w.micro_batches, " x ",
                w.tokens_per_micro_batch, " tokens");
}

std::string Outcome(const PlanReport& r) {
  const StrategyPrediction& p = r.predictions.front();
  if (!r.feasible) return StrCat("does not fit (", r.short_of.front(), ")");
  if (!p.feasible) return StrCat("does not fit (", p.why_not, ")");
  return StrCat(static_cast<uint64_t>(p.tokens_per_s), " tokens/s, bottleneck ",
                p.metrics.bottleneck);
}

}  // namespace

StatusOr<PlanReport> Optimize(const ModelConfig& model, const HardwareConfig& hardware,
                              const WorkloadConfig& workload, Strategies strategies) {
  const auto began = std::chrono::steady_clock::now();
  ECSS_ASSIGN_OR_RETURN(PlanReport given,
                        Plan(model, hardware, workload, Strategies::kWorkloadOnly));
  const uint64_t step_tokens = uint64_t{workload.tokens_per_micro_batch} * workload.micro_batches;
  std::optional<PlanReport> best;  // a change must beat the given workload by 1% to be chosen
  if (given.feasible && given.predictions.front().feasible) best = given;
  std::vector<std::string> tried;
  for (const auto& [weights, states] :
       {std::pair{Tier::kPinned, Tier::kHost}, std::pair{Tier::kPinned, Tier::kNvme},
        std::pair{Tier::kNvme, Tier::kNvme}}) {
    if (states == Tier::kNvme && hardware.nvme.empty()) continue;
    for (uint32_t split : {1u, 2u, 4u, 8u}) {
      if (step_tokens % split != 0 || (step_tokens / split) % workload.seq_len != 0) continue;
      WorkloadConfig w = workload;
      w.weights = weights;
      w.states = states;
      w.micro_batches = split;
      w.tokens_per_micro_batch = static_cast<uint32_t>(step_tokens / split);
      ECSS_ASSIGN_OR_RETURN(PlanReport r, Plan(model, hardware, w, Strategies::kWorkloadOnly));
      tried.push_back(StrCat(Describe(w), ": ", Outcome(r)));
      const StrategyPrediction& p = r.predictions.front();
      if (!r.feasible || !p.feasible) continue;
      if (!best || p.tokens_per_s > 1.01 * best->predictions.front().tokens_per_s) {
        best = std::move(r);
      }
    }
  }
  // The chosen workload's whole report (the one simulated already, where it is all asked for).
  const bool chosen = best.has_value();
  PlanReport out;
  if (chosen && strategies == Strategies::kWorkloadOnly) {
    out = *std::move(best);
  } else {
    ECSS_ASSIGN_OR_RETURN(out,
                          Plan(model, hardware, chosen ? best->workload : workload, strategies));
  }
  out.optimized.push_back(StrCat("given:  ", Describe(workload), ": ", Outcome(given)));
  out.optimized.push_back(chosen ? StrCat("chosen: ", Describe(out.workload), ": ", Outcome(out))
                                 : "chosen: nothing tried fits");
  out.optimized.push_back("prefetch window: every free cache slot (a smaller one never helps)");
  for (const std::string& t : tried) out.optimized.push_back(StrCat("tried:  ", t));
  out.plan_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  return out;
}

// ---- Output -----------------------------------------------------------------------------------

namespace {

const StrategyPrediction* Find(const PlanReport& r, Strategy strategy) {
  for (const StrategyPrediction& p : r.predictions) {
    if (p.strategy == strategy && p.feasible) return &p;
  }
  return nullptr;
}

}  // namespace

namespace {

// One strategy's prediction (the step bench's field names where they mean the same).
void WritePrediction(JsonWriter& json, const StrategyPrediction& p,
                     const StrategyPrediction* ecss) {
  json.BeginObject().Field("strategy", StrategyName(p.strategy)).Field("feasible", p.feasible);
  if (!p.feasible) {
    json.Field("why_not", p.why_not).EndObject();
    return;
  }
  json.Field("tokens_per_s", p.tokens_per_s)
      .Field("device_tokens_per_s", p.device_tokens_per_s)
      .Field("step_seconds", p.step_seconds)
      .Field("begin_seconds_per_step", p.begin_seconds)
      .Field("bound_ratio", p.metrics.bound_ratio)
      .Key("overlap_fraction");
  if (p.metrics.overlap_fraction) {
    json.Double(*p.metrics.overlap_fraction);
  } else {
    json.Null();
  }
  json.Field("bottleneck", p.metrics.bottleneck).Key("resources").BeginObject();
  const double steps = p.step_seconds > 0 ? p.metrics.seconds / p.step_seconds : 1;
  for (const ResourceUse& use : p.metrics.resources) {
    json.Key(use.name)
        .BeginObject()
        .Field("busy_seconds_per_step", use.busy_seconds / steps)
        .Field("exposed_seconds_per_step", use.exposed_seconds / steps)
        .Field("utilisation", use.busy_seconds / p.metrics.seconds)
        .EndObject();
  }
  json.EndObject().Key("plan_resources").BeginObject();
  for (size_t i = 0; i < kPlanResources; ++i) {
    json.Field(PlanResourceName(static_cast<PlanResource>(i)), p.busy_per_step[i]);
  }
  json.EndObject()
      .Field("dense_compute_seconds_per_step", p.dense_compute_seconds)
      .Field("network_seconds_per_step_modelled_only", p.network_seconds)
      .Field("h2d_bytes", p.h2d_bytes)
      .Field("d2h_bytes", p.d2h_bytes)
      .Field("nvme_bytes", p.nvme_bytes)
      .Field("updated_params", p.updated_params)
      .Field("cache_slots", uint64_t{p.cache_slots})
      .Key("memory")
      .BeginObject()
      .Field("device_bytes", p.device_bytes)
      .Field("pinned_bytes", p.pinned_bytes)
      .Field("host_bytes", p.host_bytes)
      .Field("heap_bytes", p.heap_bytes)
      .EndObject();
  if (ecss != nullptr && p.strategy != Strategy::kEcss) {
    json.Field("ecss_ratio", ecss->tokens_per_s / p.tokens_per_s);
  }
  json.EndObject();
}

}  // namespace

void WriteJson(const PlanReport& r, JsonWriter& json) {
  json.BeginObject()
      .Field("model", r.model.name)
      .Field("hardware", r.hardware.name)
      .Field("devices", uint64_t{r.devices})
      .Field("total_params", r.model.total_params())
      .Field("expert_params", r.model.expert_params())
      .Field("device_share", r.shard.how)
      .Field("strategy", StrategyName(r.workload.strategy))
      .Field("feasible", r.feasible);
  json.Key("short_of").BeginArray();
  for (const std::string& s : r.short_of) json.String(s);
  json.EndArray().Key("suggestions").BeginArray();
  for (const std::string& s : r.suggestions) json.String(s);
  json.EndArray().Key("placement").BeginObject();
  json.Key("items").BeginArray();
  for (const MemoryItem& item : r.memory.items) {
    json.BeginObject()
        .Field("what", item.what)
        .Field("tier", MemoryTierName(item.tier))
        .Field("count", item.count)
        .Field("bytes", item.total())
        .EndObject();
  }
  if (r.dense_device_bytes > 0) {
    json.BeginObject()
        .Field("what", "dense parameters (modelled)")
        .Field("tier", "device")
        .Field("count", uint64_t{1})
        .Field("bytes", r.dense_device_bytes)
        .EndObject();
  }
  if (r.nvme_bytes > 0) {
    json.BeginObject()
        .Field("what", "expert store files and checkpoints")
        .Field("tier", "nvme")
        .Field("count", uint64_t{1})
        .Field("bytes", r.nvme_bytes)
        .EndObject();
  }
  json.EndArray().Key("tiers").BeginObject();
  for (const TierUse& t : r.tiers) {
    json.Key(t.tier)
        .BeginObject()
        .Field("bytes_per_device", t.bytes)
        .Field("budget_per_device", t.budget)
        .Field("bytes_per_node", t.node_bytes)
        .Field("budget_per_node", t.node_budget)
        .EndObject();
  }
  json.EndObject().EndObject().Key("strategies").BeginArray();
  const StrategyPrediction* ecss = Find(r, Strategy::kEcss);
  for (const StrategyPrediction& p : r.predictions) WritePrediction(json, p, ecss);
  json.EndArray().Key("optimized").BeginArray();
  for (const std::string& line : r.optimized) json.String(line);
  json.EndArray().Field("plan_seconds", r.plan_seconds).EndObject();
}

std::string Table(const PlanReport& r, bool bars) {
  std::ostringstream out;
  out << "ecss-plan: " << r.model.name << " (" << std::setprecision(4)
      << static_cast<double>(r.model.total_params()) / 1e9 << "B parameters) on " << r.hardware.name
      << " (" << r.devices << " device" << (r.devices > 1 ? "s" : "") << "), strategy "
      << StrategyName(r.workload.strategy) << "\n"
      << "each device holds " << r.shard.how << "\n\n"
      << (r.feasible ? "FITS" : "DOES NOT FIT") << "  (per device; per node x"
      << r.hardware.devices_per_node << ")\n";
  for (const TierUse& t : r.tiers) {
    if (t.budget == 0 && t.bytes == 0) continue;
    out << "  " << std::left << std::setw(7) << t.tier << std::right << std::setw(12)
        << HumanBytes(t.bytes) << " of " << std::setw(12) << HumanBytes(t.budget);
    if (bars && t.budget > 0) {
      const double f = std::min(1.0, static_cast<double>(t.bytes) / static_cast<double>(t.budget));
      const int filled = static_cast<int>(std::round(f * 30));
      out << "  [" << std::string(filled, '#') << std::string(30 - filled, '.') << "]"
          << (t.bytes > t.budget ? " OVER" : "");
    }
    out << "\n";
  }
  out << "\nwhere each byte lives (per device)\n";
  for (const MemoryItem& item : r.memory.items) {
    out << "  " << std::left << std::setw(7) << MemoryTierName(item.tier) << std::setw(44)
        << item.what << std::right << std::setw(8) << item.count << " x " << std::setw(11)
        << HumanBytes(item.reserved) << " = " << HumanBytes(item.total()) << "\n";
  }
  if (r.dense_device_bytes > 0) {
    out << "  device " << std::left << std::setw(44) << "dense parameters (modelled)" << std::right
        << std::setw(26) << "" << HumanBytes(r.dense_device_bytes) << "\n";
  }
  if (r.nvme_bytes > 0) {
    out << "  nvme   " << std::left << std::setw(44) << "expert store files and checkpoints"
        << std::right << std::setw(26) << "" << HumanBytes(r.nvme_bytes) << "\n";
  }
  for (const std::string& s : r.short_of) out << "  short: " << s << "\n";
  for (const std::string& s : r.suggestions) out << "  would fit: " << s << "\n";
  const StrategyPrediction* ecss = Find(r, Strategy::kEcss);
  out << "\npredicted step (steady state, per device; the whole model's tokens/s)\n"
      << "  strategy       tokens/s   step s   bound  overlap  bottleneck"
      << (ecss != nullptr && r.predictions.size() > 1 ? "   vs ecss" : "") << "\n";
  for (const StrategyPrediction& p : r.predictions) {
    out << "  " << std::left << std::setw(13) << StrategyName(p.strategy) << std::right;
    if (!p.feasible) {
      out << "  does not fit: " << p.why_not << "\n";
      continue;
    }
    out << std::fixed << std::setprecision(0) << std::setw(10) << p.tokens_per_s
        << std::setprecision(4) << std::setw(9) << p.step_seconds << std::setprecision(3)
        << std::setw(8) << p.metrics.bound_ratio << std::setw(9);
    if (p.metrics.overlap_fraction) {
      out << *p.metrics.overlap_fraction + 0.0;  // no "-0.000"
    } else {
      out << "n/a";
    }
    out << "  " << std::left << std::setw(11) << p.metrics.bottleneck << std::right;
    if (ecss != nullptr && p.strategy != Strategy::kEcss) {
      out << std::setprecision(2) << std::setw(8) << ecss->tokens_per_s / p.tokens_per_s << "x";
    }
    out << std::defaultfloat << "\n";
  }
  if (r.shard.remote_fraction > 0) {
    out << "  (the all-to-all between nodes, " << std::setprecision(3)
        << 100 * r.shard.remote_fraction
        << "% of each layer's tokens out and back, is modelled only: the engine does not run it";
    for (const StrategyPrediction& p : r.predictions) {
      if (p.feasible) {
        out << "; " << StrategyName(p.strategy) << " " << p.network_seconds << " s a step";
        break;
      }
    }
    out << ")\n";
  }
  if (!r.optimized.empty()) out << "\n--optimize\n";
  for (const std::string& line : r.optimized) out << "  " << line << "\n";
  out << "\nplanned in " << std::setprecision(3) << r.plan_seconds << " s\n";
  return out.str();
}

}  // namespace ecss::plan
