// What each expert op costs (FLOPs, device bytes, launches) for given shapes and dtypes, as the
// CUDA implementation executes it. ModeledSeconds (runtime/device/device_profile.h) turns a
// cost into time on a device profile; KernelRunner passes that time to the simulated device in
// `timed` mode, and the planner sums the same costs, so both predict with one piece of code.
// Pure functions.
#pragma once

#include <cstdint>

#include "kernels/expert_ops.h"
#include "runtime/device/device_profile.h"

namespace ecss {

// A group without rows costs what the CUDA kernels spend on it: nothing in the forward; in the
// backward, the zeroing of its weight gradients (nothing when accumulating into them).
OpCost FfnForwardCost(const GroupedFfnProblem& problem);
OpCost FfnBackwardCost(const GroupedFfnProblem& problem, bool accumulate = false);
// Permute or Combine of `rows` rows (rows = num_tokens * k).
OpCost RowsOpCost(uint32_t rows, const RowsOp& op);
OpCost CastCost(uint64_t count);
OpCost SumOfSquaresCost(uint64_t total_count, uint32_t num_groups);

// GEMM FLOPs alone (2 per multiply-add), the figure GFLOPS are quoted in.
double FfnForwardGemmFlops(const GroupedFfnProblem& problem);
double FfnBackwardGemmFlops(const GroupedFfnProblem& problem);

}  // namespace ecss
