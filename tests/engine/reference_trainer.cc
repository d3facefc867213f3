#include "tests/engine/reference_trainer.h"

#include <cstring>
#include <filesystem>
#include <map>

#include "kernels/cpu/cpu_kernels.h"
#include "router/rre_router.h"
#include "runtime/device/backend_factory.h"

namespace ecss::engine_test {

Weights TrainSession(const RunConfig& c, std::vector<StepStats>* stats,
                     const std::function<void(Session&)>& after) {
  StatusOr<BackendOptions> backend_options = ParseDeviceSetting(c.device);
  EXPECT_TRUE(backend_options.ok()) << backend_options.status();
  backend_options->sim.device_memory_bytes = 16 << 20;
  backend_options->cuda.device_memory_bytes = 16 << 20;
  auto backend = CreateBackend(*backend_options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!c.resume && !c.nvme_dir.empty()) {
    // A new run: the store an earlier run left there goes, as a user would remove it (a
    // session refuses to overwrite one).
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(c.nvme_dir, error)) {
      if (entry.path().filename().string().rfind("ecss-store", 0) == 0) {
        std::filesystem::remove(entry.path(), error);
      }
    }
  }
  auto session = Session::Create(**backend, OptionsFor(c));
  EXPECT_TRUE(session.ok()) << session.status();
  Session& s = **session;
  Backend& b = **backend;
  const SessionOptions o = OptionsFor(c);
  const uint32_t d = o.model.d_model;
  const uint64_t bytes = uint64_t{kBatch} * kSeq * d * DTypeSize(c.dtype);
  auto in = b.device_memory().Allocate(bytes, MemoryTag::kActivations);
  auto out = b.device_memory().Allocate(bytes, MemoryTag::kActivations);
  EXPECT_TRUE(in.ok() && out.ok());
  const Stream stream = s.compute_stream();
  auto through = [&](std::vector<float> host, auto call) {
    std::vector<char> dev = ToDevice(host, c.dtype);
    EXPECT_TRUE(
        b.CopyAsync(stream, in->data(), dev.data(), dev.size(), CopyKind::kHostToDevice).ok());
    Status status = call(in->data(), out->data());
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_TRUE(
        b.CopyAsync(stream, dev.data(), out->data(), dev.size(), CopyKind::kDeviceToHost).ok());
    EXPECT_TRUE(b.SynchronizeStream(stream).ok());
    return FromDevice(dev, c.dtype);
  };
  const auto all_steps = MakeSteps(c.first_step + c.steps, c.micro_batches);
  for (int index = c.first_step; index < c.first_step + c.steps; ++index) {
    const auto& step = all_steps[index];
    std::vector<MicroBatch> views;
    for (const Batch& mb : step) views.push_back(mb.view());
    if (!c.lr_schedule.empty()) {
      HyperParams p = o.optimizer.groups[0];
      p.lr = c.lr_schedule[static_cast<size_t>(index)];
      EXPECT_TRUE(s.SetHyperParams(p).ok());
    }
    auto forward = [&](uint32_t mb, uint32_t l, const std::vector<float>& x) {
      if (!c.gated) {
        return through(x, [&](void* i, void* o2) {
          return s.Forward(MicroBatchIndex{mb}, LayerIndex{l}, i, o2);
        });
      }
      const GateOutput gate = RunGate(x, l);
      return through(x, [&](void* i, void* o2) {
        return s.Forward(MicroBatchIndex{mb}, LayerIndex{l}, i, o2,
                         {gate.experts.data(), gate.weights.data(), kGateK});
      });
    };
    std::vector<std::vector<float>> evaluated;  // the evaluation's outputs, in call order
    if (c.evaluate) {
      EXPECT_TRUE(s.BeginEvaluation(views).ok());
      RunLoop(
          step, o.model.layers, d, c.dtype,
          [&](uint32_t mb, uint32_t l, const std::vector<float>& x) {
            evaluated.push_back(forward(mb, l, x));
            return evaluated.back();
          },
          [&](uint32_t, uint32_t, const std::vector<float>& dy) {
            return std::vector<float>(dy.size(), 0.0f);  // no backward in an evaluation
          });
      auto evaluation = s.EndStep();
      EXPECT_TRUE(evaluation.ok()) << evaluation.status();
      if (evaluation.ok()) {
        EXPECT_EQ(evaluation->updated_experts, 0u);
      }
    }
    Status begun = s.BeginStep(
        views, c.loss_scales.empty() ? 1.0f : c.loss_scales[static_cast<size_t>(index)]);
    EXPECT_TRUE(begun.ok()) << begun;
    size_t call = 0;
    RunLoop(
        step, o.model.layers, d, c.dtype,
        [&](uint32_t mb, uint32_t l, const std::vector<float>& x) {
          std::vector<float> y = forward(mb, l, x);
          if (c.evaluate) {
            EXPECT_EQ(y, evaluated[call++]) << "micro-batch " << mb << " layer " << l;
          }
          return y;
        },
        [&](uint32_t mb, uint32_t l, const std::vector<float>& dy) {
          return through(dy, [&](void* i, void* o2) {
            return s.Backward(MicroBatchIndex{mb}, LayerIndex{l}, i, o2);
          });
        },
        index == c.poison_step);
    auto ended = s.EndStep();
    EXPECT_TRUE(ended.ok()) << ended.status();
    if (stats && ended.ok()) stats->push_back(*ended);
    if (c.after_step) c.after_step(s, index);
  }
  EXPECT_TRUE(s.Synchronize().ok());
  Weights w(o.model.layers);
  for (uint32_t l = 0; l < o.model.layers; ++l) {
    for (uint32_t e = 0; e < s.experts_in_layer(l); ++e)
      w[l].push_back(*s.MasterWeights(LayerIndex{l}, e));
  }
  if (after) after(s);
  return w;
}

