// CpuOptimizer: updates experts on the CPU, each as soon as it can be, in a dedicated TBB
// arena, while the device works on the next step (DESIGN.md sections 3 and 7).
//
// Protocol per step: BeginStep(grad_scale); SubmitGradient(expert, grad) as each expert's
// gradient becomes complete (after the last micro-batch); FinishStep() when no more will come.
// An update runs in the arena, split into chunks of `chunk_elements` (tasks of different
// experts interleave, so many small experts batch naturally). Each expert has a version (the
// updates it received: its own step count for bias correction) and a processed step; anyone
// can WaitForExpert(e, step) - the engine's fetch of step t+1 waits on exactly that.
//
// When updates start: with clipping (max_grad_norm > 0) or skip_step_on_nonfinite, an update
// needs the whole step's gradients (the global norm; whether any gradient overflowed), so
// updates start at FinishStep, as in every loss-scaled or clipped trainer. With both off, an
// update starts at SubmitGradient. A non-finite gradient never reaches the weights: with
// skip_step_on_nonfinite the whole step is skipped for every expert (loss-scaling overflow:
// no expert updated, versions unchanged); without it that expert alone is left unchanged and
// the error is reported by WaitForExpert and Synchronize.
//
// Determinism: updates are element-wise and the gradient norm is summed in fixed blocks and a
// fixed order, so results are bit-identical for any thread count, chunk size and SIMD path.
// Thread-safe: the protocol calls (and Expedite) come from one driving thread; WaitForExpert
// and WaitForSteps from any.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "optimizer/optimizer_config.h"
#include "optimizer/update_kernels.h"
#include "runtime/base/status.h"
#include "runtime/base/trace.h"

namespace ecss {

using UpdateObserver =
    std::function<void(uint32_t expert, uint64_t step, std::chrono::steady_clock::time_point start,
                       std::chrono::steady_clock::time_point end)>;

using UpdateStartObserver = std::function<void(uint32_t expert, uint64_t step,
                                               std::chrono::steady_clock::time_point start)>;

struct CpuOptimizerOptions {
  OptimizerKind kind = OptimizerKind::kAdamW;
  std::vector<HyperParams> groups = {HyperParams{}};  // parameter groups, by index
  int threads = 1;  // the arena's worker threads (>= 1); leave cores for I/O. TBB's worker pool
                    // (cores - 1 by default) caps it.
  size_t chunk_elements = 64 * 1024;   // per task: ~2 MiB of traffic, about an L2 (>= 1024)
  std::optional<SimdIsa> isa;          // default: the best the CPU runs
  float max_grad_norm = 0;             // > 0: clip the global gradient norm to this
  bool skip_step_on_nonfinite = true;  // loss-scaling semantics (see above)
  // Optional, not owned, must outlive the optimizer: one event per expert update on the lane
  // "optimizer thread N" of the arena thread that started it.
  TraceRecorder* trace = nullptr;
  // Optional: called on the optimizer thread once an expert's update of `step` ran (or was
  // found non-finite), with when it started and ended. Must be cheap and thread-safe.
  UpdateObserver on_update;
  // Optional: called on the optimizer thread as an expert's update of `step` starts (before
  // on_update), so that an observer can count an update still running. Same rules.
  UpdateStartObserver on_update_start;
};

// One expert's arrays, owned by the caller (host or pinned tier) and valid while registered.
struct ExpertArrays {
  float* master = nullptr;
  float* state0 = nullptr;
  float* state1 = nullptr;           // Adam(W) only
  BFloat16* compute_copy = nullptr;  // optional
  size_t size = 0;
  uint32_t group = 0;  // index into CpuOptimizerOptions::groups
  // Updates the states already hold: a resumed expert's version (its bias-correction step),
  // so that the next update is the one after them.
  uint64_t updates = 0;
};

struct StepReport {
  uint64_t step = 0;
  double global_norm = 0;  // of the unscaled gradients (deferred mode; 0 otherwise)
  float clip_coefficient = 1;
  bool skipped = false;  // a non-finite gradient skipped the whole step
  uint32_t experts_submitted = 0;
};

// Global-norm clipping exactly as CpuOptimizer::FinishStep decides it, for updaters that
// stream states instead of holding them (states on NVMe): the sum of squares of one
// gradient (over fixed blocks: independent of threads), and the step's report from the
// experts' sums added in the order given (expert order, as FinishStep adds them): the norm
// of the unscaled gradients, the clip coefficient min(1, max_grad_norm / (norm + 1e-6)), and
// whether a non-finite sum skips the step (skip_step_on_nonfinite).
double GradientSumOfSquares(const CpuOptimizerOptions& options, const void* grad, DType dtype,
                            size_t n);
StepReport GlobalNormReport(const CpuOptimizerOptions& options,
                            const std::vector<double>& sums_in_expert_order, float grad_scale);

class CpuOptimizer {
 public:
  // InvalidArgument naming the field for bad hyper-parameters, threads < 1, a tiny chunk size,
  // or an instruction set this CPU lacks.
  static StatusOr<std::unique_ptr<CpuOptimizer>> Create(const CpuOptimizerOptions& options);
  ~CpuOptimizer();  // waits for every update in flight

