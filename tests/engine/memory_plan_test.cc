// The memory plan alone (no device), and held against what a session allocates: for several
// configurations, the allocators' peaks equal the plan's totals to the byte.
#include "engine/memory_plan.h"

#include <stdlib.h>

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "engine/plan_inputs.h"
#include "engine/session.h"
#include "router/routing_plan.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/engine/reference_trainer.h"

namespace ecss {
namespace {

using namespace engine_test;  // NOLINT(google-build-using-namespace): the shared harness

constexpr uint64_t kMiB = uint64_t{1} << 20;

// A model whose experts are 1.5 MiB of bf16 weights: d_model 512 x d_ff 768, two matrices.
SessionOptions BigExperts() {
  SessionOptions o;
  o.model.layers = 1;
  o.model.d_model = 512;
  o.model.d_ff = 768;
  o.model.dtype = DType::kBF16;
  o.model.domains = {{"a", 4}, {"b", 4}};
  o.model.vocab = 100;
  o.limits.max_tokens_per_micro_batch = 64;
  o.limits.max_active_experts_per_layer = 4;
  o.budgets.device_bytes = 40 * kMiB;
  return o;
}

// CUDA's caching allocator rounds blocks of 1 MiB and more up to 2 MiB: the same budget holds
// fewer 1.5 MiB slots than on the sim's 256-byte arena, and a budget sized on the sim's rule
// is refused (naming the bytes) instead of failing on the GPU.
TEST(MemoryPlanTest, SlotsAreSizedAsTheDeviceReservesThem) {
  const DeviceMemoryRules sim{256, 0, 0};
  const DeviceMemoryRules cuda{512, kMiB, 2 * kMiB};
  EXPECT_EQ(sim.Block(1536 * 1024), 1536u * 1024);
  EXPECT_EQ(cuda.Block(1536 * 1024), 2 * kMiB);
  EXPECT_EQ(cuda.Block(1000), 1024u);
  SessionOptions o = BigExperts();
  o.model.domains = {{"a", 16}, {"b", 16}};  // more experts than either cache holds
  auto on_sim = PlanMemory(o, sim, 4096);
  auto on_cuda = PlanMemory(o, cuda, 4096);
  ASSERT_TRUE(on_sim.ok() && on_cuda.ok()) << on_sim.status() << on_cuda.status();
  EXPECT_EQ(on_sim->expert_bytes, 1536u * 1024);
  EXPECT_GT(on_sim->cache_slots, on_cuda->cache_slots);
  EXPECT_LE(on_cuda->Total(MemoryTier::kDevice), o.budgets.device_bytes);
  EXPECT_LE(on_sim->Total(MemoryTier::kDevice), o.budgets.device_bytes);
  EXPECT_EQ(on_cuda->Find("expert cache slots")->reserved, 2 * kMiB);
  // The least budget the sim accepts for 4 slots falls short on CUDA.
  o.budgets.device_bytes = on_sim->Total(MemoryTier::kDevice) -
                           (on_sim->cache_slots - 4) * on_sim->Find("expert cache slots")->reserved;
  EXPECT_EQ(PlanMemory(o, sim, 4096)->cache_slots, 4u);
  const Status refused = PlanMemory(o, cuda, 4096).status();
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("need at least 4 slots"), std::string_view::npos) << refused;
}

TEST(MemoryPlanTest, ListsEveryTierAndRefusesShortBudgets) {
  SessionOptions o = BigExperts();
  auto plan = PlanMemory(o, {}, 4096);
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Pinned: 8 experts' weights and gradients (fp32); no staging with one micro-batch, and
  // two halves of 4 experts' gradients with more.
  EXPECT_EQ(plan->Find("expert compute weights")->total(), 8u * 1536 * 1024);
  EXPECT_EQ(plan->Find("gradient accumulators")->total(), 8u * 3 * kMiB);
  EXPECT_EQ(plan->Find("gradient staging"), nullptr);
  SessionOptions accumulating = o;
  accumulating.limits.max_micro_batches = 2;
  auto staged = PlanMemory(accumulating, {}, 4096);
  ASSERT_TRUE(staged.ok()) << staged.status();
  ASSERT_NE(staged->Find("gradient staging"), nullptr);
  EXPECT_EQ(staged->Find("gradient staging")->total(), 2u * 4 * 3 * kMiB);
  // Host: bf16 weights keep an fp32 master, AdamW two moments.
  EXPECT_EQ(plan->Find("master weights")->total(), 8u * 3 * kMiB);
  EXPECT_EQ(plan->Find("optimizer moments")->total(), 8u * 6 * kMiB);
  EXPECT_EQ(plan->Find("gradient region")->total(), 4u * 3 * kMiB);
  EXPECT_NE(plan->Summary().find("device"), std::string::npos);
  o.budgets.pinned_bytes = plan->Total(MemoryTier::kPinned) - 1;
  const Status pinned = PlanMemory(o, {}, 4096).status();
  EXPECT_EQ(pinned.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(pinned.message().find("budgets.pinned_bytes"), std::string_view::npos) << pinned;
  o.budgets.pinned_bytes = 0;
  o.placement.master = o.placement.moments = Tier::kNvme;
  o.placement.nvme_dirs = {"/tmp"};
  plan = PlanMemory(o, {}, 4096);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->Total(MemoryTier::kHost), 0u) << "the states live on NVMe";
  // Experts of 0.75 Mi parameters (9 MiB of master and moments): a slot for each of the two
  // loads and two stores at once, and for the update.
  ASSERT_NE(plan->Find("state streaming slots"), nullptr);
  EXPECT_EQ(plan->Find("state streaming slots")->count, 5u);
  EXPECT_EQ(plan->Find("state streaming slots")->total(), 5u * 9 * kMiB);
  o.model.dtype = DType::kF32;  // Validate's rules hold first
  EXPECT_EQ(PlanMemory(o, {}, 4096).status().code(), StatusCode::kInvalidArgument);
}

// The RRE router keeps its tables in the heap, outside every allocator, and the session its
// routing plans' host copies: the plan lists them to the byte (the heap tier, in no budget), a
// learned gate has none, and they grow with the domains and tokens, not with the experts' size.
TEST(MemoryPlanTest, TheRreTablesArePlannedInTheHeap) {
  SessionOptions o = BigExperts();
  o.budgets.pinned_bytes = 0;
  o.model.layers = 3;
  o.model.vocab = 1000;
  o.model.domains = {{"a", 2}, {"b", 3}, {"c", 1}};
  StatusOr<MemoryPlan> plan = PlanMemory(o, {}, 4096);
  ASSERT_TRUE(plan.ok()) << plan.status();
  StatusOr<RreRouter> router = RouterOf(o.model);
  ASSERT_TRUE(router.ok()) << router.status();
  const MemoryItem* tables = plan->Find("RRE routing tables");
  ASSERT_NE(tables, nullptr);
  EXPECT_EQ(tables->count, 3u);
  EXPECT_EQ(tables->total(), router->table_bytes());
  EXPECT_EQ(tables->total(), 3u * 3 * 1000 * sizeof(uint16_t));
  // The routing plans' host copies (and token and domain ids), kept for the next step's: one per
  // micro-batch, each plan as large as the largest plan (every token of the most a micro-batch
  // holds, every expert active) asks for.
  const MemoryItem* plans = plan->Find("RRE routing plans' host copies");
  ASSERT_NE(plans, nullptr);
  EXPECT_EQ(plans->count, o.limits.max_micro_batches);
  std::vector<uint32_t> tokens(o.limits.max_tokens_per_micro_batch), domains;
  for (uint32_t t = 0; t < tokens.size(); ++t) tokens[t] = t * 7 % o.model.vocab;
  for (uint32_t s = 0; s < tokens.size(); ++s) domains.push_back(s % 3);  // a sample a token
  StatusOr<RoutingPlan> largest = RoutingPlan::BuildRre(
      *router, {tokens.data(), static_cast<uint32_t>(tokens.size()), 1, domains.data()});
  ASSERT_TRUE(largest.ok()) << largest.status();
  for (uint32_t l = 0; l < o.model.layers; ++l) ASSERT_EQ(largest->layer(l).num_active, 6u);
  EXPECT_EQ(plans->bytes, largest->bytes());
  // Their token and domain ids: as many of each as the most tokens (a sample a token).
  const MemoryItem* tokens_copies = plan->Find("micro-batches' token and domain ids");
  ASSERT_NE(tokens_copies, nullptr);
  EXPECT_EQ(tokens_copies->count, o.limits.max_micro_batches);
  EXPECT_EQ(tokens_copies->bytes, (tokens.size() + domains.size()) * sizeof(uint32_t));
  EXPECT_EQ(plan->Total(MemoryTier::kHeap),
            tables->total() + plans->total() + tokens_copies->total());
  EXPECT_NE(plan->Summary().find("heap"), std::string::npos) << plan->Summary();
  const uint64_t heap = plan->Total(MemoryTier::kHeap);
  o.model.d_ff *= 2;  // bigger experts: the same tables and plans
  plan = PlanMemory(o, {}, 4096);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->Total(MemoryTier::kHeap), heap);
  o.routing = Routing::kLearnedGate;
  plan = PlanMemory(o, {}, 4096);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->Total(MemoryTier::kHeap), 0u);
}

