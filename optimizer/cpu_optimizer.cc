#include "optimizer/cpu_optimizer.h"

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>
#include <tbb/task_group.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>

#include "optimizer/parallel_update.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

struct ExpertState {
  ExpertArrays arrays;
  uint64_t version = 0;         // GUARDED_BY(Impl::mutex)
  uint64_t submitted_step = 0;  // GUARDED_BY(Impl::mutex)
  uint64_t processed_step = 0;  // GUARDED_BY(Impl::mutex)
  uint64_t error_step = 0;      // GUARDED_BY(Impl::mutex)
  Status error;                 // GUARDED_BY(Impl::mutex): of error_step
  int waiters = 0;              // GUARDED_BY(Impl::mutex): threads waiting for its update
};

struct Pending {
  uint32_t expert;
  const void* grad;
  DType dtype;
  std::optional<double> sum_of_squares;
  HyperParams params;  // of the expert's group, as the step began
  float grad_scale;    // the step's loss scale (the next BeginStep may change it meanwhile)
};

}  // namespace

struct CpuOptimizer::Impl {
  // `threads` worker slots, and one reserved for the driving thread: it enters to hand an
  // update over and leaves at once. Without its own slot it could not enter while the
  // workers held every slot, and task_arena::execute then blocks until a task finishes (up
  // to an update per submission, in the middle of the backward).
  Impl(const CpuOptimizerOptions& o, SimdIsa simd)
      : options(o), isa(simd), arena(o.threads + 1, /*reserved_for_masters=*/1) {}

  bool deferred() const { return options.max_grad_norm > 0 || options.skip_step_on_nonfinite; }

