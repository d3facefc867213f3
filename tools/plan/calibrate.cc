#include "tools/plan/calibrate.h"

#include <linux/magic.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "engine/plan_recorder.h"
#include "offload/io/io_engine.h"
#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/median.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tools/plan/planner.h"
#include "tools/plan/step_simulator.h"

namespace ecss::plan {
namespace {

constexpr uint32_t kCalibrationWarmup = 2;          // steps before the measured ones
constexpr uint32_t kCalibrationVocab = 50257;       // the calibration model's (GPT-2's)
constexpr uint32_t kCalibrationDomainsPerStep = 4;  // its steps' samples come from

// Least squares of the relative errors for a time that is x times one quantity plus y times
// another: each sample adds its two quantities over its time (a, b), its row 1 = a x + b y.
struct TwoTermFit {
  double aa = 0, ab = 0, bb = 0, ay = 0, by = 0;  // the normal equations' sums
  void Add(double a, double b) {
    aa += a * a;
    ab += a * b;
    bb += b * b;
    ay += a;
    by += b;
  }
  // False where the samples cannot tell the two terms apart.
  bool Solve(double* x, double* y) const {
    const double det = aa * bb - ab * ab;
    if (!(det > 1e-9 * aa * bb)) return false;
    *x = (ay * bb - by * ab) / det;
    *y = (by * aa - ay * ab) / det;
    return true;
  }
};

// The length of the union of `spans` (start, end) within [from, to]: a clipped sweep over
// their sorted spans.
double UnionWithin(const std::vector<std::pair<double, double>>& spans, double from, double to) {
  std::vector<std::pair<double, double>> within;
  for (const auto& [start, end] : spans) {
    const double a = std::max(start, from), b = std::min(end, to);
    if (b > a) within.emplace_back(a, b);
  }
  std::sort(within.begin(), within.end());
  double length = 0, reached = from;
  for (const auto& [start, end] : within) {
    if (end > reached) length += end - std::max(start, reached);
    reached = std::max(reached, end);
  }
  return length;
}

// How a calibration session runs: its strategy and optimizer threads, its domains and
// micro-batches, its states in host memory or in a store under `store_dir`.
struct CalibrationRun {
  Strategy strategy = Strategy::kEcss;
  int threads = 1;
  uint32_t domains = 8;
  uint32_t layers = 4;
  uint32_t micro_batches = 1;
  uint32_t tokens_per_micro_batch = 2048;
  double device_budget_gib = 0.25;  // room for the micro-batch's activations
  std::string store_dir;
};

// Steps of the calibration model (`run.domains` domains of 2 experts of `o.expert_params`
// parameters in `run.layers` layers, AdamW; the run's micro-batches from 4 domains a step) on the
// simulated device in timed mode: the steps' statistics and the window after the first two;
// with `executed`, the last few measured steps' executed plans.
StatusOr<std::vector<StepStats>> RunCalibrationSteps(const CalibrationOptions& o,
                                                     const CalibrationRun& run, uint32_t steps,
                                                     MeasuredWindow& window,
                                                     std::vector<StepPlan>* executed = nullptr) {
  ModelConfig model;
  model.name = "calibration";
  model.sparse_layers = run.layers;
  model.d_model = 512;
  model.d_ff = static_cast<uint32_t>(o.expert_params / (2 * 512));
  model.vocab = kCalibrationVocab;
  for (uint32_t d = 0; d < run.domains; ++d) model.domains.push_back({StrCat("domain", d), 2});
  HardwareConfig hardware;
  hardware.device_kind = DeviceKind::kSim;
  hardware.device_memory_gib = std::max(1.0, 2 * run.device_budget_gib);
  ECSS_ASSIGN_OR_RETURN(hardware.device, FindDeviceProfile("h100-sxm"));
  hardware.host_memory_gib = 8;
  hardware.pinned_limit_gib = 8;
  hardware.optimizer_threads = 1;
  hardware.optimizer_params_per_s_per_thread = 1;
  WorkloadConfig workload;
  workload.tokens_per_micro_batch = run.tokens_per_micro_batch;
  workload.micro_batches = run.micro_batches;
  workload.domains_per_step = kCalibrationDomainsPerStep;
  workload.device_budget_gib = run.device_budget_gib;
  if (!run.store_dir.empty()) workload.states = Tier::kNvme;
  ECSS_ASSIGN_OR_RETURN(const DeviceShard shard, ShardFor(model, hardware, workload));
  ECSS_ASSIGN_OR_RETURN(SessionOptions options,
                        SessionOptionsFor(shard, model, hardware, workload, run.strategy));
  if (!run.store_dir.empty()) {
    options.placement.nvme_dirs = {run.store_dir};
    // As ecss-bench step does by default: every measured store overwrites, as in training
    // (first writes into a sparse file's holes are slower).
    options.placement.write_initial_states = true;
  }
  options.optimizer.threads = run.threads;
  options.record_op_times = true;  // as ecss-bench step does: each op's stamp, the executed plans
  SimOptions sim;
  sim.device_memory_bytes = options.budgets.device_bytes + (uint64_t{16} << 20);
  sim.kernel_mode = KernelMode::kTimed;
  sim.h2d_bandwidth_gbps = hardware.device.h2d_bandwidth_gbps;
  sim.d2h_bandwidth_gbps = hardware.device.d2h_bandwidth_gbps;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> backend, SimBackend::Create(sim));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Create(*backend, options));
  StepSampler sampler(options, shard.domains_per_step, workload.seq_len, workload.seed);
  window.warmup = kCalibrationWarmup;
  ECSS_ASSIGN_OR_RETURN(
      std::vector<StepStats> stats,
      RunSampledSteps(*session, *backend, options, sampler, kCalibrationWarmup + steps, &window));
  // The session keeps the last few steps' executed plans.
  constexpr size_t kExecutedSteps = PlanRecorder::kKeptSteps;
  const size_t first =
      std::max<size_t>(window.warmup, stats.size() - std::min(stats.size(), kExecutedSteps));
  for (size_t s = first; executed != nullptr && s < stats.size(); ++s) {
    ECSS_ASSIGN_OR_RETURN(StepPlan plan, session->ExecutedPlan(stats[s].step));
    executed->push_back(std::move(plan));
  }
  return stats;
}

