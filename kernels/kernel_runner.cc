#include "kernels/kernel_runner.h"

#include <utility>
#include <vector>

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

// Owned copies of the host arrays a call was given, so that the op can run after the caller's
// arrays are gone (host-kernel backends run the op later, on the stream's worker).
struct FfnHostArrays {
  std::vector<uint32_t> offsets;
  std::vector<const void*> w_in, w_out;
  std::vector<float*> dw_in, dw_out;

  FfnHostArrays(GroupedFfnProblem& p, const void* const* in, const void* const* out)
      : offsets(p.group_offsets, p.group_offsets + p.num_groups + 1),
        w_in(in, in + p.num_groups),
        w_out(out, out + p.num_groups) {
    p.group_offsets = offsets.data();
  }
};

}  // namespace

StatusOr<std::unique_ptr<KernelRunner>> KernelRunner::Create(Backend& backend,
                                                             const KernelRunnerOptions& options) {
  DeviceProfile profile = options.profile;
  if (profile.name.empty()) {
    ECSS_ASSIGN_OR_RETURN(profile, FindDeviceProfile("h100-sxm"));
  }
  ECSS_RETURN_IF_ERROR(ValidateDeviceProfile(profile));
  std::unique_ptr<CpuKernels> cpu;
  std::unique_ptr<CudaKernels> cuda;
  const Device device = backend.device();
  if (backend.capabilities().host_kernels) {
    ECSS_ASSIGN_OR_RETURN(cpu, CpuKernels::Create(options.cpu));
  } else if (device.kind == DeviceKind::kCuda) {
    ECSS_ASSIGN_OR_RETURN(cuda, CudaKernels::Create(device.index));
  } else {
    return UnimplementedError(StrCat("no expert kernels for device ", device.ToString()));
  }
  return std::unique_ptr<KernelRunner>(
      new KernelRunner(backend, std::move(profile), std::move(cpu), std::move(cuda)));
}

KernelRunner::KernelRunner(Backend& backend, DeviceProfile profile, std::unique_ptr<CpuKernels> cpu,
                           std::unique_ptr<CudaKernels> cuda)
    : backend_(backend),
      profile_(std::move(profile)),
      cpu_(std::move(cpu)),
      cuda_(std::move(cuda)) {}

KernelRunner::~KernelRunner() = default;

double KernelRunner::modeled_seconds() const {
  return static_cast<double>(modeled_nanoseconds_.load()) * 1e-9;
}

uint64_t KernelRunner::FfnForwardWorkspaceBytes(const GroupedFfnProblem& problem) const {
  return cpu_ ? cpu_->FfnForwardWorkspaceBytes(problem) : cuda_->FfnForwardWorkspaceBytes(problem);
}

uint64_t KernelRunner::FfnBackwardWorkspaceBytes(const GroupedFfnProblem& problem) const {
  return cpu_ ? cpu_->FfnBackwardWorkspaceBytes(problem)
              : cuda_->FfnBackwardWorkspaceBytes(problem);
}

Status KernelRunner::CheckDevice(const void* ptr, uint64_t bytes, std::string_view what) const {
  if (bytes == 0) return Status::Ok();
  return backend_.device_memory().CheckRange(ptr, bytes, what);
}

Status KernelRunner::CheckFfnOperands(const GroupedFfnProblem& p, const void* x, const void* out,
                                      const void* saved, const void* const* w_in,
                                      const void* const* w_out, const Workspace& workspace,
                                      uint64_t workspace_needed) const {
  const uint64_t e = DTypeSize(p.dtype);
  const uint64_t act_bytes = uint64_t{p.rows} * p.d_model * e;
  ECSS_RETURN_IF_ERROR(CheckDevice(x, act_bytes, "grouped FFN input"));
  ECSS_RETURN_IF_ERROR(CheckDevice(out, act_bytes, "grouped FFN output"));
  if (p.saved == SavedActivation::kKeep) {
    ECSS_RETURN_IF_ERROR(
        CheckDevice(saved, uint64_t{p.rows} * p.d_in() * 4, "grouped FFN saved activation"));
  }
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    ECSS_RETURN_IF_ERROR(CheckDevice(w_in[g], uint64_t{p.d_model} * p.d_in() * e,
                                     StrCat("grouped FFN w_in[", g, "]")));
    ECSS_RETURN_IF_ERROR(CheckDevice(w_out[g], uint64_t{p.d_ff} * p.d_model * e,
                                     StrCat("grouped FFN w_out[", g, "]")));
  }
  ECSS_RETURN_IF_ERROR(CheckWorkspace(workspace, workspace_needed, "grouped FFN"));
  return CheckDevice(workspace.data, workspace_needed, "grouped FFN workspace");
}

