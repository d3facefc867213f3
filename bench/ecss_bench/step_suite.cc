// `ecss-bench step`: whole training steps through the session on the simulated device in
// timed mode (kernels take the cost model's time on a device profile; copies take the
// profile's host-link bandwidth; the engines keep the device's time, not the host's) with the
// real CPU optimizer, or on the device `--device` names (sim: the real CPU kernels; cuda:N: a
// GPU, whose engines' busy times are not recorded, so the figures that need them are null
// there), for a model proportioned like PanGu-Sigma and scaled to this machine: 40 domains,
// each step's samples from 4 of them, about 300M expert parameters, master weights and moments
// in host memory or on NVMe (--states). By default the device's expert cache holds a quarter
// of the experts (--cache-fraction; --device-mib sets the budget instead), so experts are
// streamed, not kept.
// --strategy all runs ecss, zero-offload (what DeepSpeed ZeRO-Offload does with an MoE model:
// the strongest thing a user could pick instead, built on the same engine), no-overlap and
// naive interleaved in one process, --rounds times each, and reports each one's figures and
// ecss's ratio to each (the median over rounds of the per-round ratio). bound_ratio and
// overlap_fraction (engine/step_metrics.h) say how close a step came to its bottleneck's speed.
// --routing gate replaces RRE with a learned gate's reactive routing: every token picks
// --gate-k experts of the whole layer at Forward (timed mode has no activations to run a real
// gate on, so the picks are pseudo-random, as an untrained gate's are), which is the baseline
// PanGu-Sigma's RRE is measured against: nothing can be fetched ahead, and the experts a step
// touches are not confined to its domains. --delayed-update 1 turns on the one-step delayed
// update (DPU; it changes the math, see session.h). --weights nvme (with --states nvme) keeps
// the compute weights on NVMe as well: every fetch reads them into pinned staging first. Each
// run's store lives in a directory of its own under --dir, removed after it (and by the next
// run when the run is killed: ScratchDir); its initial
// states are written at creation (untimed) into both shadow slots, so that the measured steps
// read every state from the disk and overwrite it as training past its first steps does
// (--initial-states unwritten: as a new session leaves them, read as their initial values
// without I/O until first updated, and first written into the files' holes). With
// states on NVMe the suite first checks that --dir has room for the store at its full size,
// measures the drive's read and write GB/s through the store's engine before and after every
// run, and reports each run's NVMe bound (read bytes / read GB/s + written bytes / write GB/s,
// the bytes the store's engines moved) and the fraction of it reached, and the bytes per
// updated parameter, expected and moved; where stores wrote into slots never stored before,
// also the bound with those bytes at the drive's first-write rate. Every run reports its peak RSS
// beside its budgets.
// --dump-plan FILE writes the plan the session executed for the last step (the session keeps the
// last few), with when each op ran (session.h, ExecutedPlan; written after the run's last
// Synchronize, so its updates have ended; one strategy only); --dump-plans FILE, those of
// every measured step the session keeps (the last 8: {"steps": [{"step", "plan"}, ...]}, in
// step order), to compare steps that differ. critical_path is the last step's
// (engine/step_metrics.h), by op kind.
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "engine/memory_plan.h"
#include "engine/plan_recorder.h"
#include "engine/session.h"
#include "offload/state_file.h"
#include "optimizer/optimizer_config.h"
#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/backend_factory.h"
#include "tools/plan/plan_config.h"
#include "tools/plan/planner.h"

namespace ecss::bench {

namespace {

struct StepConfig {
  std::vector<Strategy> strategies;  // one, or every strategy with --strategy all
  bool all = false;
  std::string device;
  DeviceProfile profile;
  uint64_t layers = 0, d_model = 0, d_ff = 0, domains = 0, experts = 0, per_step = 0;
  uint64_t samples = 0, seq = 0, micro_batches = 0, steps = 0, warmup = 0, threads = 0;
  uint64_t rounds = 0;
  uint64_t device_mib = 0;  // 0: the budget whose cache holds cache_fraction of the experts
  double cache_fraction = 0;
  std::string states, dir, weights, dump_plan, dump_plans;
  bool initial_states_written = true;  // --initial-states written (steady state) | unwritten
  bool gated = false;
  uint64_t gate_k = 0;
  bool delayed = false;
  DType gradient_dtype = DType::kF32;

  // --model/--hardware/--workload (tools/plan's files, ecss-plan's inputs): they define the
  // model (the device's share of it), the workload, the placements and the budgets; the
  // sessions' options are the planner's (plan::SessionOptionsFor).
  struct Planned {
    plan::ModelConfig model;
    plan::HardwareConfig hardware;
    plan::WorkloadConfig workload;
    plan::DeviceShard shard;
  };
  std::optional<Planned> planned;
  uint64_t seed = 17;          // the sampled steps
  double copy_latency_us = 0;  // the sim's copy engines