// The driving thread's work at BeginStep before it issued anything (routing every micro-batch
// and building the step's plan: StepStats::begin_seconds) in a run's measured steps: their
// median, with their routed token-layers and the routing tables' lines they read. Every
// measured step, not only the few whose plans the session keeps: single begins on the
// development VM spread 3x within a run (1.1 to 4.6 ms for the same 131,072 token-layers), and
// a median of 8 of them read 6.8 to 12 ns per token-layer in calibrations minutes apart.

StatusOr<StepBeginSample> StepBeginOf(const std::vector<StepStats>& stats, size_t warmup,
                                      uint32_t layers) {
  std::vector<double> begins, tokens;
  for (size_t s = warmup; s < stats.size(); ++s) {
    if (!(stats[s].begin_seconds > 0) || stats[s].tokens == 0) continue;
    begins.push_back(stats[s].begin_seconds);
    tokens.push_back(static_cast<double>(stats[s].tokens));
  }
  if (begins.empty()) return InternalError("calibration: no measured step recorded its begin");
  const double step_tokens = Median(tokens);
  return StepBeginSample{
      Median(begins), step_tokens * layers,
      RoutingTableLines(step_tokens, kCalibrationDomainsPerStep, layers, kCalibrationVocab)};
}

// Note [The begin's samples]: the begin is mostly RRE routing, which looks every token up in
// its domain's table (2 bytes a token id: 1,571 cache lines for GPT-2's vocabulary, one table
// a domain and layer) and sorts the slots by expert. In a step the optimizer streams its
// states through the shared cache between begins, so the tables' lines a begin reads miss the
// cache once each, and the begin does not grow in proportion to the tokens. On the
// development VM (2026-12-05, ecss steps of `small`, medians of 24-50 steps, 4 domains a step)
// steps of 8,192 token-layers began after 0.21 ms, of 131,072 after 1.2-1.3, of 524,288 after
// 2.7-3.1: 8 ns a token-layer more between the first two, 4 between the last two, where the
// tables are read whole. Per token-layer and per op, fitted to the first two, a step of 524,288
// token-layers over 2 domains (`small ecss-host-4x32k`) was planned to begin after 4.2-5.3 ms
// where it began after 2.0-2.3. Per token-layer and per line read (RoutingTableLines), fitted
// to the three (4.3 ns and 26 ns), 24 configurations of 2,048-65,536 tokens, 1-4
// micro-batches and 2 or 4 domains began within 15% of the model but for two of 2 domains and
// 131,072 tokens (+54%, +58%), and `deep ecss-host-tight`'s 8 layers within 4%. Not modelled:
// per op, zero-offload's plans of every expert (1,060 ops of `uneven` began after 1.7-2.3 ms,
// the model's 0.22: the step's 1%).
//
// The begin of ecss steps of two micro-batches of 65,536 tokens (Note [The begin's samples]).
StatusOr<StepBeginSample> MeasureLargeStepBegin(const CalibrationOptions& o) {
  constexpr uint32_t kSteps = 16;  // about a second here
  CalibrationRun run;
  run.domains = o.domains;  // as the other samples'
  run.micro_batches = 2;
  run.tokens_per_micro_batch = 65536;
  run.device_budget_gib = 4;  // room for the micro-batches' activations
  MeasuredWindow window;
  ECSS_ASSIGN_OR_RETURN(const std::vector<StepStats> stats,
                        RunCalibrationSteps(o, run, kSteps, window));
  return StepBeginOf(stats, window.warmup, run.layers);
}

