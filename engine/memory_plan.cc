#include "engine/memory_plan.h"

#include <algorithm>

#include "engine/expert_updater.h"
#include "engine/step_plan.h"
#include "offload/state_file.h"
#include "router/routing_plan.h"
#include "router/rre_router.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/backend.h"

namespace ecss {
namespace {

uint64_t AlignUp(uint64_t bytes, uint64_t alignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

constexpr uint64_t kPinnedAlignment = 4096;  // PinnedPoolOptions' default
constexpr uint64_t kHostAlignment = 64;      // HostAllocatorOptions' default

uint64_t Reserved(MemoryTier tier, const DeviceMemoryRules& device, uint64_t bytes) {
  switch (tier) {
    case MemoryTier::kDevice:
      return device.Block(bytes);
    case MemoryTier::kPinned:
      return AlignUp(bytes, kPinnedAlignment);
    case MemoryTier::kHost:
      return AlignUp(bytes, kHostAlignment);
    case MemoryTier::kHeap:
      return bytes;  // as the owner's std::vector asks for it
  }
  return bytes;
}

class Planner {
 public:
  Planner(const SessionOptions& o, const DeviceMemoryRules& device) : o_(o), device_(device) {}

  void Add(std::string what, MemoryTier tier, MemoryTag tag, uint64_t count, uint64_t bytes,
           bool in_store = false) {
    if (count == 0 || bytes == 0) return;
    plan_.items.push_back(
        {std::move(what), tier, tag, count, bytes, Reserved(tier, device_, bytes), in_store});
  }

  StatusOr<MemoryPlan> Run(uint64_t ffn_workspace_bytes) {
    const ModelSpec& m = o_.model;
    const bool gated = o_.routing == Routing::kLearnedGate;
    const bool naive = StepPlan::EveryExpert(o_.strategy);  // every expert in every access
    const std::vector<uint32_t> per_layer = o_.ExpertsPerLayer();
    const uint32_t widest = *std::max_element(per_layer.begin(), per_layer.end());
    uint64_t experts = 0;
    for (uint32_t n : per_layer) experts += n;
    MemoryPlan& p = plan_;
    p.params = m.expert_params();
    p.expert_bytes = p.params * DTypeSize(m.dtype);
    p.max_rows = MaxRows(o_);
    p.max_groups = naive ? widest : std::min(widest, p.max_rows);
    if (o_.limits.max_active_experts_per_layer > 0 && !naive) {
      p.max_groups = std::min(p.max_groups, o_.limits.max_active_experts_per_layer);
    }
    // The kernels' fp32 gradients on the device; on the host, in the gradient dtype.
    const uint64_t gradient_bytes = p.params * 4;
    const uint64_t host_gradient_bytes = p.params * DTypeSize(o_.gradient_dtype);
    const bool states_on_nvme = o_.placement.states_on_nvme();
    const bool weights_on_nvme = o_.placement.weights_on_nvme();

    // The expert store: every expert's compute weights (pinned, unless on NVMe), master
    // weights (bf16 in host memory; f32: the compute weights themselves) and moments (host,
    // one array at least), each one region; its staging block; the stager's window.
    const ExpertStoreOptions store = StoreOptionsFor(o_, p.params);
    p.nvme_bytes = ExpertStore::DiskBytes(store);
    Add("expert compute weights", MemoryTier::kPinned, MemoryTag::kExpertWeights, 1,
        ExpertStore::RegionBytes(store, ExpertState::kWeights), true);
    Add("master weights", MemoryTier::kHost, MemoryTag::kMasterWeights, 1,
        ExpertStore::RegionBytes(store, ExpertState::kMaster), true);
    Add("optimizer moments", MemoryTier::kHost, MemoryTag::kOptimizerMoments, 1,
        ExpertStore::RegionBytes(store, ExpertState::kMoments), true);
    Add("store staging", MemoryTier::kPinned, MemoryTag::kStaging, 1,
        ExpertStore::StagingBytes(store), true);
    if (weights_on_nvme) {
      p.weight_staging_blocks = o_.placement.weight_staging_blocks > 0
                                    ? o_.placement.weight_staging_blocks
                                    : p.max_groups;
      Add("weight staging blocks", MemoryTier::kPinned, MemoryTag::kStaging,
          p.weight_staging_blocks, StateBlockBytes(p.expert_bytes), true);
    }
    // The session's pinned memory: the delayed update's published weights, the gradient
    // accumulators, the staging of later micro-batches' gradients, the NVMe states' staging.
    if (o_.delayed_update) {
      Add("published compute weights (delayed update)", MemoryTier::kPinned,
          MemoryTag::kExpertWeights, experts, p.expert_bytes);
    }
    // A step's experts with a gradient: in each layer, its experts or what its micro-batches
    // may activate. Twice that where updates overlap the next step (ecss's updates of step
    // t-1, the delayed update's held gradients): they still read theirs while step t
    // accumulates.
    uint64_t step_experts = 0;
    for (uint32_t n : per_layer) {
      step_experts += std::min<uint64_t>(n, uint64_t{o_.limits.max_micro_batches} * p.max_groups);
    }
    const bool overlap = o_.delayed_update || !StepPlan::StepWaitsForUpdates(o_.strategy);
    p.gradient_slots = static_cast<uint32_t>(std::min(experts, (overlap ? 2 : 1) * step_experts));
    Add("gradient accumulators", MemoryTier::kPinned, MemoryTag::kGradients, p.gradient_slots,
        host_gradient_bytes);
    p.gradient_staging_halves = o_.limits.max_micro_batches > 1 ? 2 : 0;
    Add("gradient staging", MemoryTier::kPinned, MemoryTag::kGradients, p.gradient_staging_halves,
        p.max_groups * host_gradient_bytes);
    if (states_on_nvme) {
      const NvmeUpdaterOptions nvme = NvmeOptionsFor(o_, p.params);
      ECSS_ASSIGN_OR_RETURN(const uint64_t pipeline,
                            NvmeUpdater::PipelineBytes(nvme, weights_on_nvme));
      const int slots = StagingSlots(nvme);
      Add("state streaming slots", MemoryTier::kPinned, MemoryTag::kStaging, slots,
          pipeline / slots);
      Add("state scratch", MemoryTier::kPinned, MemoryTag::kStaging, 1,
          NvmeUpdater::ScratchBytes(nvme));
    }
    // Device memory: what a step keeps and works in, then the cache in what is left.
    p.activation_bytes = uint64_t{p.max_rows} * m.d_model * DTypeSize(m.dtype);
    p.workspace_bytes = std::max<uint64_t>(ffn_workspace_bytes, 256);
    Add("saved activations", MemoryTier::kDevice, MemoryTag::kActivations,
        uint64_t{o_.limits.max_micro_batches} * m.layers, p.activation_bytes);
    Add("permuted activations", MemoryTier::kDevice, MemoryTag::kActivations, 2,
        p.activation_bytes);
    Add("kernel workspace", MemoryTier::kDevice, MemoryTag::kWorkspace, 1, p.workspace_bytes);
    Add("gradient region", MemoryTier::kDevice, MemoryTag::kGradients, 1,
        p.max_groups * gradient_bytes);
    if (o_.gradient_dtype != DType::kF32) {  // the region's gradients cast for the copy out
      Add("cast gradient region", MemoryTier::kDevice, MemoryTag::kGradients, 1,
          p.max_groups * host_gradient_bytes);
    }
    // One routing plan per micro-batch (RRE: every layer), or per micro-batch layer (gates).
    const uint64_t plan_layers = gated ? 1 : m.layers;
    p.plan_slots = o_.limits.max_micro_batches * (gated ? m.layers : 1);
    p.plan_slot_bytes =
        AlignUp(RoutingPlan::MostBytes(plan_layers, p.max_rows, std::min(widest, p.max_rows)),
                device_.alignment_bytes);
    Add("routing plans", MemoryTier::kDevice, MemoryTag::kOther, 1,
        uint64_t{p.plan_slots} * p.plan_slot_bytes);
    // RRE routes by tables: one per domain, an expert index per token and sparse layer. They
    // grow with domains x layers x vocabulary, not with the experts' size or number. Each
    // micro-batch's token and domain ids and plan, copied to the heap, stay from one step to the
    // next, whose are written in them (RoutingPlan::BuildRre's `recycled`): at most a whole slot
    // (a domain id a sample: at most one a token).
    if (!gated) {
      Add("RRE routing tables", MemoryTier::kHeap, MemoryTag::kOther, m.domains.size(),
          RreRouter::DomainTableBytes(m.vocab, m.layers));
      Add("RRE routing plans' host copies", MemoryTier::kHeap, MemoryTag::kOther, p.plan_slots,
          RoutingPlan::MostBytes(plan_layers, p.max_rows, std::min(widest, p.max_rows)));
      Add("micro-batches' token and domain ids", MemoryTier::kHeap, MemoryTag::kOther, p.plan_slots,
          2 * uint64_t{o_.limits.max_tokens_per_micro_batch} * sizeof(uint32_t));
    }
    ECSS_RETURN_IF_ERROR(PlanCache(experts));
    ECSS_RETURN_IF_ERROR(
        CheckBudget(MemoryTier::kPinned, o_.budgets.pinned_bytes, "budgets.pinned_bytes", experts));
    ECSS_RETURN_IF_ERROR(
        CheckBudget(MemoryTier::kHost, o_.budgets.host_bytes, "budgets.host_bytes", experts));
    return plan_;
  }

 private:
  // The expert cache: every slot the device budget leaves room for, at least max_groups (so
  // that no step the options accept is refused later for want of slots), at most every expert.
  Status PlanCache(uint64_t experts) {
    MemoryPlan& p = plan_;
    const uint64_t fixed = p.Total(MemoryTier::kDevice);
    const uint64_t slot = device_.Block(p.expert_bytes);
    const uint64_t left = o_.budgets.device_bytes > fixed ? o_.budgets.device_bytes - fixed : 0;
    p.cache_slots = static_cast<uint32_t>(std::min<uint64_t>(left / slot, experts));
    if (p.cache_slots < p.max_groups) {
      return ResourceExhaustedError(StrCat(
          "session: device budget ", HumanBytes(o_.budgets.device_bytes), " leaves room for ",
          p.cache_slots, " expert slots after ", HumanBytes(fixed),
          " of activations and workspace; one layer's active experts need at least ", p.max_groups,
          " slots (limits.max_active_experts_per_layer): ", HumanBytes(fixed + p.max_groups * slot),
          " in all"));
    }
    Add(std::string(kCacheSlotsItem), MemoryTier::kDevice, MemoryTag::kExpertWeights, p.cache_slots,
        p.expert_bytes);
    return Status::Ok();
  }

  // A budget of 0 means exactly what the plan needs.
  Status CheckBudget(MemoryTier tier, uint64_t budget, std::string_view field, uint64_t experts) {
    const uint64_t needed = plan_.Total(tier);
    if (budget == 0 || budget >= needed) return Status::Ok();
    return ResourceExhaustedError(
        StrCat("session: ", field, " ", HumanBytes(budget), " is below the ", HumanBytes(needed),
               " (", needed, " bytes) that the ", MemoryTierName(tier), " memory of ", experts,
               " experts needs (",
               tier == MemoryTier::kHost ? "their master weights and moments; or "
                                           "place them on NVMe"
                                         : "compute weights, gradients, staging",
               ")"));
  }

  const SessionOptions& o_;
  const DeviceMemoryRules& device_;
  MemoryPlan plan_;
};

}  // namespace

std::string_view MemoryTierName(MemoryTier tier) {
  switch (tier) {
    case MemoryTier::kDevice:
      return "device";
    case MemoryTier::kPinned:
      return "pinned";
    case MemoryTier::kHost:
      return "host";
    case MemoryTier::kHeap:
      return "heap";
  }
  return "?";
}

uint64_t DeviceMemoryRules::Block(uint64_t bytes) const {
  if (large_block_bytes > 0 && bytes >= large_block_bytes && large_granularity_bytes > 0) {
    return AlignUp(bytes, large_granularity_bytes);
  }
  return AlignUp(bytes, alignment_bytes);
}

DeviceMemoryRules DeviceMemoryRules::Of(const BackendCapabilities& capabilities) {
  return {capabilities.device_alignment_bytes, capabilities.device_large_block_bytes,
          capabilities.device_large_granularity_bytes};
}

uint64_t MemoryPlan::Total(MemoryTier tier) const {
  uint64_t total = 0;
  for (const MemoryItem& item : items) total += item.tier == tier ? item.total() : 0;
  return total;
}

uint64_t MemoryPlan::StoreTotal(MemoryTier tier) const {
  uint64_t total = 0;
  for (const MemoryItem& item : items)
    total += item.tier == tier && item.in_store ? item.total() : 0;
  return total;
}

uint64_t MemoryPlan::DeviceBudgetFor(uint32_t slots) const {
  const MemoryItem* cache = Find(kCacheSlotsItem);
  if (cache == nullptr) return Total(MemoryTier::kDevice);
  return Total(MemoryTier::kDevice) - cache->total() + uint64_t{slots} * cache->reserved;
}

const MemoryItem* MemoryPlan::Find(std::string_view what) const {
  for (const MemoryItem& item : items) {
    if (item.what == what) return &item;
  }
  return nullptr;
}

std::string MemoryPlan::Summary() const {
  std::string out;
  for (MemoryTier tier :
       {MemoryTier::kDevice, MemoryTier::kPinned, MemoryTier::kHost, MemoryTier::kHeap}) {
    if (Total(tier) == 0) continue;
    if (!out.empty()) out += "; ";
    out += StrCat(MemoryTierName(tier), " ", HumanBytes(Total(tier)), ":");
    bool first = true;
    for (const MemoryItem& item : items) {
      if (item.tier != tier) continue;
      out +=
          StrCat(first ? " " : ", ", item.what, " ", item.count, " x ", HumanBytes(item.reserved));
      first = false;
    }
  }
  return out;
}

uint32_t MaxRows(const SessionOptions& options) {
  return options.limits.max_tokens_per_micro_batch *
         (options.routing == Routing::kLearnedGate ? options.gate_k : 1);
}

StatusOr<MemoryPlan> PlanMemory(const SessionOptions& options, const DeviceMemoryRules& device,
                                uint64_t ffn_workspace_bytes) {
  ECSS_RETURN_IF_ERROR(options.Validate());
  return Planner(options, device).Run(ffn_workspace_bytes);
}

}  // namespace ecss