  // Runs in the arena: checks the gradient when asked, then updates in chunks.
  void RunUpdate(uint32_t e, Pending work, uint64_t step, float clip_coefficient,
                 bool check_finite) {
    BusyScope busy(*this);
    const auto start = std::chrono::steady_clock::now();
    if (options.on_update_start) options.on_update_start(e, step, start);
    // Reported before Finish releases the fence, so whoever waited for it sees its times.
    auto observe = [&] {
      if (options.on_update) options.on_update(e, step, start, std::chrono::steady_clock::now());
    };
    TraceRecorder* trace = options.trace;
    const int lane = trace == nullptr
                         ? 0
                         : trace->Lane(StrCat("optimizer thread ",
                                              tbb::this_task_arena::current_thread_index()));
    TraceScope scope(trace, lane, "update", "optimizer", {{"expert", e}});
    ExpertState& expert = experts[e];
    const size_t n = expert.arrays.size;
    if (check_finite) {
      const double sum = work.sum_of_squares ? *work.sum_of_squares
                                             : optimizer_internal::ParallelSumOfSquares(
                                                   isa, work.grad, work.dtype, n);
      if (!std::isfinite(sum)) {
        observe();
        Finish(e, step, false,
               FailedPreconditionError(
                   StrCat("expert ", e, " step ", step,
                          ": gradient has NaN or Inf; the expert was not updated")));
        return;
      }
    }
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mutex);
      version = expert.version + 1;
    }
    const UpdateScalars scalars =
        MakeUpdateScalars(options.kind, work.params, version, work.grad_scale, clip_coefficient);
    const ParamArrays arrays{expert.arrays.master,
                             work.grad,
                             work.dtype,
                             expert.arrays.state0,
                             expert.arrays.state1,
                             expert.arrays.compute_copy,
                             n};
    optimizer_internal::ParallelUpdate(isa, scalars, arrays, options.chunk_elements);
    observe();
    Finish(e, step, true, Status::Ok());
  }

  // Busy time: the union of the intervals in which at least one update runs.
  struct BusyScope {
    explicit BusyScope(Impl& owner) : impl(owner) {
      std::lock_guard<std::mutex> lock(impl.busy_mutex);
      if (impl.running++ == 0) impl.busy_since = std::chrono::steady_clock::now();
    }
    ~BusyScope() {
      std::lock_guard<std::mutex> lock(impl.busy_mutex);
      if (--impl.running == 0) {
        impl.busy_seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - impl.busy_since)
                .count();
      }
    }
    Impl& impl;
  };

  // Wakes waiters only when this expert's update or the last of its step's finished: a
  // wake-up is a cross-core interrupt, costly in a VM (tens of microseconds of the optimizer
  // thread per update when every update woke the driving thread, waiting for another one).
  void Finish(uint32_t e, uint64_t step, bool updated, Status error) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mutex);
      ExpertState& expert = experts[e];
      if (updated) ++expert.version;
      expert.processed_step = step;
      if (!error.ok()) {
        expert.error_step = step;
        if (first_error.ok()) first_error = error;
        expert.error = std::move(error);
      }
      wake = expert.waiters > 0;
      auto left = outstanding.find(step);
      if (left != outstanding.end() && --left->second == 0) {
        outstanding.erase(left);
        wake = wake || step_waiters > 0;
      }
    }
    if (wake) cv.notify_all();
  }
  // Waits (lock held) until `done`, counted as a waiter of `expert` so that its Finish wakes.
  template <typename Done>
  void WaitFor(std::unique_lock<std::mutex>& lock, ExpertState& expert, Done done) {
    ++expert.waiters;
    cv.wait(lock, done);
    --expert.waiters;
  }

  // Note [The optimizer's run queue]: a launched update waits in `queued` (expedited ones
  // first, each part in launch order) and each task the arena runs takes the queue's head,
  // so updates start in an order this class chooses, not TBB's (its LIFO spawning ran a
  // step's last submissions first), and Expedite can still move one that has not started.
  // One task per launched update, taking one: every update runs exactly once, and a thread
  // that picks a task up while it waits (outside the isolated parallel loops) runs one.
  struct Queued {
    uint32_t expert;
    Pending work;
    uint64_t step;
    float clip_coefficient;
    bool check_finite;
  };
  void Launch(uint32_t e, Pending work, uint64_t step, float clip_coefficient, bool check_finite) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      queued.push_back({e, work, step, clip_coefficient, check_finite});
    }
    arena.execute([&] { tasks.run([this] { RunNext(); }); });
  }
  void RunNext() {
    std::unique_lock<std::mutex> lock(mutex);
    std::deque<Queued>& from = expedited.empty() ? queued : expedited;
    const Queued next = from.front();
    from.pop_front();
    lock.unlock();
    RunUpdate(next.expert, next.work, next.step, next.clip_coefficient, next.check_finite);
  }
  // Moves the expert's queued update behind the ones expedited before it. Lock held.
  bool ExpediteLocked(uint32_t e) {
    auto it =
        std::find_if(queued.begin(), queued.end(), [e](const Queued& q) { return q.expert == e; });
    if (it == queued.end()) return false;
    expedited.push_back(*it);
    queued.erase(it);
    return true;
  }

  std::mutex busy_mutex;
  int running = 0;                                   // GUARDED_BY(busy_mutex)
  std::chrono::steady_clock::time_point busy_since;  // GUARDED_BY(busy_mutex)
  double busy_seconds = 0;                           // GUARDED_BY(busy_mutex)

  CpuOptimizerOptions options;
  SimdIsa isa;
  tbb::task_arena arena;
  tbb::task_group tasks;
  mutable std::mutex mutex;
  std::condition_variable cv;
  std::deque<ExpertState> experts;  // stable addresses; appended by the driving thread only
  uint64_t current_step = 0;        // GUARDED_BY(mutex): WaitForExpert reads it from any thread
  bool in_step = false;             // GUARDED_BY(mutex)
  float grad_scale = 1;             // of the current step; each pending update keeps its own
  std::vector<HyperParams> step_groups;  // the groups' hyper-parameters as the step began
  std::vector<Pending> pending;          // deferred mode: this step's submissions
  // Submitted updates not finished, by step (an entry leaves at 0), and the threads waiting
  // for steps in WaitForSteps.
  std::map<uint64_t, uint32_t> outstanding;  // GUARDED_BY(mutex)
  int step_waiters = 0;                      // GUARDED_BY(mutex)
  std::deque<Queued> expedited;              // GUARDED_BY(mutex): launched, not started, urgent
  std::deque<Queued> queued;                 // GUARDED_BY(mutex): launched, not started
  Status first_error;                        // GUARDED_BY(mutex)
};

