// `ecss-bench step`: whole training steps through the session on the simulated device in
// timed mode (kernels take the cost model's time on a device profile; copies are paced at the
// profile's host-link bandwidth) with the real CPU optimizer, or on the device `--device`
// names (sim: the real CPU kernels; cuda:N: a GPU, whose engines' busy times are not
// recorded, so the overlap figures are null there), for a model proportioned like PanGu-Sigma and
// scaled to this machine: 40 domains, each step's samples from 4 of them, about 300M expert
// parameters, master weights and moments in host memory or on NVMe (--states). One strategy per
// run; `naive` is the reference the target is stated against (ecss >= 6.3x naive tokens/s), and
// bound_ratio and overlap_fraction (engine/step_metrics.h) say how close a step came to its
// bottleneck's speed.
// --routing gate replaces RRE with a learned gate's reactive routing: every token picks
// --gate-k experts of the whole layer at Forward (timed mode has no activations to run a real
// gate on, so the picks are pseudo-random, as an untrained gate's are), which is the baseline
// PanGu-Sigma's RRE is measured against: nothing can be fetched ahead, and the experts a step
// touches are not confined to its domains. --delayed-update 1 turns on the one-step delayed
// update (DPU; it changes the math, see session.h). --weights nvme (with --states nvme) keeps
// the compute weights on NVMe as well: every fetch reads them into pinned staging first. The
// directory must not hold an earlier run's weight store. --dump-plan FILE writes the plan the
// session executed for the first measured step, with when each op ran (session.h,
// ExecutedPlan; written after the run's last Synchronize, so its updates have ended).
#include <algorithm>
#include <iomanip>
#include <limits>
#include <optional>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "engine/session.h"
#include "kernels/cost_model.h"
#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/backend_factory.h"

