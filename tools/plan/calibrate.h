// Calibration: this machine's figures measured through the runtime's own code, for a hardware
// file (ecss-plan --calibrate) whose predictions then hold for this machine.
//  - The CPU optimizer: a session's AdamW updates (steps of a small model with states in host
//    memory on the simulated device in timed mode), in parameters per second of the
//    optimizer's busy time, with 1 .. cores (at most max_threads) threads updating at once: one
//    optimizer thread in ecss steps (over `domains` domains), or n - 1 and the driving
//    thread's help in zero-offload steps, which wait for their updates, the part of their
//    busy time before the device work ended (on n - 1 threads) taken out at the table's
//    figure for n - 1 (HelpedRate) (optimizer_params_per_s_by_threads). With one optimizer
//    thread a device, a zero-offload
//    step's updates before its device work ends run at the one-thread figure, measured where
//    experts were mostly not updated in the step before, though zero-offload updates every
//    expert every step. Measured inside a session, not alone: on this machine the same
//    updates ran 1.5x faster in isolation than beside the session's threads, and two threads
//    in a session updated 1.4-1.55x as fast as one, not 2x (both with 8 domains; before
//    HelpedRate, so counted at the plain rate; with it, 1.0-1.81x, median 1.14, in 41 2026-12-05
//    calibrations, as this VM's memory bandwidth moved). With one thread, also the time its
//    steps, which it bounds, were not updating, per update (UpdateGapOf;
//    optimizer_update_gap_us).
//  - NVMe: sequential 1 MiB O_DIRECT writes and reads of a scratch file through the I/O
//    engine at queue depth 32 (offload/io TransferGbps), GB/s, the median of three passes;
//    the capacity is the directory's file system's. Then what a session's NVMe state pipeline
//    reaches of those rates (ecss steps over `domains` domains with states on NVMe, at two
//    expert sizes: the bytes its runs moved at those rates against the runs' time, not the
//    steps'; the step simulator models the waits for gradients between runs): the fraction of
//    the rates it gets and the drive time each expert's update takes beside its bytes
//    (session_fraction, update_overhead_us: FitStatePipeline). Reads and writes sharing the
//    drive cost the first (above 1 where the pipeline beats the sequential rates one after
//    the other), each state's header and version the second.
//  - The host's part of a step: its work at the step's begin, per routed token and layer and
//    per line of the routing tables it reads (StepStats::begin_seconds, the median over every
//    measured step of the one-thread optimizer run's steps of 2,048 tokens and of ecss steps of
//    four micro-batches of 16,384 and of two of 65,536: FitStepBegin; at 2,048 tokens alone the
//    begin looked like 52 ns per token-layer here, which made a step of 131,072 tokens begin
//    after 27 ms where it took 4.4; routing_ns_per_token_layer, routing_ns_per_table_line, and
//    step_begin_ns_per_op 0: not told apart),
//    and, where the base's device is simulated, the host's wait before an op it issues once
//    its dependencies ended (no-overlap steps' executed plans: each compute op's and update's
//    dependencies' end to its issue, the mean; host_wait_latency_us).
//  - The host's gradient additions while the optimizer is idle and while it updates beside
//    them (the same ecss steps of four micro-batches, whose additions mostly run beside the
//    optimizer, and no-overlap steps of two, whose additions run alone: each addition's time
//    against its bytes and the share of it in which an update ran; gradient_add_gbps,
//    gradient_add_beside_optimizer_gbps), and the optimizer's share of its rate beside them
//    (the ecss steps' busy time against their updates at the one-thread rate, the excess lost
//    while an addition ran; optimizer_rate_beside_additions).
// The device's figures are the base file's (a device this machine may not have).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/step_plan.h"
#include "runtime/base/status.h"
#include "tools/plan/plan_config.h"