  uint64_t tokens() const { return samples * seq; }  // per micro-batch
  uint64_t measured_steps() const { return steps - warmup; }
};

// --strategy: one, or "all" (every strategy, ecss first).
StatusOr<std::vector<Strategy>> StrategiesOf(const std::string& name) {
  if (name == "all") {
    return std::vector<Strategy>{Strategy::kEcss, Strategy::kZeroOffload, Strategy::kNoOverlap,
                                 Strategy::kNaive};
  }
  ECSS_ASSIGN_OR_RETURN(Strategy one, ParseStrategy(name));
  return std::vector<Strategy>{one};
}

// --dump-plan and --dump-plans (one strategy's run: `c.all` set before), their paths checked.
Status ReadPlanDumps(BenchArgs& args, StepConfig& c) {
  ECSS_ASSIGN_OR_RETURN(c.dump_plan, args.String("dump-plan", ""));
  ECSS_ASSIGN_OR_RETURN(c.dump_plans, args.String("dump-plans", ""));
  if (c.all && !(c.dump_plan.empty() && c.dump_plans.empty())) {
    return InvalidArgumentError(StrCat(c.dump_plan.empty() ? "--dump-plans" : "--dump-plan",
                                       " needs one strategy, not --strategy all"));
  }
  // Written when the run ends: a path that cannot take the file is refused before the run.
  for (const auto& [flag, path] :
       {std::pair{"--dump-plan", &c.dump_plan}, std::pair{"--dump-plans", &c.dump_plans}}) {
    if (!path->empty())
      ECSS_RETURN_IF_ERROR(CheckFileWritable(*path).Annotate(StrCat(flag, " ", *path)));
  }
  return Status::Ok();
}

// The run's settings beside the planner's files: the strategy (default: the workload's; "all"),
// the device and how long to run. Every other setting comes from the files.
StatusOr<StepConfig> ParsePlannedConfig(BenchArgs& args, const std::string& model,
                                        const std::string& hardware, const std::string& workload) {
  if (model.empty() || hardware.empty()) {
    return InvalidArgumentError("--model and --hardware go together (--workload is optional)");
  }
  StepConfig::Planned p;
  ECSS_ASSIGN_OR_RETURN(p.model, plan::LoadModel(model));
  ECSS_ASSIGN_OR_RETURN(p.hardware, plan::LoadHardware(hardware));
  p.workload = plan::DefaultWorkloadFor(p.model);
  if (!workload.empty()) {
    ECSS_ASSIGN_OR_RETURN(p.workload, plan::LoadWorkload(workload));
  }
  ECSS_ASSIGN_OR_RETURN(p.shard, plan::ShardFor(p.model, p.hardware, p.workload));
  StepConfig c;
  ECSS_ASSIGN_OR_RETURN(std::string strategy,
                        args.String("strategy", std::string(StrategyName(p.workload.strategy))));
  ECSS_ASSIGN_OR_RETURN(c.device, args.String("device", "sim-timed"));
  // As the planner simulates: its warm-up steps, then the workload's.
  ECSS_ASSIGN_OR_RETURN(c.steps, args.Uint("steps", plan::kWarmupSteps + p.workload.steps));
  ECSS_ASSIGN_OR_RETURN(c.warmup, args.Uint("warmup", plan::kWarmupSteps));
  ECSS_ASSIGN_OR_RETURN(c.dir, args.String("dir", "."));
  c.all = strategy == "all";
  ECSS_RETURN_IF_ERROR(ReadPlanDumps(args, c));
  ECSS_ASSIGN_OR_RETURN(c.rounds, args.Uint("rounds", c.all ? 3 : 1));
  // Anything else (--layers, --profile, ...) is the files' to say: refused as unknown.
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed().Annotate("with --model, the files give the shapes"));
  ECSS_ASSIGN_OR_RETURN(c.strategies, StrategiesOf(strategy));
  if (c.steps <= c.warmup || c.rounds == 0) {
    return InvalidArgumentError("need steps > warmup and rounds > 0");
  }
  const plan::WorkloadConfig& w = p.workload;
  c.profile = p.hardware.device;
  c.layers = p.model.sparse_layers;
  c.d_model = p.model.d_model;
  c.d_ff = p.model.d_ff;
  c.domains = p.shard.model.domains.size();
  c.per_step = p.shard.domains_per_step;
  c.seq = w.seq_len;
  c.samples = w.tokens_per_micro_batch / w.seq_len;
  c.micro_batches = w.micro_batches;
  c.seed = w.seed;
  c.states = w.states == Tier::kNvme ? "nvme" : "host";
  c.weights = w.weights == Tier::kNvme ? "nvme" : "pinned";
  c.gated = p.model.routing == Routing::kLearnedGate;
  c.gate_k = p.shard.gate_k;
  c.gradient_dtype = p.model.gradient_dtype;
  c.threads = std::max<uint32_t>(1, p.hardware.optimizer_threads / p.hardware.devices_per_node);
  c.copy_latency_us = p.hardware.copy_latency_us;
  c.planned = std::move(p);
  return c;
}

StatusOr<StepConfig> ParseConfig(BenchArgs& args) {
  ECSS_ASSIGN_OR_RETURN(std::string model, args.String("model", ""));
  ECSS_ASSIGN_OR_RETURN(std::string hardware, args.String("hardware", ""));
  ECSS_ASSIGN_OR_RETURN(std::string workload, args.String("workload", ""));
  if (!model.empty() || !hardware.empty() || !workload.empty()) {
    return ParsePlannedConfig(args, model, hardware, workload);
  }
  StepConfig c;
  ECSS_ASSIGN_OR_RETURN(std::string strategy, args.String("strategy", "ecss"));
  ECSS_ASSIGN_OR_RETURN(c.device, args.String("device", "sim-timed"));
  ECSS_ASSIGN_OR_RETURN(c.layers, args.Uint("layers", 4));
  ECSS_ASSIGN_OR_RETURN(c.d_model, args.Uint("d-model", 512));
  ECSS_ASSIGN_OR_RETURN(c.d_ff, args.Uint("d-ff", 1024));
  ECSS_ASSIGN_OR_RETURN(c.domains, args.Uint("domains", 40));
  ECSS_ASSIGN_OR_RETURN(c.experts, args.Uint("experts-per-domain", 2));
  ECSS_ASSIGN_OR_RETURN(c.per_step, args.Uint("domains-per-step", 4));
  ECSS_ASSIGN_OR_RETURN(c.samples, args.Uint("samples", 8));
  ECSS_ASSIGN_OR_RETURN(c.seq, args.Uint("seq-len", 256));
  ECSS_ASSIGN_OR_RETURN(c.micro_batches, args.Uint("micro-batches", 1));
  ECSS_ASSIGN_OR_RETURN(c.steps, args.Uint("steps", 6));
  ECSS_ASSIGN_OR_RETURN(c.warmup, args.Uint("warmup", 2));
  ECSS_ASSIGN_OR_RETURN(c.threads, args.Uint("optimizer-threads", 1));
  ECSS_ASSIGN_OR_RETURN(c.device_mib, args.Uint("device-mib", 0));
  ECSS_ASSIGN_OR_RETURN(c.cache_fraction, args.Double("cache-fraction", 0.25));
  ECSS_ASSIGN_OR_RETURN(std::string profile_name, args.String("profile", "h100-sxm"));
  ECSS_ASSIGN_OR_RETURN(c.states, args.String("states", "host"));
  ECSS_ASSIGN_OR_RETURN(c.dir, args.String("dir", "."));
  ECSS_ASSIGN_OR_RETURN(std::string routing, args.String("routing", "rre"));
  ECSS_ASSIGN_OR_RETURN(c.gate_k, args.Uint("gate-k", 2));
  ECSS_ASSIGN_OR_RETURN(uint64_t delayed, args.Uint("delayed-update", 0));
  ECSS_ASSIGN_OR_RETURN(c.weights, args.String("weights", "pinned"));
  ECSS_ASSIGN_OR_RETURN(std::string gradients, args.String("gradient-dtype", "f32"));
  ECSS_ASSIGN_OR_RETURN(std::string initial_states, args.String("initial-states", "written"));
  c.all = strategy == "all";
  ECSS_RETURN_IF_ERROR(ReadPlanDumps(args, c));
  ECSS_ASSIGN_OR_RETURN(c.rounds, args.Uint("rounds", c.all ? 3 : 1));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  ECSS_ASSIGN_OR_RETURN(c.strategies, StrategiesOf(strategy));
  if (c.states != "host" && c.states != "nvme") {
    return InvalidArgumentError(StrCat("--states '", c.states, "': host or nvme"));
  }
  if (c.weights != "pinned" && (c.weights != "nvme" || c.states != "nvme")) {
    return InvalidArgumentError(
        StrCat("--weights '", c.weights, "': pinned, or nvme (with --states nvme)"));
  }
  if (routing != "rre" && routing != "gate") {
    return InvalidArgumentError(StrCat("--routing '", routing, "': rre or gate"));
  }
  if (initial_states != "written" && initial_states != "unwritten") {
    return InvalidArgumentError(
        StrCat("--initial-states '", initial_states, "': written or unwritten"));
  }
  c.initial_states_written = initial_states == "written";
  c.gated = routing == "gate";
  if (c.gated && (c.gate_k == 0 || c.gate_k > c.domains * c.experts)) {
    return InvalidArgumentError(StrCat("--gate-k ", c.gate_k, ": 1 to the experts of a layer"));
  }
  if (delayed > 1) return InvalidArgumentError("--delayed-update: 0 or 1");
  if (gradients != "f32" && gradients != "bf16") {
    return InvalidArgumentError(StrCat("--gradient-dtype '", gradients, "': f32 or bf16"));
  }
  c.gradient_dtype = gradients == "bf16" ? DType::kBF16 : DType::kF32;
  c.delayed = delayed == 1;
  ECSS_ASSIGN_OR_RETURN(c.profile, FindDeviceProfile(profile_name));
  if (c.layers == 0 || c.d_model == 0 || c.d_ff == 0 || c.domains == 0 || c.experts == 0 ||
      c.per_step == 0 || c.per_step > c.domains || c.samples == 0 || c.seq == 0 ||
      c.micro_batches == 0 || c.steps <= c.warmup || c.threads == 0 || c.rounds == 0) {
    return InvalidArgumentError(
        "need positive sizes, micro-batches, rounds, domains-per-step <= domains and "
        "steps > warmup");
  }
  if (!(c.cache_fraction > 0 && c.cache_fraction <= 1)) {
    return InvalidArgumentError(StrCat("--cache-fraction ", c.cache_fraction, ": in (0, 1]"));
  }
  return c;
}

// The session's options for one strategy (the device budget still to set, unless planned).
StatusOr<SessionOptions> OptionsFor(const StepConfig& c, Strategy strategy) {
  if (c.planned) {
    const StepConfig::Planned& p = *c.planned;
    ECSS_ASSIGN_OR_RETURN(
        SessionOptions options,
        plan::SessionOptionsFor(p.shard, p.model, p.hardware, p.workload, strategy));
    options.record_op_times = true;
    options.placement.write_initial_states =
        options.placement.states_on_nvme() && c.initial_states_written;
    return options;
  }
  SessionOptions options;
  options.device_profile = c.profile;  // the kernels' modelled time, as the engines' bandwidth
  options.model.layers = static_cast<uint32_t>(c.layers);
  options.model.d_model = static_cast<uint32_t>(c.d_model);
  options.model.d_ff = static_cast<uint32_t>(c.d_ff);
  options.model.dtype = DType::kBF16;
  options.model.vocab = 50257;
  for (uint64_t d = 0; d < c.domains; ++d) {
    options.model.domains.push_back({StrCat("domain", d), static_cast<uint32_t>(c.experts)});
  }
  options.strategy = strategy;
  options.limits.max_tokens_per_micro_batch = static_cast<uint32_t>(c.tokens());
  options.limits.max_micro_batches = static_cast<uint32_t>(c.micro_batches);
  options.limits.max_active_experts_per_layer = static_cast<uint32_t>(c.per_step * c.experts);
  if (c.gated) {
    options.routing = Routing::kLearnedGate;
    options.gate_k = static_cast<uint32_t>(c.gate_k);
    options.limits.max_active_experts_per_layer = static_cast<uint32_t>(c.domains * c.experts);
  }
  options.optimizer.threads = static_cast<int>(c.threads);
  // Updates start as each gradient arrives (no clipping or overflow check needs the step).
  options.optimizer.skip_step_on_nonfinite = false;
  options.record_op_times = true;  // the executed plan: the critical path, --dump-plan
  options.delayed_update = c.delayed;
  options.gradient_dtype = c.gradient_dtype;
  if (c.states == "nvme") {
    options.placement.master = options.placement.moments = Tier::kNvme;
    if (c.weights == "nvme") options.placement.weights = Tier::kNvme;
    options.placement.write_initial_states = c.initial_states_written;
  }
  return options;
}

// The device budget of a strategy's session: --device-mib, or the one whose expert cache holds
// cache_fraction of the experts (at least what a step needs). Planned on `backend`'s rules.
StatusOr<uint64_t> DeviceBudget(const StepConfig& c, Backend& backend, Strategy strategy) {
  if (c.device_mib > 0) return c.device_mib << 20;
  ECSS_ASSIGN_OR_RETURN(SessionOptions options, OptionsFor(c, strategy));
  if (c.planned) return options.budgets.device_bytes;  // the workload's
  options.budgets.device_bytes = uint64_t{1} << 50;    // room for every expert: plan, then size
  if (c.states == "nvme") options.placement.nvme_dirs = {c.dir};
  ECSS_ASSIGN_OR_RETURN(MemoryPlan plan, Session::PlanMemoryOn(backend, options));
  uint64_t experts = 0;
  for (uint32_t n : options.ExpertsPerLayer()) experts += n;
  const auto slots = static_cast<uint32_t>(std::max<uint64_t>(
      plan.max_groups, static_cast<uint64_t>(c.cache_fraction * static_cast<double>(experts))));
  return plan.DeviceBudgetFor(slots);
}

// A size field of /proc/self/status ("VmHWM:", the peak resident set; "VmRSS:", the resident
// set now); 0 where there is none.
uint64_t StatusBytes(std::string_view field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with(field)) {
      return std::strtoull(line.c_str() + field.size(), nullptr, 10) << 10;
    }
  }
  return 0;
}

