#include "tools/plan/calibrate.h"

#include <linux/magic.h>
#include <sys/statfs.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <memory>
#include <vector>

#include "offload/io/io_engine.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tools/plan/planner.h"

namespace ecss::plan {
namespace {

// The CPU optimizer as a session drives it: ecss steps of a model of `expert_params`-parameter
// experts (AdamW, states in host memory) on the simulated device in timed mode, updated
// parameters over the optimizer's busy thread-seconds in the steps after the first two.
StatusOr<double> OptimizerParamsPerSecond(const CalibrationOptions& o) {
  ModelConfig model;
  model.name = "calibration";
  model.sparse_layers = 4;
  model.d_model = 512;
  model.d_ff = static_cast<uint32_t>(o.expert_params / (2 * 512));
  model.vocab = 50257;
  for (uint32_t d = 0; d < 8; ++d) model.domains.push_back({StrCat("domain", d), 2});
  HardwareConfig hardware;
  hardware.device_kind = DeviceKind::kSim;
  hardware.device_memory_gib = 1;
  ECSS_ASSIGN_OR_RETURN(hardware.device, FindDeviceProfile("h100-sxm"));
  hardware.host_memory_gib = 8;
  hardware.pinned_limit_gib = 8;
  hardware.optimizer_threads = 1;
  hardware.optimizer_params_per_s_per_thread = 1;
  WorkloadConfig workload;
  workload.tokens_per_micro_batch = 2048;
  workload.domains_per_step = 4;
  workload.device_budget_gib = 0.25;
  ECSS_ASSIGN_OR_RETURN(const DeviceShard shard, ShardFor(model, hardware, workload));
  ECSS_ASSIGN_OR_RETURN(const SessionOptions options,
                        SessionOptionsFor(shard, model, hardware, workload, Strategy::kEcss));
  SimOptions sim;
  sim.device_memory_bytes = options.budgets.device_bytes + (uint64_t{16} << 20);
  sim.kernel_mode = KernelMode::kTimed;
  sim.h2d_bandwidth_gbps = hardware.device.h2d_bandwidth_gbps;
  sim.d2h_bandwidth_gbps = hardware.device.d2h_bandwidth_gbps;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> backend, SimBackend::Create(sim));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Create(*backend, options));
  StepSampler sampler(options, shard.domains_per_step, workload.seq_len, workload.seed);
  ECSS_ASSIGN_OR_RETURN(const std::vector<StepStats> stats,
                        RunSampledSteps(*session, *backend, options, sampler, o.steps + 2));
  double params = 0, busy = 0;
  for (size_t s = 2; s < stats.size(); ++s) {
    params += static_cast<double>(stats[s].updated_params);
    busy += stats[s].optimizer_busy_seconds;
  }
  if (!(busy > 0)) return InternalError("calibration: the optimizer did not run");
  return params / busy;
}

struct NvmeRates {
  double read_gbps = 0, write_gbps = 0, capacity_gib = 0;
};

StatusOr<NvmeRates> MeasureNvme(const CalibrationOptions& o) {
  struct statfs fs {};
  if (statfs(o.dir.c_str(), &fs) != 0) {
    return NotFoundError(
        StrCat("calibrating NVMe: --dir '", o.dir, "' cannot be used (errno ", errno, ")"));
  }
  if (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC) {
    return InvalidArgumentError(
        StrCat("calibrating NVMe: --dir '", o.dir, "' is in memory (tmpfs), not on a drive"));
  }
  IoEngineOptions io;
  io.queue_depth = 32;
  ECSS_ASSIGN_OR_RETURN(
      const SequentialRates measured,
      MeasureSequentialRates((std::filesystem::path(o.dir) / "ecss-plan-calibration.dat").string(),
                             io, size_t{1} << 20, o.nvme_bytes, 3));
  NvmeRates rates;
  rates.read_gbps = measured.read_gbps;
  rates.write_gbps = measured.write_gbps;
  rates.capacity_gib = static_cast<double>(fs.f_blocks) * fs.f_bsize / (1024.0 * 1024 * 1024);
  return rates;
}

}  // namespace

StatusOr<HardwareConfig> Calibrate(HardwareConfig base, const CalibrationOptions& options) {
  ECSS_ASSIGN_OR_RETURN(base.optimizer_params_per_s_per_thread, OptimizerParamsPerSecond(options));
  ECSS_ASSIGN_OR_RETURN(const NvmeRates nvme, MeasureNvme(options));
  // One drive measured: the base's drives (or this machine's one) get its speed.
  const size_t drives = std::max<size_t>(1, base.nvme.size());
  const double capacity = base.nvme.empty() ? nvme.capacity_gib : base.nvme[0].capacity_gib;
  base.nvme.assign(drives, {capacity, nvme.read_gbps, nvme.write_gbps});
  base.name += " (calibrated)";
  return base;
}

std::string HardwareJson(const HardwareConfig& h) {
  JsonWriter json;
  const DeviceProfile& d = h.device;
  json.BeginObject()
      .Field("name", h.name)
      .Field("nodes", uint64_t{h.nodes})
      .Field("devices_per_node", uint64_t{h.devices_per_node})
      .Key("device")
      .BeginObject()
      .Field("kind", h.device_kind == DeviceKind::kSim ? "sim" : "cuda")
      .Field("memory_gib", h.device_memory_gib)
      .Field("tflops_bf16", d.peak_tflops_bf16)
      .Field("tflops_f32", d.peak_tflops_f32)
      .Field("memory_bandwidth_gbps", d.memory_bandwidth_gbps)
      .Field("launch_overhead_us", d.launch_overhead_us)
      .Field("gemm_efficiency", d.gemm_efficiency)
      .Field("h2d_gbps", d.h2d_bandwidth_gbps)
      .Field("d2h_gbps", d.d2h_bandwidth_gbps)
      .Field("copy_latency_us", h.copy_latency_us)
      .EndObject()
      .Key("host")
      .BeginObject()
      .Field("memory_gib", h.host_memory_gib)
      .Field("pinned_limit_gib", h.pinned_limit_gib)
      .Field("optimizer_threads", uint64_t{h.optimizer_threads})
      .Field("optimizer_params_per_s_per_thread", h.optimizer_params_per_s_per_thread)
      .EndObject();
  if (!h.nvme.empty()) {  // alike drives, as the file describes them
    json.Key("nvme")
        .BeginObject()
        .Field("drives", static_cast<uint64_t>(h.nvme.size()))
        .Field("capacity_gib", h.nvme[0].capacity_gib)
        .Field("read_gbps", h.nvme[0].read_gbps)
        .Field("write_gbps", h.nvme[0].write_gbps)
        .EndObject();
  }
  json.Field("network_gbps", h.network_gbps).EndObject();
  return json.str() + "\n";
}

}  // namespace ecss::plan