StatusOr<std::unique_ptr<CpuOptimizer>> CpuOptimizer::Create(const CpuOptimizerOptions& options) {
  if (options.groups.empty())
    return InvalidArgumentError("optimizer needs at least one parameter group");
  for (size_t g = 0; g < options.groups.size(); ++g) {
    Status valid = ValidateHyperParams(options.kind, options.groups[g]);
    if (!valid.ok()) return valid.Annotate(StrCat("parameter group ", g));
  }
  if (options.threads < 1) {
    return InvalidArgumentError(StrCat("optimizer threads = ", options.threads, " must be >= 1"));
  }
  if (options.chunk_elements < 1024) {
    return InvalidArgumentError(
        StrCat("optimizer chunk_elements = ", options.chunk_elements, " must be >= 1024"));
  }
  if (!(options.max_grad_norm >= 0) || !std::isfinite(options.max_grad_norm)) {
    return InvalidArgumentError("optimizer max_grad_norm must be finite and >= 0");
  }
  const SimdIsa isa = options.isa.value_or(DetectSimdIsa());
  if (!SimdIsaSupported(isa)) {
    return InvalidArgumentError(StrCat("this CPU cannot run the ", SimdIsaName(isa), " path"));
  }
  return std::unique_ptr<CpuOptimizer>(new CpuOptimizer(std::make_unique<Impl>(options, isa)));
}

CpuOptimizer::CpuOptimizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CpuOptimizer::~CpuOptimizer() { Synchronize().IgnoreError(); }

StatusOr<uint32_t> CpuOptimizer::RegisterExpert(const ExpertArrays& arrays) {
  const uint32_t id = static_cast<uint32_t>(impl_->experts.size());
  if (arrays.master == nullptr || arrays.state0 == nullptr || arrays.size == 0) {
    return InvalidArgumentError(
        StrCat("expert ", id, ": master and state arrays and a size are required"));
  }
  if (StateArrays(impl_->options.kind) == 2 && arrays.state1 == nullptr) {
    return InvalidArgumentError(StrCat("expert ", id, ": ", OptimizerKindName(impl_->options.kind),
                                       " needs a second state array"));
  }
  if (arrays.group >= impl_->options.groups.size()) {
    return InvalidArgumentError(StrCat("expert ", id, ": parameter group ", arrays.group, " of ",
                                       impl_->options.groups.size()));
  }
  std::lock_guard<std::mutex> lock(impl_->mutex);
  ExpertState state;
  state.arrays = arrays;
  state.version = arrays.updates;
  impl_->experts.push_back(std::move(state));
  return id;
}

Status CpuOptimizer::BeginStep(float grad_scale) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (impl_->in_step)
    return FailedPreconditionError(StrCat("step ", impl_->current_step, " was not finished"));
  if (!(grad_scale > 0) || !std::isfinite(grad_scale)) {
    return InvalidArgumentError(StrCat("grad_scale = ", grad_scale, " must be finite and > 0"));
  }
  impl_->in_step = true;
  impl_->grad_scale = grad_scale;
  ++impl_->current_step;
  impl_->pending.clear();
  impl_->step_groups = impl_->options.groups;  // this step's updates use these
  return Status::Ok();
}

