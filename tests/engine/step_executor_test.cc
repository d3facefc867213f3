// The step executor alone, driven as the session drives it: every op of a step's plan is
// issued and recorded, an evaluation updates nothing, and a discarded step leaves nothing in
// flight.
#include "engine/step_executor.h"

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/engine/reference_trainer.h"

namespace ecss {
namespace {

using engine_test::Batch;
using engine_test::kBatch;
using engine_test::kSeq;
using engine_test::MakeSteps;
using engine_test::OptionsFor;
using engine_test::RunConfig;

// A sim, and what the session would build on it for `c`'s options: the memory plan, the RRE
// router, the expert table, the recorder, and the executor over them.
class Harness {
 public:
  // `adjust` changes the options before anything is built on them.
  explicit Harness(const RunConfig& c, const std::function<void(SessionOptions&)>& adjust = nullptr)
      : options_(OptionsFor(c)) {
    if (adjust) adjust(options_);
    // As the session does: the updater reports when each expert's update ran.
    options_.optimizer.on_update = [this](uint32_t id, uint64_t updater_step,
                                          PlanRecorder::Clock::time_point start,
                                          PlanRecorder::Clock::time_point end) {
      recorder_.UpdateRan(updater_step, table_->index().Id(id).layer, start, end);
    };
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    sim_ = std::move(SimBackend::Create(so)).value();
    auto kernels = std::move(KernelRunner::Create(*sim_, {})).value();
    const GroupedFfnProblem sizing = FfnProblemOf(options_, MaxRows(options_));
    memory_ = std::move(PlanMemory(options_, DeviceMemoryRules::Of(sim_->capabilities()),
                                   std::max(kernels->FfnForwardWorkspaceBytes(sizing),
                                            kernels->FfnBackwardWorkspaceBytes(sizing))))
                  .value();
    const ModelSpec& m = options_.model;
    DomainMap map = std::move(DomainMap::Create(m.layers)).value();
    for (uint32_t d = 0; d < m.domains.size(); ++d) {
      EXPECT_TRUE(map.AddDomainUniform(m.domains[d].name, d, m.domains[d].experts).ok());
    }
    router_.emplace(std::move(RreRouter::Create(map, {m.vocab, m.seed, m.builder})).value());
    table_ = std::move(ExpertTable::Create(*sim_, options_, memory_)).value();
    executor_ = std::move(StepExecutor::Create(*sim_, options_, memory_, std::move(kernels),
                                               &*router_, *table_, recorder_))
                    .value();
    const uint64_t bytes = uint64_t{kBatch} * kSeq * m.d_model * DTypeSize(m.dtype);
    for (int i = 0; i < 2; ++i) {
      activations_.push_back(
          std::move(sim_->device_memory().Allocate(bytes, MemoryTag::kActivations)).value());
      EXPECT_TRUE(
          sim_->MemsetAsync(executor_->compute_stream(), activations_.back().data(), 0, bytes)
              .ok());
    }
  }

  StepExecutor& executor() { return *executor_; }
  PlanRecorder& recorder() { return recorder_; }
  void* a() { return activations_[0].data(); }
  void* b() { return activations_[1].data(); }
  uint32_t layers() const { return options_.model.layers; }
  const ExpertIndex& index() const { return table_->index(); }