Weights TrainReference(const RunConfig& c, const Weights& initial) {
  const SessionOptions o = OptionsFor(c);
  const ModelSpec& m = o.model;
  // Every expert computed (with no rows when unrouted) and updated, every step.
  const bool naive = c.strategy == Strategy::kNaive || c.strategy == Strategy::kZeroOffload;
  auto map = DomainMap::Create(m.layers);
  for (uint32_t i = 0; i < m.domains.size(); ++i) {
    EXPECT_TRUE(map->AddDomainUniform(m.domains[i].name, i, m.domains[i].experts).ok());
  }
  auto router = RreRouter::Create(*map, {m.vocab, m.seed, m.builder});
  EXPECT_TRUE(router.ok());
  auto kernels = CpuKernels::Create({1, 256});
  auto optimizer = CpuOptimizer::Create(o.optimizer);
  Weights master = initial;
  const uint32_t d_in = m.d_ff, d = m.d_model;
  const uint64_t n = master[0][0].size(), in_elems = uint64_t{d} * d_in;
  std::vector<std::vector<std::vector<float>>> s0(m.layers), s1(m.layers), grads(m.layers);
  std::vector<std::vector<std::vector<BFloat16>>> copy(m.layers);
  std::vector<std::vector<uint32_t>> ids(m.layers);
  for (uint32_t l = 0; l < m.layers; ++l) {
    for (uint32_t e = 0; e < master[l].size(); ++e) {
      s0[l].emplace_back(n, 0.0f);
      s1[l].emplace_back(n, 0.0f);
      grads[l].emplace_back(n, 0.0f);
      copy[l].emplace_back(n);
      ConvertF32ToBf16(master[l][e].data(), copy[l][e].data(), n);
    }
    for (uint32_t e = 0; e < master[l].size(); ++e) {
      ExpertArrays a{master[l][e].data(),
                     s0[l][e].data(),
                     s1[l][e].data(),
                     m.dtype == DType::kBF16 ? copy[l][e].data() : nullptr,
                     n,
                     0};
      ids[l].push_back(*(*optimizer)->RegisterExpert(a));
    }
  }
  auto current_of = [&](uint32_t l, uint32_t e) -> const void* {
    return m.dtype == DType::kF32 ? static_cast<const void*>(master[l][e].data())
                                  : copy[l][e].data();
  };
  // The delayed update (DPU): a step computes with the weights as they were before the
  // previous step's update was applied (`front`, snapshotted at each step's start).
  std::vector<std::vector<std::vector<char>>> front(m.layers);
  auto snapshot = [&] {
    for (uint32_t l = 0; l < m.layers; ++l) {
      front[l].resize(master[l].size());
      for (uint32_t e = 0; e < master[l].size(); ++e) {
        const auto* bytes = static_cast<const char*>(current_of(l, e));
        front[l][e].assign(bytes, bytes + n * DTypeSize(m.dtype));
      }
    }
  };
  auto weights_of = [&](uint32_t l, uint32_t e) -> const void* {
    return c.delayed ? static_cast<const void*>(front[l][e].data()) : current_of(l, e);
  };
  auto scale_of = [&](int step) {
    return c.loss_scales.empty() ? 1.0f : c.loss_scales[static_cast<size_t>(step)];
  };
  auto apply = [&](const std::vector<std::vector<bool>>& touched, float loss_scale) {
    EXPECT_TRUE((*optimizer)->BeginStep(loss_scale).ok());
    std::vector<std::vector<BFloat16>> bf16;  // bf16 gradients, alive until the updates end
    bf16.reserve(m.layers * master[0].size());
    for (uint32_t l = 0; l < m.layers; ++l) {
      for (uint32_t e = 0; e < master[l].size(); ++e) {
        if (!touched[l][e]) continue;
        if (c.gradient_dtype == DType::kF32) {
          EXPECT_TRUE(
              (*optimizer)->SubmitGradient(ids[l][e], grads[l][e].data(), DType::kF32).ok());
          continue;
        }
        std::vector<BFloat16>& g = bf16.emplace_back(grads[l][e].size());
        for (size_t k = 0; k < g.size(); ++k) g[k] = FloatToBf16(grads[l][e][k]);
        EXPECT_TRUE((*optimizer)->SubmitGradient(ids[l][e], g.data(), DType::kBF16).ok());
      }
    }
    EXPECT_TRUE((*optimizer)->FinishStep().ok());
    EXPECT_TRUE((*optimizer)->Synchronize().ok());
  };
  std::vector<std::vector<bool>> held;  // DPU: the previous step's touched experts
  int index = -1;
  for (const auto& step : MakeSteps(c.steps, c.micro_batches)) {
    ++index;
    if (!c.lr_schedule.empty()) {
      HyperParams p = o.optimizer.groups[0];
      p.lr = c.lr_schedule[static_cast<size_t>(index)];
      EXPECT_TRUE((*optimizer)->SetHyperParams(0, p).ok());
    }
    if (c.delayed) {
      snapshot();
      if (!held.empty()) apply(held, scale_of(index - 1));
    }
    std::vector<RoutingPlan> plans;
    if (!c.gated) {
      for (const Batch& b : step) plans.push_back(*RoutingPlan::BuildRre(*router, b.view()));
    }
    // With a learned gate, each layer's plan comes from the gate run on its input.
    std::map<uint32_t, RoutingPlan> gated_plans;
    auto plan_of = [&](uint32_t mb, uint32_t l) {
      return c.gated ? gated_plans.at(mb * m.layers + l).layer(0) : plans[mb].layer(l);
    };
    std::vector<std::vector<bool>> touched(m.layers);
    for (uint32_t l = 0; l < m.layers; ++l) touched[l].assign(master[l].size(), false);
    std::vector<std::vector<char>> saved(step.size() * m.layers);
    auto groups_of = [&](uint32_t mb, uint32_t l, std::vector<uint32_t>* experts,
                         std::vector<uint32_t>* offsets) {
      const LayerPlan lp = plan_of(mb, l);
      offsets->assign(1, 0);
      uint32_t a = 0;
      for (uint32_t e = 0; e < master[l].size(); ++e) {
        const bool active = a < lp.num_active && lp.active_experts[a] == e;
        if (!active && !naive) continue;
        experts->push_back(e);
        offsets->push_back(offsets->back() + (active ? lp.count(a++) : 0));
      }
    };
    RunLoop(
        step, m.layers, d, c.dtype,
        [&](uint32_t mb, uint32_t l, const std::vector<float>& x) {
          if (c.gated) {
            const GateOutput gate = RunGate(x, l);
            gated_plans.insert_or_assign(
                mb * m.layers + l,
                *RoutingPlan::FromAssignments(l, kExpertsPerLayer, gate.num_tokens, kGateK,
                                              gate.experts.data(), gate.weights.data()));
          }
          const LayerPlan lp = plan_of(mb, l);
          const TokenPermutation perm{lp.num_tokens, lp.k, lp.permutation, lp.inverse,
                                      lp.combine_weights};
          std::vector<uint32_t> experts, offsets;
          groups_of(mb, l, &experts, &offsets);
          const std::vector<char> xd = ToDevice(x, c.dtype);
          std::vector<char>& xp = saved[mb * m.layers + l];
          xp.resize(xd.size() * lp.k);  // one row per (token, choice)
          EXPECT_TRUE((*kernels)->Permute(perm, {d, c.dtype, false}, xd.data(), xp.data()).ok());
          std::vector<const void*> w_in, w_out;
          for (uint32_t e : experts) {
            w_in.push_back(weights_of(l, e));
            w_out.push_back(static_cast<const char*>(weights_of(l, e)) +
                            in_elems * DTypeSize(c.dtype));
          }
          GroupedFfnProblem p{d,
                              m.d_ff,
                              m.activation,
                              c.dtype,
                              SavedActivation::kRecompute,
                              static_cast<uint32_t>(experts.size()),
                              offsets.data(),
                              offsets.back()};
          std::vector<char> yp(xd.size() * lp.k), y(xd.size());
          std::vector<char> ws((*kernels)->FfnForwardWorkspaceBytes(p) + 256);
          void* aligned = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
          EXPECT_TRUE((*kernels)
                          ->FfnForward(p,
                                       {xp.data(), w_in.data(), w_out.data(), yp.data(), nullptr},
                                       {aligned, ws.size() - 256})
                          .ok());
          EXPECT_TRUE((*kernels)->Combine(perm, {d, c.dtype, true}, yp.data(), y.data()).ok());
          return FromDevice(y, c.dtype);
        },
        [&](uint32_t mb, uint32_t l, const std::vector<float>& dy) {
          const LayerPlan lp = plan_of(mb, l);
          const TokenPermutation perm{lp.num_tokens, lp.k, lp.permutation, lp.inverse,
                                      lp.combine_weights};
          std::vector<uint32_t> experts, offsets;
          groups_of(mb, l, &experts, &offsets);
          const std::vector<char> dyd = ToDevice(dy, c.dtype);
          std::vector<char> dyp(dyd.size() * lp.k), dxp(dyd.size() * lp.k), dx(dyd.size());
          EXPECT_TRUE((*kernels)->Permute(perm, {d, c.dtype, true}, dyd.data(), dyp.data()).ok());
          std::vector<const void*> w_in, w_out;
          std::vector<std::vector<float>> dw(experts.size(), std::vector<float>(n));
          std::vector<float*> dw_in, dw_out;
          for (size_t i = 0; i < experts.size(); ++i) {
            w_in.push_back(weights_of(l, experts[i]));
            w_out.push_back(static_cast<const char*>(weights_of(l, experts[i])) +
                            in_elems * DTypeSize(c.dtype));
            dw_in.push_back(dw[i].data());
            dw_out.push_back(dw[i].data() + in_elems);
          }
          GroupedFfnProblem p{d,
                              m.d_ff,
                              m.activation,
                              c.dtype,
                              SavedActivation::kRecompute,
                              static_cast<uint32_t>(experts.size()),
                              offsets.data(),
                              offsets.back()};
          std::vector<char> ws((*kernels)->FfnBackwardWorkspaceBytes(p) + 256);
          void* aligned = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
          EXPECT_TRUE((*kernels)
                          ->FfnBackward(
                              p,
                              {saved[mb * m.layers + l].data(), w_in.data(), w_out.data(), nullptr,
                               dyp.data(), dxp.data(), dw_in.data(), dw_out.data(), false},
                              {aligned, ws.size() - 256})
                          .ok());
          EXPECT_TRUE((*kernels)->Combine(perm, {d, c.dtype, false}, dxp.data(), dx.data()).ok());
          for (size_t i = 0; i < experts.size(); ++i) {
            std::vector<float>& g = grads[l][experts[i]];
            // As the session: each micro-batch's gradient rounded to the gradient dtype, and
            // each sum of a later one rounded again.
            const DType gd = c.gradient_dtype;
            if (!touched[l][experts[i]]) {
              g = dw[i];
              for (uint64_t k = 0; k < n; ++k) g[k] = RoundTo(gd, g[k]);
              touched[l][experts[i]] = true;
            } else {
              for (uint64_t k = 0; k < n; ++k) g[k] = RoundTo(gd, g[k] + RoundTo(gd, dw[i][k]));
            }
          }
          return FromDevice(dx, c.dtype);
        },
        index == c.poison_step);
    if (c.delayed) {
      held = touched;
    } else {
      apply(touched, scale_of(index));
    }
  }
  if (!held.empty()) apply(held, scale_of(index));  // the session's Synchronize applies it
  return master;
}

}  // namespace ecss::engine_test
