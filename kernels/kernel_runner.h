// KernelRunner: runs the expert ops on a Backend's stream, whichever backend it is.
//  - Backends that run host kernels (sim): each op becomes one KernelTask whose `compute` is
//    the CPU implementation (kernels/cpu) and whose modelled time is the cost model's
//    (kernels/cost_model.h) on the runner's device profile; the sim uses one or the other
//    according to its kernel mode.
//  - CUDA: the op goes to kernels/cuda on the stream's native handle.
// Every call checks its arguments (expert_ops.h's errors) and that every operand lies inside
// a live allocation of the backend's device memory (OutOfRange naming the operand) before
// anything is enqueued; then it returns without waiting. Host arrays of a problem or args are
// copied at enqueue time. Data passed to a call must stay alive until the stream has passed
// the op. Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "kernels/cost_model.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/expert_ops.h"
#include "runtime/device/backend.h"
#include "runtime/device/device_profile.h"

namespace ecss {

struct KernelRunnerOptions {
  // The device whose time the sim's timed mode models; empty name = "h100-sxm".
  DeviceProfile profile;
  CpuKernelOptions cpu;  // the sim's real-mode computation
};

class KernelRunner {
 public:
  // `backend` must outlive the runner. The kernels follow the backend's device: host kernels
  // where it runs them (the sim), cuBLAS and ours on a CUDA device (its index). InvalidArgument
  // for a bad profile or CPU option; Unimplemented for a device with no kernels here.
  static StatusOr<std::unique_ptr<KernelRunner>> Create(Backend& backend,
                                                        const KernelRunnerOptions& options = {});
  ~KernelRunner();

  const DeviceProfile& profile() const { return profile_; }
  // Sum of the modelled device seconds of every op enqueued so far.
  double modeled_seconds() const;

  uint64_t FfnForwardWorkspaceBytes(const GroupedFfnProblem& problem) const;
  uint64_t FfnBackwardWorkspaceBytes(const GroupedFfnProblem& problem) const;

  Status FfnForward(Stream stream, const GroupedFfnProblem& problem, const FfnForwardArgs& args,
                    const Workspace& workspace);
  Status FfnBackward(Stream stream, const GroupedFfnProblem& problem, const FfnBackwardArgs& args,
                     const Workspace& workspace);
  Status Permute(Stream stream, const TokenPermutation& permutation, const RowsOp& op,
                 const void* src, void* dst);
  Status Combine(Stream stream, const TokenPermutation& permutation, const RowsOp& op,
                 const void* src, void* dst);
  Status Cast(Stream stream, const void* src, DType src_dtype, void* dst, DType dst_dtype,
              uint64_t count);
  Status SumOfSquares(Stream stream, const SumOfSquaresArgs& args);

 private:
  KernelRunner(Backend& backend, DeviceProfile profile, std::unique_ptr<CpuKernels> cpu,
               std::unique_ptr<CudaKernels> cuda);
  Status CheckDevice(const void* ptr, uint64_t bytes, std::string_view what) const;
  Status CheckFfnOperands(const GroupedFfnProblem& p, const void* x, const void* out,
                          const void* saved, const void* const* w_in, const void* const* w_out,
                          const Workspace& workspace, uint64_t workspace_needed) const;
  Status Enqueue(Stream stream, std::string name, const OpCost& cost,
                 std::function<Status()> compute);

  Backend& backend_;
  const DeviceProfile profile_;
  std::unique_ptr<CpuKernels> cpu_;    // host-kernel backends
  std::unique_ptr<CudaKernels> cuda_;  // CUDA backends
  std::atomic<uint64_t> modeled_nanoseconds_{0};
};

}  // namespace ecss
