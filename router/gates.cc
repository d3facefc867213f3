#include "router/gates.h"

#include <algorithm>
#include <cmath>

#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

Status CheckOptions(const GateOptions& o) {
  if (o.d_model == 0 || o.num_experts == 0 || o.k == 0 || o.k > o.num_experts) {
    return InvalidArgumentError(StrCat("gate needs d_model > 0 and 1 <= k <= experts (d_model ",
                                       o.d_model, ", experts ", o.num_experts, ", k ", o.k, ")"));
  }
  if (!(o.init_scale >= 0) || !std::isfinite(o.init_scale)) {
    return InvalidArgumentError("gate init_scale must be finite and >= 0");
  }
  return Status::Ok();
}

std::vector<float> InitParameter(const GateOptions& o, uint64_t stream) {
  CounterRng rng(o.seed, stream);
  std::vector<float> values(static_cast<size_t>(o.d_model) * o.num_experts);
  for (float& v : values) v = (2.0f * rng.UniformFloat() - 1.0f) * o.init_scale;
  return values;
}

Status CheckForward(const float* hidden, uint32_t num_tokens, const GateOutput* out) {
  if (hidden == nullptr || out == nullptr || num_tokens == 0) {
    return InvalidArgumentError("gate forward needs hidden states, tokens and an output");
  }
  return Status::Ok();
}

Status CheckBackward(const GateOutput& out, uint32_t num_experts, uint32_t k, const void* hidden,
                     const void* d_weights, const void* d_hidden) {
  if (out.num_experts != num_experts || out.k != k ||
      out.probs.size() != static_cast<size_t>(out.num_tokens) * num_experts) {
    return InvalidArgumentError("gate backward got the output of a different gate");
  }
  if (hidden == nullptr || d_weights == nullptr || d_hidden == nullptr) {
    return InvalidArgumentError("gate backward needs hidden, d_weights and d_hidden");
  }
  return Status::Ok();
}

// y[t, e] = sum_d x[t, d] w[d, e]; accumulates in double.
void MatMul(const float* x, const float* w, uint32_t tokens, uint32_t d_model, uint32_t experts,
            double* y) {
  for (uint32_t t = 0; t < tokens; ++t) {
    double* row = y + static_cast<size_t>(t) * experts;
    std::fill(row, row + experts, 0.0);
    for (uint32_t d = 0; d < d_model; ++d) {
      const double xv = x[static_cast<size_t>(t) * d_model + d];
      const float* wrow = w + static_cast<size_t>(d) * experts;
      for (uint32_t e = 0; e < experts; ++e) row[e] += xv * wrow[e];
    }
  }
}

