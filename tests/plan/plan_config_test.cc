// ecss-plan's inputs: every preset parses, and every bad input is refused naming its JSON path.
#include "tools/plan/plan_config.h"

#include <string>

#include <gtest/gtest.h>

#include "tools/plan/calibrate.h"

namespace ecss::plan {
namespace {

constexpr const char* kModel = R"({"name": "m", "sparse_layers": 2, "d_model": 64, "d_ff": 128,
  "routing": {"kind": "rre", "domains": [{"name": "a", "experts": 4}, {"name": "b", "experts": 2}]},
  "vocab": 1000})";

// The message of a refused model, with `from` replaced by `to` in kModel.
std::string ModelError(const std::string& from, const std::string& to) {
  std::string text = kModel;
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  text.replace(at, from.size(), to);
  StatusOr<ModelConfig> parsed = ParseModel(text);
  EXPECT_FALSE(parsed.ok()) << text;
  EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument) << parsed.status();
  return parsed.ok() ? "" : std::string(parsed.status().message());
}

TEST(PlanConfigTest, EveryPresetParses) {
  for (const Preset& p : Presets()) {
    if (p.kind == "model") {
      StatusOr<ModelConfig> m = LoadModel(p.name);
      ASSERT_TRUE(m.ok()) << p.name << ": " << m.status();
      EXPECT_GT(m->total_params(), 0u);
    } else if (p.kind == "hardware") {
      StatusOr<HardwareConfig> h = LoadHardware(p.name);
      ASSERT_TRUE(h.ok()) << p.name << ": " << h.status();
      EXPECT_GT(h->devices(), 0u);
    }
  }
  // PanGu-Σ's published size: 1.085T parameters.
  const StatusOr<ModelConfig> pangu = LoadModel("pangu-sigma");
  ASSERT_TRUE(pangu.ok());
  EXPECT_NEAR(static_cast<double>(pangu->total_params()) / 1e12, 1.085, 0.001);
  EXPECT_EQ(pangu->experts_per_layer(), 640u);
}

TEST(PlanConfigTest, AModelParsesWithItsDefaults) {
  StatusOr<ModelConfig> m = ParseModel(kModel);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->experts_per_layer(), 6u);
  EXPECT_EQ(m->expert_params(), 2u * 64 * 128);
  EXPECT_EQ(m->dtype, DType::kBF16);
  EXPECT_EQ(m->activation, Activation::kGelu);
  EXPECT_EQ(m->domains.at(1).name, "b");
}

TEST(PlanConfigTest, BadModelsAreRefusedNamingTheField) {
  EXPECT_EQ(ModelError(R"("experts": 2})", R"("experts": 0})"),
            "model.routing.domains[1].experts: must be > 0 (got 0)");
  EXPECT_EQ(ModelError(R"("d_model": 64)", R"("d_model": -64)"),
            "model.d_model: must be > 0 (got -64)");
  EXPECT_EQ(ModelError(R"("d_model": 64)", R"("d_modle": 64)"), "model.d_model: required");
  EXPECT_EQ(ModelError(R"("vocab": 1000)", R"("vocab": 1000, "vocabulary": 5)"),
            "model.vocabulary: unknown field");
  EXPECT_EQ(ModelError(R"("d_ff": 128)", R"("d_ff": "128")"),
            "model.d_ff: must be an integer, not a string (\"128\")");
  EXPECT_EQ(ModelError(R"("d_ff": 128)", R"("d_ff": 12.5)"),
            "model.d_ff: must be an integer, not a number (12.5)");
  EXPECT_EQ(ModelError(R"("kind": "rre")", R"("kind": "hash")"),
            "model.routing.kind: 'hash': rre or gate");
  EXPECT_EQ(ModelError(R"("name": "a", )", R"("name": "a", "expert": 3, )"),
            "model.routing.domains[0].expert: unknown field");
  EXPECT_EQ(ModelError(R"("vocab": 1000})", R"("vocab": 1000, "activation": "relu"})"),
            "model.activation: unknown activation 'relu' (gelu or swiglu)");
  // Groups that do not add up to the layer's stated width.
  EXPECT_EQ(ModelError(R"("kind": "rre", )", R"("kind": "rre", "experts_per_layer": 8, )"),
            "model.routing.experts_per_layer: 8, but the domains' groups add up to 6");
  EXPECT_EQ(ModelError(R"("vocab": 1000)", R"("vocab": 3)"),
            "model.routing.domains[0].experts: 4 is more than the vocabulary (3 token ids)");
  EXPECT_EQ(ParseModel("[1, 2]").status().message(), "model: must be an object, not an array");
  EXPECT_EQ(ParseModel("{").status().message(), "model: not valid JSON");
}