// What the measured steps of one or more runs of a strategy did, summed.
struct StrategyRun {
  Strategy strategy = Strategy::kEcss;
  uint64_t experts = 0, expert_params = 0, cache_slots = 0, device_budget = 0;
  uint64_t steps = 0, tokens = 0, h2d_bytes = 0, d2h_bytes = 0, nvme_bytes = 0, updated = 0;
  // What the store's engines moved in the measured window (MeasuredWindow::nvme: the measured
  // steps' updates and fetches, whole), and of the writes, those into slots never stored
  // before.
  uint64_t nvme_read_bytes = 0, nvme_written_bytes = 0, nvme_fresh_written_bytes = 0;
  // What the placement makes an update and a fetch move on NVMe (0 with host states): per
  // updated parameter, the optimizer's states read and written, the weights written; per
  // expert fetched (a cache miss), its weights read.
  uint64_t state_bytes_per_param = 0, weight_bytes_per_param = 0, fetch_bytes = 0;
  uint64_t hits = 0, misses = 0;
  double seconds = 0, stalls = 0;
  double begin_seconds = 0;  // the steps' BeginStep work (StepStats::begin_seconds)
  std::vector<StepMetrics> metrics;
  std::vector<PathShare> critical_path;  // of the last step of the first run
  // The memory it took: the device memory the session holds (all of it allocated at
  // creation), its pinned and host allocators' peaks and what its plan keeps in the heap
  // (the RRE tables, and the micro-batches' plans and token ids), of it the tables; the
  // process's peak resident set (VmHWM) after it, which covers the runs
  // before it too (the simulated device's memory is host memory), and its resident set
  // before any session (the program and its libraries: the fixed overhead; a GPU's context
  // comes later, on top of it).
  uint64_t device_bytes = 0, pinned_peak_bytes = 0, host_peak_bytes = 0, heap_bytes = 0;
  uint64_t routing_tables_bytes = 0;
  uint64_t peak_rss_bytes = 0, start_rss_bytes = 0;
  uint64_t planned_bytes() const {
    return device_bytes + pinned_peak_bytes + host_peak_bytes + heap_bytes;
  }

