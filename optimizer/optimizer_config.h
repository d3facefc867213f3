// Optimizer kinds, their hyper-parameters, and the per-update scalars derived from them.
// Semantics follow PyTorch's torch.optim (AdamW: decoupled weight decay and bias correction;
// Adam: L2 added to the gradient; Adagrad; SGD with momentum, whose buffer starts as the first
// gradient); Lion follows Chen et al. 2023. Every kind sees the gradient as
//   g = grad * clip_coefficient / grad_scale
// (loss-scale unscaling and global-norm clipping folded into one multiply).
// Thread-safe (plain values and pure functions).
#pragma once

#include <cstdint>
#include <string_view>

#include "runtime/base/status.h"

namespace ecss {

enum class OptimizerKind : uint8_t {
  kAdamW = 0,
  kAdam = 1,
  kAdagrad = 2,
  kLion = 3,
  kSgdMomentum = 4
};
std::string_view OptimizerKindName(OptimizerKind kind);  // "adamw", "adam", ...
StatusOr<OptimizerKind> ParseOptimizerKind(std::string_view name);
// fp32 state arrays per parameter: Adam(W) 2 (m, v); Adagrad 1 (sum); Lion 1 (m); SGD 1 (buffer).
int StateArrays(OptimizerKind kind);

// The hyper-parameters of one parameter group (PanGu-Σ: eps 1e-20 for expert parameters).
struct HyperParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;         // Adam(W), Lion
  float beta2 = 0.999f;       // Adam(W), Lion
  float eps = 1e-8f;          // Adam(W), Adagrad
  float weight_decay = 0.0f;  // decoupled for AdamW and Lion, L2 for the others
  float momentum = 0.9f;      // SGD
  bool nesterov = false;      // SGD
};

// InvalidArgument naming the field: negative or non-finite lr, weight decay or eps; beta or
// momentum outside [0, 1).
Status ValidateHyperParams(OptimizerKind kind, const HyperParams& params);

// What one update of one expert needs, computed once per (expert, step) in double and rounded
// to float, so that every SIMD path and thread uses the same constants.
struct UpdateScalars {
  OptimizerKind kind = OptimizerKind::kAdamW;
  float grad_multiplier = 1;  // clip_coefficient / grad_scale
  float lr = 0;
  float beta1 = 0, one_minus_beta1 = 0;
  float beta2 = 0, one_minus_beta2 = 0;
  float eps = 0;
  float weight_decay = 0;
  float decay_factor = 1;        // AdamW, Lion: 1 - lr * weight_decay
  float step_size = 0;           // Adam(W): lr / (1 - beta1^t)
  float inverse_bias2_sqrt = 1;  // Adam(W): 1 / sqrt(1 - beta2^t)
  float momentum = 0;
  bool nesterov = false;
  bool first_step = false;  // SGD: the buffer starts as the gradient
};

// `step` is the expert's own update count including this one (>= 1).
UpdateScalars MakeUpdateScalars(OptimizerKind kind, const HyperParams& params, uint64_t step,
                                float grad_scale, float clip_coefficient);

}  // namespace ecss