// From logits of one token: probabilities, the top-k experts (descending, ties to the lower
// index) and their combine weights.
void SelectTopK(const double* logits, uint32_t experts, uint32_t k, bool renormalize, float* probs,
                uint32_t* chosen, float* weights) {
  double max_logit = logits[0];
  for (uint32_t e = 1; e < experts; ++e) max_logit = std::max(max_logit, logits[e]);
  double total = 0;
  std::vector<double> p(experts);
  for (uint32_t e = 0; e < experts; ++e) total += p[e] = std::exp(logits[e] - max_logit);
  for (uint32_t e = 0; e < experts; ++e) probs[e] = static_cast<float>(p[e] /= total);
  std::vector<uint32_t> order(experts);
  for (uint32_t e = 0; e < experts; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](uint32_t a, uint32_t b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
  double chosen_total = 0;
  for (uint32_t j = 0; j < k; ++j) chosen_total += p[order[j]];
  for (uint32_t j = 0; j < k; ++j) {
    chosen[j] = order[j];
    weights[j] = static_cast<float>(renormalize ? p[order[j]] / chosen_total : p[order[j]]);
  }
}

// dLoss/dlogits of one token from dLoss/dweights (and an extra dLoss/dprobs, may be null).
void TopKBackward(const float* probs, uint32_t experts, uint32_t k, bool renormalize,
                  const uint32_t* chosen, const float* d_weights, const double* extra_dprob,
                  double* d_logits) {
  std::vector<double> dp(experts, 0.0);
  if (extra_dprob) std::copy(extra_dprob, extra_dprob + experts, dp.begin());
  if (renormalize) {
    // w_j = p_j / Z, Z = sum of chosen p: dp_i = dw_i / Z - (sum_j dw_j p_j) / Z^2.
    double z = 0, dot = 0;
    for (uint32_t j = 0; j < k; ++j) {
      z += probs[chosen[j]];
      dot += static_cast<double>(d_weights[j]) * probs[chosen[j]];
    }
    for (uint32_t j = 0; j < k; ++j) dp[chosen[j]] += d_weights[j] / z - dot / (z * z);
  } else {
    for (uint32_t j = 0; j < k; ++j) dp[chosen[j]] += d_weights[j];
  }
  // Softmax: dz_e = p_e (dp_e - sum_i p_i dp_i).
  double dot = 0;
  for (uint32_t e = 0; e < experts; ++e) dot += probs[e] * dp[e];
  for (uint32_t e = 0; e < experts; ++e) d_logits[e] = probs[e] * (dp[e] - dot);
}

void AllocateOutput(uint32_t tokens, uint32_t experts, uint32_t k, GateOutput* out) {
  out->num_tokens = tokens;
  out->num_experts = experts;
  out->k = k;
  out->experts.assign(static_cast<size_t>(tokens) * k, 0);
  out->weights.assign(static_cast<size_t>(tokens) * k, 0.0f);
  out->probs.assign(static_cast<size_t>(tokens) * experts, 0.0f);
  out->aux_loss = 0;
  out->saved.clear();
}

}  // namespace

StatusOr<RoutingPlan> GateOutput::ToPlan(uint32_t layer) const {
  return RoutingPlan::FromAssignments(layer, num_experts, num_tokens, k, experts.data(),
                                      weights.data());
}

// ---- TopKGate -----------------------------------------------------------------------------

StatusOr<TopKGate> TopKGate::Create(const GateOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(options));
  TopKGate gate(options);
  gate.weight_ = InitParameter(options, 1);
  return gate;
}

Status TopKGate::Forward(const float* hidden, uint32_t num_tokens, GateOutput* out) const {
  ECSS_RETURN_IF_ERROR(CheckForward(hidden, num_tokens, out));
  const uint32_t experts = options_.num_experts;
  const uint32_t k = options_.k;
  AllocateOutput(num_tokens, experts, k, out);
  std::vector<double> logits(static_cast<size_t>(num_tokens) * experts);
  MatMul(hidden, weight_.data(), num_tokens, options_.d_model, experts, logits.data());
  std::vector<double> first_choice(experts, 0.0), mean_prob(experts, 0.0);
  for (uint32_t t = 0; t < num_tokens; ++t) {
    float* probs = out->probs.data() + static_cast<size_t>(t) * experts;
    SelectTopK(logits.data() + static_cast<size_t>(t) * experts, experts, k, options_.renormalize,
               probs, out->experts.data() + static_cast<size_t>(t) * k,
               out->weights.data() + static_cast<size_t>(t) * k);
    first_choice[out->experts[static_cast<size_t>(t) * k]] += 1.0 / num_tokens;
    for (uint32_t e = 0; e < experts; ++e)
      mean_prob[e] += probs[e] / static_cast<double>(num_tokens);
  }
  for (uint32_t e = 0; e < experts; ++e) out->aux_loss += experts * first_choice[e] * mean_prob[e];
  // Saved for backward: the first-choice fractions f_e.
  out->saved.assign(first_choice.begin(), first_choice.end());
  return Status::Ok();
}