  double tokens_per_s() const { return static_cast<double>(tokens) / seconds; }
  void Add(const StrategyRun& other) {
    steps += other.steps;
    tokens += other.tokens;
    h2d_bytes += other.h2d_bytes;
    d2h_bytes += other.d2h_bytes;
    nvme_bytes += other.nvme_bytes;
    nvme_read_bytes += other.nvme_read_bytes;
    nvme_written_bytes += other.nvme_written_bytes;
    nvme_fresh_written_bytes += other.nvme_fresh_written_bytes;
    updated += other.updated;
    hits += other.hits;
    misses += other.misses;
    seconds += other.seconds;
    stalls += other.stalls;
    begin_seconds += other.begin_seconds;
    device_bytes = std::max(device_bytes, other.device_bytes);
    pinned_peak_bytes = std::max(pinned_peak_bytes, other.pinned_peak_bytes);
    host_peak_bytes = std::max(host_peak_bytes, other.host_peak_bytes);
    heap_bytes = std::max(heap_bytes, other.heap_bytes);
    routing_tables_bytes = std::max(routing_tables_bytes, other.routing_tables_bytes);
    peak_rss_bytes = std::max(peak_rss_bytes, other.peak_rss_bytes);
    start_rss_bytes = std::max(start_rss_bytes, other.start_rss_bytes);
    metrics.insert(metrics.end(), other.metrics.begin(), other.metrics.end());
  }
};

// The directories the runs' stores live in: kStorePrefix + pid + digits under --dir (ScratchDir).
constexpr std::string_view kStorePrefix = "ecss-bench-store.";