Status KernelRunner::Enqueue(Stream stream, std::string name, const OpCost& cost,
                             std::function<Status()> compute) {
  const double seconds = ModeledSeconds(cost, profile_);
  modeled_nanoseconds_.fetch_add(static_cast<uint64_t>(seconds * 1e9));
  return backend_.LaunchKernel(stream, KernelTask{std::move(name), std::move(compute), seconds});
}

Status KernelRunner::FfnForward(Stream stream, const GroupedFfnProblem& problem,
                                const FfnForwardArgs& args, const Workspace& workspace) {
  ECSS_RETURN_IF_ERROR(CheckFfnForwardArgs(problem, args));
  ECSS_RETURN_IF_ERROR(CheckFfnOperands(problem, args.x, args.y, args.saved, args.w_in, args.w_out,
                                        workspace, FfnForwardWorkspaceBytes(problem)));
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->FfnForward(native, problem, args, workspace);
  }
  GroupedFfnProblem p = problem;
  auto arrays = std::make_shared<FfnHostArrays>(p, args.w_in, args.w_out);
  FfnForwardArgs a = args;
  a.w_in = arrays->w_in.data();
  a.w_out = arrays->w_out.data();
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "grouped_ffn_forward", FfnForwardCost(p),
                 [cpu, p, a, workspace, arrays] { return cpu->FfnForward(p, a, workspace); });
}

Status KernelRunner::FfnBackward(Stream stream, const GroupedFfnProblem& problem,
                                 const FfnBackwardArgs& args, const Workspace& workspace) {
  ECSS_RETURN_IF_ERROR(CheckFfnBackwardArgs(problem, args));
  ECSS_RETURN_IF_ERROR(CheckFfnOperands(problem, args.x, args.dx, args.saved, args.w_in, args.w_out,
                                        workspace, FfnBackwardWorkspaceBytes(problem)));
  ECSS_RETURN_IF_ERROR(
      CheckDevice(args.dy, uint64_t{problem.rows} * problem.d_model * DTypeSize(problem.dtype),
                  "grouped FFN output gradient"));
  for (uint32_t g = 0; g < problem.num_groups; ++g) {
    ECSS_RETURN_IF_ERROR(CheckDevice(args.dw_in[g], uint64_t{problem.d_model} * problem.d_in() * 4,
                                     StrCat("grouped FFN dw_in[", g, "]")));
    ECSS_RETURN_IF_ERROR(CheckDevice(args.dw_out[g], uint64_t{problem.d_ff} * problem.d_model * 4,
                                     StrCat("grouped FFN dw_out[", g, "]")));
  }
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->FfnBackward(native, problem, args, workspace);
  }
  GroupedFfnProblem p = problem;
  auto arrays = std::make_shared<FfnHostArrays>(p, args.w_in, args.w_out);
  arrays->dw_in.assign(args.dw_in, args.dw_in + p.num_groups);
  arrays->dw_out.assign(args.dw_out, args.dw_out + p.num_groups);
  FfnBackwardArgs a = args;
  a.w_in = arrays->w_in.data();
  a.w_out = arrays->w_out.data();
  a.dw_in = arrays->dw_in.data();
  a.dw_out = arrays->dw_out.data();
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "grouped_ffn_backward", FfnBackwardCost(p, a.accumulate),
                 [cpu, p, a, workspace, arrays] { return cpu->FfnBackward(p, a, workspace); });
}

namespace {

Status CheckPermutationOnDevice(const Allocator& memory, const TokenPermutation& perm,
                                const RowsOp& op) {
  const uint64_t rows = perm.rows();
  if (rows == 0) return Status::Ok();
  ECSS_RETURN_IF_ERROR(memory.CheckRange(perm.row_to_slot, rows * 4, "plan row_to_slot"));
  ECSS_RETURN_IF_ERROR(memory.CheckRange(perm.slot_to_row, rows * 4, "plan slot_to_row"));
  if (op.use_weights) {
    ECSS_RETURN_IF_ERROR(memory.CheckRange(perm.row_weights, rows * 4, "plan row_weights"));
  }
  return Status::Ok();
}

}  // namespace