// The CPU optimizer as a session drives it with `threads` threads updating at once, states in
// host memory, from the measured steps' updated parameters and the optimizer's busy seconds. One
// thread: ecss steps with one optimizer thread (the driving thread goes on to the next step) over
// o.domains domains (CalibrationOptions::domains says why). More: zero-offload steps (every
// expert updated, the step waiting for its updates) with threads - 1 optimizer threads and
// the driving thread helping once the device work is done (Note [The driving thread helps],
// tools/plan/step_simulator.cc); until then the step's updates run on threads - 1 threads, at
// `fewer_threads_rate` (measured before), which HelpedRate takes out. With one thread, also
// the measured steps' begin (StepBeginOf) and the time they were not updating, per update
// (UpdateGapOf).
struct OptimizerRun {
  double rate = 0;           // parameters / s
  StepBeginSample begin;     // one thread's
  double update_gap_us = 0;  // one thread's
};
StatusOr<OptimizerRun> MeasureOptimizerRate(const CalibrationOptions& o, int threads,
                                            double fewer_threads_rate) {
  CalibrationRun run;
  if (threads > 1) {  // every expert updated each step: the default model's 8 domains
    run.strategy = Strategy::kZeroOffload;
    run.threads = threads - 1;
  } else {
    run.domains = o.domains;
  }
  MeasuredWindow window;
  std::vector<StepPlan> executed;
  ECSS_ASSIGN_OR_RETURN(
      const std::vector<StepStats> stats,
      RunCalibrationSteps(o, run, o.steps, window, threads > 1 ? &executed : nullptr));
  OptimizerRun measured;
  double params = 0, busy = 0;
  UpdateGapSample gaps;
  for (size_t s = window.warmup; s < stats.size(); ++s) {
    params += static_cast<double>(stats[s].updated_params);
    busy += stats[s].optimizer_busy_seconds;
    gaps.seconds += stats[s].seconds;
    gaps.updates += stats[s].updated_experts;
  }
  if (!(busy > 0)) return InternalError("calibration: the optimizer did not run");
  if (threads == 1) {
    ECSS_ASSIGN_OR_RETURN(measured.begin, StepBeginOf(stats, window.warmup, run.layers));
    gaps.busy_s = busy;
    measured.update_gap_us = UpdateGapOf(gaps);
    measured.rate = params / busy;
    return measured;
  }
  HelpedSample sample{params, busy};  // the executed plans are the last steps' (kKeptSteps)
  for (size_t i = 0; i < executed.size(); ++i) {
    sample.kept_before_s += BusyBeforeDeviceEnd(executed[i]);
    sample.kept_busy_s += stats[stats.size() - executed.size() + i].optimizer_busy_seconds;
  }
  measured.rate = HelpedRate(sample, fewer_threads_rate);
  return measured;
}

// Note [A session beside the sequential rates]: a session's NVMe state pipeline is fitted as
// a share of the drive's sequential rates, reads and writes one after the other in one queue,
// as the step simulator runs them (session_fraction), and that share passes 1 where the
// pipeline moves its bytes faster: where the drive serves its reads and writes at once, or
// where the sequential measurement, minutes from the pipeline's, read low. On the 2026-12-06
// VM both were seen: ecss-bench's NVMe runs took less than their bytes' time at rates measured
// in the same run in 5 of 39 (nvme.fraction_of_nvme_bound up to 1.07), and in one hour the
// calibrations' sequential reads fell to 1.58-2.15 GB/s (from 1.75-2.61) while the runs'
// pipelines did not slow down. Clamped at 1, the fit then sat at the clamp with no overhead in
// 5 of that hour's 6 calibrations, and plan-vs-run planned the NVMe configurations' steps
// 10.9-11.7% long. At most kMostSessionFraction, against a fit's noise. The simulator runs a
// stage of weights, a read that may have no write beside it, at the same share.

