// What ecss-plan plans: a model, the hardware it runs on and the workload of a step, read from
// JSON files or built-in presets. Every size is checked, every field must be known: a bad
// input is InvalidArgument naming its JSON path ("model.routing.domains[3].experts: must be
// > 0"), an unknown preset NotFound listing the known ones. Plain values.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/session_options.h"
#include "runtime/base/device_id.h"
#include "runtime/base/status.h"
#include "runtime/device/device_profile.h"

namespace ecss::plan {

struct ModelConfig {
  std::string name;
  uint32_t sparse_layers = 0;
  uint32_t d_model = 0;
  uint32_t d_ff = 0;
  Activation activation = Activation::kGelu;
  // RRE: the domains and their groups (experts per sparse layer). A learned gate: experts per
  // layer, k per token, and the load-balance assumption "uniform" (each token takes k distinct
  // experts uniformly at random: a perfectly balanced gate in expectation).
  Routing routing = Routing::kRre;
  std::vector<DomainSpec> domains;
  uint32_t gate_experts = 0;
  uint32_t gate_k = 0;
  // Parameters outside the experts (attention, dense layers, embeddings). Simple model: split
  // over a node's devices (tensor parallelism), compute weights and fp32 gradients, with their
  // master weights and moments sharded over every device (ZeRO stage 1); 6 FLOPs per
  // parameter and token (forward 2, backward 4) for the device's share. The engine does not
  // run them.
  uint64_t dense_params = 0;
  uint32_t vocab = 0;
  DType dtype = DType::kBF16;
  DType gradient_dtype = DType::kF32;
  OptimizerKind optimizer = OptimizerKind::kAdamW;

  uint32_t experts_per_layer() const;
  uint64_t expert_params() const;  // one expert's
  uint64_t total_params() const;   // every expert's and the dense ones
};

// The most of NvmeDrive::session_fraction: a reader and a writer at once on a drive, each at
// its full rate, move their bytes in half the time of the two one after the other at most.
inline constexpr double kMostSessionFraction = 2;

struct NvmeDrive {
  double capacity_gib = 0;
  double read_gbps = 0;
  double write_gbps = 0;
  // The share of those rates a session's NVMe state pipeline reaches, reads and writes taken
  // one after the other on the drive (--calibrate measures it; 1: all of them). Above 1 where
  // the pipeline gets more than that: a drive that serves reads and writes at once.
  double session_fraction = 1;
  // And the drive time each update of an expert's NVMe states takes beside its bytes at that
  // fraction of the rates (its states' reads and writes, headers and versions: --calibrate
  // measures it at two expert sizes; 0: none).
  double update_overhead_us = 0;
};

struct HardwareConfig {
  std::string name;
  uint32_t nodes = 1;
  uint32_t devices_per_node = 1;
  DeviceKind device_kind = DeviceKind::kCuda;  // whose allocation rules apply (sim or cuda)
  double device_memory_gib = 0;
  DeviceProfile device;  // TFLOPS, memory bandwidth, launch overhead, H2D / D2H GB/s
  double copy_latency_us = 0;
  // From the end of a device op the host waits for (a stream's synchronisation, in the
  // chained strategies' host-waiting ops) until the host has resumed and issued its next op:
  // the wake-ups between. --calibrate measures the simulated device's; 0: not modelled.
  double host_wait_latency_us = 0;
  double host_memory_gib = 0;      // per node
  double pinned_limit_gib = 0;     // per node; 0 = host_memory_gib
  uint32_t optimizer_threads = 1;  // per node
  // The CPU optimizer's AdamW parameter updates / s, one of the two: one thread's (n threads
  // update n times as fast), or measured per thread count (`--calibrate`): element i is i + 1
  // threads' together, counting a driving thread that helps (Note [The driving thread helps]).
  double optimizer_params_per_s_per_thread = 0;
  std::vector<double> optimizer_params_per_s_by_threads;
  // An optimizer thread's time between two updates of host states that it runs one after the
  // other, beyond their busy time (handing an update over and taking the next; Note [The
  // optimizer's gap between updates], step_simulator.cc), microseconds per update. --calibrate
  // measures it where one thread bounds the steps; 0: not modelled.
  double optimizer_update_gap_us = 0;
  // The driving thread's work when a step begins, before it issues anything, per token and
  // sparse layer of the step (RRE routing each micro-batch's tokens through each layer's
  // tables), per cache line of the step's tables it reads (RoutingTableLines: the first read
  // of each misses the cache where the optimizer streams its states between begins) and per
  // op of the step's plan (building it). --calibrate fits the first two to a session's steps
  // of 2,048 to 131,072 tokens (FitStepBegin) and leaves the third 0; 0: not modelled. (A
  // learned gate routes, and plans, at each layer's forward; not modelled.)
  double routing_ns_per_token_layer = 0;
  double routing_ns_per_table_line = 0;
  double step_begin_ns_per_op = 0;
  // A later micro-batch's gradients added into the step's accumulators on the host (a host
  // stream of their own, one addition at a time), GB/s of gradients added while no optimizer
  // thread updates. --calibrate measures it through a session; 0: not modelled (the additions
  // take no time).
  double gradient_add_gbps = 0;
  // The same while an optimizer thread updates beside them (both stream memory); 0: as
  // gradient_add_gbps.
  double gradient_add_beside_optimizer_gbps = 0;
  // The share of its rate the optimizer keeps while the host adds gradients beside it, in
  // (0, 1]; 1: unaffected. --calibrate measures it with one optimizer thread; the planner
  // applies it to a step's own updates of host states, at any thread count.
  double optimizer_rate_beside_additions = 1;
  std::vector<NvmeDrive> nvme;  // per node
  double network_gbps = 0;      // between nodes, per node and direction; 0 with one node

