// The planner behind ecss-plan: for a model, hardware and workload, where every byte of one
// device's session lives (the engine's own MemoryPlan, engine/memory_plan.h), whether it fits
// and the smallest change that would, and how fast a step runs (the engine's own StepPlan,
// built from sampled routing and run in virtual time by StepSimulator), for ecss and the
// strategies a user could pick instead.
//
// Several devices: the engine plans one device's session; the planner gives each device its
// share of the experts (expert parallelism: whole domains per device while there are at least
// as many domains as devices, else each domain's group spread over devices / domains devices;
// a learned gate's experts split evenly) and plans the busiest device. Each device trains on
// its own micro-batches (data parallelism), so the model's tokens/s is the device's times the
// devices. The all-to-all that carries tokens to other nodes' experts is added around each
// compute op on the node's network, marked as modelled only (the engine does not run it yet).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/memory_plan.h"
#include "engine/session.h"
#include "engine/session_options.h"
#include "engine/step_metrics.h"
#include "engine/step_plan.h"
#include "router/routing_plan.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/random.h"
#include "tools/plan/plan_config.h"

namespace ecss::plan {

// One device's part of the model and what it trains on.
struct DeviceShard {
  ModelSpec model;                // its experts: the domains (or share of one) it holds
  uint32_t gate_k = 0;            // learned gate: choices per token among its experts
  uint32_t domains_per_step = 1;  // RRE: domains a step's samples come from
  std::string how;                // "5 of 40 domains", "2 of domain0's 16 experts", ...
  // Of a layer's token rows, the share the all-to-all exchanges with other nodes: RRE keeps
  // tokens in their domain's group (none while a group fits in a node), a learned gate
  // spreads them over every device.
  double remote_fraction = 0;
};
StatusOr<DeviceShard> ShardFor(const ModelConfig& model, const HardwareConfig& hardware,
                               const WorkloadConfig& workload);
// The cache lines (64 bytes) of the RRE routing tables a step reads, the expected number:
// `domains` tables a sparse layer (2 bytes a token id of `vocab`), each read at `tokens` /
// `domains` token ids drawn uniformly (StepSampler's), each line once however often it is read
// (HardwareConfig::routing_ns_per_table_line).
double RoutingTableLines(double tokens, uint32_t domains, uint32_t layers, uint32_t vocab);

// The session options of the device's shard for `strategy` (budgets: the device's share of
// the hardware; states on NVMe get a placeholder directory: nothing is created).
StatusOr<SessionOptions> SessionOptionsFor(const DeviceShard& shard, const ModelConfig& model,
                                           const HardwareConfig& hardware,
                                           const WorkloadConfig& workload, Strategy strategy);

// The session's memory plan on the hardware's device (its allocation rules, the kernels'
// scratch): what Session::memory_plan() is for these options on such a device.
StatusOr<MemoryPlan> PlanMemoryFor(const SessionOptions& options, const HardwareConfig& hardware);

// The micro-batches of each step, as ecss-bench step makes them: the step's domains drawn at
// random (distinct), samples of seq_len tokens dealt to them in turn, token ids uniform over
// the vocabulary; with a learned gate, k distinct experts per token drawn at random (the
// "uniform" load-balance assumption). Deterministic in the seed.
class StepSampler {
 public:
  // REQUIRES: seq_len divides options.limits.max_tokens_per_micro_batch.
  StepSampler(const SessionOptions& options, uint32_t domains_per_step, uint32_t seq_len,
              uint64_t seed);
  // The next step's micro-batches (valid until the next call).
  const std::vector<MicroBatch>& NextStep();
  // A learned gate's choices for the current step's (micro-batch, layer), drawn at the call.
  GateChoices NextGate();
  uint32_t seq_len() const { return seq_len_; }

