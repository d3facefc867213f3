// Learned gates, the baselines RRE is measured against. Their routing depends on the hidden
// states, so it is known only after the layer's input exists: plans built from them are
// "reactive" (GateOutput::ToPlan). Both run forward and backward on the CPU in fp32 storage
// with double accumulation; the selection is softmax -> top-k (ties to the lower expert) ->
// weights, optionally renormalised over the k chosen, one piece of code shared by both.
//  - TopKGate: the classic MoE gate, logits = h Wg, with the Switch/GShard load-balancing
//    auxiliary loss  aux = E * sum_e f_e * P_e  (f_e: fraction of tokens whose first choice is
//    e, treated as a constant; P_e: mean probability of e).
//  - AttentionRouter: Yuan2.0-M32's router: q = h Wq, k = h Wk, v = h Wv (each of length E),
//    logits = softmax(q k^T) v (an E x E attention per token, rows softmaxed, no scaling),
//    top-2 with weights renormalised over the two.
// Thread-compatible: Forward/Backward are const and may run concurrently on distinct outputs.
#pragma once

#include <cstdint>
#include <vector>

#include "router/routing_plan.h"
#include "runtime/base/status.h"

namespace ecss {

struct GateOutput {
  uint32_t num_tokens = 0;
  uint32_t num_experts = 0;
  uint32_t k = 0;
  std::vector<uint32_t> experts;  // [tokens, k], by descending probability
  std::vector<float> weights;     // [tokens, k], combine weights
  std::vector<float> probs;       // [tokens, E], softmax of the logits
  double aux_loss = 0;            // TopKGate only
  std::vector<float> saved;       // intermediates the backward pass needs

  // The reactive plan of this routing for sparse layer `layer`.
  StatusOr<RoutingPlan> ToPlan(uint32_t layer) const;
};

struct GateOptions {
  uint32_t d_model = 0;
  uint32_t num_experts = 0;
  uint32_t k = 2;
  bool renormalize = true;   // weights sum to 1 over the k chosen experts
  uint64_t seed = 0;         // parameter initialisation
  float init_scale = 0.02f;  // parameters uniform in [-init_scale, init_scale]
};

class TopKGate {
 public:
  // InvalidArgument for zero sizes or k outside [1, num_experts].
  static StatusOr<TopKGate> Create(const GateOptions& options);

  // hidden: [num_tokens, d_model].
  Status Forward(const float* hidden, uint32_t num_tokens, GateOutput* out) const;
  // d_weights: dLoss/d(out.weights) [tokens, k]; aux_grad: dLoss/d(out.aux_loss).
  // Writes d_hidden [tokens, d_model]; adds dLoss/dWg into d_weight [d_model, E].
  Status Backward(const float* hidden, const GateOutput& out, const float* d_weights,
                  float aux_grad, float* d_hidden, float* d_weight) const;

  std::vector<float>& weight() { return weight_; }  // [d_model, E]
  const GateOptions& options() const { return options_; }

 private:
  explicit TopKGate(const GateOptions& options) : options_(options) {}
  GateOptions options_;
  std::vector<float> weight_;
};

class AttentionRouter {
 public:
  // As TopKGate::Create; Yuan's router uses k = 2.
  static StatusOr<AttentionRouter> Create(const GateOptions& options);

  Status Forward(const float* hidden, uint32_t num_tokens, GateOutput* out) const;
  // Writes d_hidden; adds into d_wq, d_wk, d_wv (each [d_model, E]).
  Status Backward(const float* hidden, const GateOutput& out, const float* d_weights,
                  float* d_hidden, float* d_wq, float* d_wk, float* d_wv) const;

  std::vector<float>& wq() { return wq_; }
  std::vector<float>& wk() { return wk_; }
  std::vector<float>& wv() { return wv_; }
  const GateOptions& options() const { return options_; }

 private:
  explicit AttentionRouter(const GateOptions& options) : options_(options) {}
  GateOptions options_;
  std::vector<float> wq_, wk_, wv_;
};

}  // namespace ecss
