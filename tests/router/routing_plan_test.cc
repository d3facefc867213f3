#include "router/routing_plan.h"

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "router/gates.h"
#include "runtime/base/random.h"

namespace ecss {
namespace {

struct Batch {
  std::vector<uint32_t> tokens;
  std::vector<uint32_t> domains;
  MicroBatch view;
};

Batch RandomBatch(uint32_t batch_size, uint32_t seq_len, uint32_t vocab,
                  const std::vector<uint32_t>& domain_ids, uint64_t seed) {
  Batch b;
  CounterRng rng(seed, 0);
  b.tokens.resize(static_cast<size_t>(batch_size) * seq_len);
  for (uint32_t& t : b.tokens) t = rng.Uniform(vocab);
  for (uint32_t s = 0; s < batch_size; ++s) b.domains.push_back(domain_ids[s % domain_ids.size()]);
  b.view = MicroBatch{b.tokens.data(), batch_size, seq_len, b.domains.data()};
  return b;
}

RreRouter MakeRouter() {
  DomainMap map = *DomainMap::Create(4);
  EXPECT_TRUE(map.AddDomainUniform("zh", 0, 8).ok());
  EXPECT_TRUE(map.AddDomain("en", 1, {4, 6, 8, 10}).ok());
  EXPECT_TRUE(map.AddDomainUniform("code", 2, 3).ok());
  return *RreRouter::Create(map, {1000, 5, TableBuilder::kRreUniform});
}

// Invariants every layer plan must satisfy, whatever built it.
void CheckLayerInvariants(const LayerPlan& plan, const std::vector<uint32_t>& expert_of_slot) {
  const uint32_t rows = plan.rows();
  ASSERT_EQ(plan.expert_offsets[0], 0u);
  ASSERT_EQ(plan.expert_offsets[plan.num_active], rows);
  std::vector<int> routed(plan.num_tokens, 0);
  for (uint32_t a = 0; a < plan.num_active; ++a) {
    ASSERT_GT(plan.count(a), 0u) << "active experts have rows";
    if (a > 0) {
      ASSERT_LT(plan.active_experts[a - 1], plan.active_experts[a]);
    }
    for (uint32_t row = plan.expert_offsets[a]; row < plan.expert_offsets[a + 1]; ++row) {
      const uint32_t slot = plan.permutation[row];
      ASSERT_EQ(expert_of_slot[slot], plan.active_experts[a]) << "rows are sorted by expert";
      ASSERT_EQ(plan.inverse[slot], row) << "inverse inverts";
      if (row > plan.expert_offsets[a]) {
        ASSERT_LT(plan.permutation[row - 1], slot) << "stable";
      }
      ++routed[slot / plan.k];
    }
  }
  for (uint32_t token = 0; token < plan.num_tokens; ++token) {
    ASSERT_EQ(routed[token], static_cast<int>(plan.k)) << "token " << token << " routed k times";
  }
}

TEST(RoutingPlanTest, RrePlansMatchTheRouterAndInvertExactly) {
  const RreRouter router = MakeRouter();
  Batch batch = RandomBatch(6, 77, 1000, {0, 1, 2}, 11);
  StatusOr<RoutingPlan> plan = RoutingPlan::BuildRre(router, batch.view);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->num_layers(), 4u);
  ASSERT_EQ(plan->num_tokens(), 6u * 77u);
  for (uint32_t layer = 0; layer < 4; ++layer) {
    std::vector<uint32_t> expected(plan->num_tokens());
    for (uint32_t t = 0; t < plan->num_tokens(); ++t) {
      expected[t] = *router.Route(layer, batch.domains[t / 77], batch.tokens[t]);
    }
    const LayerPlan view = plan->layer(layer);
    EXPECT_EQ(view.layer, layer);
    EXPECT_EQ(view.k, 1u);
    CheckLayerInvariants(view, expected);
    for (uint32_t row = 0; row < view.rows(); ++row) ASSERT_EQ(view.combine_weights[row], 1.0f);
  }
}

TEST(RoutingPlanTest, PlanIsOneRelocatableBuffer) {
  const RreRouter router = MakeRouter();
  Batch batch = RandomBatch(2, 50, 1000, {1}, 3);
  StatusOr<RoutingPlan> plan = RoutingPlan::BuildRre(router, batch.view);
  ASSERT_TRUE(plan.ok());
  std::vector<uint32_t> copy(plan->bytes() / sizeof(uint32_t));
  std::memcpy(copy.data(), plan->data(), plan->bytes());  // as a single H2D transfer would
  for (uint32_t layer = 0; layer < 4; ++layer) {
    const LayerPlan a = plan->layer(layer);
    const LayerPlan b = RoutingPlan::LayerAt(copy.data(), layer);
    ASSERT_EQ(a.num_active, b.num_active);
    ASSERT_EQ(0, std::memcmp(a.permutation, b.permutation, a.rows() * sizeof(uint32_t)));
    ASSERT_EQ(0, std::memcmp(a.active_experts, b.active_experts, a.num_active * sizeof(uint32_t)));
    ASSERT_NE(static_cast<const void*>(a.permutation), static_cast<const void*>(b.permutation));
    // The device view points into the copy without reading it, and agrees with LayerAt's.
    const LayerPlan c = plan->DeviceLayer(layer, copy.data());
    EXPECT_EQ(c.permutation, b.permutation);
    EXPECT_EQ(c.inverse, b.inverse);
    EXPECT_EQ(c.expert_offsets, b.expert_offsets);
    EXPECT_EQ(c.combine_weights, b.combine_weights);
    EXPECT_EQ(c.num_active, a.num_active);
  }
}

// The expert of every slot of `batch` in `layer`, as the router routes it one at a time.
std::vector<uint32_t> RoutedOneByOne(const RreRouter& router, const Batch& batch, uint32_t layer) {
  std::vector<uint32_t> experts(batch.tokens.size());
  for (size_t t = 0; t < experts.size(); ++t) {
    experts[t] = *router.Route(layer, batch.domains[t / batch.view.seq_len], batch.tokens[t]);
  }
  return experts;
}

// Micro-batches shorter than the sort's lanes, and of lengths that leave its last lane short.
TEST(RoutingPlanTest, EveryLengthSortsStably) {
  const RreRouter router = MakeRouter();
  for (uint32_t seq_len : {1u, 2u, 3u, 4u, 5u, 7u, 9u, 13u}) {
    for (uint32_t samples : {1u, 2u, 3u}) {
      Batch batch = RandomBatch(samples, seq_len, 1000, {0, 1, 2}, seq_len * 10 + samples);
      StatusOr<RoutingPlan> plan = RoutingPlan::BuildRre(router, batch.view);
      ASSERT_TRUE(plan.ok()) << plan.status();
      for (uint32_t layer = 0; layer < 4; ++layer) {
        SCOPED_TRACE(testing::Message() << samples << " x " << seq_len << ", layer " << layer);
        CheckLayerInvariants(plan->layer(layer), RoutedOneByOne(router, batch, layer));
      }
    }
  }
}

// A plan built in a recycled buffer, larger or smaller than it needs, is byte for byte the plan
// built in a new one; a build that fails leaves the recycled plan as it was.
TEST(RoutingPlanTest, RecycledBuffersBuildTheSamePlans) {
  const RreRouter router = MakeRouter();
  const Batch large = RandomBatch(6, 77, 1000, {0, 1, 2}, 21);
  const Batch small = RandomBatch(2, 50, 1000, {1}, 22);
  const auto same = [](const RoutingPlan& a, const RoutingPlan& b) {
    return a.bytes() == b.bytes() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
  };
  StatusOr<RoutingPlan> fresh_large = RoutingPlan::BuildRre(router, large.view);
  StatusOr<RoutingPlan> fresh_small = RoutingPlan::BuildRre(router, small.view);
  ASSERT_TRUE(fresh_large.ok() && fresh_small.ok());
  StatusOr<RoutingPlan> spare = RoutingPlan::BuildRre(router, large.view);
  ASSERT_TRUE(spare.ok());
  StatusOr<RoutingPlan> shrunk = RoutingPlan::BuildRre(router, small.view, &*spare);
  ASSERT_TRUE(shrunk.ok()) << shrunk.status();
  EXPECT_TRUE(same(*shrunk, *fresh_small));
  StatusOr<RoutingPlan> grown = RoutingPlan::BuildRre(router, large.view, &*shrunk);
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_TRUE(same(*grown, *fresh_large));

  Batch bad = small;
  bad.view.token_ids = bad.tokens.data();
  bad.tokens[3] = 1000;  // out of the vocabulary
  EXPECT_EQ(RoutingPlan::BuildRre(router, bad.view, &*grown).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(same(*grown, *fresh_large)) << "a failed build took the recycled buffer";
}

TEST(RoutingPlanTest, BadTokensAndDomainsAreNamed) {
  const RreRouter router = MakeRouter();
  Batch batch = RandomBatch(3, 10, 1000, {0}, 1);
  batch.tokens[2 * 10 + 7] = 1000;
  Status token = RoutingPlan::BuildRre(router, batch.view).status();
  EXPECT_EQ(token.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(token.message().find("sample 2 position 7"), std::string_view::npos) << token;
  batch.tokens[2 * 10 + 7] = 0;
  batch.domains[1] = 42;
  Status domain = RoutingPlan::BuildRre(router, batch.view).status();
  EXPECT_EQ(domain.code(), StatusCode::kNotFound);
  EXPECT_NE(domain.message().find("sample 1"), std::string_view::npos) << domain;
  EXPECT_NE(domain.message().find("42"), std::string_view::npos) << domain;
  EXPECT_EQ(RoutingPlan::BuildRre(router, MicroBatch{}).status().code(),
            StatusCode::kInvalidArgument);
}

// A plan addresses its buffer with 32-bit word offsets: one of 342 layers of 4 Mi tokens would
// need about 4.3 G words (3 per row and layer), and is refused before anything is allocated.
TEST(RoutingPlanTest, APlanPast32BitOffsetsIsRefused) {
  DomainMap map = *DomainMap::Create(342);
  ASSERT_TRUE(map.AddDomainUniform("one", 0, 1).ok());
  const RreRouter router = *RreRouter::Create(map, {2, 1, TableBuilder::kRreUniform});
  Batch batch = RandomBatch(1, 4u << 20, 2, {0}, 1);
  const Status refused = RoutingPlan::BuildRre(router, batch.view).status();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("342 layer(s) of 4194304 rows is too large for 32-bit offsets"),
            std::string_view::npos)
      << refused;
}

TEST(RoutingPlanTest, AssignmentPlansRouteEveryTokenKTimes) {
  GateOptions options;
  options.d_model = 16;
  options.num_experts = 8;
  options.k = 2;
  StatusOr<TopKGate> gate = TopKGate::Create(options);
  ASSERT_TRUE(gate.ok());
  std::vector<float> hidden(100 * 16);
  CounterRng rng(9, 9);
  for (float& h : hidden) h = rng.UniformFloat() - 0.5f;
  for (float& w : gate->weight()) w = 4 * (rng.UniformFloat() - 0.5f);
  GateOutput out;
  ASSERT_TRUE(gate->Forward(hidden.data(), 100, &out).ok());
  StatusOr<RoutingPlan> plan = out.ToPlan(3);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const LayerPlan view = plan->layer(0);
  EXPECT_EQ(view.layer, 3u);
  EXPECT_EQ(view.k, 2u);
  CheckLayerInvariants(view, out.experts);
  for (uint32_t row = 0; row < view.rows(); ++row) {
    ASSERT_EQ(view.combine_weights[row], out.weights[view.permutation[row]]);
  }
  std::vector<uint32_t> twice = {1, 1};
  std::vector<float> weights = {0.5f, 0.5f};
  EXPECT_EQ(RoutingPlan::FromAssignments(0, 4, 1, 2, twice.data(), weights.data()).status().code(),
            StatusCode::kInvalidArgument);
  std::vector<uint32_t> outside = {0, 4};
  EXPECT_EQ(
      RoutingPlan::FromAssignments(0, 4, 1, 2, outside.data(), weights.data()).status().code(),
      StatusCode::kInvalidArgument);
}

TEST(RoutingPlanTest, StepAccessSequenceIsForwardThenBackward) {
  const RreRouter router = MakeRouter();
  std::vector<RoutingPlan> plans;
  for (uint64_t m = 0; m < 2; ++m) {
    Batch batch = RandomBatch(2, 30, 1000, {0, 2}, 100 + m);
    plans.push_back(*RoutingPlan::BuildRre(router, batch.view));
  }
  const std::vector<ExpertAccess> sequence = StepAccessSequence(plans);
  std::vector<uint32_t> expected_layers;
  for (uint32_t m = 0; m < 2; ++m) {
    for (uint32_t l : {0u, 1u, 2u, 3u, 3u, 2u, 1u, 0u}) expected_layers.push_back(m * 10 + l);
  }
  uint64_t rows = 0;
  for (const ExpertAccess& access : sequence) rows += access.rows;
  // Layer 3's forward and backward visits are adjacent; collapse repeated keys per pass.
  std::vector<uint32_t> collapsed;
  uint32_t previous_pass = 2;
  uint32_t previous_key = UINT32_MAX;
  for (const ExpertAccess& access : sequence) {
    const uint32_t key = access.micro_batch * 10 + access.layer;
    const auto pass = static_cast<uint32_t>(access.pass);
    if (key != previous_key || pass != previous_pass) collapsed.push_back(key);
    previous_key = key;
    previous_pass = pass;
  }
  EXPECT_EQ(collapsed, expected_layers);
  EXPECT_EQ(rows, 2u * 2 * 60 * 4) << "every token of every layer, forward and backward";
}

TEST(RoutingStatsTest, CountsPerStepAndRun) {
  const RreRouter router = MakeRouter();
  RoutingStats stats(router.domains());
  Batch batch = RandomBatch(4, 25, 1000, {0, 1}, 5);
  RoutingPlan plan = *RoutingPlan::BuildRre(router, batch.view);
  ASSERT_TRUE(stats.Add(plan).ok());
  ASSERT_TRUE(stats.Add(plan).ok());
  uint64_t total = 0;
  for (uint64_t c : stats.step_counts(2)) total += c;
  EXPECT_EQ(total, 200u);
  stats.EndStep();
  total = 0;
  for (uint64_t c : stats.run_counts(2)) total += c;
  EXPECT_EQ(total, 200u);
  for (uint64_t c : stats.step_counts(2)) EXPECT_EQ(c, 0u);
  const ExpertRange zh = router.domains().domains()[0].groups[0];
  EXPECT_GE(RoutingStats::Summarize(stats.run_counts(0), zh).imbalance(), 1.0);
}

}  // namespace
}  // namespace ecss
