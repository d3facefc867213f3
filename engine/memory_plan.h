// MemoryPlan: every byte a session allocates, by tier (device, pinned host, pageable host;
// and the heap, outside the allocators) and purpose, as a pure function of the session
// options, the device's allocation rules and the kernels' workspace: no device, no
// allocation. The session's allocators allocate exactly what its plan lists for their tiers
// (tests hold their peaks to it), and the planner calls the same function for a device this
// machine does not have.
//
// Device blocks are sized as the device reserves them: the sim's arena rounds to 256 B, the
// CUDA caching allocator rounds blocks of 1 MiB or more up to 2 MiB (BackendCapabilities), so
// that cache slots sized on the sim also fit on a GPU. Pinned blocks round to the pool's 4 KiB,
// host blocks to the host allocator's 64 B.
//
// The device budget holds what a step keeps and works in (activations, the kernels'
// workspace, the gradient region, the routing plans) and the expert cache in what is left: at
// least max_active_experts_per_layer slots (every expert of the widest layer for naive), at
// most every expert. A plain value.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/session_options.h"
#include "runtime/base/memory_tag.h"

namespace ecss {

struct BackendCapabilities;

// kHeap: host memory outside the session's allocators, in the process heap of the object that
// owns it (the RRE router's tables), so no budget bounds it; it is planned all the same (the
// bytes its owner asks for; malloc rounds large blocks to pages), because it is resident
// memory all the same.
enum class MemoryTier : uint8_t { kDevice, kPinned, kHost, kHeap };
std::string_view MemoryTierName(MemoryTier tier);  // "device", "pinned", "host", "heap"

// How a device reserves a block of `bytes`.
struct DeviceMemoryRules {
  uint64_t alignment_bytes = 256;
  uint64_t large_block_bytes = 0;        // blocks of at least this size (0: no such rule) ...
  uint64_t large_granularity_bytes = 0;  // ... round up to this
  uint64_t Block(uint64_t bytes) const;
  static DeviceMemoryRules Of(const BackendCapabilities& capabilities);
};

struct MemoryItem {
  std::string what;  // "expert cache slots", ...
  MemoryTier tier = MemoryTier::kDevice;
  MemoryTag tag = MemoryTag::kOther;
  uint64_t count = 0;     // allocations
  uint64_t bytes = 0;     // each, as requested
  uint64_t reserved = 0;  // each, as the tier's allocator rounds it
  // In the expert store's own pools (every expert's compute weights, master weights and
  // moments, each one region), not the session's.
  bool in_store = false;
  uint64_t total() const { return count * reserved; }
};

inline constexpr std::string_view kCacheSlotsItem = "expert cache slots";

struct MemoryPlan {
  uint64_t params = 0;        // per expert
  uint64_t expert_bytes = 0;  // compute weights of one expert
  uint32_t max_rows = 0;      // token slots of a micro-batch's layer
  uint32_t max_groups = 0;    // the most experts one layer of a micro-batch may activate
  uint32_t cache_slots = 0;
  uint32_t weight_staging_blocks = 0;  // weights on NVMe: the NVMe -> pinned window
  uint64_t activation_bytes = 0;       // one [max_rows, d_model] buffer
  uint64_t workspace_bytes = 0;        // the kernels' scratch
  uint64_t plan_slot_bytes = 0;        // one routing plan's room in the plan region
  uint32_t plan_slots = 0;             // micro-batches (RRE) or micro-batch layers (gates)
  // The expert store's files in placement.nvme_dirs once every expert is written, shadow
  // slots included (ExpertStore::DiskBytes): a new store takes none of it up front.
  uint64_t nvme_bytes = 0;
  // Pinned gradient accumulators: the experts that may have a gradient in a step (two steps
  // where one step's updates overlap the next), at most every expert.
  uint32_t gradient_slots = 0;
  // Pinned staging of later micro-batches' gradients before they are added, each of
  // max_groups experts: 2 with several micro-batches (they take turns), else none.
  uint32_t gradient_staging_halves = 0;
  std::vector<MemoryItem> items;

  uint64_t Total(MemoryTier tier) const;
  uint64_t StoreTotal(MemoryTier tier) const;           // of the items in_store
  const MemoryItem* Find(std::string_view what) const;  // null when not planned
  // The budgets.device_bytes whose plan has `slots` expert cache slots (at least
  // max_active_experts_per_layer, at most every expert, for the same options otherwise):
  // this plan's device items other than the cache, plus the slots.
  uint64_t DeviceBudgetFor(uint32_t slots) const;
  // "device 300.00 MiB: expert cache slots 40 x 7.50 MiB, ...; pinned ...; host ...; heap ..."
  std::string Summary() const;
};

// Token slots of one micro-batch's layer: its tokens, times gate_k with a learned gate.
// REQUIRES: options.Validate() passed.
uint32_t MaxRows(const SessionOptions& options);

// REQUIRES: options.Validate() passed. `ffn_workspace_bytes`: the grouped FFN's scratch for a
// micro-batch of max_rows rows, forward or backward (the kernels' own figure). The NVMe
// states' staging comes from engine/expert_updater.h. ResourceExhausted naming the tier, the
// bytes needed and what for when a budget (budgets.device_bytes; budgets.pinned_bytes and
// budgets.host_bytes unless 0 = exactly what is needed) is too small.
StatusOr<MemoryPlan> PlanMemory(const SessionOptions& options, const DeviceMemoryRules& device,
                                uint64_t ffn_workspace_bytes);

}  // namespace ecss