// A session's NVMe state pipeline while it works, per updated expert: the time its bytes
// take at the drive's rates and the runs' time (load to drain), in the measured steps
// (StatePipelineSampleOf). Not the steps' time: the pipeline waits for gradients in part of
// it, and the step simulator models that wait itself. `run`'s layers and device budget,
// states of experts of o.expert_params in a store of o.domains domains under o.dir (removed
// after).
StatusOr<StatePipelineSample> MeasureStatePipeline(const CalibrationOptions& o, CalibrationRun run,
                                                   double read_gbps, double write_gbps) {
  ECSS_ASSIGN_OR_RETURN(const ScratchDir store,
                        ScratchDir::Create(o.dir, "ecss-plan-calibration."));
  run.domains = o.domains;
  run.store_dir = store.path();
  MeasuredWindow window;
  std::vector<StepPlan> executed;
  ECSS_ASSIGN_OR_RETURN(const std::vector<StepStats> stats,
                        RunCalibrationSteps(o, run, o.nvme_steps + 1, window, &executed));
  // Not the first measured step: it holds the warm-up's last runs, which ended in the wait
  // before it (RunSampledSteps synchronizes there), the first of the store's updates among
  // them (on 2026-12-06 one such step took 3.6 s of busy time for 16 updates of 8 Mi
  // parameters, where the steps after took 0.27-0.5 s for 8).
  StatePipelineRun measured;
  for (size_t s = window.warmup + 1; s < stats.size(); ++s) {
    measured.busy_s += stats[s].optimizer_busy_seconds;
    measured.bytes += static_cast<double>(stats[s].nvme_bytes);
  }
  if (!executed.empty()) {  // the last measured step's own updates, as the engine planned them
    const StepPlan& plan = executed.back();
    for (const PlanOp* read : plan.Find(OpKind::kStateRead)) {
      if (read->step_offset == 0) measured.planned_updates += read->experts.size();
    }
    measured.planned_read_bytes = static_cast<double>(plan.Bytes(OpKind::kStateRead));
    measured.planned_written_bytes = static_cast<double>(plan.Bytes(OpKind::kStateWrite));
  }
  return StatePipelineSampleOf(measured, read_gbps, write_gbps);
}

// The host's wait before an op it issues only once the op's dependencies ended (a
// host-waiting op, PlanOp::host_waits), as the simulator adds it: in the executed plans of
// no-overlap steps on the simulated device in timed mode, from the last dependency's end to
// when the host issued each compute op (an update: to its start, the optimizer's thread woken
// by the driving thread), in microseconds. Fetches and routing-plan uploads are left out: the
// host issues them in a batch, and a step's begin is routing_ns_per_token_layer's. The mean,
// not the median: the simulator adds the latency to every such op, and a step pays their sum
// (no-overlap's chain here: 0.04-0.27 ms an op, where a stream synchronisation alone took 50
// us; the chain's handoffs to and from the optimizer's thread take longer).
StatusOr<double> MeasureHostWaitLatency(const CalibrationOptions& o) {
  constexpr uint32_t kSteps = PlanRecorder::kKeptSteps;  // measured: every one's plan kept
  CalibrationRun run;
  run.strategy = Strategy::kNoOverlap;
  MeasuredWindow window;
  std::vector<StepPlan> executed;
  ECSS_RETURN_IF_ERROR(RunCalibrationSteps(o, run, kSteps, window, &executed).status());
  double waited = 0;
  size_t waits = 0;
  for (const StepPlan& plan : executed) {
    for (const PlanOp& op : plan.ops()) {
      if (!op.host_waits || op.kind == OpKind::kFetch || op.kind == OpKind::kPlanUpload ||
          op.kind == OpKind::kStage) {  // a stage's issue is the stager's, not the host's
        continue;
      }
      double ready = -1;
      for (uint32_t dep : op.deps) ready = std::max(ready, plan.ops()[dep].end_s);
      const double issued = op.issued_s >= 0 ? op.issued_s : op.start_s;
      if (ready < 0 || issued < 0) continue;
      waited += std::max(0.0, issued - ready);
      ++waits;
    }
  }
  if (waits == 0) return InternalError("calibration: no executed plan recorded a host wait");
  return waited / static_cast<double>(waits) * 1e6;
}

// Each gradient addition of the executed plans as an AdditionSample (calibrate.h).
void AddAdditionSamples(const std::vector<StepPlan>& executed,
                        std::vector<AdditionSample>& samples) {
  for (const StepPlan& plan : executed) {
    std::vector<std::pair<double, double>> updating;
    for (const PlanOp* update : plan.Find(OpKind::kUpdate)) {
      if (update->start_s >= 0 && update->end_s > update->start_s) {
        updating.emplace_back(update->start_s, update->end_s);
      }
    }
    for (const PlanOp* add : plan.Find(OpKind::kAccumulate)) {
      if (add->start_s < 0 || !(add->end_s > add->start_s)) continue;
      const double overlap = UnionWithin(updating, add->start_s, add->end_s);
      const double seconds = add->end_s - add->start_s;
      samples.push_back({static_cast<double>(add->bytes), seconds, overlap / seconds});
    }
  }
}