 private:
  SessionOptions options_;
  std::unique_ptr<SimBackend> sim_;
  MemoryPlan memory_;
  std::optional<RreRouter> router_;
  PlanRecorder recorder_;
  std::unique_ptr<ExpertTable> table_;
  std::unique_ptr<StepExecutor> executor_;
  std::vector<Buffer> activations_;
};

std::vector<MicroBatch> Views(const std::vector<Batch>& step) {
  std::vector<MicroBatch> views;
  for (const Batch& b : step) views.push_back(b.view());
  return views;
}

TEST(StepExecutorTest, RunsEveryOpOfThePlanAndRecordsWhenItRan) {
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    SCOPED_TRACE(StrategyName(strategy));
    RunConfig c;
    c.strategy = strategy;
    c.micro_batches = 2;
    Harness h(c);
    StepExecutor& x = h.executor();
    const auto steps = MakeSteps(1, 2);
    bool opened = false;
    ASSERT_TRUE(x.Begin(Views(steps[0]), 1.0f, false, 1, &opened).ok());
    EXPECT_TRUE(opened);
    ASSERT_EQ(x.micro_batches(), 2u);
    EXPECT_EQ(x.tokens(1), kBatch * kSeq);
    for (uint32_t mb = 0; mb < 2; ++mb) {
      for (uint32_t l = 0; l < h.layers(); ++l) {
        ASSERT_TRUE(x.Forward(mb, l, h.a(), h.b(), nullptr, nullptr).ok());
        EXPECT_TRUE(x.progress(mb, l).forwarded);
      }
      for (uint32_t l = h.layers(); l-- > 0;) {
        ASSERT_TRUE(x.Backward(mb, l, h.b(), h.a()).ok());
        EXPECT_TRUE(x.progress(mb, l).backwarded);
      }
    }
    StepExecutor::StepRecord record;
    ASSERT_TRUE(x.Finish(&record).ok());
    ASSERT_TRUE(x.Synchronize(false).ok());
    EXPECT_EQ(record.tokens, 2u * kBatch * kSeq);
    StatusOr<StepPlan> ran = h.recorder().ExecutedPlan(1);
    ASSERT_TRUE(ran.ok()) << ran.status();
    // Every expert the plan updates was submitted, and every op issued on a stream or by the
    // optimizer ended after it started.
    uint32_t planned_updates = 0;
    for (const PlanOp* update : ran->Find(OpKind::kUpdate)) {
      planned_updates += static_cast<uint32_t>(update->experts.size());
    }
    EXPECT_EQ(record.updated_experts, planned_updates);
    EXPECT_GT(planned_updates, 0u);
    for (const PlanOp& op : ran->ops()) {
      if (op.kind == OpKind::kFetch || op.kind == OpKind::kStage || op.kind == OpKind::kEvict) {
        continue;  // the cache may not need a planned fetch (naive's unrouted experts)
      }
      if (op.step_offset != 0) continue;  // the earlier steps' updates this step waits for
      EXPECT_GE(op.start_s, 0) << OpKindName(op.kind) << " " << op.id;
      EXPECT_GE(op.end_s, op.start_s) << OpKindName(op.kind) << " " << op.id;
    }
  }
}

TEST(StepExecutorTest, AnEvaluationUpdatesNothingAndADiscardedStepLeavesNothingInFlight) {
  Harness h(RunConfig{});
  StepExecutor& x = h.executor();
  const auto steps = MakeSteps(3, 1);
  bool opened = false;
  ASSERT_TRUE(x.Begin(Views(steps[0]), 1.0f, true, 1, &opened).ok());
  for (uint32_t l = 0; l < h.layers(); ++l) {
    ASSERT_TRUE(x.Forward(0, l, h.a(), h.b(), nullptr, nullptr).ok());
  }
  StepExecutor::StepRecord evaluation;
  ASSERT_TRUE(x.Finish(&evaluation).ok());
  EXPECT_EQ(evaluation.updated_experts, 0u);
  EXPECT_EQ(evaluation.gradient_bytes, 0u);
  // A step begun and dropped before any Forward: the next one runs whole.
  ASSERT_TRUE(x.Begin(Views(steps[1]), 1.0f, false, 2, &opened).ok());
  EXPECT_TRUE(opened);
  x.Discard(opened);
  ASSERT_TRUE(x.Begin(Views(steps[2]), 1.0f, false, 3, &opened).ok());
  for (uint32_t l = 0; l < h.layers(); ++l) {
    ASSERT_TRUE(x.Forward(0, l, h.a(), h.b(), nullptr, nullptr).ok());
  }
  for (uint32_t l = h.layers(); l-- > 0;) ASSERT_TRUE(x.Backward(0, l, h.b(), h.a()).ok());
  StepExecutor::StepRecord trained;
  ASSERT_TRUE(x.Finish(&trained).ok());
  EXPECT_GT(trained.updated_experts, 0u);
  EXPECT_TRUE(x.Synchronize(false).ok());
  EXPECT_TRUE(x.TakeUpdateError().ok());
}

// Note [Updates in fetch order]: step 2 begins while step 1's updates wait behind the one
// that runs; they then run in the order step 2 fetches their experts (forward: layer 0
// first), not in the order step 1's backward submitted them (last layer first).
TEST(StepExecutorTest, TheNextStepsFetchOrderIsTheOrderOfTheUpdatesItWaitsFor) {
  std::mutex mutex;
  std::condition_variable cv;
  bool released = false;
  std::vector<uint32_t> started;
  RunConfig c;
  c.immediate = true;
  Harness h(c, [&](SessionOptions& options) {
    options.optimizer.threads = 1;
    options.optimizer.on_update_start = [&](uint32_t id, uint64_t, auto) {
      std::unique_lock<std::mutex> lock(mutex);
      started.push_back(id);
      cv.wait(lock, [&] { return released; });  // the first update holds the thread
    };
  });
  StepExecutor& x = h.executor();
  const auto steps = MakeSteps(1, 1);
  auto run_step = [&](uint64_t step, bool release_after_begin) {
    bool opened = false;
    ASSERT_TRUE(x.Begin(Views(steps[0]), 1.0f, false, step, &opened).ok());
    if (release_after_begin) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        released = true;
      }
      cv.notify_all();
    }
    for (uint32_t l = 0; l < h.layers(); ++l) {
      ASSERT_TRUE(x.Forward(0, l, h.a(), h.b(), nullptr, nullptr).ok());
    }
    for (uint32_t l = h.layers(); l-- > 0;) ASSERT_TRUE(x.Backward(0, l, h.b(), h.a()).ok());
    StepExecutor::StepRecord record;
    ASSERT_TRUE(x.Finish(&record).ok());
  };
  run_step(1, false);  // its updates queue behind the first, held
  for (;;) {           // (the optimizer's thread may start after every submission)
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!started.empty()) break;
    }
    std::this_thread::yield();
  }
  run_step(2, true);  // the same batch: step 2 fetches every expert step 1 updates
  ASSERT_TRUE(x.Synchronize(false).ok());

  StatusOr<StepPlan> plan = h.recorder().ExecutedPlan(2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<uint32_t> fetch_order;  // step 2's forward order
  for (const PlanOp* forward : plan->Find(OpKind::kForward)) {
    for (uint32_t e : forward->experts) {
      fetch_order.push_back(h.index().Flat({static_cast<uint32_t>(forward->layer), e}));
    }
  }
  std::lock_guard<std::mutex> lock(mutex);
  ASSERT_EQ(started.size(), 2 * fetch_order.size()) << "each step updates what it fetched";
  EXPECT_NE(h.index().Id(started[0]).layer, 0u) << "step 1 submitted its last layer first";
  std::vector<uint32_t> expected = {started[0]};  // it was running when step 2 began
  for (uint32_t id : fetch_order) {
    if (id != started[0]) expected.push_back(id);
  }
  EXPECT_EQ(std::vector<uint32_t>(started.begin(), started.begin() + expected.size()), expected);
}

}  // namespace
}  // namespace ecss
