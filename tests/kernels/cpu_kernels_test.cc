#include "kernels/cpu/cpu_kernels.h"

#include <cmath>
#include <cstring>

#include <gtest/gtest.h>

#include "kernels/cpu/activation.h"
#include "router/routing_plan.h"
#include "tests/kernels/ffn_run.h"

namespace ecss::testing {
namespace {

std::unique_ptr<CpuKernels> MakeKernels(int threads, uint32_t tile = 16) {
  CpuKernelOptions options;
  options.threads = threads;
  options.tile_columns = tile;
  auto kernels = CpuKernels::Create(options);
  EXPECT_TRUE(kernels.ok()) << kernels.status();
  return std::move(kernels).value();
}

// Forward then backward on the CPU kernels with host buffers.
FfnResult RunCpu(const CpuKernels& kernels, const ReferenceFfn& ref, DType dtype,
                 SavedActivation saved, int backward_passes = 1) {
  const GroupedFfnProblem p = ProblemFor(ref, dtype, saved);
  std::vector<char> x = AsBytes(ref.x, dtype), dy = AsBytes(ref.dy, dtype);
  std::vector<char> y(x.size()), dx(x.size());
  std::vector<std::vector<char>> w_in, w_out;
  std::vector<const void*> w_in_ptr, w_out_ptr;
  FfnResult result;
  for (uint32_t g = 0; g < ref.groups(); ++g) {
    w_in.push_back(AsBytes(ref.w_in[g], dtype));
    w_out.push_back(AsBytes(ref.w_out[g], dtype));
    result.dw_in.emplace_back(ref.w_in[g].size(), -7.0f);  // overwritten unless accumulating
    result.dw_out.emplace_back(ref.w_out[g].size(), -7.0f);
  }
  std::vector<float*> dw_in_ptr, dw_out_ptr;
  for (uint32_t g = 0; g < ref.groups(); ++g) {
    w_in_ptr.push_back(w_in[g].data());
    w_out_ptr.push_back(w_out[g].data());
    dw_in_ptr.push_back(result.dw_in[g].data());
    dw_out_ptr.push_back(result.dw_out[g].data());
  }
  std::vector<float> saved_h(uint64_t{p.rows} * p.d_in());
  AlignedBuffer ws_f(kernels.FfnForwardWorkspaceBytes(p));
  FfnForwardArgs fwd{x.data(), w_in_ptr.data(), w_out_ptr.data(), y.data(), saved_h.data()};
  EXPECT_TRUE(kernels.FfnForward(p, fwd, {ws_f.data.get(), ws_f.size}).ok());
  AlignedBuffer ws_b(kernels.FfnBackwardWorkspaceBytes(p));
  for (int pass = 0; pass < backward_passes; ++pass) {
    FfnBackwardArgs bwd{x.data(),  w_in_ptr.data(),  w_out_ptr.data(),  saved_h.data(), dy.data(),
                        dx.data(), dw_in_ptr.data(), dw_out_ptr.data(), pass > 0};
    Status status = kernels.FfnBackward(p, bwd, {ws_b.data.get(), ws_b.size});
    EXPECT_TRUE(status.ok()) << status;
  }
  result.y = FromBytes(y, dtype);
  result.dx = FromBytes(dx, dtype);
  return result;
}

void ExpectClose(const FfnResult& got, const ReferenceFfn& ref, double tolerance) {
  EXPECT_LT(MaxRelativeError(got.y, ref.Forward()), tolerance) << "y";
  const ReferenceFfn::Grads grads = ref.Backward();
  EXPECT_LT(MaxRelativeError(got.dx, grads.dx), tolerance) << "dx";
  for (uint32_t g = 0; g < ref.groups(); ++g) {
    EXPECT_LT(MaxRelativeError(got.dw_in[g], grads.dw_in[g]), tolerance) << "dw_in " << g;
    EXPECT_LT(MaxRelativeError(got.dw_out[g], grads.dw_out[g]), tolerance) << "dw_out " << g;
  }
}

struct Shape {
  uint32_t d_model, d_ff;
  std::vector<uint32_t> counts;
};

// Experts with no token, one token, and counts and widths that are no multiple of the tile.
const Shape kShapes[] = {
    {16, 32, {3}},
    {24, 37, {0, 1, 17, 5}},
    {33, 50, {9, 0, 40}},
    {16, 16, {1, 1, 1}},
};

TEST(CpuKernelsTest, F32MatchesDoubleReference) {
  auto kernels = MakeKernels(2);
  for (const Shape& shape : kShapes) {
    for (Activation act : {Activation::kGelu, Activation::kSwiGlu}) {
      for (SavedActivation saved : {SavedActivation::kKeep, SavedActivation::kRecompute}) {
        SCOPED_TRACE(::testing::Message()
                     << "d_model " << shape.d_model << " d_ff " << shape.d_ff << " "
                     << ActivationName(act)
                     << (saved == SavedActivation::kKeep ? " keep" : " recompute"));
        const ReferenceFfn ref = MakeReference(shape.d_model, shape.d_ff, act, shape.counts, false);
        ExpectClose(RunCpu(*kernels, ref, DType::kF32, saved), ref, 2e-5);
      }
    }
  }
}

// bf16 rounds the activation and its gradient to bf16 before the GEMMs that read them
// (documented in expert_ops.h); the tolerance covers that rounding (2^-8 relative).
TEST(CpuKernelsTest, Bf16WithinDocumentedTolerance) {
  auto kernels = MakeKernels(2);
  for (const Shape& shape : kShapes) {
    for (Activation act : {Activation::kGelu, Activation::kSwiGlu}) {
      const ReferenceFfn ref = MakeReference(shape.d_model, shape.d_ff, act, shape.counts, true);
      SCOPED_TRACE(ActivationName(act));
      ExpectClose(RunCpu(*kernels, ref, DType::kBF16, SavedActivation::kRecompute), ref, 2e-2);
    }
  }
}

// The double reference's gradient against central differences of the double forward, so the
// kernel's backward is checked against a gradient that is itself checked.
TEST(CpuKernelsTest, ReferenceGradientMatchesFiniteDifferences) {
  for (Activation act : {Activation::kGelu, Activation::kSwiGlu}) {
    ReferenceFfn ref = MakeReference(6, 7, act, {2, 0, 3}, false);
    const ReferenceFfn::Grads grads = ref.Backward();
    auto loss = [&] {
      const std::vector<double> y = ref.Forward();
      double sum = 0;
      for (size_t i = 0; i < y.size(); ++i) sum += y[i] * ref.dy[i];
      return sum;
    };
    const float eps = 1e-2f;
    auto check = [&](float& value, double analytic) {
      const float original = value;
      value = original + eps;
      const double up = loss();
      value = original - eps;
      const double down = loss();
      value = original;
      EXPECT_NEAR((up - down) / (2 * eps), analytic, 1e-3 * (1 + std::abs(analytic)));
    };
    for (size_t i = 0; i < ref.x.size(); i += 5) check(ref.x[i], grads.dx[i]);
    for (uint32_t g = 0; g < ref.groups(); ++g) {
      for (size_t i = 0; i < ref.w_in[g].size(); i += 7) check(ref.w_in[g][i], grads.dw_in[g][i]);
      for (size_t i = 0; i < ref.w_out[g].size(); i += 7) {
        check(ref.w_out[g][i], grads.dw_out[g][i]);
      }
    }
  }
}

// Central differences of the kernel's own fp32 forward agree with its backward.
TEST(CpuKernelsTest, KernelBackwardMatchesFiniteDifferencesOfKernelForward) {
  auto kernels = MakeKernels(1);
  ReferenceFfn ref = MakeReference(8, 20, Activation::kSwiGlu, {3, 1}, false);
  const FfnResult base = RunCpu(*kernels, ref, DType::kF32, SavedActivation::kKeep);
  auto loss = [&] {
    const FfnResult r = RunCpu(*kernels, ref, DType::kF32, SavedActivation::kKeep);
    double sum = 0;
    for (size_t i = 0; i < r.y.size(); ++i) sum += double{r.y[i]} * ref.dy[i];
    return sum;
  };
  const float eps = 1e-2f;
  for (size_t i = 0; i < ref.w_in[1].size(); i += 11) {
    const float original = ref.w_in[1][i];
    ref.w_in[1][i] = original + eps;
    const double up = loss();
    ref.w_in[1][i] = original - eps;
    const double down = loss();
    ref.w_in[1][i] = original;
    EXPECT_NEAR((up - down) / (2 * eps), base.dw_in[1][i], 2e-3);
  }
}

TEST(CpuKernelsTest, BitIdenticalForAnyThreadCount) {
  const ReferenceFfn ref = MakeReference(40, 72, Activation::kGelu, {30, 0, 7, 61}, false);
  auto one = MakeKernels(1, 32);
  auto two = MakeKernels(2, 32);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const FfnResult a = RunCpu(*one, ref, dtype, SavedActivation::kKeep);
    const FfnResult b = RunCpu(*two, ref, dtype, SavedActivation::kKeep);
    EXPECT_EQ(a.y, b.y);
    EXPECT_EQ(a.dx, b.dx);
    EXPECT_EQ(a.dw_in, b.dw_in);
    EXPECT_EQ(a.dw_out, b.dw_out);
  }
}

TEST(CpuKernelsTest, AccumulateAddsToTheGradient) {
  auto kernels = MakeKernels(2);
  const ReferenceFfn ref = MakeReference(16, 24, Activation::kGelu, {5, 0, 9}, false);
  const FfnResult once = RunCpu(*kernels, ref, DType::kF32, SavedActivation::kKeep, 1);
  const FfnResult twice = RunCpu(*kernels, ref, DType::kF32, SavedActivation::kKeep, 2);
  for (uint32_t g = 0; g < ref.groups(); ++g) {
    for (size_t i = 0; i < once.dw_in[g].size(); ++i) {
      EXPECT_NEAR(twice.dw_in[g][i], 2 * once.dw_in[g][i], 1e-5 * (1 + std::abs(once.dw_in[g][i])));
    }
  }
  // The expert with no rows: zero gradient, doubled is still zero.
  for (float v : twice.dw_out[1]) EXPECT_EQ(v, 0.0f);
}

// ---- Permute and combine: exact ----------------------------------------------------------

struct PlanFixture {
  RoutingPlan plan;
  TokenPermutation perm;
};

PlanFixture MakePlan(uint32_t tokens, uint32_t k, uint32_t experts) {
  CounterRng rng(7, 3);
  std::vector<uint32_t> choice(uint64_t{tokens} * k);
  std::vector<float> weights(choice.size());
  for (uint32_t t = 0; t < tokens; ++t) {
    const uint32_t first = static_cast<uint32_t>(rng.UniformFloat() * experts) % experts;
    for (uint32_t j = 0; j < k; ++j) {
      choice[t * k + j] = (first + j) % experts;
      weights[t * k + j] = rng.UniformFloat();
    }
  }
  auto plan = RoutingPlan::FromAssignments(0, experts, tokens, k, choice.data(), weights.data());
  EXPECT_TRUE(plan.ok()) << plan.status();
  PlanFixture f{std::move(plan).value(), {}};
  const LayerPlan layer = f.plan.layer(0);
  f.perm = {layer.num_tokens, layer.k, layer.permutation, layer.inverse, layer.combine_weights};
  return f;
}

TEST(CpuKernelsTest, PermuteAndCombineAreExact) {
  auto kernels = MakeKernels(2);
  const PlanFixture f = MakePlan(37, 2, 5);
  const uint32_t width = 300;  // more than one 256-element chunk
  const std::vector<float> x = RandomValues(uint64_t{37} * width, 4, 1.0f, false);
  std::vector<float> x_perm(uint64_t{f.perm.rows()} * width);
  ASSERT_TRUE(kernels->Permute(f.perm, {width, DType::kF32, false}, x.data(), x_perm.data()).ok());
  for (uint32_t r = 0; r < f.perm.rows(); ++r) {
    const uint32_t token = f.perm.row_to_slot[r] / 2;
    ASSERT_EQ(0, std::memcmp(&x_perm[uint64_t{r} * width], &x[uint64_t{token} * width],
                             width * sizeof(float)));
  }
  // Combine with weights: the weighted sum in choice order, in fp32.
  std::vector<float> out(x.size());
  ASSERT_TRUE(kernels->Combine(f.perm, {width, DType::kF32, true}, x_perm.data(), out.data()).ok());
  for (uint32_t t = 0; t < 37; ++t) {
    for (uint32_t c = 0; c < width; ++c) {
      float want = 0;
      for (uint32_t j = 0; j < 2; ++j) {
        const uint32_t row = f.perm.slot_to_row[t * 2 + j];
        const float term = f.perm.row_weights[row] * x_perm[uint64_t{row} * width + c];
        want = j == 0 ? term : want + term;
      }
      ASSERT_EQ(out[uint64_t{t} * width + c], want);
    }
  }
  // Unweighted combine of a permute is k times the input, exactly for k = 2.
  ASSERT_TRUE(
      kernels->Combine(f.perm, {width, DType::kF32, false}, x_perm.data(), out.data()).ok());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(out[i], 2 * x[i]);
  // bf16 permute moves bits.
  const std::vector<BFloat16> xb = ToBf16(x);
  std::vector<BFloat16> xb_perm(x_perm.size());
  ASSERT_TRUE(
      kernels->Permute(f.perm, {width, DType::kBF16, false}, xb.data(), xb_perm.data()).ok());
  for (uint32_t r = 0; r < f.perm.rows(); ++r) {
    const uint32_t token = f.perm.row_to_slot[r] / 2;
    ASSERT_EQ(0, std::memcmp(&xb_perm[uint64_t{r} * width], &xb[uint64_t{token} * width],
                             width * sizeof(BFloat16)));
  }
}

TEST(CpuKernelsTest, CastRoundsToNearestEvenAndSumOfSquaresIsExactEnough) {
  auto kernels = MakeKernels(2);
  std::vector<float> values = RandomValues(200000, 9, 100.0f, false);
  values[0] = std::nanf("");
  values[1] = INFINITY;
  std::vector<BFloat16> got(values.size());
  ASSERT_TRUE(
      kernels->Cast(values.data(), DType::kF32, got.data(), DType::kBF16, values.size()).ok());
  for (size_t i = 0; i < values.size(); ++i) {
    ASSERT_EQ(got[i].bits, FloatToBf16(values[i]).bits) << i;
  }
  std::vector<float> back(values.size());
  ASSERT_TRUE(kernels->Cast(got.data(), DType::kBF16, back.data(), DType::kF32, back.size()).ok());
  EXPECT_EQ(back[5], Bf16ToFloat(got[5]));

  const std::vector<float> a = RandomValues(1001, 10, 1.0f, false);
  const std::vector<float> b = RandomValues(7, 11, 3.0f, false);
  const float* grads[] = {a.data(), b.data(), nullptr};
  const uint64_t counts[] = {a.size(), b.size(), 0};
  double out[3] = {-1, -1, -1};
  ASSERT_TRUE(kernels->SumOfSquares({3, grads, counts, out}).ok());
  double want_a = 0, want_b = 0;
  for (float v : a) want_a += double{v} * v;
  for (float v : b) want_b += double{v} * v;
  EXPECT_NEAR(out[0], want_a, 1e-12 * want_a);
  EXPECT_NEAR(out[1], want_b, 1e-12 * want_b);
  EXPECT_EQ(out[2], 0.0);
}

TEST(CpuKernelsTest, ApproximationsStayWithinTheirDocumentedError) {
  for (float x = -10; x <= 10; x += 0.001f) {
    ASSERT_NEAR(cpu::ErfApprox(x), std::erf(double{x}), 4e-7) << x;
  }
  for (float x = -80; x <= 80; x += 0.01f) {
    ASSERT_NEAR(cpu::ExpApprox(x) / std::exp(double{x}), 1.0, 1e-6) << x;
  }
  float v[4] = {1.00390625f, 1.01171875f, -0.0f, std::nanf("")};  // ties: even down, even up
  cpu::RoundToBf16(v, 4);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], 1.015625f);
  EXPECT_TRUE(std::signbit(v[2]));
  EXPECT_TRUE(std::isnan(v[3]));
}

