// The CUDA implementation of the expert ops (kernels/expert_ops.h). GEMMs are cuBLAS
// cublasGemmEx calls, one per expert and GEMM, enqueued on the op's stream: the grouped-batched
// entry point (cublasGemmGroupedBatchedEx) requires the output type to equal the input type,
// which would round h, dA and dW to bf16; cublasGemmEx keeps them fp32 (bf16 inputs, fp32
// accumulation and output). Permute, combine, activations, casts and sums of squares are our
// kernels. Nothing synchronises and nothing reads back: row counts come from the host-side
// plan in the problem. `stream` is the backend's native handle (Backend::NativeStream).
// This header never includes CUDA headers. Thread-safe (one cuBLAS handle behind a mutex).
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/expert_ops.h"

namespace ecss {

// True when this build contains the CUDA kernels.
bool CudaKernelsCompiled();

class CudaKernels {
 public:
  // Unimplemented without CUDA in the build; Unavailable without a device.
  static StatusOr<std::unique_ptr<CudaKernels>> Create(int device);
  virtual ~CudaKernels() = default;

  virtual uint64_t FfnForwardWorkspaceBytes(const GroupedFfnProblem& problem) const = 0;
  virtual uint64_t FfnBackwardWorkspaceBytes(const GroupedFfnProblem& problem) const = 0;
  virtual Status FfnForward(void* stream, const GroupedFfnProblem& problem,
                            const FfnForwardArgs& args, const Workspace& workspace) = 0;
  virtual Status FfnBackward(void* stream, const GroupedFfnProblem& problem,
                             const FfnBackwardArgs& args, const Workspace& workspace) = 0;
  virtual Status Permute(void* stream, const TokenPermutation& permutation, const RowsOp& op,
                         const void* src, void* dst) = 0;
  virtual Status Combine(void* stream, const TokenPermutation& permutation, const RowsOp& op,
                         const void* src, void* dst) = 0;
  virtual Status Cast(void* stream, const void* src, DType src_dtype, void* dst, DType dst_dtype,
                      uint64_t count) = 0;
  virtual Status SumOfSquares(void* stream, const SumOfSquaresArgs& args) = 0;
};

}  // namespace ecss