// One run of a strategy: a session of its own (its store in a directory of its own), warm-up
// steps, then the measured ones.
StatusOr<StrategyRun> RunStrategy(const StepConfig& c, Backend& backend, Strategy strategy,
                                  uint64_t device_budget) {
  ECSS_ASSIGN_OR_RETURN(SessionOptions options, OptionsFor(c, strategy));
  options.budgets.device_bytes = device_budget;
  std::optional<ScratchDir> store_dir;  // the session's expert store, removed after the run
  if (c.states == "nvme") {
    ECSS_ASSIGN_OR_RETURN(ScratchDir made, ScratchDir::Create(c.dir, kStorePrefix));
    store_dir.emplace(std::move(made));
    options.placement.nvme_dirs = {store_dir->path()};
  }
  const uint64_t device_before = backend.device_memory().stats().used_bytes;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Create(backend, options));
  StrategyRun run;
  run.strategy = strategy;
  run.device_budget = device_budget;
  run.cache_slots = session->cache_slots();
  run.device_bytes = backend.device_memory().stats().used_bytes - device_before;
  for (uint32_t l = 0; l < c.layers; ++l) run.experts += session->experts_in_layer(l);
  run.expert_params = run.experts * session->expert_params();
  if (options.placement.states_on_nvme()) {
    run.state_bytes_per_param =
        2 * 4 * (1 + static_cast<uint64_t>(StateArrays(options.optimizer.kind)));
  }
  if (options.placement.weights_on_nvme()) {
    run.weight_bytes_per_param = DTypeSize(options.model.dtype);
    run.fetch_bytes = session->expert_params() * run.weight_bytes_per_param;
  }

  // Every strategy sees the same steps, and so does the planner (the same sampler). Where
  // kernels compute, they compute on zeros (the time of a matrix product does not depend on
  // its values, and uninitialised memory could hold NaNs).
  plan::StepSampler sampler(options, static_cast<uint32_t>(c.per_step),
                            static_cast<uint32_t>(c.seq), c.seed);
  // The measured steps' time: from the warm-up's updates finished to the last step's (a step
  // whose updates run on into the next must not leave the last one's out, nor inherit the
  // warm-up's).
  plan::MeasuredWindow window;
  window.warmup = static_cast<uint32_t>(c.warmup);
  ECSS_ASSIGN_OR_RETURN(const std::vector<StepStats> stats,
                        plan::RunSampledSteps(*session, backend, options, sampler,
                                              static_cast<uint32_t>(c.steps), &window));
  for (uint64_t step = c.warmup; step < stats.size(); ++step) {
    const StepStats& s = stats[step];
    ++run.steps;
    run.metrics.push_back(s.metrics);
    run.stalls += s.stalls.total();
    run.begin_seconds += s.begin_seconds;
    run.tokens += s.tokens;
    run.h2d_bytes += s.h2d_bytes;
    run.d2h_bytes += s.d2h_bytes;
    run.nvme_bytes += s.nvme_bytes;
    run.updated += s.updated_params;
    run.hits += s.cache_hits;
    run.misses += s.cache_misses;
  }
  run.seconds = window.seconds;
  run.nvme_read_bytes = window.nvme.read;
  run.nvme_written_bytes = window.nvme.written;
  run.nvme_fresh_written_bytes = window.nvme.fresh_written;
  run.pinned_peak_bytes = session->host_memory_peaks().pinned_bytes;
  run.host_peak_bytes = session->host_memory_peaks().host_bytes;
  run.heap_bytes = session->memory_plan().Total(MemoryTier::kHeap);
  const MemoryItem* tables = session->memory_plan().Find("RRE routing tables");
  run.routing_tables_bytes = tables != nullptr ? tables->total() : 0;
  run.peak_rss_bytes = StatusBytes("VmHWM:");
  ECSS_ASSIGN_OR_RETURN(StepPlan plan, session->ExecutedPlan(stats.back().step));
  run.critical_path = CriticalPath(plan);
  if (!c.dump_plan.empty()) {
    JsonWriter plan_json;
    plan.WriteJson(plan_json);
    ECSS_RETURN_IF_ERROR(WriteFileAtomically(c.dump_plan, plan_json.str() + "\n")
                             .Annotate(StrCat("--dump-plan ", c.dump_plan)));
  }
  if (!c.dump_plans.empty()) {  // every measured step whose plan the session keeps
    JsonWriter plans_json;
    plans_json.BeginObject().Key("steps").BeginArray();
    const size_t kept = std::min<size_t>(stats.size() - c.warmup, PlanRecorder::kKeptSteps);
    for (size_t s = stats.size() - kept; s < stats.size(); ++s) {
      ECSS_ASSIGN_OR_RETURN(const StepPlan executed, session->ExecutedPlan(stats[s].step));
      plans_json.BeginObject().Field("step", uint64_t{stats[s].step}).Key("plan");
      executed.WriteJson(plans_json);
      plans_json.EndObject();
    }
    plans_json.EndArray().EndObject();
    ECSS_RETURN_IF_ERROR(WriteFileAtomically(c.dump_plans, plans_json.str() + "\n")
                             .Annotate(StrCat("--dump-plans ", c.dump_plans)));
  }
  return run;
}

// With states on NVMe: the NVMe bound of a step, read bytes / read GB/s + written bytes /
// write GB/s, where the bytes are what the placement requires of the step's updates and
// fetches (so redundant I/O cannot raise the bound) and the rates are measured through the
// same engine in the same run; the fraction of it a step reached; and the bytes per updated
// parameter, required and as the store's engines moved them in the measured window (headers
// and 4 KiB padding too; the window begins and ends with every update finished, so it holds
// the measured steps' updates whole, which per-step counts split by time). And the same bound with
// the share of the written bytes that went into slots never stored before (a new store's first
// writes) at the rate of such writes, which is lower on file systems that allocate as they write
// (ext4): what the drive allows a run that is still filling its store.
struct NvmeFigures {
  double read_per_step = 0, written_per_step = 0, bound_seconds = 0, fraction = 0;
  double required_per_param = 0, moved_per_param = 0;
  double fresh_share = 0, fresh_bound_seconds = 0, fresh_fraction = 0;
};
NvmeFigures NvmeFiguresOf(const StrategyRun& run, const SequentialRates& rates) {
  const auto steps = static_cast<double>(run.steps);
  const auto updated = static_cast<double>(run.updated);
  const auto state = static_cast<double>(run.state_bytes_per_param) / 2;  // each way
  NvmeFigures f;
  f.read_per_step = (updated * state + static_cast<double>(run.misses * run.fetch_bytes)) / steps;
  f.written_per_step = updated * (state + static_cast<double>(run.weight_bytes_per_param)) / steps;
  f.bound_seconds =
      f.read_per_step / (rates.read_gbps * 1e9) + f.written_per_step / (rates.write_gbps * 1e9);
  f.fraction = f.bound_seconds / (run.seconds / steps);
  f.required_per_param = (f.read_per_step + f.written_per_step) * steps / std::max(updated, 1.0);
  f.moved_per_param =
      static_cast<double>(run.nvme_read_bytes + run.nvme_written_bytes) / std::max(updated, 1.0);
  f.fresh_share = static_cast<double>(run.nvme_fresh_written_bytes) /
                  std::max(static_cast<double>(run.nvme_written_bytes), 1.0);
  f.fresh_bound_seconds = f.bound_seconds;
  if (f.fresh_share > 0) {
    f.fresh_bound_seconds += f.written_per_step * f.fresh_share *
                             (1 / (rates.fresh_write_gbps * 1e9) - 1 / (rates.write_gbps * 1e9));
  }
  f.fresh_fraction = f.fresh_bound_seconds / (run.seconds / steps);
  return f;
}