 private:
  SessionOptions options_;
  uint32_t domains_per_step_;
  uint32_t samples_ = 0, seq_len_ = 0;
  CounterRng rng_;
  std::vector<std::vector<uint32_t>> ids_, domains_;
  std::vector<MicroBatch> batches_;
  std::vector<uint32_t> picks_;
  std::vector<float> pick_weights_;
};

// The plans of consecutive steps of a session with `options` and `memory` (its memory plan),
// as its executor would build them from the sampler's micro-batches (and gate choices) called
// in the step's order: per micro-batch, forward of every layer, then backward, last layer first.
StatusOr<std::vector<StepPlan>> BuildStepPlans(const SessionOptions& options,
                                               const MemoryPlan& memory, StepSampler& sampler,
                                               uint32_t steps);

// Steps simulated before the measured ones: the cache fills and the optimizer's backlog (at
// most the previous step's updates) reaches its steady state. ecss-bench step with --model
// warms up as many, so that it measures the steps the planner predicts.
inline constexpr uint32_t kWarmupSteps = 4;

// Runs `steps` steps of `session` on `backend` with the sampler's micro-batches (and gate
// choices), as a training loop calls it: per micro-batch Forward of every layer, then
// Backward of every layer, last first, on zero activations, and waits for the updates. The
// steps' inputs are drawn before the first step (Note [Inputs drawn ahead], planner.cc):
// CheckDrawnInputs' error where they would take more than 1 GiB.
// Returns each step's stats. With `window`: after the first `warmup` steps it also waits for
// their updates, and *window is the time from then until the last step's updates finished:
// the measured steps' whole work, updates that run on past a step included (what an ecss
// step leaves to the next is not left out of the last one's).
struct MeasuredWindow {
  uint32_t warmup = 0;
  double seconds = 0;
  // What the store's files moved in it (Session::nvme_io): the measured steps' updates and
  // fetches, whole.
  ExpertStore::IoBytes nvme;
};
StatusOr<std::vector<StepStats>> RunSampledSteps(Session& session, Backend& backend,
                                                 const SessionOptions& options,
                                                 StepSampler& sampler, uint32_t steps,
                                                 MeasuredWindow* window = nullptr);
// That RunSampledSteps may draw `steps` steps' inputs for these options and samples of
// `seq_len` tokens: InvalidArgument naming their bytes and the most steps that fit, for a
// caller to refuse before it builds anything.
Status CheckDrawnInputs(const SessionOptions& options, uint32_t seq_len, uint64_t steps);

struct TierUse {
  std::string tier;     // "device", "pinned", "host", "nvme"
  uint64_t bytes = 0;   // per device
  uint64_t budget = 0;  // per device
  uint64_t node_bytes = 0;
  uint64_t node_budget = 0;
};

struct StrategyPrediction {
  Strategy strategy = Strategy::kEcss;
  bool feasible = false;
  std::string why_not;  // when not feasible
  uint32_t cache_slots = 0;
  double step_seconds = 0;   // steady state, per device
  double begin_seconds = 0;  // of it, BeginStep's routing and planning (StepStats::begin_seconds)
  double tokens_per_s = 0;   // every device together
  double device_tokens_per_s = 0;
  StepMetrics metrics;                                 // steady-state steps summed (step_metrics.h)
  std::array<double, kPlanResources> busy_per_step{};  // per plan resource
  // The session's memory plan: its allocators' and, outside them, the heap's (MemoryTier).
  uint64_t device_bytes = 0, pinned_bytes = 0, host_bytes = 0, heap_bytes = 0;
  double dense_compute_seconds = 0;  // per step, inside the compute figures
  double network_seconds = 0;        // per step: the all-to-all between nodes (modelled only)
  uint64_t h2d_bytes = 0, d2h_bytes = 0, nvme_bytes = 0, updated_params = 0;  // per step
  // The last simulated step's plan, each op's start_s / end_s the simulator's (the format of
  // the executed plans ecss-bench step --dump-plan writes).
  StepPlan last_plan;
};

struct PlanReport {
  ModelConfig model;
  HardwareConfig hardware;
  WorkloadConfig workload;
  DeviceShard shard;
  uint32_t devices = 1;
  MemoryPlan memory;  // the workload's strategy's, per device
  uint64_t dense_device_bytes = 0;
  uint64_t nvme_bytes = 0;  // per device: the store's files and the checkpoints kept
  std::vector<TierUse> tiers;
  bool feasible = false;
  std::vector<std::string> short_of;            // "host memory: 1.2 TiB needed per node, 768 GiB"
  std::vector<std::string> suggestions;         // the smallest changes that fit
  std::vector<StrategyPrediction> predictions;  // the workload's strategy first
  double plan_seconds = 0;                      // what planning took here
  // --optimize: what was searched and why the workload is the one chosen (empty otherwise).
  std::vector<std::string> optimized;
};

// Which strategies a report predicts: the workload's and the three others (the comparison,
// ecss's ratio to each), or the workload's alone (about a quarter of the simulation; what
// plan-vs-run reads).
enum class Strategies { kEvery, kWorkloadOnly };

StatusOr<PlanReport> Plan(const ModelConfig& model, const HardwareConfig& hardware,
                          const WorkloadConfig& workload,
                          Strategies strategies = Strategies::kEvery);

// --optimize: the workload's strategy with each placement (weights pinned or on NVMe, master
// and moments in host memory or on NVMe) and micro-batch split (the step's tokens in 1, 2, 4
// or 8 micro-batches, of whole samples) that fits, simulated; the report of the fastest, with
// `optimized` saying what it changed and the bottleneck before and after. The prefetch window
// is left at every free cache slot: in the model a smaller window never helps (it saves no
// memory, the slots are the budget's). The candidates are simulated with the workload's strategy
// alone; `strategies` are the chosen one's.
StatusOr<PlanReport> Optimize(const ModelConfig& model, const HardwareConfig& hardware,
                              const WorkloadConfig& workload,
                              Strategies strategies = Strategies::kEvery);

// The report as JSON (the step bench's field names where they mean the same) and as a table.
void WriteJson(const PlanReport& report, JsonWriter& json);
std::string Table(const PlanReport& report, bool bars);

}  // namespace ecss::plan