// The host's gradient additions (a later micro-batch's gradients added into the step's
// accumulators, one at a time on the add stream), in the executed plans of ecss steps of four
// micro-batches of 16,384 tokens, whose additions mostly run while the optimizer's thread
// updates the step before's experts, and of no-overlap steps of two of 2,048, whose updates
// wait for the step's device work, so that their additions run alone (FitGradientAdditions).
// And the optimizer beside them, in the measured ecss steps: its busy time against its updates'
// time at `one_thread_rate` (parameters/s), the excess taken as lost in the time it ran beside
// an addition (the kept plans' per step): optimizer_rate_beside_additions, at least 0.1.
// Four micro-batches, not two: three additions a layer, so that the optimizer runs beside one
// for most of its busy time and the excess stands out of the one-thread rate's own drift
// between the two runs. With two, nine calibrations in one hour of 2026-12-06 put the share at
// 0.14-1.0, five of them at the clamp of 1 (the optimizer no slower beside the additions than
// in the one-thread run), where three with four, in the next half hour, put it at 0.73, 0.83
// and 0.89, and `small ecss-host-4x32k`'s runs implied 0.69-0.8 (with 0.83 in every file, the
// 8 rounds of that hour's plan-vs-run planned its optimizer's busy time 2.4% short, not 10.3%,
// and their calibrations' predictions drifted 15.6% apart, not 27.4%). Whatever else slows
// these steps' optimizer against the one-thread run's (their larger routing beside it, the
// simulated device's threads) is counted as the additions', so the share errs low. `begin`:
// the ecss steps' begin (StepBeginOf).
Status MeasureGradientAdditions(const CalibrationOptions& o, double one_thread_rate,
                                StepBeginSample& begin, HardwareConfig& h) {
  std::vector<AdditionSample> samples;
  {
    // Measured: the additions in the last few, whose plans the session keeps; the begin in
    // all (about two seconds here).
    constexpr uint32_t kSteps = 4 * PlanRecorder::kKeptSteps;
    CalibrationRun run;
    run.domains = o.domains;  // as the one-thread run's: the step-begin fit compares their tokens
    run.micro_batches = 4;
    run.tokens_per_micro_batch = 16384;
    run.device_budget_gib = 2;
    MeasuredWindow window;
    std::vector<StepPlan> executed;
    ECSS_ASSIGN_OR_RETURN(const std::vector<StepStats> stats,
                          RunCalibrationSteps(o, run, kSteps, window, &executed));
    ECSS_ASSIGN_OR_RETURN(begin, StepBeginOf(stats, window.warmup, run.layers));
    AddAdditionSamples(executed, samples);
    if (!(one_thread_rate > 0) || !std::isfinite(one_thread_rate)) {
      return InternalError(StrCat("calibration: the one-thread optimizer rate is not positive (",
                                  one_thread_rate, ")"));
    }
    double work = 0, busy = 0, beside = 0;
    for (size_t s = window.warmup; s < stats.size(); ++s) {
      work += static_cast<double>(stats[s].updated_params) / one_thread_rate;
      busy += stats[s].optimizer_busy_seconds;
    }
    for (const AdditionSample& add : samples) beside += add.beside * add.seconds;
    // The kept plans' time beside an addition, per step, over every measured step.
    beside *= static_cast<double>(stats.size() - window.warmup) /
              static_cast<double>(std::max<size_t>(1, executed.size()));
    const double share = 1 - (busy - work) / beside;
    h.optimizer_rate_beside_additions =
        beside > 0 && std::isfinite(share) ? std::clamp(share, 0.1, 1.0) : 1.0;
  }
  CalibrationRun alone;
  alone.strategy = Strategy::kNoOverlap;
  alone.micro_batches = 2;
  MeasuredWindow window;
  std::vector<StepPlan> executed;
  ECSS_RETURN_IF_ERROR(
      RunCalibrationSteps(o, alone, PlanRecorder::kKeptSteps, window, &executed).status());
  AddAdditionSamples(executed, samples);
  if (samples.empty()) return InternalError("calibration: no executed plan recorded an addition");
  FitGradientAdditions(samples, h);
  return Status::Ok();
}

struct NvmeRates {
  double read_gbps = 0, write_gbps = 0, capacity_gib = 0;
};

StatusOr<NvmeRates> MeasureNvme(const CalibrationOptions& o) {
  struct statfs fs {};
  if (statfs(o.dir.c_str(), &fs) != 0) {
    return ErrnoError(errno, "calibrating NVMe: --dir '", o.dir, "' cannot be used");
  }
  if (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC) {
    return InvalidArgumentError(
        StrCat("calibrating NVMe: --dir '", o.dir, "' is in memory (tmpfs), not on a drive"));
  }
  IoEngineOptions io;
  io.queue_depth = 32;
  ECSS_ASSIGN_OR_RETURN(
      const SequentialRates measured,
      MeasureSequentialRates((std::filesystem::path(o.dir) / "ecss-plan-calibration.dat").string(),
                             io, size_t{1} << 20, o.nvme_bytes, 3));
  NvmeRates rates;
  rates.read_gbps = measured.read_gbps;
  rates.write_gbps = measured.write_gbps;
  rates.capacity_gib = static_cast<double>(fs.f_blocks) * fs.f_bsize / (1024.0 * 1024 * 1024);
  return rates;
}

}  // namespace