TEST(PlanConfigTest, BadHardwareAndWorkloadsAreRefusedNamingTheField) {
  const std::string hardware = R"({"device": {"kind": "sim", "memory_gib": 4,
      "profile": "h100-sxm"}, "host": {"memory_gib": 24, "optimizer_threads": 1,
      "optimizer_params_per_s_per_thread": 1e8}})";
  ASSERT_TRUE(ParseHardware(hardware).ok()) << ParseHardware(hardware).status();
  auto error = [](const std::string& text) {
    StatusOr<HardwareConfig> h = ParseHardware(text);
    return h.ok() ? std::string() : std::string(h.status().message());
  };
  std::string no_memory = hardware;
  no_memory.replace(no_memory.find(R"("memory_gib": 4,)"), 16, "");
  EXPECT_EQ(error(no_memory), "hardware.device.memory_gib: required");
  std::string bad_profile = hardware;
  bad_profile.replace(bad_profile.find("h100-sxm"), 8, "h900");
  EXPECT_NE(error(bad_profile).find("hardware.device.profile: "), std::string::npos)
      << error(bad_profile);
  std::string bad_kind = hardware;
  bad_kind.replace(bad_kind.find(R"("sim")"), 5, R"("tpu")");
  EXPECT_EQ(error(bad_kind), "hardware.device.kind: 'tpu': cuda or sim");
  std::string two_nodes = hardware;
  two_nodes.replace(1, 0, R"("nodes": 2, )");
  EXPECT_EQ(error(two_nodes), "hardware.network_gbps: required with more than one node");
  std::string nan_rate = hardware;
  nan_rate.replace(nan_rate.find("1e8"), 3, "-1e8");
  EXPECT_EQ(error(nan_rate),
            "hardware.host.optimizer_params_per_s_per_thread: must be > 0 (got -100000000.0)");
  // The optimizer's rate per thread count (what --calibrate writes) instead of one thread's:
  // one of the two, each element a rate.
  std::string by_threads = hardware;
  by_threads.replace(by_threads.find(R"("optimizer_params_per_s_per_thread": 1e8)"), 40,
                     R"("optimizer_params_per_s_by_threads": [1e8, 1.6e8])");
  ASSERT_TRUE(ParseHardware(by_threads).ok()) << error(by_threads);
  std::string both = by_threads;
  both.replace(both.find(R"("optimizer_params_per_s_by_threads")"), 0,
               R"("optimizer_params_per_s_per_thread": 1e8, )");
  std::string neither = hardware;  // without the rate and the comma before it
  const size_t rate = neither.find(R"("optimizer_params_per_s_per_thread": 1e8)");
  const size_t comma = neither.rfind(',', rate);
  neither.erase(comma, rate + 40 - comma);
  std::string bad_element = by_threads;
  bad_element.replace(bad_element.find("1.6e8"), 5, "0");
  std::string not_a_list = by_threads;
  not_a_list.replace(not_a_list.find("[1e8, 1.6e8]"), 12, "[]");
  EXPECT_EQ(error(both),
            "hardware.host.optimizer_params_per_s_per_thread: give it or "
            "optimizer_params_per_s_by_threads, not both");
  EXPECT_EQ(error(neither),
            "hardware.host.optimizer_params_per_s_per_thread: required (or "
            "optimizer_params_per_s_by_threads)");
  EXPECT_EQ(error(bad_element),
            "hardware.host.optimizer_params_per_s_by_threads[1]: must be > 0 (got 0)");
  EXPECT_EQ(error(not_a_list),
            "hardware.host.optimizer_params_per_s_by_threads: must be a non-empty array of "
            "numbers, not an array ([])");
  std::string bad_fraction = hardware;
  bad_fraction.replace(bad_fraction.size() - 1, 0,
                       R"(, "nvme": {"capacity_gib": 10, "read_gbps": 1, "write_gbps": 1,
                             "session_fraction": 2.5})");
  EXPECT_EQ(error(bad_fraction), "hardware.nvme.session_fraction: must be at most 2 (got 2.5)");
  // Above 1 (a drive that reads and writes at once) is read back as given.
  std::string overlapped = bad_fraction;
  overlapped.replace(overlapped.find("2.5"), 3, "1.25");
  StatusOr<HardwareConfig> with_overlap = ParseHardware(overlapped);
  ASSERT_TRUE(with_overlap.ok()) << with_overlap.status();
  EXPECT_EQ(with_overlap->nvme.at(0).session_fraction, 1.25);
  EXPECT_EQ(ParseHardware(HardwareJson(*with_overlap))->nvme.at(0).session_fraction, 1.25);
  std::string overhead = bad_fraction;
  overhead.replace(overhead.find("2.5"), 3, R"(0.9, "update_overhead_us": 1500)");
  StatusOr<HardwareConfig> with_overhead = ParseHardware(overhead);
  ASSERT_TRUE(with_overhead.ok()) << with_overhead.status();
  EXPECT_EQ(with_overhead->nvme.at(0).update_overhead_us, 1500);
  EXPECT_EQ(ParseHardware(HardwareJson(*with_overhead))->nvme.at(0).update_overhead_us, 1500);
  std::string negative_overhead = overhead;
  negative_overhead.replace(negative_overhead.find("1500"), 4, "-3");
  EXPECT_EQ(error(negative_overhead), "hardware.nvme.update_overhead_us: must be >= 0 (got -3)");
  // The host's costs (what --calibrate measures): optional, never negative.
  std::string host_costs = hardware;
  host_costs.replace(host_costs.find(R"("profile": "h100-sxm")"), 0,
                     R"("host_wait_latency_us": 50.5, )");
  host_costs.replace(
      host_costs.find(R"("optimizer_threads")"), 0,
      R"("routing_ns_per_token_layer": 14, "routing_ns_per_table_line": 31, )"
      R"("step_begin_ns_per_op": 900, )"
      R"("gradient_add_gbps": 6.5, "gradient_add_beside_optimizer_gbps": 4.5, )"
      R"("optimizer_rate_beside_additions": 0.75, "optimizer_update_gap_us": 9.5, )");
  StatusOr<HardwareConfig> costs = ParseHardware(host_costs);
  ASSERT_TRUE(costs.ok()) << costs.status();
  EXPECT_EQ(costs->host_wait_latency_us, 50.5);
  EXPECT_EQ(costs->routing_ns_per_token_layer, 14);
  EXPECT_EQ(costs->routing_ns_per_table_line, 31);
  std::string negative_per_line = host_costs;
  negative_per_line.replace(negative_per_line.find("31"), 2, "-4");
  EXPECT_EQ(error(negative_per_line),
            "hardware.host.routing_ns_per_table_line: must be >= 0 (got -4)");
  EXPECT_EQ(costs->gradient_add_gbps, 6.5);
  EXPECT_EQ(costs->gradient_add_beside_optimizer_gbps, 4.5);
  EXPECT_EQ(costs->optimizer_rate_beside_additions, 0.75);
  std::string beside_faster = host_costs;
  beside_faster.replace(beside_faster.find("4.5"), 3, "7.5");
  EXPECT_NE(error(beside_faster)
                .find("hardware.host.gradient_add_beside_optimizer_gbps: 7.5 is "
                      "more than gradient_add_gbps (6.5)"),
            std::string::npos)
      << error(beside_faster);
  std::string share_above_one = host_costs;
  share_above_one.replace(share_above_one.find("0.75"), 4, "1.25");
  EXPECT_NE(error(share_above_one).find("hardware.host.optimizer_rate_beside_additions: "),
            std::string::npos)
      << error(share_above_one);
  EXPECT_EQ(costs->step_begin_ns_per_op, 900);
  EXPECT_EQ(costs->optimizer_update_gap_us, 9.5);
  EXPECT_EQ(ParseHardware(HardwareJson(*costs))->optimizer_update_gap_us, 9.5);
  std::string negative_gap = host_costs;
  negative_gap.replace(negative_gap.find("9.5"), 3, "-2");
  EXPECT_EQ(error(negative_gap), "hardware.host.optimizer_update_gap_us: must be >= 0 (got -2)");
  std::string negative_per_op = host_costs;
  negative_per_op.replace(negative_per_op.find("900"), 3, "-5");
  EXPECT_EQ(error(negative_per_op), "hardware.host.step_begin_ns_per_op: must be >= 0 (got -5)");
  std::string negative_add = host_costs;
  negative_add.replace(negative_add.find("6.5"), 3, "-1");
  EXPECT_EQ(error(negative_add), "hardware.host.gradient_add_gbps: must be >= 0 (got -1)");
  std::string negative_beside = host_costs;
  negative_beside.replace(negative_beside.find("4.5"), 3, "-2");
  EXPECT_EQ(error(negative_beside),
            "hardware.host.gradient_add_beside_optimizer_gbps: must be >= 0 (got -2)");
  std::string negative_wait = host_costs;
  negative_wait.replace(negative_wait.find("50.5"), 4, "-2");
  EXPECT_EQ(error(negative_wait), "hardware.device.host_wait_latency_us: must be >= 0 (got -2)");
  std::string text_routing = host_costs;
  text_routing.replace(text_routing.find("14,"), 2, R"("fast")");
  EXPECT_NE(error(text_routing).find("hardware.host.routing_ns_per_token_layer: "),
            std::string::npos)
      << error(text_routing);

  auto workload_error = [](const std::string& text) {
    StatusOr<WorkloadConfig> w = ParseWorkload(text);
    return w.ok() ? std::string() : std::string(w.status().message());
  };
  EXPECT_EQ(workload_error(R"({"tokens_per_micro_batch": 100})"),
            "workload.seq_len: 256 does not divide tokens_per_micro_batch (100)");
  EXPECT_EQ(workload_error(R"({"tokens_per_micro_batch": 512, "strategy": "fast"})"),
            "workload.strategy: unknown strategy 'fast' (ecss, no-overlap, naive, zero-offload)");
  EXPECT_EQ(workload_error(R"({"tokens_per_micro_batch": 512, "placement": {"weights": "nvme"}})"),
            "workload.placement.weights: nvme needs placement.states nvme too");
  EXPECT_EQ(workload_error(R"({"tokens_per_micro_batch": 512, "placement": {"state": "nvme"}})"),
            "workload.placement.state: unknown field");
  EXPECT_EQ(workload_error(R"({"micro_batches": 2})"), "workload.tokens_per_micro_batch: required");
}

