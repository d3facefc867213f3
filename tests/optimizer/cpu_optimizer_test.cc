#include "optimizer/cpu_optimizer.h"

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/random.h"

namespace ecss {
namespace {

struct Expert {
  std::vector<float> master, m, v;
  std::vector<BFloat16> copy;
  explicit Expert(size_t n, uint64_t seed) : master(n), m(n, 0), v(n, 0), copy(n) {
    CounterRng rng(seed, 1);
    for (float& x : master) x = rng.UniformFloat() - 0.5f;
  }
  ExpertArrays Arrays(uint32_t group = 0) {
    return ExpertArrays{master.data(), m.data(), v.data(), copy.data(), master.size(), group};
  }
  bool operator==(const Expert& o) const {
    return master == o.master && m == o.m && v == o.v &&
           std::memcmp(copy.data(), o.copy.data(), copy.size() * 2) == 0;
  }
};

std::vector<float> Gradient(size_t n, uint64_t step, uint32_t expert) {
  CounterRng rng(step * 1000 + expert, 2);
  std::vector<float> g(n);
  for (float& x : g) x = 4 * (rng.UniformFloat() - 0.5f);
  return g;
}

const std::vector<size_t> kSizes = {1, 1000, 70000, 200000, 3, 65536};

// Which experts a step touches: not all, so that step counts differ between experts.
bool Touched(uint64_t step, uint32_t expert) { return (step + expert) % 3 != 0; }

std::vector<Expert> Train(CpuOptimizerOptions options, int steps) {
  std::vector<Expert> experts;
  for (uint32_t e = 0; e < kSizes.size(); ++e) experts.emplace_back(kSizes[e], e);
  auto optimizer = CpuOptimizer::Create(options);
  EXPECT_TRUE(optimizer.ok()) << optimizer.status();
  for (Expert& expert : experts) EXPECT_TRUE((*optimizer)->RegisterExpert(expert.Arrays()).ok());
  std::vector<std::vector<float>> grads(kSizes.size());
  for (int step = 1; step <= steps; ++step) {
    EXPECT_TRUE((*optimizer)->BeginStep(2.0f).ok());
    for (uint32_t e = 0; e < kSizes.size(); ++e) {
      if (!Touched(step, e)) continue;
      EXPECT_TRUE((*optimizer)->WaitForExpert(e, step - 1).ok());  // before reusing its buffer
      grads[e] = Gradient(kSizes[e], step, e);
      EXPECT_TRUE((*optimizer)->SubmitGradient(e, grads[e].data(), DType::kF32).ok());
    }
    EXPECT_TRUE((*optimizer)->FinishStep().ok());
  }
  EXPECT_TRUE((*optimizer)->Synchronize().ok());
  return experts;
}

TEST(CpuOptimizerTest, BitIdenticalForAnyThreadsChunksPathsAndModes) {
  CpuOptimizerOptions base;
  base.groups[0].weight_decay = 0.01f;
  base.max_grad_norm = 5.0f;
  const std::vector<Expert> reference = Train(base, 5);
  for (int threads : {1, 2}) {
    for (size_t chunk : {size_t{1024}, size_t{4096 + 16}, size_t{1} << 20}) {
      CpuOptimizerOptions options = base;
      options.threads = threads;
      options.chunk_elements = chunk;
      EXPECT_TRUE(Train(options, 5) == reference) << threads << " threads, chunk " << chunk;
    }
  }
  CpuOptimizerOptions scalar = base;
  scalar.isa = SimdIsa::kScalar;
  scalar.threads = 2;
  EXPECT_TRUE(Train(scalar, 5) == reference) << "scalar path";
}

// A resumed expert (its states copied out after two updates and registered again with
// updates = 2) takes its third and fourth updates as if never stopped: its bias correction
// continues at t = 3.
TEST(CpuOptimizerTest, AnExpertRegisteredWithItsUpdatesContinuesBitForBit) {
  CpuOptimizerOptions options;
  options.skip_step_on_nonfinite = false;
  auto train = [&](CpuOptimizer& optimizer, uint32_t id, uint64_t first, uint64_t last) {
    for (uint64_t step = first; step <= last; ++step) {
      ASSERT_TRUE(optimizer.BeginStep().ok());
      const std::vector<float> grad = Gradient(3000, step, 0);
      ASSERT_TRUE(optimizer.SubmitGradient(id, grad.data(), DType::kF32).ok());
      ASSERT_TRUE(optimizer.FinishStep().ok());
      ASSERT_TRUE(optimizer.Synchronize().ok());
    }
  };
  Expert straight(3000, 4), stopped(3000, 4);
  auto once = *CpuOptimizer::Create(options);
  train(*once, *once->RegisterExpert(straight.Arrays()), 1, 4);
  auto before = *CpuOptimizer::Create(options);
  train(*before, *before->RegisterExpert(stopped.Arrays()), 1, 2);
  Expert resumed = stopped;  // what a checkpoint holds
  ExpertArrays arrays = resumed.Arrays();
  arrays.updates = before->version(0);
  auto after = *CpuOptimizer::Create(options);
  const uint32_t id = *after->RegisterExpert(arrays);
  EXPECT_EQ(after->version(id), 2u);
  train(*after, id, 3, 4);
  EXPECT_EQ(after->version(id), 4u);
  EXPECT_TRUE(resumed == straight);
  // Registered as new instead (updates = 0), the same states diverge: the step count matters.
  Expert restarted = stopped;
  auto fresh = *CpuOptimizer::Create(options);
  train(*fresh, *fresh->RegisterExpert(restarted.Arrays()), 3, 4);
  EXPECT_FALSE(restarted.master == straight.master);
}

// eps = 0 divides 0 by 0 for an element whose gradients were all zero: refused for the kinds
// that divide by sqrt(state) + eps, at creation and when set later.
TEST(CpuOptimizerTest, ZeroEpsIsRefusedWhereItDividesByZero) {
  CpuOptimizerOptions options;
  for (OptimizerKind kind :
       {OptimizerKind::kAdamW, OptimizerKind::kAdam, OptimizerKind::kAdagrad}) {
    options.kind = kind;
    options.groups[0].eps = 0;
    StatusOr<std::unique_ptr<CpuOptimizer>> made = CpuOptimizer::Create(options);
    ASSERT_FALSE(made.ok()) << OptimizerKindName(kind);
    EXPECT_EQ(made.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(made.status().ToString().find("eps"), std::string::npos);
    options.groups[0].eps = 1e-8f;
    std::unique_ptr<CpuOptimizer> optimizer = *CpuOptimizer::Create(options);
    options.groups[0].eps = 0;
    EXPECT_EQ(optimizer->SetHyperParams(0, options.groups[0]).code(), StatusCode::kInvalidArgument);
  }
  options.kind = OptimizerKind::kSgdMomentum;  // no eps in its update
  EXPECT_TRUE(CpuOptimizer::Create(options).ok());
}

TEST(CpuOptimizerTest, UntouchedExpertsKeepTheirOwnStepCount) {
  CpuOptimizerOptions options;
  options.skip_step_on_nonfinite = false;  // immediate mode
  auto optimizer = *CpuOptimizer::Create(options);
  Expert a(5000, 1), b(5000, 2), b_alone(5000, 2);
  const uint32_t ia = *optimizer->RegisterExpert(a.Arrays());
  const uint32_t ib = *optimizer->RegisterExpert(b.Arrays());
  std::vector<std::vector<float>> grads;
  for (uint64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(optimizer->BeginStep().ok());
    grads.push_back(Gradient(5000, step, 0));
    ASSERT_TRUE(optimizer->SubmitGradient(ia, grads.back().data(), DType::kF32).ok());
    if (step != 2) {
      grads.push_back(Gradient(5000, step, 1));
      ASSERT_TRUE(optimizer->SubmitGradient(ib, grads.back().data(), DType::kF32).ok());
    }
    ASSERT_TRUE(optimizer->FinishStep().ok());
    ASSERT_TRUE(optimizer->WaitForExpert(ia, step).ok());
    ASSERT_TRUE(optimizer->WaitForExpert(ib, step).ok());
  }
  EXPECT_EQ(optimizer->version(ia), 3u);
  EXPECT_EQ(optimizer->version(ib), 2u);
  // b equals an expert updated twice with the same gradients: bias correction at t = 1, 2.
  auto alone = *CpuOptimizer::Create(options);
  const uint32_t id = *alone->RegisterExpert(b_alone.Arrays());
  for (uint64_t step : {1u, 3u}) {
    std::vector<float> g = Gradient(5000, step, 1);
    ASSERT_TRUE(alone->BeginStep().ok());
    ASSERT_TRUE(alone->SubmitGradient(id, g.data(), DType::kF32).ok());
    ASSERT_TRUE(alone->FinishStep().ok());
    ASSERT_TRUE(alone->Synchronize().ok());
  }
  EXPECT_TRUE(b == b_alone);
}

TEST(CpuOptimizerTest, OverflowSkipsTheWholeStep) {
  CpuOptimizerOptions options;  // skip_step_on_nonfinite by default
  auto optimizer = *CpuOptimizer::Create(options);
  Expert a(3000, 1), b(3000, 2);
  const Expert a0 = a, b0 = b;
  ASSERT_TRUE(optimizer->RegisterExpert(a.Arrays()).ok());
  ASSERT_TRUE(optimizer->RegisterExpert(b.Arrays()).ok());
  std::vector<float> ga = Gradient(3000, 1, 0), gb = Gradient(3000, 1, 1);
  gb[1234] = std::numeric_limits<float>::infinity();
  ASSERT_TRUE(optimizer->BeginStep(65536.0f).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(0, ga.data(), DType::kF32).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(1, gb.data(), DType::kF32).ok());
  StatusOr<StepReport> report = optimizer->FinishStep();
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->skipped);
  ASSERT_TRUE(optimizer->Synchronize().ok());
  EXPECT_TRUE(a == a0 && b == b0) << "nothing changed";
  EXPECT_EQ(optimizer->version(0), 0u);
  EXPECT_TRUE(optimizer->WaitForExpert(0, 1).ok()) << "the fence still passes";
  // The next step proceeds normally.
  gb[1234] = 0;
  ASSERT_TRUE(optimizer->BeginStep(1.0f).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(1, gb.data(), DType::kF32).ok());
  ASSERT_FALSE(optimizer->FinishStep()->skipped);
  ASSERT_TRUE(optimizer->Synchronize().ok());
  EXPECT_EQ(optimizer->version(1), 1u);
  EXPECT_FALSE(b == b0);
}

TEST(CpuOptimizerTest, NonFiniteGradientNeverReachesTheWeightsInImmediateMode) {
  CpuOptimizerOptions options;
  options.skip_step_on_nonfinite = false;
  auto optimizer = *CpuOptimizer::Create(options);
  Expert a(3000, 1), b(3000, 2);
  const Expert b0 = b;
  ASSERT_TRUE(optimizer->RegisterExpert(a.Arrays()).ok());
  ASSERT_TRUE(optimizer->RegisterExpert(b.Arrays()).ok());
  std::vector<float> ga = Gradient(3000, 1, 0), gb = Gradient(3000, 1, 1);
  gb[7] = std::nanf("");
  ASSERT_TRUE(optimizer->BeginStep().ok());
  ASSERT_TRUE(optimizer->SubmitGradient(0, ga.data(), DType::kF32).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(1, gb.data(), DType::kF32).ok());
  ASSERT_TRUE(optimizer->FinishStep().ok());
  EXPECT_TRUE(optimizer->WaitForExpert(0, 1).ok());
  Status bad = optimizer->WaitForExpert(1, 1);
  EXPECT_EQ(bad.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.message().find("expert 1 step 1"), std::string_view::npos) << bad;
  EXPECT_TRUE(b == b0);
  EXPECT_EQ(optimizer->version(0), 1u);
  EXPECT_EQ(optimizer->version(1), 0u);
  EXPECT_EQ(optimizer->Synchronize().code(), StatusCode::kFailedPrecondition);
}

TEST(CpuOptimizerTest, GlobalNormClipping) {
  CpuOptimizerOptions options;
  options.max_grad_norm = 1.0f;
  auto optimizer = *CpuOptimizer::Create(options);
  Expert a(1000, 1), b(2000, 2);
  ASSERT_TRUE(optimizer->RegisterExpert(a.Arrays()).ok());
  ASSERT_TRUE(optimizer->RegisterExpert(b.Arrays()).ok());
  std::vector<float> ga = Gradient(1000, 1, 0), gb = Gradient(2000, 1, 1);
  double expected = 0;
  for (float g : ga) expected += double{g} * g;
  for (float g : gb) expected += double{g} * g;
  expected = std::sqrt(expected) / 4.0;
  ASSERT_TRUE(optimizer->BeginStep(4.0f).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(1, gb.data(), DType::kF32).ok());
  ASSERT_TRUE(optimizer->SubmitGradient(0, ga.data(), DType::kF32).ok());
  StatusOr<StepReport> report = optimizer->FinishStep();
  ASSERT_TRUE(report.ok());
  EXPECT_NEAR(report->global_norm, expected, 1e-9 * expected);
  EXPECT_FLOAT_EQ(report->clip_coefficient, static_cast<float>(1.0 / (expected + 1e-6)));
  ASSERT_TRUE(optimizer->Synchronize().ok());
  // The same update done by hand with that coefficient.
  Expert manual(1000, 1);
  UpdateRange(
      DetectSimdIsa(),
      MakeUpdateScalars(OptimizerKind::kAdamW, HyperParams{}, 1, 4.0f, report->clip_coefficient),
      ParamArrays{manual.master.data(), ga.data(), DType::kF32, manual.m.data(), manual.v.data(),
                  manual.copy.data(), 1000},
      0, 1000);
  EXPECT_TRUE(a == manual);
}

TEST(CpuOptimizerTest, BadInputIsRefusedAndChangesNothing) {
  CpuOptimizerOptions options;
  options.threads = 0;
  EXPECT_EQ(CpuOptimizer::Create(options).status().code(), StatusCode::kInvalidArgument);
  options = CpuOptimizerOptions{};
  options.chunk_elements = 10;
  EXPECT_EQ(CpuOptimizer::Create(options).status().code(), StatusCode::kInvalidArgument);
  options = CpuOptimizerOptions{};
  options.groups[0].lr = -1;
  Status lr = CpuOptimizer::Create(options).status();
  EXPECT_NE(lr.message().find("parameter group 0"), std::string_view::npos) << lr;

  auto optimizer = *CpuOptimizer::Create(CpuOptimizerOptions{});
  Expert a(100, 1);
  ExpertArrays missing_v = a.Arrays();
  missing_v.state1 = nullptr;
  EXPECT_EQ(optimizer->RegisterExpert(missing_v).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(optimizer->RegisterExpert(a.Arrays(3)).status().code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(optimizer->RegisterExpert(a.Arrays()).ok());
  std::vector<float> g(100, 1.0f);
  EXPECT_EQ(optimizer->SubmitGradient(0, g.data(), DType::kF32).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(optimizer->FinishStep().status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(optimizer->BeginStep(0.0f).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(optimizer->BeginStep().ok());
  EXPECT_EQ(optimizer->BeginStep().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(optimizer->SubmitGradient(5, g.data(), DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(optimizer->SubmitGradient(0, nullptr, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(optimizer->SubmitGradient(0, g.data(), DType::kF16).code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(optimizer->SubmitGradient(0, g.data(), DType::kF32).ok());
  EXPECT_EQ(optimizer->SubmitGradient(0, g.data(), DType::kF32).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(optimizer->WaitForExpert(0, 1).code(), StatusCode::kFailedPrecondition)
      << "deferred updates cannot finish before FinishStep";
  ASSERT_TRUE(optimizer->FinishStep().ok());
  EXPECT_TRUE(optimizer->WaitForExpert(0, 1).ok());
  EXPECT_EQ(optimizer->version(0), 1u);
}

// WaitForExpert may be called from any thread while the driving thread begins and finishes
// steps (the session's fetches wait from the driving thread, its tests and tools from others):
// the step state it reads is written under the same lock (ThreadSanitizer found the race), and
// every wait returns once its step's update finished.
TEST(CpuOptimizerTest, WaitForExpertFromAnotherThreadWhileStepsBeginAndFinish) {
  for (bool deferred : {false, true}) {
    CpuOptimizerOptions options;
    options.skip_step_on_nonfinite = deferred;
    auto optimizer = CpuOptimizer::Create(options);
    ASSERT_TRUE(optimizer.ok());
    Expert expert(4096, 3);
    ASSERT_TRUE((*optimizer)->RegisterExpert(expert.Arrays()).ok());
    constexpr uint64_t kSteps = 50;
    std::atomic<uint64_t> submitted{0};
    std::thread waiter([&] {
      for (uint64_t step = 1; step <= kSteps; ++step) {
        while (submitted.load() < step) std::this_thread::yield();
        // Deferred updates cannot finish before FinishStep: that is the one refusal allowed.
        Status waited;
        do {
          waited = (*optimizer)->WaitForExpert(0, step);
        } while (waited.code() == StatusCode::kFailedPrecondition);
        EXPECT_TRUE(waited.ok()) << waited;
        EXPECT_GE((*optimizer)->version(0), step);
        EXPECT_GE((*optimizer)->processed_step(0), step);
      }
    });
    std::vector<float> grad = Gradient(4096, 1, 0);
    for (uint64_t step = 1; step <= kSteps; ++step) {
      ASSERT_TRUE((*optimizer)->BeginStep().ok());
      ASSERT_TRUE((*optimizer)->SubmitGradient(0, grad.data(), DType::kF32).ok());
      submitted.store(step);
      ASSERT_TRUE((*optimizer)->FinishStep().ok());
      EXPECT_EQ((*optimizer)->current_step(), step);
      ASSERT_TRUE((*optimizer)->WaitForExpert(0, step).ok());  // before the buffer is reused
    }
    waiter.join();
    EXPECT_TRUE((*optimizer)->Synchronize().ok());
  }
}

// An update's failure is reported once: one bad step does not fail every later Synchronize.
TEST(CpuOptimizerTest, AnUpdateErrorIsReportedOnce) {
  CpuOptimizerOptions options;
  options.skip_step_on_nonfinite = false;
  auto optimizer = CpuOptimizer::Create(options);
  ASSERT_TRUE(optimizer.ok());
  Expert expert(1000, 4);
  ASSERT_TRUE((*optimizer)->RegisterExpert(expert.Arrays()).ok());
  std::vector<float> bad = Gradient(1000, 1, 0);
  bad[3] = INFINITY;
  ASSERT_TRUE((*optimizer)->BeginStep().ok());
  ASSERT_TRUE((*optimizer)->SubmitGradient(0, bad.data(), DType::kF32).ok());
  ASSERT_TRUE((*optimizer)->FinishStep().ok());
  const Status failed = (*optimizer)->Synchronize();
  EXPECT_EQ(failed.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(failed.message().find("expert 0 step 1"), std::string_view::npos) << failed;
  EXPECT_TRUE((*optimizer)->Synchronize().ok());
  EXPECT_TRUE((*optimizer)->TakeError().ok());
  std::vector<float> good = Gradient(1000, 2, 0);
  ASSERT_TRUE((*optimizer)->BeginStep().ok());
  ASSERT_TRUE((*optimizer)->SubmitGradient(0, good.data(), DType::kF32).ok());
  ASSERT_TRUE((*optimizer)->FinishStep().ok());
  EXPECT_TRUE((*optimizer)->Synchronize().ok());
  EXPECT_EQ((*optimizer)->version(0), 1u);
}

// Holds the optimizer's one thread at the start of the first update until Release, and
// records the order in which updates start.
struct StartGate {
  std::mutex mutex;
  std::condition_variable cv;
  bool released = false;
  std::vector<uint32_t> started;

  void Started(uint32_t expert) {
    std::unique_lock<std::mutex> lock(mutex);
    started.push_back(expert);
    cv.wait(lock, [&] { return released; });
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      released = true;
    }
    cv.notify_all();
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return started.size();
  }
};

// Note [The optimizer's run queue]: updates start in launch order, except that Expedite moves
// queued ones ahead in the order it names them; running, finished and unknown experts do not
// move. The order changes no result.
TEST(CpuOptimizerTest, ExpeditedUpdatesStartFirstInTheOrderNamed) {
  for (bool deferred : {false, true}) {
    StartGate gate;
    CpuOptimizerOptions options;
    options.threads = 1;
    options.skip_step_on_nonfinite = deferred;
    options.on_update_start = [&](uint32_t e, uint64_t, auto) { gate.Started(e); };
    auto optimizer = CpuOptimizer::Create(options);
    ASSERT_TRUE(optimizer.ok());
    std::vector<Expert> experts, reference;
    for (uint32_t e = 0; e < 6; ++e) {
      experts.emplace_back(5000, e);
      reference.emplace_back(5000, e);
      ASSERT_TRUE((*optimizer)->RegisterExpert(experts.back().Arrays()).ok());
    }
    std::vector<std::vector<float>> grads;
    for (uint32_t e = 0; e < 6; ++e) grads.push_back(Gradient(5000, 1, e));
    ASSERT_TRUE((*optimizer)->BeginStep().ok());
    for (uint32_t e = 0; e < 6; ++e) {
      ASSERT_TRUE((*optimizer)->SubmitGradient(e, grads[e].data(), DType::kF32).ok());
      // Immediate mode: expert 0's update starts at its submission, and holds the thread.
      while (!deferred && gate.count() == 0) std::this_thread::yield();
    }
    if (deferred) {
      EXPECT_EQ((*optimizer)->Expedite({5}), 0u) << "deferred: not launched before FinishStep";
      ASSERT_TRUE((*optimizer)->FinishStep().ok());
      while (gate.count() == 0) std::this_thread::yield();
    }
    EXPECT_EQ((*optimizer)->Expedite({5}), 1u);
    EXPECT_EQ((*optimizer)->Expedite({4, 0, 2, 9, 4}), 2u)
        << "4 and 2 move, behind 5; the running update, an unknown expert and a repeat do not";
    gate.Release();
    // All started on the optimizer's thread before anyone else waits in the arena (a thread
    // waiting there runs queued updates too, and the order of their starts would interleave).
    while (gate.count() < 6) std::this_thread::yield();
    if (!deferred) {
      ASSERT_TRUE((*optimizer)->FinishStep().ok());
    }
    ASSERT_TRUE((*optimizer)->Synchronize().ok());
    EXPECT_EQ(gate.started, (std::vector<uint32_t>{0, 5, 4, 2, 1, 3}));
    EXPECT_EQ((*optimizer)->Expedite({0, 1}), 0u) << "nothing is queued";

    // The same updates in launch order give the same bits.
    CpuOptimizerOptions plain;
    plain.skip_step_on_nonfinite = deferred;
    auto in_order = CpuOptimizer::Create(plain);
    ASSERT_TRUE(in_order.ok());
    for (Expert& expert : reference) ASSERT_TRUE((*in_order)->RegisterExpert(expert.Arrays()).ok());
    ASSERT_TRUE((*in_order)->BeginStep().ok());
    for (uint32_t e = 0; e < 6; ++e) {
      ASSERT_TRUE((*in_order)->SubmitGradient(e, grads[e].data(), DType::kF32).ok());
    }
    ASSERT_TRUE((*in_order)->FinishStep().ok());
    ASSERT_TRUE((*in_order)->Synchronize().ok());
    for (uint32_t e = 0; e < 6; ++e) {
      EXPECT_TRUE(experts[e] == reference[e]) << "expert " << e;
    }
  }
}

// WaitForSteps returns once every update of the steps named finished (one wake-up, not one
// per expert), and refuses the deferred step that FinishStep has not started.
TEST(CpuOptimizerTest, WaitForStepsWaitsForEveryUpdateOfThoseSteps) {
  StartGate gate;
  CpuOptimizerOptions options;
  options.threads = 1;
  options.skip_step_on_nonfinite = false;
  options.on_update_start = [&](uint32_t e, uint64_t, auto) { gate.Started(e); };
  auto optimizer = CpuOptimizer::Create(options);
  ASSERT_TRUE(optimizer.ok());
  std::vector<Expert> experts;
  for (uint32_t e = 0; e < 3; ++e) experts.emplace_back(3000, e);
  for (Expert& expert : experts) ASSERT_TRUE((*optimizer)->RegisterExpert(expert.Arrays()).ok());
  std::vector<float> grad = Gradient(3000, 1, 0);
  ASSERT_TRUE((*optimizer)->BeginStep().ok());
  for (uint32_t e = 0; e < 3; ++e) {
    ASSERT_TRUE((*optimizer)->SubmitGradient(e, grad.data(), DType::kF32).ok());
  }
  ASSERT_TRUE((*optimizer)->FinishStep().ok());
  EXPECT_TRUE((*optimizer)->WaitForSteps(0).ok()) << "no update of step 0: returns at once";
  std::atomic<bool> waited{false};
  std::thread waiter([&] {
    EXPECT_TRUE((*optimizer)->WaitForSteps(1).ok());
    waited = true;
  });
  while (gate.count() == 0) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(waited.load()) << "step 1's updates are held";
  gate.Release();
  waiter.join();
  for (uint32_t e = 0; e < 3; ++e) {
    EXPECT_EQ((*optimizer)->version(e), 1u) << "expert " << e;
  }

  CpuOptimizerOptions deferred_options;  // skip_step_on_nonfinite: updates wait for FinishStep
  auto deferred = CpuOptimizer::Create(deferred_options);
  ASSERT_TRUE(deferred.ok());
  ASSERT_TRUE((*deferred)->RegisterExpert(experts[0].Arrays()).ok());
  ASSERT_TRUE((*deferred)->BeginStep().ok());
  ASSERT_TRUE((*deferred)->SubmitGradient(0, grad.data(), DType::kF32).ok());
  EXPECT_EQ((*deferred)->WaitForSteps(1).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*deferred)->FinishStep().ok());
  EXPECT_TRUE((*deferred)->WaitForSteps(1).ok());
  EXPECT_EQ((*deferred)->version(0), 1u);
}

}  // namespace
}  // namespace ecss
