#include "runtime/device/device_profile.h"

#include <algorithm>
#include <cmath>

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

// Fields: name, fp32 TFLOPS, bf16 TFLOPS, memory GB/s, launch us, h2d GB/s, d2h GB/s, GEMM
// efficiency. Arithmetic and memory are the vendor datasheets' dense figures (no sparsity).
// h2d/d2h: what a pinned cudaMemcpyAsync reaches on the host link (PCIe 5 x16 ~ 55 GB/s,
// PCIe 4 x16 ~ 25 GB/s), not the link's raw rate. Launch overhead and GEMM efficiency are not
// datasheet figures: a typical launch of a small kernel, and the fraction of peak large cuBLAS
// GEMMs reach.
const DeviceProfile kProfiles[] = {
    // NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: FP32 67, BF16 989 (1,979 sparse),
    // HBM3 3.35 TB/s; host link PCIe 5.0 x16.
    {"h100-sxm", 67, 989, 3350, 4, 55, 55, 0.7},
    // NVIDIA H200 Tensor Core GPU datasheet, SXM column: FP32 67, BF16 989 (1,979 sparse),
    // HBM3e 4.8 TB/s; host link PCIe 5.0 x16.
    {"h200-sxm", 67, 989, 4800, 4, 55, 55, 0.7},
    // NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: FP32 19.5, BF16 312 (624
    // sparse), HBM2e 2,039 GB/s; host link PCIe 4.0 x16.
    {"a100-sxm", 19.5, 312, 2039, 5, 25, 25, 0.7},
    // NVIDIA L40S datasheet: FP32 91.6, BF16 362 (733 sparse), GDDR6 864 GB/s; PCIe 4.0 x16.
    {"l40s", 91.6, 362, 864, 5, 25, 25, 0.7},
};

bool Positive(double value) { return value > 0 && std::isfinite(value); }

}  // namespace

StatusOr<DeviceProfile> FindDeviceProfile(std::string_view name) {
  for (const DeviceProfile& profile : kProfiles) {
    if (profile.name == name) return profile;
  }
  std::string known;
  for (const std::string& each : DeviceProfileNames()) known = StrCat(known, " ", each);
  return NotFoundError(StrCat("unknown device profile '", name, "'; known:", known));
}

std::vector<std::string> DeviceProfileNames() {
  std::vector<std::string> names;
  for (const DeviceProfile& profile : kProfiles) names.push_back(profile.name);
  return names;
}

Status ValidateDeviceProfile(const DeviceProfile& profile) {
  const struct {
    const char* field;
    double value;
  } positive[] = {{"peak_tflops_f32", profile.peak_tflops_f32},
                  {"peak_tflops_bf16", profile.peak_tflops_bf16},
                  {"memory_bandwidth_gbps", profile.memory_bandwidth_gbps},
                  {"h2d_bandwidth_gbps", profile.h2d_bandwidth_gbps},
                  {"d2h_bandwidth_gbps", profile.d2h_bandwidth_gbps}};
  for (const auto& each : positive) {
    if (!Positive(each.value)) {
      return InvalidArgumentError(StrCat("device profile '", profile.name, "': ", each.field,
                                         " is ", each.value, ", must be > 0"));
    }
  }
  if (!(profile.launch_overhead_us >= 0) || !std::isfinite(profile.launch_overhead_us)) {
    return InvalidArgumentError(
        StrCat("device profile '", profile.name, "': launch_overhead_us must be >= 0"));
  }
  if (!Positive(profile.gemm_efficiency) || profile.gemm_efficiency > 1) {
    return InvalidArgumentError(
        StrCat("device profile '", profile.name, "': gemm_efficiency must be in (0, 1]"));
  }
  return Status::Ok();
}

OpCost& OpCost::operator+=(const OpCost& other) {
  flops += other.flops;
  bytes += other.bytes;
  launches += other.launches;
  if (other.compute_dtype != DType::kF32) compute_dtype = other.compute_dtype;
  return *this;
}

double ModeledSeconds(const OpCost& cost, const DeviceProfile& profile) {
  const double peak_tflops =
      cost.compute_dtype == DType::kF32 ? profile.peak_tflops_f32 : profile.peak_tflops_bf16;
  const double compute_s = cost.flops / (peak_tflops * 1e12 * profile.gemm_efficiency);
  const double memory_s = cost.bytes / (profile.memory_bandwidth_gbps * 1e9);
  return cost.launches * profile.launch_overhead_us * 1e-6 + std::max(compute_s, memory_s);
}

}  // namespace ecss