  // Returns the expert's id. InvalidArgument for null arrays, zero size, a missing state
  // array for the kind, or an unknown group.
  StatusOr<uint32_t> RegisterExpert(const ExpertArrays& arrays);

  // Starts step t+1. grad_scale: the loss scale the gradients carry (> 0).
  Status BeginStep(float grad_scale = 1.0f);
  // The hyper-parameters of `group` for the steps that begin after this call (a schedule);
  // updates of steps already begun keep theirs. InvalidArgument naming the group or field.
  Status SetHyperParams(uint32_t group, const HyperParams& params);
  // What `group` has in force now (the last SetHyperParams, else the options'). REQUIRES: a
  // group of the options.
  HyperParams hyper_params(uint32_t group) const;
  // The expert's gradient for this step is complete. `grad` (f32 or bf16, `size` elements)
  // must stay valid until WaitForExpert(expert, step) returns. sum_of_squares: the gradient's
  // sum of squares if the caller has it (the device computes it), else it is computed here.
  // Blocks until the expert's previous update finished. FailedPrecondition for a second
  // submission of one expert in a step, or outside a step.
  Status SubmitGradient(uint32_t expert, const void* grad, DType dtype,
                        std::optional<double> sum_of_squares = std::nullopt);
  // Ends the step's submissions; in deferred mode computes the norm and starts the updates.
  // Does not wait for them.
  StatusOr<StepReport> FinishStep();
  // Ends the step without its held-back updates (deferred mode: every submission is skipped,
  // as an overflow skips it; updates already started run on), for a step whose gradients
  // could not all be submitted. FailedPrecondition outside a step.
  Status AbortStep();

  // Blocks until the expert's update for `step` finished or was skipped (immediately if the
  // expert was not submitted in that step). Returns that update's error, if any.
  Status WaitForExpert(uint32_t expert, uint64_t step);
  // Blocks until every update submitted in steps <= `step` finished or was skipped; their
  // errors are TakeError's. One wake-up, not one per expert (each costs the optimizer
  // thread a cross-core interrupt). FailedPrecondition for the current step before
  // FinishStep in deferred mode.
  Status WaitForSteps(uint64_t step);
  // Updates start in the order they were launched (submitted; deferred: FinishStep's expert
  // order). Expedite moves the launched, not yet started updates of `experts` ahead of every
  // other, in the order given and behind those expedited before: the engine names the experts
  // the next step fetches first. Returns how many moved (others already ran, are running, or
  // were not launched). Results do not depend on the order: each update is its expert's own.
  uint32_t Expedite(const std::vector<uint32_t>& experts);
  // Waits for every update submitted so far; returns TakeError().
  Status Synchronize();
  // The first update error not reported yet (a non-finite gradient without
  // skip_step_on_nonfinite), then OK until another update fails: each failure is reported
  // once, so one bad step does not fail every later call. Does not wait.
  Status TakeError();
  uint64_t version(uint32_t expert) const;  // updates received (the bias-correction step)
  // The last step whose update of the expert finished, failed or was skipped.
  uint64_t processed_step(uint32_t expert) const;
  // Seconds in which at least one update was running, since creation (the optimizer as a
  // resource: what overlap efficiency compares with the step time).
  double busy_seconds() const;
  uint64_t current_step() const;
  SimdIsa isa() const;

 private:
  struct Impl;
  explicit CpuOptimizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