void WriteNvmeFigures(JsonWriter& json, const StrategyRun& run, const SequentialRates& rates) {
  const NvmeFigures f = NvmeFiguresOf(run, rates);
  json.Key("nvme")
      .BeginObject()
      .Field("read_gbps", rates.read_gbps)
      .Field("write_gbps", rates.write_gbps)
      .Field("fresh_write_gbps", rates.fresh_write_gbps)
      .Field("required_read_bytes_per_step", f.read_per_step)
      .Field("required_written_bytes_per_step", f.written_per_step)
      .Field("moved_read_bytes_per_step",
             static_cast<double>(run.nvme_read_bytes) / static_cast<double>(run.steps))
      .Field("moved_written_bytes_per_step",
             static_cast<double>(run.nvme_written_bytes) / static_cast<double>(run.steps))
      .Field("bound_seconds_per_step", f.bound_seconds)
      .Field("fraction_of_nvme_bound", f.fraction)
      .Field("fresh_written_share", f.fresh_share)
      .Field("fresh_bound_seconds_per_step", f.fresh_bound_seconds)
      .Field("fraction_of_fresh_nvme_bound", f.fresh_fraction)
      .Field("required_bytes_per_updated_param", f.required_per_param)
      .Field("moved_bytes_per_updated_param", f.moved_per_param)
      .Field("reference",
             "bound = read bytes / read GB/s + written bytes / write GB/s: the bytes the "
             "placement requires of the step's updates and fetches, the rates measured through "
             "the same engine in this run (write: an overwrite); fresh bound: the written bytes' "
             "fresh_written_share (into slots never stored before) at fresh_write_gbps (a "
             "sparse file's first write)")
      .EndObject();
}

// A run's figures, per measured step. Where the device's engines keep no busy time (CUDA),
// what needs it is null, not 0.
void WriteFigures(JsonWriter& json, const StrategyRun& run, bool on_sim,
                  const std::optional<SequentialRates>& rates) {
  if (rates) WriteNvmeFigures(json, run, *rates);
  const double unknown = std::numeric_limits<double>::quiet_NaN();  // written as null
  const double steps = static_cast<double>(run.steps);
  const StepMetrics metrics = SumStepMetrics(run.metrics);
  auto per_step = [&](uint64_t value) {
    return static_cast<uint64_t>(static_cast<double>(value) / steps);
  };
  json.Field("strategy", StrategyName(run.strategy))
      .Field("tokens_per_s", run.tokens_per_s())
      .Field("step_seconds", run.seconds / steps)
      .Field("begin_seconds_per_step", run.begin_seconds / steps)
      .Field("bound_ratio", on_sim ? metrics.bound_ratio : unknown)
      .Field("overlap_fraction",
             on_sim && metrics.overlap_fraction ? *metrics.overlap_fraction : unknown)
      .Field("overlap_denominator_seconds_per_step",
             on_sim ? metrics.overlap_denominator_seconds / steps : unknown)
      .Key("bottleneck");
  if (on_sim) {
    json.String(metrics.bottleneck);
  } else {
    json.Null();
  }
  json.Key("resources").BeginObject();
  for (const ResourceUse& use : metrics.resources) {
    json.Key(use.name)
        .BeginObject()
        .Field("busy_seconds_per_step", use.busy_seconds / steps)
        .Field("exposed_seconds_per_step", use.exposed_seconds / steps)
        .EndObject();
  }
  json.EndObject()
      .Field("stall_fraction", run.stalls / run.seconds)
      .Field("h2d_bytes", per_step(run.h2d_bytes))
      .Field("d2h_bytes", per_step(run.d2h_bytes))
      .Field("nvme_bytes", per_step(run.nvme_bytes))
      .Field("updated_params", per_step(run.updated))
      .Field("hit_rate",
             run.hits + run.misses ? static_cast<double>(run.hits) / (run.hits + run.misses) : 0.0)
      .Field("cache_slots", run.cache_slots)
      .Field("fraction_of_experts_on_device",
             static_cast<double>(run.cache_slots) / static_cast<double>(run.experts))
      .Field("device_budget_bytes", run.device_budget)
      .Key("memory")
      .BeginObject()
      .Field("device_bytes", run.device_bytes)
      .Field("pinned_bytes", run.pinned_peak_bytes)
      .Field("host_bytes", run.host_peak_bytes)
      .Field("heap_bytes", run.heap_bytes)
      .Field("routing_tables_bytes", run.routing_tables_bytes)
      .Field("peak_rss_bytes", run.peak_rss_bytes)
      .Field("start_rss_bytes", run.start_rss_bytes)
      .EndObject()
      .Key("critical_path")
      .BeginArray();
  for (const PathShare& each : run.critical_path) {
    json.BeginObject().Field("kind", each.kind).Field("share", each.share).EndObject();
  }
  json.EndArray();
}

