// Calibration: this machine's figures measured through the runtime's own code, for a hardware
// file (ecss-plan --calibrate) whose predictions then hold for this machine.
//  - The CPU optimizer: a session's AdamW updates (ecss steps of a small model with states in
//    host memory on the simulated device in timed mode, one optimizer thread), in parameters
//    per second of the optimizer's busy time. Measured inside a session, not alone: on this
//    machine the same updates ran 1.5x faster in isolation than beside the session's threads.
//  - NVMe: sequential 1 MiB O_DIRECT writes and reads of a scratch file through the I/O
//    engine at queue depth 32 (offload/io TransferGbps), GB/s, the median of three passes;
//    the capacity is the directory's file system's.
// The device's figures are the base file's (a device this machine may not have).
#pragma once

#include <cstdint>
#include <string>

#include "runtime/base/status.h"
#include "tools/plan/plan_config.h"

namespace ecss::plan {

struct CalibrationOptions {
  std::string dir = ".";                       // where the NVMe scratch file goes (removed after)
  uint64_t expert_params = uint64_t{1} << 20;  // d_model 512 x d_ff expert_params / 1024
  uint32_t steps = 6;                          // measured, after two
  uint64_t nvme_bytes = uint64_t{512} << 20;
};

// `base` with host.optimizer_params_per_s_per_thread and nvme measured here.
StatusOr<HardwareConfig> Calibrate(HardwareConfig base, const CalibrationOptions& options);
// A hardware file ParseHardware reads back as `hardware`.
std::string HardwareJson(const HardwareConfig& hardware);

}  // namespace ecss::plan