Status CpuOptimizer::SetHyperParams(uint32_t group, const HyperParams& params) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (group >= impl_->options.groups.size()) {
    return InvalidArgumentError(
        StrCat("parameter group ", group, " of ", impl_->options.groups.size()));
  }
  ECSS_RETURN_IF_ERROR(
      ValidateHyperParams(impl_->options.kind, params).Annotate(StrCat("parameter group ", group)));
  impl_->options.groups[group] = params;
  return Status::Ok();
}

HyperParams CpuOptimizer::hyper_params(uint32_t group) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->options.groups.at(group);
}

Status CpuOptimizer::SubmitGradient(uint32_t expert, const void* grad, DType dtype,
                                    std::optional<double> sum_of_squares) {
  uint64_t step;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (!impl_->in_step)
      return FailedPreconditionError("SubmitGradient outside a step (call BeginStep)");
    step = impl_->current_step;
  }
  if (expert >= impl_->experts.size()) {
    return InvalidArgumentError(
        StrCat("unknown expert ", expert, " (", impl_->experts.size(), " registered)"));
  }
  if (grad == nullptr) return InvalidArgumentError(StrCat("expert ", expert, ": null gradient"));
  if (dtype == DType::kF16) {
    return InvalidArgumentError(StrCat("expert ", expert, ": gradients are f32 or bf16, not f16"));
  }
  {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    ExpertState& state = impl_->experts[expert];
    if (state.submitted_step == step) {
      return FailedPreconditionError(
          StrCat("expert ", expert, " was already submitted in step ", step));
    }
    // One update per expert at a time: wait for the previous one.
    impl_->WaitFor(lock, state, [&] { return state.processed_step >= state.submitted_step; });
    state.submitted_step = step;
    ++impl_->outstanding[step];
  }
  Pending work{expert,
               grad,
               dtype,
               sum_of_squares,
               impl_->step_groups[impl_->experts[expert].arrays.group],
               impl_->grad_scale};
  if (impl_->deferred()) {
    impl_->pending.push_back(work);
  } else {
    impl_->Launch(expert, work, step, 1.0f, /*check_finite=*/true);
  }
  return Status::Ok();
}

double GradientSumOfSquares(const CpuOptimizerOptions& options, const void* grad, DType dtype,
                            size_t n) {
  return optimizer_internal::ParallelSumOfSquares(options.isa.value_or(DetectSimdIsa()), grad,
                                                  dtype, n);
}

StepReport GlobalNormReport(const CpuOptimizerOptions& options,
                            const std::vector<double>& sums_in_expert_order, float grad_scale) {
  StepReport report;
  double total = 0;
  for (double sum : sums_in_expert_order) total += sum;  // in the order given: deterministic
  report.global_norm = std::sqrt(total) / grad_scale;
  report.skipped = !std::isfinite(total) && options.skip_step_on_nonfinite;
  if (!report.skipped && options.max_grad_norm > 0 && std::isfinite(report.global_norm)) {
    report.clip_coefficient =
        static_cast<float>(std::min(1.0, options.max_grad_norm / (report.global_norm + 1e-6)));
  }
  return report;
}