void FitStepBegin(const std::vector<StepBeginSample>& samples, HardwareConfig& h) {
  TwoTermFit fit;
  for (const StepBeginSample& s : samples) {
    if (s.seconds > 0) fit.Add(s.token_layers / s.seconds, s.table_lines / s.seconds);
  }
  double per_token_layer = -1, per_line = -1;
  if (!fit.Solve(&per_token_layer, &per_line) || per_token_layer < 0 || per_line < 0) {
    const bool tokens_only = per_token_layer >= 0 || per_line < 0;
    per_token_layer = tokens_only && fit.aa > 0 ? fit.ay / fit.aa : 0;
    per_line = tokens_only || !(fit.bb > 0) ? 0 : fit.by / fit.bb;
  }
  h.routing_ns_per_token_layer = per_token_layer * 1e9;
  h.routing_ns_per_table_line = per_line * 1e9;
  h.step_begin_ns_per_op = 0;
}

void FitGradientAdditions(const std::vector<AdditionSample>& samples, HardwareConfig& h) {
  TwoTermFit fit;  // x and y: seconds per byte beside the optimizer and alone
  double bytes = 0, seconds = 0;
  for (const AdditionSample& s : samples) {
    if (!(s.seconds > 0)) continue;
    fit.Add(s.bytes * s.beside / s.seconds, s.bytes * (1 - s.beside) / s.seconds);
    bytes += s.bytes;
    seconds += s.seconds;
  }
  double beside = -1, idle = -1;
  if (fit.Solve(&beside, &idle) && beside > 0 && idle > 0 && beside >= idle) {
    h.gradient_add_gbps = 1 / idle / 1e9;
    h.gradient_add_beside_optimizer_gbps = 1 / beside / 1e9;
  } else {  // one rate, written as both (a median over calibrations then stays a rate)
    h.gradient_add_gbps = seconds > 0 ? bytes / seconds / 1e9 : 0;
    h.gradient_add_beside_optimizer_gbps = h.gradient_add_gbps;
  }
}

void FitStatePipeline(const StatePipelineSample& small, const StatePipelineSample& large,
                      NvmeDrive& drive) {
  constexpr double kLeastSlowdown = 1 / kMostSessionFraction;
  // The small sample alone (the experts most training uses; at the large size alone the
  // line's noise is least felt): its fraction of the rates and no overhead.
  const double alone = std::max(kLeastSlowdown, small.busy_s / small.bound_s);
  double slowdown = alone, overhead = 0;
  if (large.bound_s > small.bound_s) {  // busy = bound / fraction + overhead through both
    slowdown = (large.busy_s - small.busy_s) / (large.bound_s - small.bound_s);
    overhead = small.busy_s - small.bound_s * slowdown;
    // Where the line leaves the ranges, the small sample's time is kept: the most of the rates
    // and its excess as the overhead, or the sample alone. The fraction may pass 1 (Note [A
    // session beside the sequential rates]).
    if (slowdown < kLeastSlowdown) {
      slowdown = kLeastSlowdown;
      overhead = small.busy_s - small.bound_s * slowdown;
    }
    if (overhead < 0) {
      overhead = 0;
      slowdown = alone;
    }
  }
  drive.session_fraction = 1 / slowdown;
  drive.update_overhead_us = overhead * 1e6;
}

StatusOr<StatePipelineSample> StatePipelineSampleOf(const StatePipelineRun& run, double read_gbps,
                                                    double write_gbps) {
  if (!(read_gbps > 0 && write_gbps > 0)) {
    return InternalError(StrCat("calibration: the drive's rates (read ", read_gbps, " GB/s, write ",
                                write_gbps, " GB/s) must be > 0"));
  }
  const double planned_bytes = run.planned_read_bytes + run.planned_written_bytes;
  if (!(run.busy_s > 0 && run.bytes > 0 && run.planned_updates > 0 && planned_bytes > 0)) {
    return InternalError(StrCat("calibration: the NVMe state pipeline did not run (busy ",
                                run.busy_s, " s, ", run.bytes, " bytes, ", run.planned_updates,
                                " updates planned of ", planned_bytes, " bytes)"));
  }
  const double planned = static_cast<double>(run.planned_updates);
  const double updates = run.bytes / (planned_bytes / planned);
  const double bound = (run.planned_read_bytes / (read_gbps * 1e9) +
                        run.planned_written_bytes / (write_gbps * 1e9)) /
                       planned;
  return StatePipelineSample{bound, run.busy_s / updates};
}

