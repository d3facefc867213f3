// DeviceProfile: the few numbers that decide how long device work takes on a GPU we may not
// have: peak arithmetic per dtype, memory bandwidth, launch overhead and host link bandwidth.
// ModeledSeconds turns an operation's cost (FLOPs, bytes, launches) into device time with a
// roofline. It is the one piece of code that the simulated device's `timed` mode (through
// kernels/cost_model.h), ecss-bench and the planner use to predict device time.
// Plain values; thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/dtype.h"
#include "runtime/base/status.h"

namespace ecss {

struct DeviceProfile {
  std::string name;                  // "h100-sxm"
  double peak_tflops_f32 = 0;        // dense fp32 (CUDA cores, no TF32), 10^12 FLOP/s, > 0
  double peak_tflops_bf16 = 0;       // dense bf16 tensor cores with fp32 accumulation, > 0
  double memory_bandwidth_gbps = 0;  // device memory, 10^9 bytes/s, > 0
  double launch_overhead_us = 0;     // per kernel launch, microseconds, >= 0
  double h2d_bandwidth_gbps = 0;     // host link, pinned memory, 10^9 bytes/s, > 0
  double d2h_bandwidth_gbps = 0;
  // The fraction of peak that large GEMMs reach in practice (0, 1]; FLOPs are divided by
  // peak * efficiency.
  double gemm_efficiency = 0.7;
};

// Built-in profiles from vendor datasheets (dense, no sparsity): "h100-sxm", "h200-sxm",
// "a100-sxm", "l40s". NotFound lists the known names.
StatusOr<DeviceProfile> FindDeviceProfile(std::string_view name);
std::vector<std::string> DeviceProfileNames();
// InvalidArgument naming the first field that is not positive (or negative, for overhead).
Status ValidateDeviceProfile(const DeviceProfile& profile);

// What one operation costs, independent of the device.
struct OpCost {
  double flops = 0;                   // multiply-adds count 2
  double bytes = 0;                   // device memory read + written
  uint32_t launches = 0;              // kernel launches
  DType compute_dtype = DType::kF32;  // selects the peak: bf16 GEMMs use tensor cores

  OpCost& operator+=(const OpCost& other);
};

// launches * overhead + max(flops / (peak * efficiency), bytes / bandwidth), in seconds.
double ModeledSeconds(const OpCost& cost, const DeviceProfile& profile);

}  // namespace ecss