void WriteNvmeRow(std::ostream& table, const StrategyRun& run, const SequentialRates& rates) {
  const NvmeFigures f = NvmeFiguresOf(run, rates);
  table << std::setprecision(2) << "  " << std::left << std::setw(13) << "" << std::right
        << "nvme per step: " << HumanBytes(static_cast<uint64_t>(f.read_per_step)) << " read, "
        << HumanBytes(static_cast<uint64_t>(f.written_per_step)) << " written; bound "
        << f.bound_seconds << " s at " << rates.read_gbps << " / " << rates.write_gbps
        << " GB/s: " << f.fraction << " of it; per updated parameter " << f.required_per_param
        << " B required, " << f.moved_per_param << " B moved\n";
  if (f.fresh_share > 0) {
    table << "  " << std::setw(13) << ""
          << "of the writes " << f.fresh_share << " into slots never stored before, which write at "
          << rates.fresh_write_gbps << " GB/s: bound " << f.fresh_bound_seconds << " s, "
          << f.fresh_fraction << " of it\n";
  }
}

void WriteRow(std::ostream& table, const StrategyRun& run, bool on_sim) {
  const double steps = static_cast<double>(run.steps);
  const StepMetrics metrics = SumStepMetrics(run.metrics);
  table << "  " << std::left << std::setw(13) << StrategyName(run.strategy) << std::right
        << std::fixed << std::setprecision(0) << std::setw(10) << run.tokens_per_s()
        << std::setprecision(4) << std::setw(10) << run.seconds / steps << std::setprecision(3);
  if (on_sim) {
    table << std::setw(8) << metrics.bound_ratio << std::setw(10)
          << (metrics.overlap_fraction ? StrCat(*metrics.overlap_fraction) : std::string("n/a"))
          << "  " << std::left << std::setw(10) << metrics.bottleneck << std::right;
  } else {
    table << std::setw(8) << "n/a" << std::setw(10) << "n/a"
          << "  " << std::left << std::setw(10) << "n/a" << std::right;
  }
  table << "  h2d " << HumanBytes(static_cast<uint64_t>(static_cast<double>(run.h2d_bytes) / steps))
        << ", d2h " << HumanBytes(static_cast<uint64_t>(static_cast<double>(run.d2h_bytes) / steps))
        << ", nvme "
        << HumanBytes(static_cast<uint64_t>(static_cast<double>(run.nvme_bytes) / steps))
        << "; memory " << HumanBytes(run.planned_bytes()) << ", peak RSS "
        << HumanBytes(run.peak_rss_bytes) << " (" << HumanBytes(run.start_rss_bytes)
        << " at start)\n";
}

// States on NVMe: refuses a --dir without room for the largest run's store at its full size
// (and the rate measurement's file); returns one state array's bytes (the store's requests).
StatusOr<size_t> CheckNvmeRoom(const StepConfig& c, Backend& backend,
                               const std::map<Strategy, uint64_t>& budgets) {
  uint64_t need = 0;
  size_t block = 0;
  for (Strategy strategy : c.strategies) {
    ECSS_ASSIGN_OR_RETURN(SessionOptions options, OptionsFor(c, strategy));
    options.budgets.device_bytes = budgets.at(strategy);
    options.placement.nvme_dirs = {c.dir};  // a directory of its own under it, in the run
    ECSS_ASSIGN_OR_RETURN(const MemoryPlan plan, Session::PlanMemoryOn(backend, options));
    need = std::max(need, plan.nvme_bytes);
    block = StateArrayBytes(plan.params);
  }
  ScratchDir::RemoveLeftovers(c.dir, kStorePrefix);  // a killed run's store is no one's
  ECSS_RETURN_IF_ERROR(
      CheckDirHasRoom(c.dir, c.dir, need + (uint64_t{1} << 30),
                      StrCat("a run's expert store takes ", HumanBytes(need),
                             " once every expert is written (shadow slots included), and the rate "
                             "measurement 1 GiB: choose a smaller model or another --dir")));
  return block;
}

}  // namespace