double BusyBeforeDeviceEnd(const StepPlan& executed) {
  double device_end = 0;
  std::vector<std::pair<double, double>> updating;  // this step's own updates
  for (const PlanOp& op : executed.ops()) {
    if (op.start_s < 0 || !(op.end_s >= op.start_s)) continue;  // not run
    if (!UpdateLike(op.kind) && op.kind != OpKind::kPublish) {
      device_end = std::max(device_end, op.end_s);
    } else if (op.resource == PlanResource::kCpuOptimizer && op.step_offset == 0) {
      updating.emplace_back(op.start_s, op.end_s);
    }
  }
  return UnionWithin(updating, -std::numeric_limits<double>::infinity(), device_end);
}

double HelpedRate(const HelpedSample& sample, double fewer_threads_rate) {
  const double plain = sample.params / sample.busy_s;
  if (!(sample.kept_busy_s > 0)) return plain;
  const double fewer = sample.busy_s * std::min(1.0, sample.kept_before_s / sample.kept_busy_s);
  const double rate = (sample.params - fewer_threads_rate * fewer) / (sample.busy_s - fewer);
  if (!(fewer < kMostBusyBeforeDeviceEnd * sample.busy_s) || !std::isfinite(rate) || !(rate > 0)) {
    return plain;
  }
  return rate;
}

double UpdateGapOf(const UpdateGapSample& sample) {
  if (!(sample.updates > 0 && sample.busy_s >= kLeastBoundShare * sample.seconds)) return 0;
  return std::max(0.0, sample.seconds - sample.busy_s) / sample.updates * 1e6;
}

StatusOr<HardwareConfig> Calibrate(HardwareConfig base, const CalibrationOptions& options) {
  if (options.nvme_large_expert_params <= options.expert_params) {
    return InvalidArgumentError(
        StrCat("calibration: nvme_large_expert_params (", options.nvme_large_expert_params,
               ") must be above expert_params (", options.expert_params,
               "): the NVMe pipeline's overhead is fitted at two expert sizes"));
  }
  for (const auto& [name, domains] : {std::pair<const char*, uint32_t>{"domains", options.domains},
                                      {"nvme_large_domains", options.nvme_large_domains}}) {
    if (domains < kCalibrationDomainsPerStep) {
      return InvalidArgumentError(StrCat("calibration: ", name, " (", domains,
                                         ") must be at least ", kCalibrationDomainsPerStep,
                                         ", the calibration steps' domains"));
    }
  }
  // 1 .. this machine's cores (at most max_threads) threads updating at once.
  const int cores = static_cast<int>(
      std::clamp(std::thread::hardware_concurrency(), 1u, std::max(1u, options.max_threads)));
  base.optimizer_params_per_s_per_thread = 0;
  base.optimizer_params_per_s_by_threads.clear();
  StepBeginSample few;  // one thread's ecss steps of 2,048 tokens
  for (int threads = 1; threads <= cores; ++threads) {
    const double fewer = threads > 1 ? base.optimizer_params_per_s_by_threads.back() : 0;
    ECSS_ASSIGN_OR_RETURN(const OptimizerRun measured,
                          MeasureOptimizerRate(options, threads, fewer));
    base.optimizer_params_per_s_by_threads.push_back(measured.rate);
    if (threads == 1) {
      few = measured.begin;
      base.optimizer_update_gap_us = measured.update_gap_us;
    }
  }
  StepBeginSample many;  // four micro-batches of 16,384 tokens a step
  ECSS_RETURN_IF_ERROR(
      MeasureGradientAdditions(options, base.optimizer_params_per_s_by_threads.at(0), many, base));
  ECSS_ASSIGN_OR_RETURN(const StepBeginSample large_steps, MeasureLargeStepBegin(options));
  FitStepBegin({few, many, large_steps}, base);
  ECSS_ASSIGN_OR_RETURN(const NvmeRates nvme, MeasureNvme(options));
  // One drive measured: the base's drives (or this machine's one) get its speed.
  const size_t drives = std::max<size_t>(1, base.nvme.size());
  const double capacity = base.nvme.empty() ? nvme.capacity_gib : base.nvme[0].capacity_gib;
  // The pipeline at two expert sizes: the fraction of the rates and each update's overhead.
  ECSS_ASSIGN_OR_RETURN(const StatePipelineSample small,
                        MeasureStatePipeline(options, {}, nvme.read_gbps, nvme.write_gbps));
  CalibrationOptions large_experts = options;
  large_experts.expert_params = options.nvme_large_expert_params;
  large_experts.domains = options.nvme_large_domains;
  // One layer (by default a store of 3 GiB, as the small run's, both shadow slots written
  // first), and steps that move as many bytes in all (a step's 8 experts of 16 Mi against 32
  // of 1 Mi: a quarter of the steps); the device budget grows with d_ff, as the activations
  // do.
  CalibrationRun large_run;
  large_run.layers = 1;
  const double steps_ratio = static_cast<double>(options.expert_params) * CalibrationRun{}.layers /
                             (static_cast<double>(large_experts.expert_params) * large_run.layers);
  large_experts.nvme_steps = std::max<uint32_t>(
      1, static_cast<uint32_t>(static_cast<double>(options.nvme_steps) * steps_ratio));
  large_run.device_budget_gib *=
      static_cast<double>(large_experts.expert_params) / static_cast<double>(options.expert_params);
  ECSS_ASSIGN_OR_RETURN(
      const StatePipelineSample large,
      MeasureStatePipeline(large_experts, large_run, nvme.read_gbps, nvme.write_gbps));
  NvmeDrive drive{capacity, nvme.read_gbps, nvme.write_gbps};
  FitStatePipeline(small, large, drive);
  base.nvme.assign(drives, drive);
  // The simulated device's wait on this host; a real device's is the base file's.
  if (base.device_kind == DeviceKind::kSim) {
    ECSS_ASSIGN_OR_RETURN(base.host_wait_latency_us, MeasureHostWaitLatency(options));
  }
  base.name += " (calibrated)";
  return base;
}

