#include "optimizer/parallel_update.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <vector>

namespace ecss::optimizer_internal {

namespace {
constexpr size_t kNormBlock = 64 * 1024;
}  // namespace

// Isolated: a thread waiting for its chunks takes no other task of the arena meanwhile (a
// queued update: its own would then finish only after that one).
void ParallelUpdate(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays,
                    size_t chunk_elements) {
  tbb::this_task_arena::isolate([&] {
    tbb::parallel_for(
        tbb::blocked_range<size_t>(0, arrays.size, chunk_elements),
        [&](const tbb::blocked_range<size_t>& range) {
          UpdateRange(isa, scalars, arrays, range.begin(), range.end());
        },
        tbb::simple_partitioner());
  });
}

double ParallelSumOfSquares(SimdIsa isa, const void* grad, DType dtype, size_t n) {
  const size_t blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(blocks);
  tbb::this_task_arena::isolate([&] {  // as ParallelUpdate
    tbb::parallel_for(size_t{0}, blocks, [&](size_t b) {
      partial[b] =
          GradSumOfSquares(isa, grad, dtype, b * kNormBlock, std::min(n, (b + 1) * kNormBlock));
    });
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace ecss::optimizer_internal