StatusOr<StepReport> CpuOptimizer::FinishStep() {
  StepReport report;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (!impl_->in_step) return FailedPreconditionError("FinishStep without BeginStep");
    impl_->in_step = false;
    report.step = impl_->current_step;
  }
  std::vector<Pending>& pending = impl_->pending;
  report.experts_submitted = static_cast<uint32_t>(pending.size());
  if (!impl_->deferred()) return report;

  std::sort(pending.begin(), pending.end(),
            [](const Pending& a, const Pending& b) { return a.expert < b.expert; });
  impl_->arena.execute([&] {
    // Isolated: the driving thread runs no queued update of the previous step meanwhile.
    tbb::this_task_arena::isolate([&] {
      tbb::parallel_for(size_t{0}, pending.size(), [&](size_t i) {
        Pending& p = pending[i];
        if (!p.sum_of_squares)
          p.sum_of_squares = optimizer_internal::ParallelSumOfSquares(
              impl_->isa, p.grad, p.dtype, impl_->experts[p.expert].arrays.size);
      });
    });
  });
  std::vector<double> sums;
  sums.reserve(pending.size());
  for (const Pending& p : pending) sums.push_back(*p.sum_of_squares);
  const StepReport norm = GlobalNormReport(impl_->options, sums, impl_->grad_scale);
  report.global_norm = norm.global_norm;
  report.clip_coefficient = norm.clip_coefficient;
  if (norm.skipped) {
    report.skipped = true;
    for (const Pending& p : pending) impl_->Finish(p.expert, report.step, false, Status::Ok());
    return report;
  }
  for (const Pending& p : pending) {
    impl_->Launch(p.expert, p, report.step, report.clip_coefficient, /*check_finite=*/true);
  }
  return report;
}

Status CpuOptimizer::AbortStep() {
  uint64_t step;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (!impl_->in_step) return FailedPreconditionError("AbortStep without BeginStep");
    impl_->in_step = false;
    step = impl_->current_step;
  }
  for (const Pending& p : impl_->pending) impl_->Finish(p.expert, step, false, Status::Ok());
  impl_->pending.clear();
  return Status::Ok();
}

Status CpuOptimizer::WaitForExpert(uint32_t expert, uint64_t step) {
  if (expert >= impl_->experts.size())
    return InvalidArgumentError(StrCat("unknown expert ", expert));
  std::unique_lock<std::mutex> lock(impl_->mutex);
  ExpertState& state = impl_->experts[expert];
  if (state.submitted_step < step) return Status::Ok();  // not submitted in that step
  if (impl_->in_step && step == impl_->current_step && impl_->deferred()) {
    return FailedPreconditionError(StrCat("expert ", expert, " step ", step,
                                          " cannot finish before FinishStep (deferred updates)"));
  }
  impl_->WaitFor(lock, state, [&] { return state.processed_step >= step; });
  return state.error_step == step ? state.error : Status::Ok();
}

uint32_t CpuOptimizer::Expedite(const std::vector<uint32_t>& experts) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  uint32_t moved = 0;
  for (uint32_t e : experts) moved += impl_->ExpediteLocked(e);
  return moved;
}

Status CpuOptimizer::WaitForSteps(uint64_t step) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  if (impl_->in_step && step >= impl_->current_step && impl_->deferred()) {
    return FailedPreconditionError(StrCat("step ", impl_->current_step,
                                          " cannot finish before FinishStep (deferred updates)"));
  }
  ++impl_->step_waiters;
  impl_->cv.wait(
      lock, [&] { return impl_->outstanding.empty() || impl_->outstanding.begin()->first > step; });
  --impl_->step_waiters;
  return Status::Ok();
}

Status CpuOptimizer::Synchronize() {
  // The caller waits inside the arena, so it runs queued updates too: a step that waits for
  // its updates gets one thread more (Note [The driving thread helps], tools/plan).
  impl_->arena.execute([&] { impl_->tasks.wait(); });
  return TakeError();
}

Status CpuOptimizer::TakeError() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Status error = std::move(impl_->first_error);
  impl_->first_error = Status::Ok();
  return error;
}

uint64_t CpuOptimizer::version(uint32_t expert) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return expert < impl_->experts.size() ? impl_->experts[expert].version : 0;
}

uint64_t CpuOptimizer::processed_step(uint32_t expert) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return expert < impl_->experts.size() ? impl_->experts[expert].processed_step : 0;
}

uint64_t CpuOptimizer::current_step() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->current_step;
}
SimdIsa CpuOptimizer::isa() const { return impl_->isa; }

double CpuOptimizer::busy_seconds() const {
  std::lock_guard<std::mutex> lock(impl_->busy_mutex);
  return impl_->busy_seconds;
}

}  // namespace ecss
