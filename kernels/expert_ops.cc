#include "kernels/expert_ops.h"

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

Status CheckOperand(const void* ptr, DType dtype, std::string_view name) {
  if (ptr == nullptr) return InvalidArgumentError(StrCat(name, " is null"));
  if (reinterpret_cast<uintptr_t>(ptr) % DTypeSize(dtype) != 0) {
    return FailedPreconditionError(
        StrCat(name, " is not aligned to its element size (", DTypeSize(dtype), " bytes)"));
  }
  return Status::Ok();
}

Status CheckTable(const void* const* table, uint32_t count, DType dtype, std::string_view name) {
  if (table == nullptr) return InvalidArgumentError(StrCat(name, " table is null"));
  for (uint32_t g = 0; g < count; ++g) {
    ECSS_RETURN_IF_ERROR(CheckOperand(table[g], dtype, StrCat(name, "[", g, "]")));
  }
  return Status::Ok();
}

Status CheckMatrixDtype(DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return UnimplementedError(
        StrCat("dtype ", DTypeName(dtype), " is not supported (f32 or bf16)"));
  }
  return Status::Ok();
}

}  // namespace

std::string_view ActivationName(Activation activation) {
  return activation == Activation::kGelu ? "gelu" : "swiglu";
}

StatusOr<Activation> ParseActivation(std::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "swiglu") return Activation::kSwiGlu;
  return InvalidArgumentError(StrCat("unknown activation '", name, "' (gelu or swiglu)"));
}

Status CheckFfnProblem(const GroupedFfnProblem& problem) {
  if (problem.d_model == 0 || problem.d_ff == 0) {
    return InvalidArgumentError(StrCat("grouped FFN: d_model ", problem.d_model, " and d_ff ",
                                       problem.d_ff, " must be > 0"));
  }
  // Every index is computed in 64 bits, but BLAS and CUDA take int dimensions.
  constexpr uint64_t kMaxDim = uint64_t{1} << 30;
  if (problem.d_in() >= kMaxDim || problem.d_model >= kMaxDim || problem.rows >= kMaxDim) {
    return InvalidArgumentError("grouped FFN: a dimension is 2^30 or more");
  }
  ECSS_RETURN_IF_ERROR(CheckMatrixDtype(problem.dtype));
  if (problem.num_groups == 0) {
    return InvalidArgumentError("grouped FFN: num_groups is 0 (at least one active expert)");
  }
  if (problem.group_offsets == nullptr) {
    return InvalidArgumentError("grouped FFN: group_offsets is null");
  }
  if (problem.group_offsets[0] != 0) {
    return InvalidArgumentError(
        StrCat("grouped FFN: group_offsets[0] is ", problem.group_offsets[0], ", must be 0"));
  }
  for (uint32_t g = 0; g < problem.num_groups; ++g) {
    if (problem.group_offsets[g + 1] < problem.group_offsets[g]) {
      return InvalidArgumentError(StrCat("grouped FFN: group_offsets decrease at group ", g, " (",
                                         problem.group_offsets[g], " -> ",
                                         problem.group_offsets[g + 1], ")"));
    }
  }
  if (problem.group_offsets[problem.num_groups] != problem.rows) {
    return InvalidArgumentError(StrCat("grouped FFN: the plan's counts sum to ",
                                       problem.group_offsets[problem.num_groups],
                                       " rows but the input has ", problem.rows));
  }
  return Status::Ok();
}

Status CheckFfnForwardArgs(const GroupedFfnProblem& problem, const FfnForwardArgs& args) {
  ECSS_RETURN_IF_ERROR(CheckFfnProblem(problem));
  const DType dtype = problem.dtype;
  if (problem.rows > 0) {
    ECSS_RETURN_IF_ERROR(CheckOperand(args.x, dtype, "grouped FFN forward: x"));
    ECSS_RETURN_IF_ERROR(CheckOperand(args.y, dtype, "grouped FFN forward: y"));
    if (problem.saved == SavedActivation::kKeep) {
      ECSS_RETURN_IF_ERROR(CheckOperand(args.saved, DType::kF32, "grouped FFN forward: saved"));
    }
  }
  ECSS_RETURN_IF_ERROR(CheckTable(args.w_in, problem.num_groups, dtype, "grouped FFN: w_in"));
  return CheckTable(args.w_out, problem.num_groups, dtype, "grouped FFN: w_out");
}

