// The element-wise optimizer update, one fused pass per range: unscale and clip the gradient,
// update the state arrays, update the fp32 master weights, and write the bf16 compute copy
// (round to nearest even). Three instruction-set paths, chosen at run time from the CPU:
// AVX-512, AVX2+FMA and scalar. They run the same sequence of IEEE operations (fused
// multiply-adds included; the scalar path uses std::fma), so their results are bit-identical,
// and since every element is independent, so are the results for any chunking or thread count.
// Large ranges use non-temporal stores: master, states and the copy are not read again soon.
// Thread-safe: distinct ranges may be updated concurrently. Never allocates or blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "optimizer/optimizer_config.h"
#include "runtime/base/dtype.h"

namespace ecss {

enum class SimdIsa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
std::string_view SimdIsaName(SimdIsa isa);  // "scalar", "avx2", "avx512"
// The best path this CPU runs.
SimdIsa DetectSimdIsa();
bool SimdIsaSupported(SimdIsa isa);

// One expert's arrays (or a window of them). `grad` is f32 or bf16; state1 is null for kinds
// with one state array; compute_copy may be null (no bf16 copy wanted).
struct ParamArrays {
  float* master = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::kF32;
  float* state0 = nullptr;  // Adam(W), Lion: m; Adagrad: sum of squares; SGD: momentum buffer
  float* state1 = nullptr;  // Adam(W): v
  BFloat16* compute_copy = nullptr;
  size_t size = 0;
};

// CRC-32C (runtime/base/checksum.h) of each array an update writes, over its `size` elements
// (0 for an array that is null).
struct ParamChecksums {
  uint32_t master = 0;
  uint32_t state0 = 0;
  uint32_t state1 = 0;
  uint32_t compute_copy = 0;
};

// Updates elements [begin, end) of `arrays` with the given path.
// REQUIRES: SimdIsaSupported(isa); end <= arrays.size; arrays valid for the kind.
void UpdateRange(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays, size_t begin,
                 size_t end);

// Sum of squares of grad[begin, end) (as the update sees it, before the multiplier) in double,
// accumulated in 8 fixed lanes (element i into lane i % 8) and added in a fixed order: every
// path gives the same bits. Non-finite gradients give a non-finite sum.
double GradSumOfSquares(SimdIsa isa, const void* grad, DType grad_dtype, size_t begin, size_t end);

}  // namespace ecss