  uint32_t devices() const { return nodes * devices_per_node; }
  double nvme_capacity_gib() const;  // of a node's drives together
  // Updates / s of `threads` (> 0; fractions for a node's threads shared by its devices):
  // between two measured counts, interpolated; beyond the last, its per-thread rate.
  double OptimizerParamsPerSecond(double threads) const;
};

struct WorkloadConfig {
  uint32_t tokens_per_micro_batch = 0;  // per device
  uint32_t seq_len = 256;               // tokens of a sample; divides tokens_per_micro_batch
  uint32_t micro_batches = 1;
  uint32_t domains_per_step = 1;  // RRE: the domains a device's micro-batches sample from
  Strategy strategy = Strategy::kEcss;
  Tier weights = Tier::kPinned;          // pinned or nvme
  Tier states = Tier::kHost;             // master weights and moments: host or nvme
  double device_budget_gib = 0;          // 0: the device's memory less the dense part
  uint32_t prefetch_window_experts = 0;  // 0: every free cache slot
  // Measured, after kWarmupSteps (planner.h) simulated to warm up. With the optimizer the
  // bottleneck its backlog swings from step to step (a step of 31 ms, then one of 45), so a mean
  // over few steps depends on where the window cuts the swing: configs/deep with ecss-host-tight on
  // this VM's calibration gave 39.7 ms over 6 steps, 38.1 over 20 and 38.0 over 60 (the timed
  // run: 38.0).
  uint32_t steps = 20;
  uint64_t seed = 17;             // sampled routing
  uint32_t checkpoints_kept = 0;  // NVMe sizing: full copies of the states kept
};

// A file's path or a preset's name: a path when it ends in ".json" or names a file.
StatusOr<ModelConfig> LoadModel(std::string_view file_or_preset);
StatusOr<HardwareConfig> LoadHardware(std::string_view file_or_preset);
StatusOr<WorkloadConfig> LoadWorkload(std::string_view file_or_preset);
// The same from JSON text; `root` prefixes every error's path ("model").
StatusOr<ModelConfig> ParseModel(std::string_view json, std::string_view root = "model");
StatusOr<HardwareConfig> ParseHardware(std::string_view json, std::string_view root = "hardware");
StatusOr<WorkloadConfig> ParseWorkload(std::string_view json, std::string_view root = "workload");

// The presets: name and a line on where its figures come from.
struct Preset {
  std::string kind;  // "model", "hardware", "workload"
  std::string name;
  std::string about;
};
std::vector<Preset> Presets();
// The workload without a file: 2,048 tokens a micro-batch of 256-token samples, up to 4
// domains a step, ecss, states in host memory.
WorkloadConfig DefaultWorkloadFor(const ModelConfig& model);

}  // namespace ecss::plan
