// Internal to optimizer/: one expert's update split into chunks over the calling TBB arena,
// shared by CpuOptimizer and StateStreamingUpdater so that both produce the same bits.
// Call from inside a task_arena (or any TBB context); blocks until the update is done.
#pragma once

#include <cstddef>

#include "optimizer/update_kernels.h"

namespace ecss::optimizer_internal {

void ParallelUpdate(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays,
                    size_t chunk_elements);
// Sum of squares over fixed 64 Ki-element blocks added in order: independent of threads.
double ParallelSumOfSquares(SimdIsa isa, const void* grad, DType dtype, size_t n);

}  // namespace ecss::optimizer_internal