Status RunStepSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  // The resident set before the suite made anything: the program and the libraries it loaded
  // (not a device context, which comes with the backend).
  const uint64_t start_rss_bytes = StatusBytes("VmRSS:");
  ECSS_ASSIGN_OR_RETURN(StepConfig c, ParseConfig(args));
  {  // the steps' inputs, drawn before the first step: refused before anything is built
    ECSS_ASSIGN_OR_RETURN(const SessionOptions options, OptionsFor(c, c.strategies.front()));
    ECSS_RETURN_IF_ERROR(plan::CheckDrawnInputs(options, static_cast<uint32_t>(c.seq), c.steps)
                             .Annotate(StrCat("--steps ", c.steps)));
  }
  ECSS_ASSIGN_OR_RETURN(BackendOptions backend_options, ParseDeviceSetting(c.device));
  backend_options.sim.h2d_bandwidth_gbps = c.profile.h2d_bandwidth_gbps;
  backend_options.sim.d2h_bandwidth_gbps = c.profile.d2h_bandwidth_gbps;
  backend_options.sim.copy_latency_us = c.copy_latency_us;
  // Only the sim keeps its engines' busy times (and paces copies at the profile's bandwidth).
  const bool on_sim = backend_options.kind == BackendKind::kSim;
  auto create = [&](uint64_t bytes) -> StatusOr<std::unique_ptr<Backend>> {
    backend_options.sim.device_memory_bytes = bytes;
    backend_options.cuda.device_memory_bytes = bytes;
    StatusOr<std::unique_ptr<Backend>> created = CreateBackend(backend_options);
    if (!created.ok()) return created.status().Annotate(StrCat("--device ", c.device));
    return created;
  };
  // Each strategy's budget, planned on a small backend of the same kind (its allocation
  // rules); then the backend that holds the largest and the activations.
  std::map<Strategy, uint64_t> budgets;
  uint64_t largest = 0;
  {
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> probe, create(uint64_t{64} << 20));
    for (Strategy strategy : c.strategies) {
      ECSS_ASSIGN_OR_RETURN(budgets[strategy], DeviceBudget(c, *probe, strategy));
      largest = std::max(largest, budgets[strategy]);
    }
  }
  const uint64_t activations = 2 * c.tokens() * c.d_model * 2;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                        create(largest + activations + (uint64_t{16} << 20)));
  // States on NVMe: the store must fit --dir, and the drive's rates are measured around every
  // run (the same engine, the store's requests: one state array each).
  std::optional<SequentialRates> rates;
  std::vector<double> read_gbps, write_gbps, fresh_write_gbps;
  size_t rate_block = 0;
  if (c.states == "nvme") {
    ECSS_ASSIGN_OR_RETURN(rate_block, CheckNvmeRoom(c, *backend, budgets));
  }
  auto measure_rates = [&]() -> Status {
    if (rate_block == 0) return Status::Ok();
    // Through the engine the store makes (CreateIoEngine's default factory: queue depth 8),
    // in requests of one state array each.
    IoEngineOptions io;
    io.queue_depth = 8;
    ECSS_ASSIGN_OR_RETURN(const SequentialRates r,
                          MeasureSequentialRates(c.dir + "/ecss-bench-rates.dat", io, rate_block,
                                                 uint64_t{1} << 30, 2));
    read_gbps.push_back(r.read_gbps);
    write_gbps.push_back(r.write_gbps);
    fresh_write_gbps.push_back(r.fresh_write_gbps);
    return Status::Ok();
  };
  ECSS_RETURN_IF_ERROR(measure_rates());

  // Interleaved: round r runs every strategy once, in turn.
  std::map<Strategy, StrategyRun> runs;
  std::map<Strategy, std::vector<double>> ratios;  // ecss / strategy, per round
  for (uint64_t round = 0; round < c.rounds; ++round) {
    std::map<Strategy, double> tokens_per_s;
    for (Strategy strategy : c.strategies) {
      ECSS_ASSIGN_OR_RETURN(StrategyRun run, RunStrategy(c, *backend, strategy, budgets[strategy]));
      run.start_rss_bytes = start_rss_bytes;
      ECSS_RETURN_IF_ERROR(measure_rates());
      tokens_per_s[strategy] = run.tokens_per_s();
      if (round == 0) {
        runs[strategy] = run;
      } else {
        runs[strategy].Add(run);
      }
    }
    if (c.all) {
      for (Strategy strategy : c.strategies) {
        ratios[strategy].push_back(tokens_per_s[Strategy::kEcss] / tokens_per_s[strategy]);
      }
    }
  }

  if (!read_gbps.empty()) {
    rates = SequentialRates{Median(read_gbps), Median(write_gbps), Median(fresh_write_gbps)};
  }
  const StrategyRun& first = runs[c.strategies.front()];
  json.Field("routing", c.gated ? "gate (reactive)" : "rre")
      .Field("delayed_update", c.delayed)
      .Field("device", c.device)
      .Field("profile", on_sim ? c.profile.name : "")
      .Field("layers", c.layers)
      .Field("domains", c.domains)
      .Field("domains_per_step", c.per_step)
      .Field("experts", first.experts)
      .Field("expert_params", first.expert_params)
      .Field("micro_batches", c.micro_batches)
      .Field("tokens_per_step", c.tokens() * c.micro_batches)
      .Field("states_placement", c.states)
      .Field("weights_placement", c.weights)
      .Field("optimizer_threads", c.threads)
      .Field("gradient_dtype", DTypeName(c.gradient_dtype))
      .Field("rounds", c.rounds)
      .Field("measured_steps_per_round", c.measured_steps());
  if (!c.all) {
    WriteFigures(json, first, on_sim, rates);
  } else {
    json.Key("strategies").BeginArray();
    for (Strategy strategy : c.strategies) {
      json.BeginObject();
      WriteFigures(json, runs[strategy], on_sim, rates);
      json.EndObject();
    }
    json.EndArray().Key("ecss_vs").BeginObject();
    for (Strategy strategy : c.strategies) {
      if (strategy != Strategy::kEcss) json.Field(StrategyName(strategy), Median(ratios[strategy]));
    }
    json.EndObject();
  }
  json.Field("reference",
             c.all ? "every strategy interleaved in this process, round by round; ecss_vs: the "
                     "median over rounds of ecss's tokens/s over the strategy's"
                   : "run with --strategy all for every strategy interleaved and ecss's ratios");

  table << "step suite: " << first.experts << " experts (" << first.cache_slots
        << " fit the device cache), " << first.expert_params / 1000000 << "M expert params, "
        << c.domains << " domains (" << c.per_step << " per step), " << c.tokens() * c.micro_batches
        << " tokens/step in " << c.micro_batches << " micro-batch(es), " << c.device
        << (on_sim ? StrCat(" ", c.profile.name) : "") << (c.gated ? ", reactive gate" : "")
        << ", states " << c.states << ", " << c.rounds << " round(s)\n"
        << "  " << std::left << std::setw(13) << "strategy" << std::right << std::setw(10)
        << "tokens/s" << std::setw(10) << "step s" << std::setw(8) << "bound" << std::setw(10)
        << "overlap"
        << "  " << std::left << std::setw(10) << "bottleneck" << std::right << "  per step\n";
  for (Strategy strategy : c.strategies) {
    WriteRow(table, runs[strategy], on_sim);
    if (rates) WriteNvmeRow(table, runs[strategy], *rates);
  }
  if (c.all) {
    table << "  ecss vs";
    for (Strategy strategy : c.strategies) {
      if (strategy == Strategy::kEcss) continue;
      table << "  " << StrategyName(strategy) << " " << std::setprecision(2)
            << Median(ratios[strategy]) << "x";
    }
    table << " (median over rounds)\n";
  }
  return Status::Ok();
}

}  // namespace ecss::bench