namespace ecss::plan {

struct CalibrationOptions {
  std::string dir = ".";                       // where the NVMe scratch file goes (removed after)
  uint64_t expert_params = uint64_t{1} << 20;  // d_model 512 x d_ff expert_params / 1024
  // Measured, after two: about 2 s of updates with one thread on the development VM, whose
  // speed swings by a tenth between seconds (24 steps, half a second, gave one thread
  // 1.32-1.70 G/s in five calibrations back to back).
  uint32_t steps = 96;
  uint64_t nvme_bytes = uint64_t{512} << 20;
  // The session's NVMe pipeline: measured, after two and the step that holds their last
  // updates (MeasureStatePipeline, calibrate.cc), with experts of expert_params (about 8 s on
  // the development VM; a quarter as many steps of the large experts'). On 2026-12-06 runs of
  // 16 steps measured one update of 1 Mi experts at 4.7-6.1 ms in seven runs within half an
  // hour (one slow step of 10 ms an update weighs a sixteenth), runs of 48 at 4.8-5.2 ms in
  // four, and plan-vs-run's 60-step runs of small ecss-nvme-states at 5.0-5.3 ms in six.
  uint32_t nvme_steps = 48;
  // The model of the ecss calibration steps (one optimizer thread, the NVMe pipeline, the
  // gradient additions; with them a step's begin) has this many domains, 4 a step: a step's
  // experts are then mostly ones the step before did not update, as in training over many
  // domains; with 8 both the optimizer and the pipeline ran slower (tools/plan/README.md).
  // Zero-offload's threads update every expert each step whatever the domains: measured on 8.
  uint32_t domains = 32;
  // The pipeline is measured again with experts of this many parameters in one layer of
  // nvme_large_domains domains, for the overhead of each update beside its bytes
  // (nvme.update_overhead_us): on the development VM experts of 16 Mi parameters reached
  // 0.90-0.97 of the drive's rates in plan-vs-run's `wide` where experts of 1 Mi reached
  // 0.78-0.83, and one fraction for both predicted wide's steps 11-17% slow. 16 Mi, not 8: on
  // 2026-12-06 runs of 8 Mi experts over 32 domains (a 6 GiB store) took 34-39 ms an update,
  // and 54-56 ms in 2 of 5 with slow steps in them, a line through 1 Mi's that left no
  // overhead and planned wide's 16 Mi updates 10-20% long, where two runs of 16 Mi experts
  // over 8 domains (3 GiB, as the 1 Mi run's store) took 65 and 74 ms, as wide's runs did
  // (61-72). The presets' experts are larger still (21-210 M parameters).
  uint64_t nvme_large_expert_params = uint64_t{16} << 20;
  uint32_t nvme_large_domains = 8;  // at least 4, the steps' domains
  uint32_t max_threads = 8;  // optimizer rates for 1 .. min(this, the machine's cores) threads
};

// `base` with host.optimizer_params_per_s_by_threads, host.optimizer_update_gap_us,
// host.routing_ns_per_token_layer, host.routing_ns_per_table_line, host.gradient_add_gbps,
// host.gradient_add_beside_optimizer_gbps, host.optimizer_rate_beside_additions and nvme
// measured here, host.step_begin_ns_per_op 0 (the fit's terms hold the samples' per-op share),
// and device.host_wait_latency_us with a simulated device.
StatusOr<HardwareConfig> Calibrate(HardwareConfig base, const CalibrationOptions& options);
// A session's NVMe state pipeline at one expert size, per updated expert: its bytes' time at
// the drive's measured rates and the time it took.
struct StatePipelineSample {
  double bound_s = 0, busy_s = 0;
};
// A run of the pipeline's measured steps: its busy time (load to drain) and the bytes its
// updates moved (StepStats::optimizer_busy_seconds and nvme_bytes, both counted in the step
// in which a run of updates ended; nvme_bytes also counts stages of weights from NVMe, which
// the calibration's runs, weights in pinned memory, have none of), and one step's updates as
// the engine planned them (their count and bytes read and written: a step's kStateRead and
// kStateWrite ops).
struct StatePipelineRun {
  double busy_s = 0, bytes = 0;
  uint64_t planned_updates = 0;
  double planned_read_bytes = 0, planned_written_bytes = 0;
};
// The run's sample, its updates counted by their bytes (run.bytes over a planned update's), not
// by the measured steps' updated_experts: a run of updates counts in the step in which it
// ended, which may be a later one than the step that issued it (the NVMe updater takes the
// updates of several steps in one run), and a warm-up step's run may end in the first
// measured step (both seen on 2026-12-06: the busy time of 16 measured steps of 1 Mi experts
// held 15 steps' updates in 4 of 7 runs, a count by steps 6% short of each update's time).
// Internal where nothing ran, or a rate is not > 0.
StatusOr<StatePipelineSample> StatePipelineSampleOf(const StatePipelineRun& run, double read_gbps,
                                                    double write_gbps);
// The drive's session_fraction and update_overhead_us from samples at a small and a large
// expert size: busy = bound / session_fraction + overhead through both, the fraction at most
// kMostSessionFraction (Note [A session beside the sequential rates], calibrate.cc) and the
// overhead at least 0; where the line through them leaves either range, or the large sample's
// bound is not larger, the small sample alone with that figure at its limit (its time kept).
// On the development VM the two samples, minutes apart, put the line anywhere from (0.90, 0.4
// ms) to (1, 2.7 ms) with the fraction then clamped at 1; a fit that split a clamped line's
// excess between both samples predicted 1 Mi experts' NVMe steps 7-9% fast in plan-vs-run.
void FitStatePipeline(const StatePipelineSample& small, const StatePipelineSample& large,
                      NvmeDrive& drive);
// A step's begin (StepStats::begin_seconds: routing every micro-batch and building the step's
// plan), the median over a run's measured steps, with the steps' token-layers and the cache
// lines of the routing tables they read (RoutingTableLines).
struct StepBeginSample {
  double seconds = 0, token_layers = 0, table_lines = 0;
};
// routing_ns_per_token_layer and routing_ns_per_table_line from samples whose tokens differ
// (the calibration's: ecss steps of 2,048 tokens, of 4 x 16,384 and of 2 x 65,536, over 4
// domains): seconds = token_layers x the one + table_lines x the other, by least squares of the
// relative errors; where either would come out negative, the other alone (samples of no time
// are left out). step_begin_ns_per_op becomes 0: the samples' plans have 51-68 ops, too few
// apart to tell plan building from the rest (Note [The begin's samples]).
void FitStepBegin(const std::vector<StepBeginSample>& samples, HardwareConfig& hardware);
// One gradient addition of an executed plan: its bytes, its time (from its start, once its copy
// and the addition before it ended, to its end), and the share of that time in which an update
// ran (the plan's update ops, carried-in ones too, as their spans in that step's time).
struct AdditionSample {
  double bytes = 0, seconds = 0, beside = 0;
};
// The additions' rate while the optimizer is idle and while it updates beside them
// (gradient_add_gbps, gradient_add_beside_optimizer_gbps), from samples of both: seconds =
// bytes x (beside / beside rate + (1 - beside) / idle rate), by least squares of the relative
// errors. Where the samples cannot tell the two apart, or the fit makes either rate not
// positive or the additions faster beside the optimizer, one rate for both (their bytes over
// their seconds, written as both figures).
void FitGradientAdditions(const std::vector<AdditionSample>& samples, HardwareConfig& hardware);
// Zero-offload steps' optimizer with the driving thread helping once the device work is done
// (Note [The driving thread helps], tools/plan/step_simulator.cc): what the measured steps
// updated and their busy seconds; of the last steps, whose executed plans are kept, their busy
// seconds and the part of them before the device work ended (BusyBeforeDeviceEnd).
struct HelpedSample {
  double params = 0, busy_s = 0;
  double kept_busy_s = 0, kept_before_s = 0;
};
// Of an executed step's optimizer busy time, the part before its device work ended: the union
// of its own updates' spans (not carried-in ones') up to the end of its last op that is
// neither an update nor a publish, as the step simulator counts a pass's device_end. (The
// session's driving thread starts helping once the compute stream is done, before the last
// gradient copy ends; like the simulator, this counts from the copy's end, and the rate
// measured takes the difference in.) 0 without updates.
double BusyBeforeDeviceEnd(const StepPlan& executed);
// Beyond this share of the busy time before the device work ended, the rest is too small a
// remainder to divide by: the noise of the fewer threads' rate, measured in another run,
// would dominate the rate.
inline constexpr double kMostBusyBeforeDeviceEnd = 0.8;
// The rate with the driving thread's help: until the device work ended the updates ran on one
// thread fewer, at `fewer_threads_rate`; that share of the busy time (the kept steps' share of
// theirs) and what it updated at that rate are taken out. Where that share reaches
// kMostBusyBeforeDeviceEnd, or the result is not a positive number: the plain rate, params /
// busy, which counts the part before the end at the full rate. On the development VM
// (2026-12-05, the calibration model's zero-offload steps) the part before the end was 12-18%
// of the busy time (its updates began at 4.5 ms, its last gradient copy ended at 9.0, of 27
// ms busy), and the plain rate was 2-9% below this one in five runs.
double HelpedRate(const HelpedSample& sample, double fewer_threads_rate);
// One optimizer thread's ecss steps (the calibration's, which it bounds): their time, its busy
// time in them and the updates it ran.
struct UpdateGapSample {
  double seconds = 0, busy_s = 0, updates = 0;
};
// Below this share of the steps' time updating, the thread did not bound them: the rest is
// then the device's work or waits the step simulator models, not the updates' gaps (at this
// share, 2% of the calibration's 22-24 ms steps over their 32 updates is 14 us an update, four
// times the gaps measured).
inline constexpr double kLeastBoundShare = 0.98;
// optimizer_update_gap_us: the steps' time the thread was not updating, per update (Note [The
// optimizer's gap between updates], step_simulator.cc); 0 where it updated less than
// kLeastBoundShare of the time or ran no update.
double UpdateGapOf(const UpdateGapSample& sample);
// A hardware file ParseHardware reads back as `hardware`.
std::string HardwareJson(const HardwareConfig& hardware);

}  // namespace ecss::plan
