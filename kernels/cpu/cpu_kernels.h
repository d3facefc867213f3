// The CPU implementation of the expert ops (kernels/expert_ops.h): OpenBLAS sgemm for every
// GEMM, in tiles that a TBB arena runs in parallel over experts and column tiles, with the
// activations fused per tile. This is what the simulated device computes in `real` mode.
//
// Determinism: each output element comes from one single-threaded sgemm call whose shape
// depends only on the problem and the tile size, never on the thread count, so results are
// bit-identical for any `threads` on one machine.
// OpenBLAS's own threading is set to 1 when the first CpuKernels is created (process-wide:
// OpenBLAS has no per-call setting); parallelism comes from the arena instead.
// bf16: Debian's OpenBLAS 0.3.21 exports no sbgemm, so bf16 operands are widened to fp32 in
// workspace (weights per tile, activations once per call) and multiplied with sgemm.
//
// Every method runs synchronously on the calling thread plus the arena, never allocates, and
// returns the errors of expert_ops.h. Thread-safe: concurrent calls share the arena.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/expert_ops.h"

namespace ecss {

struct CpuKernelOptions {
  int threads = 0;  // arena size; 0 = the machine's hardware threads
  // Columns of one GEMM tile (> 0, multiple of 16). OpenBLAS ran 512-wide NN tiles near its
  // full-matrix rate on this machine, 256-wide ones at 60% of it.
  uint32_t tile_columns = 512;
};

class CpuKernels {
 public:
  // InvalidArgument naming a bad option.
  static StatusOr<std::unique_ptr<CpuKernels>> Create(const CpuKernelOptions& options = {});
  ~CpuKernels();
  CpuKernels(const CpuKernels&) = delete;
  CpuKernels& operator=(const CpuKernels&) = delete;

  int threads() const;

  // Workspace bytes (a multiple of kWorkspaceAlignment; 0 when none is needed).
  uint64_t FfnForwardWorkspaceBytes(const GroupedFfnProblem& problem) const;
  uint64_t FfnBackwardWorkspaceBytes(const GroupedFfnProblem& problem) const;

  Status FfnForward(const GroupedFfnProblem& problem, const FfnForwardArgs& args,
                    const Workspace& workspace) const;
  Status FfnBackward(const GroupedFfnProblem& problem, const FfnBackwardArgs& args,
                     const Workspace& workspace) const;
  Status Permute(const TokenPermutation& permutation, const RowsOp& op, const void* src,
                 void* dst) const;
  Status Combine(const TokenPermutation& permutation, const RowsOp& op, const void* src,
                 void* dst) const;
  Status Cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, uint64_t count) const;
  Status SumOfSquares(const SumOfSquaresArgs& args) const;

 private:
  struct Impl;
  explicit CpuKernels(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ecss