// Measured per thread count: the counts measured as they are, fractions of a node's threads
// between them, and beyond the last its per-thread rate; one thread's rate scales linearly.
TEST(PlanConfigTest, TheOptimizersRateFollowsItsThreadCount) {
  HardwareConfig h;
  h.optimizer_params_per_s_per_thread = 5e8;
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(2), 1e9);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(0.5), 2.5e8);
  h.optimizer_params_per_s_by_threads = {5e8, 8e8, 9e8};
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(1), 5e8);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(2), 8e8);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(2.5), 8.5e8);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(3), 9e8);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(6), 1.8e9);
  EXPECT_DOUBLE_EQ(h.OptimizerParamsPerSecond(0.25), 1.25e8);
}

// Sizes beyond what the planner can multiply in 64 bits, or beyond physics, are refused by
// their path; so are duplicate names, and files that are not regular files.
TEST(PlanConfigTest, SizesOutOfRangeAndOddFilesAreRefused) {
  EXPECT_EQ(ModelError(R"("d_model": 64)", R"("d_model": 1000000000)"),
            "model.d_model: must be at most 262144 (got 1000000000)");
  EXPECT_EQ(ModelError(R"("experts": 2})", R"("experts": 70000})"),
            "model.routing.domains[1].experts: must be at most 65535 (got 70000)");
  EXPECT_EQ(
      ModelError(R"("vocab": 1000})", R"("vocab": 1000, "dense_params": 1.8446744073709552e19})"),
      "model.dense_params: must be at most 1e+15 (got 1.8446744073709552e+19)");
  EXPECT_EQ(ModelError(R"({"name": "b", )", R"({"name": "a", )"),
            "model.routing.domains[1].name: 'a' names an earlier domain too");
  EXPECT_EQ(ModelError(R"("sparse_layers": 2, "d_model": 64, "d_ff": 128)",
                       R"("sparse_layers": 4096, "d_model": 262144, "d_ff": 262144)"),
            "model: 3.3777e+15 expert parameters; the planner takes up to 10^15");
  StatusOr<WorkloadConfig> w = ParseWorkload(
      R"({"tokens_per_micro_batch": 16777216, "seq_len": 256, "micro_batches": 1024})");
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().message(),
            "workload: 1024 micro-batches of 16777216 tokens are more than 2^31 tokens a step");
  StatusOr<HardwareConfig> h = ParseHardware(R"({"device": {"kind": "sim", "memory_gib": 4,
      "profile": "h100-sxm", "gemm_efficiency": 1.5}, "host": {"memory_gib": 24,
      "optimizer_threads": 1, "optimizer_params_per_s_per_thread": 1e-300}})");
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().message(), "hardware.device.gemm_efficiency: must be at most 1 (got 1.5)");
  EXPECT_EQ(LoadModel("/tmp").status().message(), "model file '/tmp': not a regular file");
  EXPECT_EQ(LoadWorkload("ecss-host").status().code(), StatusCode::kNotFound);  // no presets
}

TEST(PlanConfigTest, AnUnknownPresetListsTheKnownOnes) {
  StatusOr<ModelConfig> m = LoadModel("pangu");
  ASSERT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("pangu-sigma"), std::string_view::npos) << m.status();
  EXPECT_EQ(LoadHardware("/no/such/file.json").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss::plan