Status TopKGate::Backward(const float* hidden, const GateOutput& out, const float* d_weights,
                          float aux_grad, float* d_hidden, float* d_weight) const {
  const uint32_t experts = options_.num_experts;
  const uint32_t k = options_.k;
  const uint32_t d_model = options_.d_model;
  ECSS_RETURN_IF_ERROR(CheckBackward(out, experts, k, hidden, d_weights, d_hidden));
  if (d_weight == nullptr || out.saved.size() != experts) {
    return InvalidArgumentError("TopKGate backward needs d_weight and a TopKGate forward output");
  }
  // d aux / d p[t, e] = E * f_e / T (f is piecewise constant).
  std::vector<double> aux_dprob(experts);
  for (uint32_t e = 0; e < experts; ++e) {
    aux_dprob[e] = aux_grad * static_cast<double>(experts) * out.saved[e] / out.num_tokens;
  }
  std::vector<double> d_logits(experts);
  for (uint32_t t = 0; t < out.num_tokens; ++t) {
    TopKBackward(out.probs.data() + static_cast<size_t>(t) * experts, experts, k,
                 options_.renormalize, out.experts.data() + static_cast<size_t>(t) * k,
                 d_weights + static_cast<size_t>(t) * k, aux_dprob.data(), d_logits.data());
    const float* h = hidden + static_cast<size_t>(t) * d_model;
    float* dh = d_hidden + static_cast<size_t>(t) * d_model;
    for (uint32_t d = 0; d < d_model; ++d) {
      const float* wrow = weight_.data() + static_cast<size_t>(d) * experts;
      float* dwrow = d_weight + static_cast<size_t>(d) * experts;
      double sum = 0;
      for (uint32_t e = 0; e < experts; ++e) {
        sum += d_logits[e] * wrow[e];
        dwrow[e] += static_cast<float>(h[d] * d_logits[e]);
      }
      dh[d] = static_cast<float>(sum);
    }
  }
  return Status::Ok();
}

// ---- AttentionRouter ------------------------------------------------------------------------
// Saved per token: q, k, v (E each) and the row-softmaxed attention A (E x E).

StatusOr<AttentionRouter> AttentionRouter::Create(const GateOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(options));
  AttentionRouter router(options);
  router.wq_ = InitParameter(options, 2);
  router.wk_ = InitParameter(options, 3);
  router.wv_ = InitParameter(options, 4);
  return router;
}

Status AttentionRouter::Forward(const float* hidden, uint32_t num_tokens, GateOutput* out) const {
  ECSS_RETURN_IF_ERROR(CheckForward(hidden, num_tokens, out));
  const uint32_t experts = options_.num_experts;
  const uint32_t d_model = options_.d_model;
  const size_t per_token =
      3 * static_cast<size_t>(experts) + static_cast<size_t>(experts) * experts;
  AllocateOutput(num_tokens, experts, options_.k, out);
  out->saved.assign(per_token * num_tokens, 0.0f);
  std::vector<double> q(experts), kv(experts), v(experts), logits(experts), row(experts);
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const float* h = hidden + static_cast<size_t>(t) * d_model;
    MatMul(h, wq_.data(), 1, d_model, experts, q.data());
    MatMul(h, wk_.data(), 1, d_model, experts, kv.data());
    MatMul(h, wv_.data(), 1, d_model, experts, v.data());
    float* saved = out->saved.data() + per_token * t;
    for (uint32_t e = 0; e < experts; ++e) {
      saved[e] = static_cast<float>(q[e]);
      saved[experts + e] = static_cast<float>(kv[e]);
      saved[2 * experts + e] = static_cast<float>(v[e]);
    }
    float* attention = saved + 3 * experts;
    for (uint32_t i = 0; i < experts; ++i) {
      double max_score = q[i] * kv[0];
      for (uint32_t j = 1; j < experts; ++j) max_score = std::max(max_score, q[i] * kv[j]);
      double total = 0;
      for (uint32_t j = 0; j < experts; ++j) total += row[j] = std::exp(q[i] * kv[j] - max_score);
      logits[i] = 0;
      for (uint32_t j = 0; j < experts; ++j) {
        row[j] /= total;
        attention[i * experts + j] = static_cast<float>(row[j]);
        logits[i] += row[j] * v[j];
      }
    }
    SelectTopK(logits.data(), experts, options_.k, options_.renormalize,
               out->probs.data() + static_cast<size_t>(t) * experts,
               out->experts.data() + static_cast<size_t>(t) * options_.k,
               out->weights.data() + static_cast<size_t>(t) * options_.k);
  }
  return Status::Ok();
}

