#include "optimizer/optimizer_config.h"

#include <cmath>

#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view OptimizerKindName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdamW:
      return "adamw";
    case OptimizerKind::kAdam:
      return "adam";
    case OptimizerKind::kAdagrad:
      return "adagrad";
    case OptimizerKind::kLion:
      return "lion";
    case OptimizerKind::kSgdMomentum:
      return "sgd";
  }
  return "invalid";
}

StatusOr<OptimizerKind> ParseOptimizerKind(std::string_view name) {
  for (OptimizerKind kind : {OptimizerKind::kAdamW, OptimizerKind::kAdam, OptimizerKind::kAdagrad,
                             OptimizerKind::kLion, OptimizerKind::kSgdMomentum}) {
    if (OptimizerKindName(kind) == name) return kind;
  }
  return InvalidArgumentError(
      StrCat("unknown optimizer '", name, "' (adamw, adam, adagrad, lion, sgd)"));
}

int StateArrays(OptimizerKind kind) {
  return kind == OptimizerKind::kAdamW || kind == OptimizerKind::kAdam ? 2 : 1;
}

Status ValidateHyperParams(OptimizerKind kind, const HyperParams& p) {
  auto non_negative = [](float value, std::string_view field) -> Status {
    if (!std::isfinite(value) || value < 0) {
      return InvalidArgumentError(
          StrCat("optimizer ", field, " = ", value, " must be finite and >= 0"));
    }
    return Status::Ok();
  };
  auto unit = [](float value, std::string_view field) -> Status {
    if (!(value >= 0 && value < 1)) {
      return InvalidArgumentError(StrCat("optimizer ", field, " = ", value, " must be in [0, 1)"));
    }
    return Status::Ok();
  };
  ECSS_RETURN_IF_ERROR(non_negative(p.lr, "lr"));
  ECSS_RETURN_IF_ERROR(non_negative(p.weight_decay, "weight_decay"));
  ECSS_RETURN_IF_ERROR(non_negative(p.eps, "eps"));
  // Adam(W) and Adagrad divide by sqrt(state) + eps: with eps = 0 an element whose gradients
  // have all been zero is 0 / 0, a NaN weight that no non-finite check sees coming.
  if ((kind == OptimizerKind::kAdamW || kind == OptimizerKind::kAdam ||
       kind == OptimizerKind::kAdagrad) &&
      !(p.eps > 0)) {
    return InvalidArgumentError(StrCat("optimizer eps = ", p.eps, " must be > 0 for ",
                                       OptimizerKindName(kind), " (it divides by sqrt(v) + eps)"));
  }
  if (kind == OptimizerKind::kAdamW || kind == OptimizerKind::kAdam ||
      kind == OptimizerKind::kLion) {
    ECSS_RETURN_IF_ERROR(unit(p.beta1, "beta1"));
    ECSS_RETURN_IF_ERROR(unit(p.beta2, "beta2"));
  }
  if (kind == OptimizerKind::kSgdMomentum) ECSS_RETURN_IF_ERROR(unit(p.momentum, "momentum"));
  return Status::Ok();
}

UpdateScalars MakeUpdateScalars(OptimizerKind kind, const HyperParams& p, uint64_t step,
                                float grad_scale, float clip_coefficient) {
  UpdateScalars s;
  s.kind = kind;
  s.grad_multiplier = static_cast<float>(static_cast<double>(clip_coefficient) / grad_scale);
  s.lr = p.lr;
  s.beta1 = p.beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - p.beta1);
  s.beta2 = p.beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  s.eps = p.eps;
  s.weight_decay = p.weight_decay;
  s.decay_factor = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);
  const double t = static_cast<double>(step);
  s.step_size = static_cast<float>(p.lr / (1.0 - std::pow(static_cast<double>(p.beta1), t)));
  s.inverse_bias2_sqrt =
      static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(p.beta2), t)));
  s.momentum = p.momentum;
  s.nesterov = p.nesterov;
  s.first_step = step == 1;
  return s;
}

}  // namespace ecss