Status KernelRunner::Permute(Stream stream, const TokenPermutation& perm, const RowsOp& op,
                             const void* src, void* dst) {
  ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
  ECSS_RETURN_IF_ERROR(CheckPermutationOnDevice(backend_.device_memory(), perm, op));
  const uint64_t row_bytes = uint64_t{op.width} * DTypeSize(op.dtype);
  ECSS_RETURN_IF_ERROR(CheckDevice(src, perm.num_tokens * row_bytes, "permute source"));
  ECSS_RETURN_IF_ERROR(CheckDevice(dst, perm.rows() * row_bytes, "permute destination"));
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->Permute(native, perm, op, src, dst);
  }
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "permute", RowsOpCost(perm.rows(), op),
                 [cpu, perm, op, src, dst] { return cpu->Permute(perm, op, src, dst); });
}

Status KernelRunner::Combine(Stream stream, const TokenPermutation& perm, const RowsOp& op,
                             const void* src, void* dst) {
  ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
  ECSS_RETURN_IF_ERROR(CheckPermutationOnDevice(backend_.device_memory(), perm, op));
  const uint64_t row_bytes = uint64_t{op.width} * DTypeSize(op.dtype);
  ECSS_RETURN_IF_ERROR(CheckDevice(src, perm.rows() * row_bytes, "combine source"));
  ECSS_RETURN_IF_ERROR(CheckDevice(dst, perm.num_tokens * row_bytes, "combine destination"));
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->Combine(native, perm, op, src, dst);
  }
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "combine", RowsOpCost(perm.rows(), op),
                 [cpu, perm, op, src, dst] { return cpu->Combine(perm, op, src, dst); });
}

Status KernelRunner::Cast(Stream stream, const void* src, DType src_dtype, void* dst,
                          DType dst_dtype, uint64_t count) {
  if (count == 0) return Status::Ok();
  ECSS_RETURN_IF_ERROR(CheckCast(src, src_dtype, dst, dst_dtype));
  ECSS_RETURN_IF_ERROR(CheckDevice(src, count * DTypeSize(src_dtype), "cast source"));
  ECSS_RETURN_IF_ERROR(CheckDevice(dst, count * DTypeSize(dst_dtype), "cast destination"));
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->Cast(native, src, src_dtype, dst, dst_dtype, count);
  }
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "cast", CastCost(count), [cpu, src, src_dtype, dst, dst_dtype, count] {
    return cpu->Cast(src, src_dtype, dst, dst_dtype, count);
  });
}

Status KernelRunner::SumOfSquares(Stream stream, const SumOfSquaresArgs& args) {
  ECSS_RETURN_IF_ERROR(CheckSumOfSquares(args));
  uint64_t total = 0;
  for (uint32_t g = 0; g < args.num_groups; ++g) {
    ECSS_RETURN_IF_ERROR(
        CheckDevice(args.grads[g], args.counts[g] * 4, StrCat("sum of squares grads[", g, "]")));
    total += args.counts[g];
  }
  ECSS_RETURN_IF_ERROR(CheckDevice(args.out, uint64_t{args.num_groups} * 8, "sum of squares out"));
  if (cuda_) {
    ECSS_ASSIGN_OR_RETURN(void* native, backend_.NativeStream(stream));
    return cuda_->SumOfSquares(native, args);
  }
  auto grads =
      std::make_shared<std::vector<const float*>>(args.grads, args.grads + args.num_groups);
  auto counts = std::make_shared<std::vector<uint64_t>>(args.counts, args.counts + args.num_groups);
  SumOfSquaresArgs a = args;
  a.grads = grads->data();
  a.counts = counts->data();
  const CpuKernels* cpu = cpu_.get();
  return Enqueue(stream, "sum_of_squares", SumOfSquaresCost(total, args.num_groups),
                 [cpu, a, grads, counts] { return cpu->SumOfSquares(a); });
}

}  // namespace ecss
