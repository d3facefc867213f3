// The scalar path: the reference the SIMD paths match bit for bit, and the fallback on CPUs
// without AVX2+FMA. Also the run-time dispatch.
#include <cmath>

#include "optimizer/update_kernels.h"

namespace ecss::simd_internal {
void UpdateRangeAvx2(const UpdateScalars& s, const ParamArrays& a, size_t begin, size_t end);
void UpdateRangeAvx512(const UpdateScalars& s, const ParamArrays& a, size_t begin, size_t end);
double SumSquaresAvx2(const void* grad, DType dtype, size_t begin, size_t end);
double SumSquaresAvx512(const void* grad, DType dtype, size_t begin, size_t end);
}  // namespace ecss::simd_internal

namespace {
struct ScalarSum {
  template <bool kBf16>
  static size_t SumSquares8(const void*, size_t begin, size_t, double*) {
    return begin;  // the generic tail loop does everything
  }
};
}  // namespace

#include "optimizer/simd/update_impl.h"

namespace {
struct ScalarPath : ScalarVec, ScalarSum {};
}  // namespace

namespace ecss {

std::string_view SimdIsaName(SimdIsa isa) {
  switch (isa) {
    case SimdIsa::kScalar:
      return "scalar";
    case SimdIsa::kAvx2:
      return "avx2";
    case SimdIsa::kAvx512:
      return "avx512";
  }
  return "invalid";
}

bool SimdIsaSupported(SimdIsa isa) {
  switch (isa) {
    case SimdIsa::kScalar:
      return true;
    case SimdIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case SimdIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}

SimdIsa DetectSimdIsa() {
  static const SimdIsa best = SimdIsaSupported(SimdIsa::kAvx512) ? SimdIsa::kAvx512
                              : SimdIsaSupported(SimdIsa::kAvx2) ? SimdIsa::kAvx2
                                                                 : SimdIsa::kScalar;
  return best;
}

void UpdateRange(SimdIsa isa, const UpdateScalars& scalars, const ParamArrays& arrays, size_t begin,
                 size_t end) {
  switch (isa) {
    case SimdIsa::kAvx512:
      return simd_internal::UpdateRangeAvx512(scalars, arrays, begin, end);
    case SimdIsa::kAvx2:
      return simd_internal::UpdateRangeAvx2(scalars, arrays, begin, end);
    case SimdIsa::kScalar:
      return UpdateRangeImpl<ScalarPath>(scalars, arrays, begin, end);
  }
}

double GradSumOfSquares(SimdIsa isa, const void* grad, DType grad_dtype, size_t begin, size_t end) {
  switch (isa) {
    case SimdIsa::kAvx512:
      return simd_internal::SumSquaresAvx512(grad, grad_dtype, begin, end);
    case SimdIsa::kAvx2:
      return simd_internal::SumSquaresAvx2(grad, grad_dtype, begin, end);
    case SimdIsa::kScalar:
      return GradSumOfSquaresImpl<ScalarPath>(grad, grad_dtype, begin, end);
  }
  return 0;
}

}  // namespace ecss