// Every configuration allocates exactly its plan: the device allocator's peak is the plan's
// device total (plus the two activation buffers the loop allocated), the session's pinned
// pools and host allocator peak at the plan's pinned and host totals.
TEST(MemoryPlanTest, ASessionAllocatesExactlyItsPlan) {
  char dir[] = "/tmp/ecss_memory_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  struct Case {
    const char* name;
    RunConfig config;
  };
  std::vector<Case> cases;
  RunConfig c;
  cases.push_back({"f32 host states", c});
  c.dtype = DType::kBF16;
  c.micro_batches = 2;
  cases.push_back({"bf16, two micro-batches", c});
  c.delayed = true;
  cases.push_back({"delayed update", c});
  c.delayed = false;
  c.strategy = Strategy::kNaive;
  cases.push_back({"naive", c});
  c.strategy = Strategy::kEcss;
  c.gated = true;
  cases.push_back({"learned gate", c});
  c.gated = false;
  c.nvme_dir = dir;
  cases.push_back({"states on NVMe", c});
  c.nvme_weights = true;
  c.staging_blocks = 3;
  cases.push_back({"weights on NVMe", c});
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    auto sim = SimBackend::Create(so);
    ASSERT_TRUE(sim.ok());
    const SessionOptions o = OptionsFor(k.config);
    auto session = Session::Create(**sim, o);
    ASSERT_TRUE(session.ok()) << session.status();
    const MemoryPlan& plan = (*session)->memory_plan();
    // The session's own device allocations, before the loop allocates anything.
    EXPECT_EQ((*sim)->device_memory().stats().peak_used_bytes, plan.Total(MemoryTier::kDevice))
        << plan.Summary();
    for (int tag = 0; tag < kNumMemoryTags; ++tag) {
      uint64_t planned = 0;
      for (const MemoryItem& item : plan.items) {
        if (item.tier == MemoryTier::kDevice && static_cast<int>(item.tag) == tag) {
          planned += item.total();
        }
      }
      EXPECT_EQ((*sim)->device_memory().accounting().Usage(static_cast<MemoryTag>(tag)).peak_bytes,
                planned)
          << MemoryTagName(static_cast<MemoryTag>(tag));
    }
    (*session).reset();
    // Trained (naive touches every expert), its master weights read back: every pinned and
    // host allocation the plan lists has been live at once.
    if (!k.config.nvme_dir.empty()) {
      std::filesystem::remove_all(dir);
      std::filesystem::create_directory(dir);
    }
    TrainSession(k.config, nullptr, [](Session& s) {
      const Session::HostMemoryPeaks peaks = s.host_memory_peaks();
      EXPECT_EQ(peaks.pinned_bytes, s.memory_plan().Total(MemoryTier::kPinned))
          << s.memory_plan().Summary();
      EXPECT_EQ(peaks.host_bytes, s.memory_plan().Total(MemoryTier::kHost));
    });
    if (!k.config.nvme_dir.empty()) {
      std::filesystem::remove_all(dir);
      std::filesystem::create_directory(dir);
    }
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ecss