std::string HardwareJson(const HardwareConfig& h) {
  JsonWriter json;
  const DeviceProfile& d = h.device;
  json.BeginObject()
      .Field("name", h.name)
      .Field("nodes", uint64_t{h.nodes})
      .Field("devices_per_node", uint64_t{h.devices_per_node})
      .Key("device")
      .BeginObject()
      .Field("kind", h.device_kind == DeviceKind::kSim ? "sim" : "cuda")
      .Field("memory_gib", h.device_memory_gib)
      .Field("tflops_bf16", d.peak_tflops_bf16)
      .Field("tflops_f32", d.peak_tflops_f32)
      .Field("memory_bandwidth_gbps", d.memory_bandwidth_gbps)
      .Field("launch_overhead_us", d.launch_overhead_us)
      .Field("gemm_efficiency", d.gemm_efficiency)
      .Field("h2d_gbps", d.h2d_bandwidth_gbps)
      .Field("d2h_gbps", d.d2h_bandwidth_gbps)
      .Field("copy_latency_us", h.copy_latency_us)
      .Field("host_wait_latency_us", h.host_wait_latency_us)
      .EndObject()
      .Key("host")
      .BeginObject()
      .Field("memory_gib", h.host_memory_gib)
      .Field("pinned_limit_gib", h.pinned_limit_gib)
      .Field("optimizer_threads", uint64_t{h.optimizer_threads});
  if (h.optimizer_params_per_s_by_threads.empty()) {
    json.Field("optimizer_params_per_s_per_thread", h.optimizer_params_per_s_per_thread);
  } else {
    json.Key("optimizer_params_per_s_by_threads").BeginArray();
    for (double rate : h.optimizer_params_per_s_by_threads) json.Double(rate);
    json.EndArray();
  }
  json.Field("optimizer_update_gap_us", h.optimizer_update_gap_us)
      .Field("routing_ns_per_token_layer", h.routing_ns_per_token_layer)
      .Field("routing_ns_per_table_line", h.routing_ns_per_table_line)
      .Field("step_begin_ns_per_op", h.step_begin_ns_per_op)
      .Field("gradient_add_gbps", h.gradient_add_gbps)
      .Field("gradient_add_beside_optimizer_gbps", h.gradient_add_beside_optimizer_gbps)
      .Field("optimizer_rate_beside_additions", h.optimizer_rate_beside_additions)
      .EndObject();
  if (!h.nvme.empty()) {  // alike drives, as the file describes them
    json.Key("nvme")
        .BeginObject()
        .Field("drives", static_cast<uint64_t>(h.nvme.size()))
        .Field("capacity_gib", h.nvme[0].capacity_gib)
        .Field("read_gbps", h.nvme[0].read_gbps)
        .Field("write_gbps", h.nvme[0].write_gbps)
        .Field("session_fraction", h.nvme[0].session_fraction)
        .Field("update_overhead_us", h.nvme[0].update_overhead_us)
        .EndObject();
  }
  json.Field("network_gbps", h.network_gbps).EndObject();
  return json.str() + "\n";
}

}  // namespace ecss::plan