Status AttentionRouter::Backward(const float* hidden, const GateOutput& out, const float* d_weights,
                                 float* d_hidden, float* d_wq, float* d_wk, float* d_wv) const {
  const uint32_t experts = options_.num_experts;
  const uint32_t d_model = options_.d_model;
  const uint32_t k = options_.k;
  ECSS_RETURN_IF_ERROR(CheckBackward(out, experts, k, hidden, d_weights, d_hidden));
  const size_t per_token =
      3 * static_cast<size_t>(experts) + static_cast<size_t>(experts) * experts;
  if (d_wq == nullptr || d_wk == nullptr || d_wv == nullptr ||
      out.saved.size() != per_token * out.num_tokens) {
    return InvalidArgumentError(
        "AttentionRouter backward needs d_wq, d_wk, d_wv and an AttentionRouter forward output");
  }
  std::vector<double> d_logits(experts), dq(experts), dk(experts), dv(experts), dscore(experts);
  for (uint32_t t = 0; t < out.num_tokens; ++t) {
    TopKBackward(out.probs.data() + static_cast<size_t>(t) * experts, experts, k,
                 options_.renormalize, out.experts.data() + static_cast<size_t>(t) * k,
                 d_weights + static_cast<size_t>(t) * k, nullptr, d_logits.data());
    const float* saved = out.saved.data() + per_token * t;
    const float* q = saved;
    const float* kv = saved + experts;
    const float* v = saved + 2 * experts;
    const float* attention = saved + 3 * experts;
    std::fill(dq.begin(), dq.end(), 0.0);
    std::fill(dk.begin(), dk.end(), 0.0);
    std::fill(dv.begin(), dv.end(), 0.0);
    for (uint32_t i = 0; i < experts; ++i) {
      const float* a = attention + static_cast<size_t>(i) * experts;
      // logits_i = sum_j A_ij v_j:  dA_ij = dl_i v_j,  dv_j += A_ij dl_i.
      double dot = 0;
      for (uint32_t j = 0; j < experts; ++j) {
        const double da = d_logits[i] * v[j];
        dv[j] += a[j] * d_logits[i];
        dscore[j] = da;
        dot += a[j] * da;
      }
      // Row softmax: dS_ij = A_ij (dA_ij - sum_m A_im dA_im); S_ij = q_i k_j.
      for (uint32_t j = 0; j < experts; ++j) {
        const double ds = a[j] * (dscore[j] - dot);
        dq[i] += ds * kv[j];
        dk[j] += ds * q[i];
      }
    }
    const float* h = hidden + static_cast<size_t>(t) * d_model;
    float* dh = d_hidden + static_cast<size_t>(t) * d_model;
    for (uint32_t d = 0; d < d_model; ++d) {
      const size_t row = static_cast<size_t>(d) * experts;
      double sum = 0;
      for (uint32_t e = 0; e < experts; ++e) {
        sum += dq[e] * wq_[row + e] + dk[e] * wk_[row + e] + dv[e] * wv_[row + e];
        d_wq[row + e] += static_cast<float>(h[d] * dq[e]);
        d_wk[row + e] += static_cast<float>(h[d] * dk[e]);
        d_wv[row + e] += static_cast<float>(h[d] * dv[e]);
      }
      dh[d] = static_cast<float>(sum);
    }
  }
  return Status::Ok();
}

}  // namespace ecss
