#include "optimizer/parallel_update.h"

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <vector>

#include "runtime/base/checksum.h"

namespace ecss::optimizer_internal {

namespace {
constexpr size_t kNormBlock = 64 * 1024;

// The CRCs of elements [begin, end) of each array `arrays` has (0 for the others).
ParamChecksums RangeChecksums(const ParamArrays& arrays, size_t begin, size_t end) {
  const size_t n = end - begin;
  auto crc = [&](const void* array, size_t element_bytes) {
    if (array == nullptr) return uint32_t{0};
    return Crc32c(static_cast<const char*>(array) + begin * element_bytes, n * element_bytes);
  };
  return {crc(arrays.master, 4), crc(arrays.state0, 4), crc(arrays.state1, 4),
          crc(arrays.compute_copy, sizeof(BFloat16))};
}

// The chunks' CRCs of each array joined in order (chunk c: elements from c * chunk_elements).
ParamChecksums Joined(const std::vector<ParamChecksums>& parts, const ParamArrays& arrays,
                      size_t chunk_elements) {
  ParamChecksums whole;
  auto join = [](uint32_t* into, const void* array, uint32_t part, uint64_t bytes) {
    if (array != nullptr) *into = Crc32cCombine(*into, part, bytes);
  };
  for (size_t c = 0; c < parts.size(); ++c) {
    const size_t n = std::min(arrays.size, (c + 1) * chunk_elements) - c * chunk_elements;
    join(&whole.master, arrays.master, parts[c].master, n * 4);
    join(&whole.state0, arrays.state0, parts[c].state0, n * 4);
    join(&whole.state1, arrays.state1, parts[c].state1, n * 4);
    join(&whole.compute_copy, arrays.compute_copy, parts[c].compute_copy, n * sizeof(BFloat16));
  }
  return whole;
}

size_t Chunks(size_t n, size_t chunk_elements) { return (n + chunk_elements - 1) / chunk_elements; }

// body(c, begin, end) for each fixed chunk c of [0, n) (so that chunks' CRCs join at known
// lengths), over the calling arena. Isolated: a thread waiting for its chunks takes no other
// task of the arena meanwhile (a queued update: its own would then finish only after that one).
template <class Body>
void ForEachChunk(size_t n, size_t chunk_elements, const Body& body) {
  const size_t chunks = Chunks(n, chunk_elements);
  tbb::this_task_arena::isolate([&] {
    tbb::parallel_for(size_t{0}, chunks, [&](size_t c) {
      const size_t begin = c * chunk_elements;
      body(c, begin, std::min(n, begin + chunk_elements));
    });
  });
}

}  // namespace

void ParallelUpdate(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays,
                    size_t chunk_elements, ParamChecksums* checksums) {
  std::vector<ParamChecksums> parts(checksums != nullptr ? Chunks(arrays.size, chunk_elements) : 0);
  ForEachChunk(arrays.size, chunk_elements, [&](size_t c, size_t begin, size_t end) {
    UpdateRange(isa, scalars, arrays, begin, end);
    if (checksums != nullptr) parts[c] = RangeChecksums(arrays, begin, end);
  });
  if (checksums != nullptr) *checksums = Joined(parts, arrays, chunk_elements);
}

ParamChecksums ParallelChecksums(const ParamArrays& arrays, size_t chunk_elements) {
  std::vector<ParamChecksums> parts(Chunks(arrays.size, chunk_elements));
  ForEachChunk(arrays.size, chunk_elements, [&](size_t c, size_t begin, size_t end) {
    parts[c] = RangeChecksums(arrays, begin, end);
  });
  return Joined(parts, arrays, chunk_elements);
}

double ParallelSumOfSquares(SimdIsa isa, const void* grad, DType dtype, size_t n) {
  std::vector<double> partial(Chunks(n, kNormBlock));
  ForEachChunk(n, kNormBlock, [&](size_t b, size_t begin, size_t end) {
    partial[b] = GradSumOfSquares(isa, grad, dtype, begin, end);
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace ecss::optimizer_internal