Status CheckFfnBackwardArgs(const GroupedFfnProblem& problem, const FfnBackwardArgs& args) {
  ECSS_RETURN_IF_ERROR(CheckFfnProblem(problem));
  const DType dtype = problem.dtype;
  if (problem.rows > 0) {
    ECSS_RETURN_IF_ERROR(CheckOperand(args.x, dtype, "grouped FFN backward: x"));
    ECSS_RETURN_IF_ERROR(CheckOperand(args.dy, dtype, "grouped FFN backward: dy"));
    ECSS_RETURN_IF_ERROR(CheckOperand(args.dx, dtype, "grouped FFN backward: dx"));
    if (problem.saved == SavedActivation::kKeep) {
      ECSS_RETURN_IF_ERROR(
          CheckOperand(args.saved, DType::kF32, "grouped FFN backward: saved (kKeep)"));
    }
  }
  ECSS_RETURN_IF_ERROR(CheckTable(args.w_in, problem.num_groups, dtype, "grouped FFN: w_in"));
  ECSS_RETURN_IF_ERROR(CheckTable(args.w_out, problem.num_groups, dtype, "grouped FFN: w_out"));
  ECSS_RETURN_IF_ERROR(CheckTable(reinterpret_cast<const void* const*>(args.dw_in),
                                  problem.num_groups, DType::kF32, "grouped FFN: dw_in"));
  return CheckTable(reinterpret_cast<const void* const*>(args.dw_out), problem.num_groups,
                    DType::kF32, "grouped FFN: dw_out");
}

Status CheckRowsOp(const TokenPermutation& permutation, const RowsOp& op, const void* src,
                   const void* dst) {
  if (op.width == 0) return InvalidArgumentError("rows op: width is 0");
  if (permutation.k == 0) return InvalidArgumentError("rows op: the plan's k is 0");
  ECSS_RETURN_IF_ERROR(CheckMatrixDtype(op.dtype));
  if (permutation.rows() == 0) return Status::Ok();
  if (permutation.row_to_slot == nullptr || permutation.slot_to_row == nullptr) {
    return InvalidArgumentError("rows op: the plan's permutation arrays are null");
  }
  if (op.use_weights && permutation.row_weights == nullptr) {
    return InvalidArgumentError("rows op: weights requested but the plan has none");
  }
  ECSS_RETURN_IF_ERROR(CheckOperand(src, op.dtype, "rows op: src"));
  return CheckOperand(dst, op.dtype, "rows op: dst");
}

Status CheckCast(const void* src, DType src_dtype, const void* dst, DType dst_dtype) {
  const bool supported = (src_dtype == DType::kF32 && dst_dtype == DType::kBF16) ||
                         (src_dtype == DType::kBF16 && dst_dtype == DType::kF32);
  if (!supported) {
    return UnimplementedError(StrCat("cast ", DTypeName(src_dtype), " -> ", DTypeName(dst_dtype),
                                     " is not supported (f32 <-> bf16)"));
  }
  ECSS_RETURN_IF_ERROR(CheckOperand(src, src_dtype, "cast: src"));
  return CheckOperand(dst, dst_dtype, "cast: dst");
}

Status CheckSumOfSquares(const SumOfSquaresArgs& args) {
  if (args.num_groups == 0) return InvalidArgumentError("sum of squares: num_groups is 0");
  if (args.grads == nullptr || args.counts == nullptr) {
    return InvalidArgumentError("sum of squares: grads or counts table is null");
  }
  for (uint32_t g = 0; g < args.num_groups; ++g) {
    if (args.counts[g] > 0) {
      ECSS_RETURN_IF_ERROR(
          CheckOperand(args.grads[g], DType::kF32, StrCat("sum of squares: grads[", g, "]")));
    }
  }
  if (args.out == nullptr) return InvalidArgumentError("sum of squares: out is null");
  if (reinterpret_cast<uintptr_t>(args.out) % alignof(double) != 0) {
    return FailedPreconditionError("sum of squares: out is not 8-byte aligned");
  }
  return Status::Ok();
}

Status CheckWorkspace(const Workspace& workspace, uint64_t needed, std::string_view op) {
  if (needed == 0) return Status::Ok();
  if (workspace.data == nullptr || workspace.bytes < needed) {
    return ResourceExhaustedError(
        StrCat(op, ": workspace is ", workspace.bytes, " bytes, the op needs ", needed));
  }
  if (reinterpret_cast<uintptr_t>(workspace.data) % kWorkspaceAlignment != 0) {
    return FailedPreconditionError(
        StrCat(op, ": workspace is not aligned to ", kWorkspaceAlignment, " bytes"));
  }
  return Status::Ok();
}

}  // namespace ecss
