// Internal to optimizer/: one expert's update split into chunks over the calling TBB arena,
// shared by CpuOptimizer and StateStreamingUpdater so that both produce the same bits.
// Call from inside a task_arena (or any TBB context); blocks until the update is done.
#pragma once

#include <cstddef>

#include "optimizer/update_kernels.h"

namespace ecss::optimizer_internal {

// With `checksums`, each chunk's output arrays are checksummed right after the chunk's update,
// while they are in cache, and the chunks' CRCs joined in order: the arrays are not read again
// to checksum them (for a caller that stores them with their checksums). Chunks of 256 Ki
// elements or more are written with non-temporal stores (update_kernels.h), so their
// checksums read memory: still right, not cheaper.
void ParallelUpdate(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays,
                    size_t chunk_elements, ParamChecksums* checksums = nullptr);
// The CRC-32C of each array of `arrays` (grad aside), in chunks over the calling arena, as
// ParallelUpdate's `checksums`.
ParamChecksums ParallelChecksums(const ParamArrays& arrays, size_t chunk_elements);
// Sum of squares over fixed 64 Ki-element blocks added in order: independent of threads.
double ParallelSumOfSquares(SimdIsa isa, const void* grad, DType dtype, size_t n);

}  // namespace ecss::optimizer_internal
