// Gate backward passes checked against central finite differences of the same loss.
#include "router/gates.h"

#include <cmath>
#include <functional>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/random.h"

namespace ecss {
namespace {

constexpr uint32_t kTokens = 6;
constexpr uint32_t kModel = 8;
constexpr uint32_t kExperts = 6;

std::vector<float> Random(size_t n, uint64_t stream, float scale) {
  CounterRng rng(77, stream);
  std::vector<float> v(n);
  for (float& x : v) x = scale * (2 * rng.UniformFloat() - 1);
  return v;
}

// Loss = sum_t,j c[t,j] * weight[t,j] + beta * aux.
double Loss(const GateOutput& out, const std::vector<float>& c, double beta) {
  double loss = beta * out.aux_loss;
  for (size_t i = 0; i < out.weights.size(); ++i) loss += c[i] * out.weights[i];
  return loss;
}

// Central difference of loss with respect to values[index].
double NumericGradient(std::vector<float>& values, size_t index,
                       const std::function<double()>& loss) {
  const float original = values[index];
  const float eps = 1e-3f;
  values[index] = original + eps;
  const double plus = loss();
  values[index] = original - eps;
  const double minus = loss();
  values[index] = original;
  return (plus - minus) / (2.0 * eps);
}

void ExpectClose(double analytic, double numeric, const char* what, size_t index) {
  EXPECT_NEAR(analytic, numeric, 2e-3 + 2e-2 * std::fabs(numeric)) << what << "[" << index << "]";
}

class TopKGateGradientTest : public ::testing::TestWithParam<bool> {};

TEST_P(TopKGateGradientTest, MatchesFiniteDifferences) {
  GateOptions options{kModel, kExperts, 2, /*renormalize=*/GetParam(), 3, 0.5f};
  StatusOr<TopKGate> gate = TopKGate::Create(options);
  ASSERT_TRUE(gate.ok());
  std::vector<float> hidden = Random(kTokens * kModel, 1, 1.0f);
  const std::vector<float> c = Random(kTokens * 2, 2, 1.0f);
  const double beta = 0.7;
  GateOutput out;
  auto loss = [&] {
    GateOutput o;
    EXPECT_TRUE(gate->Forward(hidden.data(), kTokens, &o).ok());
    return Loss(o, c, beta);
  };
  ASSERT_TRUE(gate->Forward(hidden.data(), kTokens, &out).ok());
  std::vector<float> d_hidden(hidden.size()), d_weight(gate->weight().size(), 0.0f);
  ASSERT_TRUE(gate->Backward(hidden.data(), out, c.data(), static_cast<float>(beta),
                             d_hidden.data(), d_weight.data())
                  .ok());
  // The aux loss's first-choice fractions are piecewise constant; finite differences see the
  // same constant as long as no token's first choice flips, which these inputs keep.
  for (size_t i = 0; i < hidden.size(); ++i) {
    ExpectClose(d_hidden[i], NumericGradient(hidden, i, loss), "d_hidden", i);
  }
  for (size_t i = 0; i < gate->weight().size(); ++i) {
    ExpectClose(d_weight[i], NumericGradient(gate->weight(), i, loss), "d_weight", i);
  }
  EXPECT_GT(out.aux_loss, 0.0);
  for (uint32_t t = 0; t < kTokens; ++t) {
    EXPECT_GE(out.probs[t * kExperts + out.experts[t * 2]],
              out.probs[t * kExperts + out.experts[t * 2 + 1]]);
    if (GetParam()) {
      EXPECT_NEAR(out.weights[t * 2] + out.weights[t * 2 + 1], 1.0f, 1e-6);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Renormalize, TopKGateGradientTest, ::testing::Bool());

TEST(AttentionRouterTest, MatchesFiniteDifferences) {
  GateOptions options{kModel, kExperts, 2, true, 5, 0.6f};
  StatusOr<AttentionRouter> router = AttentionRouter::Create(options);
  ASSERT_TRUE(router.ok());
  std::vector<float> hidden = Random(kTokens * kModel, 3, 1.0f);
  const std::vector<float> c = Random(kTokens * 2, 4, 1.0f);
  auto loss = [&] {
    GateOutput o;
    EXPECT_TRUE(router->Forward(hidden.data(), kTokens, &o).ok());
    return Loss(o, c, 0.0);
  };
  GateOutput out;
  ASSERT_TRUE(router->Forward(hidden.data(), kTokens, &out).ok());
  std::vector<float> d_hidden(hidden.size());
  std::vector<float> d_wq(router->wq().size(), 0.0f), d_wk(d_wq.size(), 0.0f),
      d_wv(d_wq.size(), 0.0f);
  ASSERT_TRUE(router
                  ->Backward(hidden.data(), out, c.data(), d_hidden.data(), d_wq.data(),
                             d_wk.data(), d_wv.data())
                  .ok());
  for (size_t i = 0; i < hidden.size(); ++i) {
    ExpectClose(d_hidden[i], NumericGradient(hidden, i, loss), "d_hidden", i);
  }
  for (size_t i = 0; i < d_wq.size(); ++i) {
    ExpectClose(d_wq[i], NumericGradient(router->wq(), i, loss), "d_wq", i);
    ExpectClose(d_wk[i], NumericGradient(router->wk(), i, loss), "d_wk", i);
    ExpectClose(d_wv[i], NumericGradient(router->wv(), i, loss), "d_wv", i);
  }
}

TEST(GateTest, BadInput) {
  EXPECT_EQ(TopKGate::Create({8, 4, 5, true, 0, 0.1f}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AttentionRouter::Create({0, 4, 2, true, 0, 0.1f}).status().code(),
            StatusCode::kInvalidArgument);
  StatusOr<TopKGate> gate = TopKGate::Create({8, 4, 2, true, 0, 0.1f});
  ASSERT_TRUE(gate.ok());
  GateOutput out;
  EXPECT_EQ(gate->Forward(nullptr, 3, &out).code(), StatusCode::kInvalidArgument);
  StatusOr<AttentionRouter> other = AttentionRouter::Create({8, 5, 2, true, 0, 0.1f});
  std::vector<float> hidden(3 * 8, 0.1f), d_hidden(3 * 8), dw(8 * 4);
  ASSERT_TRUE(other->Forward(hidden.data(), 3, &out).ok());
  std::vector<float> dweights(6, 1.0f);
  EXPECT_EQ(
      gate->Backward(hidden.data(), out, dweights.data(), 0, d_hidden.data(), dw.data()).code(),
      StatusCode::kInvalidArgument)
      << "an output of another gate";
}

}  // namespace
}  // namespace ecss
