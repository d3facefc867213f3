// The fused update against a double-precision reference, and every SIMD path against scalar.
#include "optimizer/update_kernels.h"

#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/random.h"

namespace ecss {
namespace {

const OptimizerKind kKinds[] = {OptimizerKind::kAdamW, OptimizerKind::kAdam,
                                OptimizerKind::kAdagrad, OptimizerKind::kLion,
                                OptimizerKind::kSgdMomentum};

std::vector<float> Uniform(size_t n, uint64_t stream, float low, float high) {
  CounterRng rng(2024, stream);
  std::vector<float> v(n);
  for (float& x : v) x = low + (high - low) * rng.UniformFloat();
  return v;
}

HyperParams Params(OptimizerKind kind) {
  HyperParams p;
  p.lr = kind == OptimizerKind::kLion ? 1e-4f : 1e-2f;
  p.beta1 = 0.8f;  // PanGu-Σ's
  p.beta2 = 0.95f;
  p.eps = 1e-8f;
  p.weight_decay = 0.1f;
  p.momentum = 0.9f;
  return p;
}

// The same update rules in double.
struct Reference {
  std::vector<double> p, s0, s1;
  void Step(OptimizerKind kind, const HyperParams& hp, uint64_t t, const std::vector<float>& grad,
            double multiplier) {
    const double lr = hp.lr, b1 = hp.beta1, b2 = hp.beta2, eps = hp.eps, wd = hp.weight_decay;
    for (size_t i = 0; i < p.size(); ++i) {
      double g = grad[i] * multiplier;
      switch (kind) {
        case OptimizerKind::kAdamW:
        case OptimizerKind::kAdam: {
          if (kind == OptimizerKind::kAdamW)
            p[i] *= 1 - lr * wd;
          else
            g += wd * p[i];
          s0[i] = b1 * s0[i] + (1 - b1) * g;
          s1[i] = b2 * s1[i] + (1 - b2) * g * g;
          const double denom = std::sqrt(s1[i]) / std::sqrt(1 - std::pow(b2, t)) + eps;
          p[i] -= lr / (1 - std::pow(b1, t)) * s0[i] / denom;
          break;
        }
        case OptimizerKind::kAdagrad:
          g += wd * p[i];
          s0[i] += g * g;
          p[i] -= lr * g / (std::sqrt(s0[i]) + eps);
          break;
        case OptimizerKind::kLion: {
          const double c = b1 * s0[i] + (1 - b1) * g;
          p[i] = p[i] * (1 - lr * wd) - lr * (c > 0 ? 1 : c < 0 ? -1 : 0);
          s0[i] = b2 * s0[i] + (1 - b2) * g;
          break;
        }
        case OptimizerKind::kSgdMomentum:
          g += wd * p[i];
          s0[i] = t == 1 ? g : hp.momentum * s0[i] + g;
          p[i] -= lr * s0[i];
          break;
      }
    }
  }
};

struct FloatState {
  std::vector<float> p, s0, s1;
  std::vector<BFloat16> copy;
  ParamArrays Arrays(const void* grad, DType dtype) {
    return ParamArrays{p.data(), grad, dtype, s0.data(), s1.data(), copy.data(), p.size()};
  }
};

TEST(UpdateKernelsTest, EveryOptimizerMatchesDoubleReferenceOver100Steps) {
  constexpr size_t kN = 4099;  // not a multiple of any vector width
  for (OptimizerKind kind : kKinds) {
    for (DType grad_dtype : {DType::kF32, DType::kBF16}) {
      const HyperParams hp = Params(kind);
      ASSERT_TRUE(ValidateHyperParams(kind, hp).ok());
      FloatState f{Uniform(kN, 1, -1, 1), std::vector<float>(kN, 0), std::vector<float>(kN, 0),
                   std::vector<BFloat16>(kN)};
      Reference r{std::vector<double>(f.p.begin(), f.p.end()), std::vector<double>(kN, 0),
                  std::vector<double>(kN, 0)};
      const float grad_scale = 1024.0f, clip = 0.5f;
      for (uint64_t t = 1; t <= 100; ++t) {
        std::vector<float> grad = Uniform(kN, 100 + t, -grad_scale, grad_scale);
        std::vector<BFloat16> grad16(kN);
        if (grad_dtype == DType::kBF16) {
          ConvertF32ToBf16(grad.data(), grad16.data(), kN);
          ConvertBf16ToF32(grad16.data(), grad.data(), kN);  // the reference sees the same values
        }
        const void* g =
            grad_dtype == DType::kBF16 ? static_cast<const void*>(grad16.data()) : grad.data();
        UpdateRange(DetectSimdIsa(), MakeUpdateScalars(kind, hp, t, grad_scale, clip),
                    f.Arrays(g, grad_dtype), 0, kN);
        r.Step(kind, hp, t, grad, static_cast<double>(clip) / grad_scale);
      }
      int outliers = 0;
      for (size_t i = 0; i < kN; ++i) {
        const double tolerance = 3e-5 + 1e-4 * std::fabs(r.p[i]);
        if (std::fabs(f.p[i] - r.p[i]) > tolerance) ++outliers;
        ASSERT_EQ(f.copy[i].bits, FloatToBf16(f.p[i]).bits) << "bf16 copy of the master";
      }
      // Lion's sign() may flip where its argument is within rounding of zero: allow a handful.
      EXPECT_LE(outliers, kind == OptimizerKind::kLion ? 4 : 0)
          << OptimizerKindName(kind) << " " << DTypeName(grad_dtype);
    }
  }
}

// Every SIMD path gives the scalar path's bits, for every kind and gradient type, at
// misaligned starts, odd lengths, and lengths long enough for streaming stores.
TEST(UpdateKernelsTest, SimdPathsAreBitIdenticalToScalar) {
  for (SimdIsa isa : {SimdIsa::kAvx2, SimdIsa::kAvx512}) {
    if (!SimdIsaSupported(isa)) {
      GTEST_LOG_(INFO) << SimdIsaName(isa) << " not supported here; not compared";
      continue;
    }
    for (OptimizerKind kind : kKinds) {
      for (DType grad_dtype : {DType::kF32, DType::kBF16}) {
        for (size_t n : {size_t{1}, size_t{37}, size_t{1000}, (size_t{1} << 18) + 333}) {
          for (size_t offset : {size_t{0}, size_t{3}}) {
            const size_t total = n + offset;
            std::vector<float> grad = Uniform(total, 7, -3, 3);
            std::vector<BFloat16> grad16(total);
            ConvertF32ToBf16(grad.data(), grad16.data(), total);
            const void* g =
                grad_dtype == DType::kBF16 ? static_cast<const void*>(grad16.data()) : grad.data();
            FloatState a{Uniform(total, 8, -1, 1), Uniform(total, 9, -1, 1),
                         Uniform(total, 10, 0, 1), std::vector<BFloat16>(total)};
            FloatState b = a;
            // Special values too: zeros, subnormals, huge, and a NaN in a master weight.
            a.p[offset] = b.p[offset] = 1e-40f;
            if (total > offset + 5) a.p[offset + 5] = b.p[offset + 5] = std::nanf("");
            for (uint64_t t : {uint64_t{1}, uint64_t{2}}) {
              const UpdateScalars s = MakeUpdateScalars(kind, Params(kind), t, 8.0f, 0.7f);
              UpdateRange(SimdIsa::kScalar, s, a.Arrays(g, grad_dtype), offset, total);
              UpdateRange(isa, s, b.Arrays(g, grad_dtype), offset, total);
            }
            ASSERT_EQ(0, std::memcmp(a.p.data(), b.p.data(), total * 4))
                << SimdIsaName(isa) << " " << OptimizerKindName(kind) << " n=" << n;
            ASSERT_EQ(0, std::memcmp(a.s0.data(), b.s0.data(), total * 4));
            ASSERT_EQ(0, std::memcmp(a.s1.data(), b.s1.data(), total * 4));
            ASSERT_EQ(0, std::memcmp(a.copy.data(), b.copy.data(), total * 2));
          }
        }
      }
    }
    // Gradient norms: the same bits on every path.
    std::vector<float> grad = Uniform(100003, 11, -2, 2);
    for (size_t begin : {size_t{0}, size_t{5}}) {
      EXPECT_EQ(GradSumOfSquares(SimdIsa::kScalar, grad.data(), DType::kF32, begin, grad.size()),
                GradSumOfSquares(isa, grad.data(), DType::kF32, begin, grad.size()));
    }
  }
}

TEST(UpdateKernelsTest, SumOfSquaresIsAccurateAndSeesNonFinite) {
  std::vector<float> grad = Uniform(10000, 12, -1, 1);
  double expected = 0;
  for (float g : grad) expected += static_cast<double>(g) * g;
  EXPECT_NEAR(GradSumOfSquares(DetectSimdIsa(), grad.data(), DType::kF32, 0, grad.size()), expected,
              1e-9 * expected);
  grad[777] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(
      std::isfinite(GradSumOfSquares(DetectSimdIsa(), grad.data(), DType::kF32, 0, grad.size())));
}

TEST(OptimizerConfigTest, InvalidHyperParamsNameTheField) {
  HyperParams p;
  p.lr = -1;
  Status lr = ValidateHyperParams(OptimizerKind::kAdamW, p);
  EXPECT_EQ(lr.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(lr.message().find("lr"), std::string_view::npos);
  p = HyperParams{};
  p.beta1 = 1.0f;
  EXPECT_NE(ValidateHyperParams(OptimizerKind::kAdam, p).message().find("beta1"),
            std::string_view::npos);
  p = HyperParams{};
  p.beta2 = -0.1f;
  EXPECT_FALSE(ValidateHyperParams(OptimizerKind::kLion, p).ok());
  p = HyperParams{};
  p.eps = std::nanf("");
  EXPECT_FALSE(ValidateHyperParams(OptimizerKind::kAdagrad, p).ok());
  p = HyperParams{};
  p.momentum = 1.5f;
  EXPECT_FALSE(ValidateHyperParams(OptimizerKind::kSgdMomentum, p).ok());
  p.eps = 1e-20f;  // PanGu-Σ's expert epsilon is valid
  p.momentum = 0.9f;
  EXPECT_TRUE(ValidateHyperParams(OptimizerKind::kAdamW, p).ok());
  EXPECT_EQ(ParseOptimizerKind("adafactor").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseOptimizerKind("lion"), OptimizerKind::kLion);
}

}  // namespace
}  // namespace ecss