namespace ecss::bench {

Status RunStepSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(std::string strategy_name, args.String("strategy", "ecss"));
  ECSS_ASSIGN_OR_RETURN(std::string device, args.String("device", "sim-timed"));
  ECSS_ASSIGN_OR_RETURN(uint64_t layers, args.Uint("layers", 4));
  ECSS_ASSIGN_OR_RETURN(uint64_t d_model, args.Uint("d-model", 512));
  ECSS_ASSIGN_OR_RETURN(uint64_t d_ff, args.Uint("d-ff", 1024));
  ECSS_ASSIGN_OR_RETURN(uint64_t domains, args.Uint("domains", 40));
  ECSS_ASSIGN_OR_RETURN(uint64_t experts, args.Uint("experts-per-domain", 2));
  ECSS_ASSIGN_OR_RETURN(uint64_t per_step, args.Uint("domains-per-step", 4));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 8));
  ECSS_ASSIGN_OR_RETURN(uint64_t seq, args.Uint("seq-len", 256));
  ECSS_ASSIGN_OR_RETURN(uint64_t steps, args.Uint("steps", 6));
  ECSS_ASSIGN_OR_RETURN(uint64_t warmup, args.Uint("warmup", 2));
  ECSS_ASSIGN_OR_RETURN(uint64_t threads, args.Uint("optimizer-threads", 1));
  ECSS_ASSIGN_OR_RETURN(uint64_t device_mib, args.Uint("device-mib", 768));
  ECSS_ASSIGN_OR_RETURN(std::string profile_name, args.String("profile", "h100-sxm"));
  ECSS_ASSIGN_OR_RETURN(std::string states, args.String("states", "host"));
  ECSS_ASSIGN_OR_RETURN(std::string dir, args.String("dir", "."));
  ECSS_ASSIGN_OR_RETURN(std::string routing, args.String("routing", "rre"));
  ECSS_ASSIGN_OR_RETURN(uint64_t gate_k, args.Uint("gate-k", 2));
  ECSS_ASSIGN_OR_RETURN(uint64_t delayed, args.Uint("delayed-update", 0));
  ECSS_ASSIGN_OR_RETURN(std::string weights, args.String("weights", "pinned"));
  ECSS_ASSIGN_OR_RETURN(std::string dump_plan, args.String("dump-plan", ""));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (states != "host" && states != "nvme") {
    return InvalidArgumentError(StrCat("--states '", states, "': host or nvme"));
  }
  if (weights != "pinned" && (weights != "nvme" || states != "nvme")) {
    return InvalidArgumentError(
        StrCat("--weights '", weights, "': pinned, or nvme (with --states nvme)"));
  }
  if (routing != "rre" && routing != "gate") {
    return InvalidArgumentError(StrCat("--routing '", routing, "': rre or gate"));
  }
  const bool gated = routing == "gate";
  if (gated && (gate_k == 0 || gate_k > domains * experts)) {
    return InvalidArgumentError(StrCat("--gate-k ", gate_k, ": 1 to the experts of a layer"));
  }
  ECSS_ASSIGN_OR_RETURN(Strategy strategy, ParseStrategy(strategy_name));
  ECSS_ASSIGN_OR_RETURN(DeviceProfile profile, FindDeviceProfile(profile_name));
  if (layers == 0 || d_model == 0 || d_ff == 0 || domains == 0 || experts == 0 || per_step == 0 ||
      per_step > domains || samples == 0 || seq == 0 || steps <= warmup || threads == 0 ||
      device_mib == 0) {
    return InvalidArgumentError(
        "need positive sizes, domains-per-step <= domains and "
        "steps > warmup");
  }

  ECSS_ASSIGN_OR_RETURN(BackendOptions backend_options, ParseDeviceSetting(device));
  backend_options.sim.h2d_bandwidth_gbps = profile.h2d_bandwidth_gbps;
  backend_options.sim.d2h_bandwidth_gbps = profile.d2h_bandwidth_gbps;
  const uint64_t device_bytes = (device_mib << 20) + (uint64_t{64} << 20);  // + activations
  backend_options.sim.device_memory_bytes = device_bytes;
  backend_options.cuda.device_memory_bytes = device_bytes;
  StatusOr<std::unique_ptr<Backend>> created = CreateBackend(backend_options);
  if (!created.ok()) return created.status().Annotate(StrCat("--device ", device));
  std::unique_ptr<Backend> backend = *std::move(created);
  // Only the sim keeps its engines' busy times (and paces copies at the profile's bandwidth).
  const bool on_sim = backend_options.kind == BackendKind::kSim;

  SessionOptions options;
  options.device_profile = profile;  // the kernels' modelled time, as the engines' bandwidth
  options.model.layers = static_cast<uint32_t>(layers);
  options.model.d_model = static_cast<uint32_t>(d_model);
  options.model.d_ff = static_cast<uint32_t>(d_ff);
  options.model.dtype = DType::kBF16;
  options.model.vocab = 50257;
  for (uint64_t d = 0; d < domains; ++d) {
    options.model.domains.push_back({StrCat("domain", d), static_cast<uint32_t>(experts)});
  }
  options.strategy = strategy;
  options.budgets.device_bytes = device_mib << 20;
  options.limits.max_tokens_per_micro_batch = static_cast<uint32_t>(samples * seq);
  options.limits.max_active_experts_per_layer = static_cast<uint32_t>(per_step * experts);
  if (gated) {
    options.routing = Routing::kLearnedGate;
    options.gate_k = static_cast<uint32_t>(gate_k);
    options.limits.max_active_experts_per_layer = static_cast<uint32_t>(domains * experts);
  }
  options.optimizer.threads = static_cast<int>(threads);
  // Updates start as each gradient arrives (no clipping or overflow check needs the step).
  options.optimizer.skip_step_on_nonfinite = false;
  options.record_op_times = !dump_plan.empty();
  options.delayed_update = delayed != 0;
  std::optional<ScratchDir> store_dir;  // the session's expert store, removed after the run
  if (states == "nvme") {
    ECSS_ASSIGN_OR_RETURN(ScratchDir made, ScratchDir::Create(dir, "ecss-bench-store"));
    store_dir.emplace(std::move(made));
    options.placement.master = options.placement.moments = Tier::kNvme;
    options.placement.nvme_dirs = {store_dir->path()};
    if (weights == "nvme") options.placement.weights = Tier::kNvme;
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Create(*backend, options));
  uint64_t total_experts = 0;
  for (uint32_t l = 0; l < layers; ++l) total_experts += session->experts_in_layer(l);
  const uint64_t expert_params = total_experts * session->expert_params();

  const uint64_t tokens = samples * seq;
  const uint64_t act_bytes = tokens * d_model * 2;
  ECSS_ASSIGN_OR_RETURN(Buffer a,
                        backend->device_memory().Allocate(act_bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(Buffer b,
                        backend->device_memory().Allocate(act_bytes, MemoryTag::kActivations));
  // Where kernels compute, they compute on zeros (the time of a matrix product does not depend
  // on its values, and uninitialised memory could hold NaNs).
  ECSS_RETURN_IF_ERROR(backend->MemsetAsync(session->compute_stream(), a.data(), 0, act_bytes));
  ECSS_RETURN_IF_ERROR(backend->MemsetAsync(session->compute_stream(), b.data(), 0, act_bytes));
  std::vector<uint32_t> ids(tokens), sample_domains(samples), picks(tokens * gate_k);
  std::vector<float> pick_weights(tokens * gate_k, 1.0f / static_cast<float>(gate_k));
  const auto layer_experts = static_cast<uint32_t>(domains * experts);
  CounterRng rng(17, 0);
  double seconds = 0, compute = 0, h2d = 0, d2h = 0, optimizer = 0, stalls = 0;
  uint64_t measured_tokens = 0, h2d_bytes = 0, d2h_bytes = 0, nvme_bytes = 0, updated = 0;
  uint64_t hits = 0, misses = 0;
  std::vector<StepMetrics> measured_metrics;
  for (uint64_t step = 0; step < steps; ++step) {
    // Each step's samples come from `per_step` distinct domains, chosen at random.
    std::vector<uint32_t> chosen;
    while (chosen.size() < per_step) {
      const uint32_t d = rng.Uniform(static_cast<uint32_t>(domains));
      if (std::find(chosen.begin(), chosen.end(), d) == chosen.end()) chosen.push_back(d);
    }
    for (uint64_t s = 0; s < samples; ++s) sample_domains[s] = chosen[s % per_step];
    for (uint32_t& id : ids) id = rng.Uniform(options.model.vocab);
    ECSS_RETURN_IF_ERROR(
        session->BeginStep({MicroBatch{ids.data(), static_cast<uint32_t>(samples),
                                       static_cast<uint32_t>(seq), sample_domains.data()}}));
    for (uint32_t l = 0; l < layers; ++l) {
      if (!gated) {
        ECSS_RETURN_IF_ERROR(
            session->Forward(MicroBatchIndex{0}, LayerIndex{l}, a.data(), b.data()));
        continue;
      }
      for (uint64_t t = 0; t < tokens; ++t) {  // gate_k distinct experts per token
        uint32_t* token_picks = &picks[t * gate_k];
        for (uint64_t j = 0; j < gate_k; ++j) {
          do {
            token_picks[j] = rng.Uniform(layer_experts);
          } while (std::find(token_picks, token_picks + j, token_picks[j]) != token_picks + j);
        }
      }
      ECSS_RETURN_IF_ERROR(
          session->Forward(MicroBatchIndex{0}, LayerIndex{l}, a.data(), b.data(),
                           {picks.data(), pick_weights.data(), static_cast<uint32_t>(gate_k)}));
    }
    for (uint32_t l = static_cast<uint32_t>(layers); l-- > 0;) {
      ECSS_RETURN_IF_ERROR(
          session->Backward(MicroBatchIndex{0}, LayerIndex{l}, b.data(), a.data()));
    }
    ECSS_ASSIGN_OR_RETURN(StepStats s, session->EndStep());
    if (step < warmup) continue;
    measured_metrics.push_back(s.metrics);
    seconds += s.seconds;
    compute += s.compute_busy_seconds;
    h2d += s.h2d_busy_seconds;
    d2h += s.d2h_busy_seconds;
    optimizer += s.optimizer_busy_seconds;
    stalls += s.stalls.total();
    measured_tokens += s.tokens;
    h2d_bytes += s.h2d_bytes;
    d2h_bytes += s.d2h_bytes;
    nvme_bytes += s.nvme_bytes;
    updated += s.updated_params;
    hits += s.cache_hits;
    misses += s.cache_misses;
  }
  ECSS_RETURN_IF_ERROR(session->Synchronize());
  if (!dump_plan.empty()) {
    ECSS_ASSIGN_OR_RETURN(StepPlan plan, session->ExecutedPlan(warmup + 1));
    JsonWriter plan_json;
    plan.WriteJson(plan_json);
    ECSS_RETURN_IF_ERROR(WriteFileAtomically(dump_plan, plan_json.str() + "\n")
                             .Annotate(StrCat("--dump-plan ", dump_plan)));
  }
  const double measured = static_cast<double>(steps - warmup);
  // Where the device's engines keep no busy time (CUDA), what needs it is null, not 0.
  const double unknown = std::numeric_limits<double>::quiet_NaN();  // written as null
  const StepMetrics metrics = SumStepMetrics(measured_metrics);
  json.Field("strategy", StrategyName(strategy))
      .Field("routing", gated ? "gate (reactive)" : "rre")
      .Field("delayed_update", delayed != 0)
      .Field("device", device)
      .Field("profile", on_sim ? profile.name : "")
      .Field("layers", layers)
      .Field("domains", domains)
      .Field("domains_per_step", per_step)
      .Field("experts", total_experts)
      .Field("expert_params", expert_params)
      .Field("tokens_per_step", tokens)
      .Field("states_placement", states)
      .Field("weights_placement", weights)
      .Field("optimizer_threads", threads)
      .Field("tokens_per_s", static_cast<double>(measured_tokens) / seconds)
      .Field("step_seconds", seconds / measured)
      .Field("bound_ratio", on_sim ? metrics.bound_ratio : unknown)
      .Field("overlap_fraction",
             on_sim && metrics.overlap_fraction ? *metrics.overlap_fraction : unknown)
      .Field("overlap_denominator_seconds_per_step",
             on_sim ? metrics.overlap_denominator_seconds / measured : unknown)
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
        .Field("busy_seconds_per_step", use.busy_seconds / measured)
        .Field("exposed_seconds_per_step", use.exposed_seconds / measured)
        .EndObject();
  }
  json.EndObject();
  json.Field("stall_fraction", stalls / seconds)
      .Field("h2d_bytes", static_cast<uint64_t>(static_cast<double>(h2d_bytes) / measured))
      .Field("d2h_bytes", static_cast<uint64_t>(static_cast<double>(d2h_bytes) / measured))
      .Field("nvme_bytes", static_cast<uint64_t>(static_cast<double>(nvme_bytes) / measured))
      .Field("updated_params", static_cast<uint64_t>(static_cast<double>(updated) / measured))
      .Field("hit_rate", hits + misses ? static_cast<double>(hits) / (hits + misses) : 0.0)
      .Key("busy_seconds_per_step")
      .BeginObject()
      .Field("compute", on_sim ? compute / measured : unknown)
      .Field("h2d", on_sim ? h2d / measured : unknown)
      .Field("d2h", on_sim ? d2h / measured : unknown)
      .Field("optimizer", optimizer / measured)
      .EndObject()
      .Field("reference",
             "run the suite with --strategy naive in the same session for the "
             "tokens/s ratio; bound_ratio (step time / busiest resource's busy time) and "
             "overlap_fraction ((sum of busy - step time) / (sum of busy - busiest), null "
             "under 5% of the step) are measured within this run, engine/step_metrics.h");
  table << "step suite: " << StrategyName(strategy) << (gated ? " with a reactive gate" : "")
        << ", " << total_experts << " experts, " << expert_params / 1000000 << "M expert params, "
        << domains << " domains (" << per_step << " per step), " << tokens << " tokens/step, "
        << device << (on_sim ? StrCat(" ", profile.name) : "") << "\n"
        << std::fixed << std::setprecision(3) << "  tokens/s " << std::setprecision(0)
        << static_cast<double>(measured_tokens) / seconds << std::setprecision(3) << "  step "
        << seconds / measured << " s  ";
  if (on_sim) {
    table << "bound ratio " << metrics.bound_ratio << " (" << metrics.bottleneck
          << ")  overlap fraction "
          << (metrics.overlap_fraction ? StrCat(*metrics.overlap_fraction) : std::string("n/a"));
  } else {
    table << "bound ratio n/a (no engine times)";
  }
  table << "  stalls " << stalls / seconds << "\n"
        << "  per step: h2d " << HumanBytes(static_cast<uint64_t>(h2d_bytes / measured)) << ", d2h "
        << HumanBytes(static_cast<uint64_t>(d2h_bytes / measured)) << ", nvme "
        << HumanBytes(static_cast<uint64_t>(nvme_bytes / measured)) << ", updated "
        << static_cast<uint64_t>(updated / measured) << " params\n";
  return Status::Ok();
}

}  // namespace ecss::bench
