// The training loop the engine's exactness tests share: a small RRE model, deterministic
// batches, a loop with a fixed embedding and residual sparse layers, and the resident
// reference trainer (CPU kernels and CpuOptimizer called directly, everything in host memory)
// whose weights a session's must match bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/session.h"
#include "offload/io/io_engine.h"
#include "router/gates.h"
#include "runtime/base/dtype.h"
#include "runtime/base/random.h"

namespace ecss::engine_test {

inline constexpr uint32_t kBatch = 2, kSeq = 8, kVocab = 64;

inline ModelSpec SmallModel(DType dtype) {
  ModelSpec m;
  m.layers = 2;
  m.d_model = 16;
  m.d_ff = 24;
  m.activation = Activation::kGelu;
  m.dtype = dtype;
  m.domains = {{"c", 2}, {"python", 3}, {"docs", 2}};
  m.vocab = kVocab;
  m.seed = 5;
  return m;
}

// The batches of every step: deterministic tokens and domains.
struct Batch {
  std::vector<uint32_t> tokens, domains;
  MicroBatch view() const { return {tokens.data(), kBatch, kSeq, domains.data()}; }
};
inline std::vector<std::vector<Batch>> MakeSteps(int steps, int micro_batches) {
  CounterRng rng(11, 0);
  std::vector<std::vector<Batch>> out(steps);
  for (auto& step : out) {
    for (int m = 0; m < micro_batches; ++m) {
      Batch b;
      for (uint32_t i = 0; i < kBatch * kSeq; ++i) b.tokens.push_back(rng.Uniform(kVocab));
      for (uint32_t i = 0; i < kBatch; ++i) b.domains.push_back(rng.Uniform(3));
      step.push_back(std::move(b));
    }
  }
  return out;
}

inline float RoundTo(DType dtype, float v) {
  return dtype == DType::kBF16 ? Bf16ToFloat(FloatToBf16(v)) : v;
}

// The loop both trainers share: a fixed embedding, residual sparse layers, loss 0.5 |x_L|^2.
// `forward(mb, layer, x) -> y` and `backward(mb, layer, dy) -> dx` are the sparse layers.
// `poison`: the loss gradient of micro-batch 0 holds a NaN (a loss-scaling overflow).
template <typename Fwd, typename Bwd>
void RunLoop(const std::vector<Batch>& step, uint32_t layers, uint32_t d_model, DType dtype,
             Fwd forward, Bwd backward, bool poison = false) {
  for (uint32_t mb = 0; mb < step.size(); ++mb) {
    const auto tokens = static_cast<uint32_t>(step[mb].tokens.size());
    std::vector<float> x(tokens * d_model);
    for (uint32_t t = 0; t < tokens; ++t) {
      for (uint32_t c = 0; c < d_model; ++c) {
        x[t * d_model + c] =
            RoundTo(dtype, 0.1f * static_cast<float>((step[mb].tokens[t] * 7 + c * 3) % 17) - 0.8f);
      }
    }
    for (uint32_t l = 0; l < layers; ++l) {
      const std::vector<float> y = forward(mb, l, x);
      for (size_t i = 0; i < x.size(); ++i) x[i] = RoundTo(dtype, x[i] + y[i]);
    }
    std::vector<float> g = x;
    if (poison && mb == 0) g[0] = std::nanf("");
    for (uint32_t l = layers; l-- > 0;) {
      const std::vector<float> dx = backward(mb, l, g);
      for (size_t i = 0; i < g.size(); ++i) g[i] = RoundTo(dtype, g[i] + dx[i]);
    }
  }
}

inline std::vector<char> ToDevice(const std::vector<float>& v, DType dtype) {
  std::vector<char> out(v.size() * DTypeSize(dtype));
  ConvertFromF32(v.data(), out.data(), dtype, v.size());
  return out;
}
inline std::vector<float> FromDevice(const std::vector<char>& bytes, DType dtype) {
  std::vector<float> out(bytes.size() / DTypeSize(dtype));
  ConvertToF32(bytes.data(), dtype, out.data(), out.size());
  return out;
}

using Weights = std::vector<std::vector<std::vector<float>>>;  // [layer][expert][param]

struct RunConfig {
  std::string device = "sim";  // TrainSession's device (backend_factory.h's settings)
  DType dtype = DType::kF32;
  Strategy strategy = Strategy::kEcss;
  uint64_t device_budget = 0;  // 0: roomy
  int optimizer_threads = 1;
  int micro_batches = 1;
  int steps = 3;
  int first_step = 0;                 // the steps trained are [first_step, first_step + steps)
  std::string nvme_dir;               // non-empty: master weights and moments on NVMe there
  bool resume = false;                // open the state files in nvme_dir instead of creating them
  std::string resume_from;            // placement.resume_from (a checkpoint's directory)
  bool write_initial_states = false;  // placement.write_initial_states
  float max_grad_norm = 0;
  float eps = HyperParams{}.eps;  // AdamW's
  bool gated = false;    // a learned gate (fixed, the same in both trainers) routes every layer
  bool delayed = false;  // the one-step delayed update (DPU)
  bool nvme_weights = false;  // compute weights on NVMe too (in nvme_dir)
  uint32_t staging_blocks = 0;
  bool immediate = false;  // skip_step_on_nonfinite off: updates start as gradients complete
  int poison_step = -1;    // this step's loss gradient holds a NaN
  std::vector<float> lr_schedule;  // non-empty: step i's learning rate (SetHyperParams)
  std::vector<float> loss_scales;  // non-empty: step i's loss scale (the gradients carry it)
  // Each step's batch is first evaluated (BeginEvaluation, Forward only); its outputs must
  // equal the training step's forward outputs.
  bool evaluate = false;
  std::function<StatusOr<std::unique_ptr<IoEngine>>()> io_engines;
  std::string profile;  // non-empty: the session's device profile (timed kernels' time)
  DType gradient_dtype = DType::kF32;
  // Non-zero: limits.max_active_experts_per_layer, and max_micro_batches = micro_batches (the
  // tightest limits: the fewest gradient accumulators and cache slots).
  uint32_t max_active_experts = 0;
  // Called after each step's EndStep with the step's index (TrainSession only).
  std::function<void(Session&, int)> after_step;
};

inline constexpr uint32_t kGateK = 2, kExpertsPerLayer = 7;

// The gate both trainers run on a layer's input: a fixed top-2 softmax gate.
inline GateOutput RunGate(const std::vector<float>& x, uint32_t layer) {
  GateOptions options;
  options.d_model = 16;
  options.num_experts = kExpertsPerLayer;
  options.k = kGateK;
  options.seed = 100 + layer;
  options.init_scale = 0.5f;
  const TopKGate gate = *TopKGate::Create(options);
  GateOutput out;
  EXPECT_TRUE(gate.Forward(x.data(), static_cast<uint32_t>(x.size() / 16), &out).ok());
  return out;
}

inline SessionOptions OptionsFor(const RunConfig& c) {
  SessionOptions o;
  o.model = SmallModel(c.dtype);
  o.strategy = c.strategy;
  o.budgets.device_bytes = c.device_budget ? c.device_budget : 8 << 20;
  o.limits.max_tokens_per_micro_batch = kBatch * kSeq;
  o.limits.max_micro_batches = static_cast<uint32_t>(std::max(2, c.micro_batches));
  if (c.max_active_experts > 0) {
    o.limits.max_active_experts_per_layer = c.max_active_experts;
    o.limits.max_micro_batches = static_cast<uint32_t>(c.micro_batches);
  }
  o.optimizer.threads = c.optimizer_threads;
  o.optimizer.groups[0].lr = 0.05f;
  o.optimizer.groups[0].eps = c.eps;
  o.optimizer.max_grad_norm = c.max_grad_norm;
  o.kernel_threads = 2;
  if (!c.profile.empty()) o.device_profile = *FindDeviceProfile(c.profile);
  o.gradient_dtype = c.gradient_dtype;
  o.delayed_update = c.delayed;
  o.optimizer.skip_step_on_nonfinite = !c.immediate;
  o.placement.io_engines = c.io_engines;
  o.record_op_times = true;
  if (c.gated) {
    o.routing = Routing::kLearnedGate;
    o.gate_k = kGateK;
  }
  o.placement.resume_from = c.resume_from;  // any placement
  if (!c.nvme_dir.empty()) {
    o.placement.master = o.placement.moments = Tier::kNvme;
    o.placement.nvme_dirs = {c.nvme_dir};
    o.placement.resume = c.resume;
    o.placement.write_initial_states = c.write_initial_states;
    if (c.nvme_weights) {
      o.placement.weights = Tier::kNvme;
      o.placement.weight_staging_blocks = c.staging_blocks;
    }
  }
  return o;
}

// Trains through a session on `c.device` (the simulated device by default); returns every expert's
// master weights (read after the last step's Synchronize), and calls `after` with the session then.
Weights TrainSession(const RunConfig& c, std::vector<StepStats>* stats = nullptr,
                     const std::function<void(Session&)>& after = {});

// The same training as a session's with everything resident in host memory and no offload:
// the CPU kernels called directly, the plans from the same router, the same optimizer rule,
// starting from `initial` (the session's initial master weights).
Weights TrainReference(const RunConfig& c, const Weights& initial);

}  // namespace ecss::engine_test