// ---- Bad input ---------------------------------------------------------------------------

TEST(CpuKernelsTest, BadInputGetsSpecificErrors) {
  auto kernels = MakeKernels(1);
  const ReferenceFfn ref = MakeReference(16, 16, Activation::kGelu, {2, 3}, false);
  GroupedFfnProblem p = ProblemFor(ref, DType::kF32, SavedActivation::kRecompute);
  std::vector<float> x(ref.x), y(x.size());
  const void* w_in[] = {ref.w_in[0].data(), ref.w_in[1].data()};
  const void* w_out[] = {ref.w_out[0].data(), ref.w_out[1].data()};
  FfnForwardArgs args{x.data(), w_in, w_out, y.data(), nullptr};
  AlignedBuffer ws(kernels->FfnForwardWorkspaceBytes(p) + kWorkspaceAlignment);
  const Workspace good{ws.data.get(), ws.size};
  ASSERT_TRUE(kernels->FfnForward(p, args, good).ok());

  auto code = [&](GroupedFfnProblem problem, FfnForwardArgs a, Workspace w) {
    return kernels->FfnForward(problem, a, w).code();
  };
  GroupedFfnProblem bad = p;
  bad.rows = 4;  // counts sum to 5
  EXPECT_EQ(code(bad, args, good), StatusCode::kInvalidArgument);
  const uint32_t decreasing[] = {0, 3, 2};
  bad = p;
  bad.group_offsets = decreasing;
  bad.rows = 2;
  EXPECT_EQ(code(bad, args, good), StatusCode::kInvalidArgument);
  bad = p;
  bad.d_model = 0;
  EXPECT_EQ(code(bad, args, good), StatusCode::kInvalidArgument);
  bad = p;
  bad.dtype = DType::kF16;
  EXPECT_EQ(code(bad, args, good), StatusCode::kUnimplemented);
  bad = p;
  bad.num_groups = 0;
  EXPECT_EQ(code(bad, args, good), StatusCode::kInvalidArgument);
  FfnForwardArgs bad_args = args;
  bad_args.y = nullptr;
  EXPECT_EQ(code(p, bad_args, good), StatusCode::kInvalidArgument);
  bad_args = args;
  bad_args.x = reinterpret_cast<const char*>(x.data()) + 2;
  EXPECT_EQ(code(p, bad_args, good), StatusCode::kFailedPrecondition);
  EXPECT_EQ(code(p, args, {good.data, good.bytes - kWorkspaceAlignment - 1}),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(code(p, args, {ws.data.get() + 64, ws.size - 64}), StatusCode::kFailedPrecondition);
  GroupedFfnProblem keep = p;
  keep.saved = SavedActivation::kKeep;
  EXPECT_EQ(code(keep, args, good), StatusCode::kInvalidArgument);  // saved is null
  // Nothing was written by the refused calls.
  const std::vector<float> before = y;
  EXPECT_EQ(code(bad, args, good), StatusCode::kInvalidArgument);
  EXPECT_EQ(y, before);

  EXPECT_EQ(kernels->Cast(x.data(), DType::kF32, y.data(), DType::kF16, 4).code(),
            StatusCode::kUnimplemented);
  EXPECT_EQ(kernels->SumOfSquares({0, nullptr, nullptr, nullptr}).code(),
            StatusCode::kInvalidArgument);
  TokenPermutation perm{2, 0, nullptr, nullptr, nullptr};
  EXPECT_EQ(kernels->Permute(perm, {4, DType::kF32, false}, x.data(), y.data()).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CpuKernels::Create({0, 20}).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ecss::testing
