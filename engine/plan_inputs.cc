#include "engine/plan_inputs.h"

#include "kernels/cost_model.h"
#include "optimizer/optimizer_config.h"
#include "router/domain_map.h"

namespace ecss {

PlanModel PlanModelOf(const SessionOptions& options, const MemoryPlan& memory) {
  const ModelSpec& m = options.model;
  PlanModel model;
  model.d_model = m.d_model;
  model.d_ff = m.d_ff;
  model.d_in = m.d_in();
  model.params = memory.params;
  model.weight_bytes = static_cast<uint32_t>(DTypeSize(m.dtype));
  model.gradient_bytes = static_cast<uint32_t>(DTypeSize(options.gradient_dtype));
  model.state_arrays = 1 + static_cast<uint32_t>(StateArrays(options.optimizer.kind));
  model.experts_per_layer = options.ExpertsPerLayer();
  return model;
}

PlanPolicy PlanPolicyOf(const SessionOptions& options, uint32_t cache_slots, bool evaluation) {
  PlanPolicy p;
  p.strategy = options.strategy;
  p.learned_gate = options.routing == Routing::kLearnedGate;
  p.delayed_update = options.delayed_update;
  p.deferred_updates =
      options.optimizer.max_grad_norm > 0 || options.optimizer.skip_step_on_nonfinite;
  p.states_on_nvme = options.placement.states_on_nvme();
  p.weights_on_nvme = options.placement.weights_on_nvme();
  p.cache_slots = cache_slots;
  p.evaluation = evaluation;
  return p;
}

LayerRoute RouteOf(const LayerPlan& layer) {
  LayerRoute route;
  route.experts.assign(layer.active_experts, layer.active_experts + layer.num_active);
  for (uint32_t a = 0; a < layer.num_active; ++a) route.rows.push_back(layer.count(a));
  return route;
}

MicroBatchRoute RouteOf(const RoutingPlan& plan) {
  MicroBatchRoute route;
  route.tokens = plan.num_tokens();
  route.plan_bytes = plan.bytes();
  for (uint32_t l = 0; l < plan.num_layers(); ++l) route.layers.push_back(RouteOf(plan.layer(l)));
  return route;
}

StatusOr<RreRouter> RouterOf(const ModelSpec& model) {
  ECSS_ASSIGN_OR_RETURN(DomainMap map, DomainMap::Create(model.layers));
  for (uint32_t d = 0; d < model.domains.size(); ++d) {
    ECSS_RETURN_IF_ERROR(
        map.AddDomainUniform(model.domains[d].name, model.DomainId(d), model.domains[d].experts));
  }
  return RreRouter::Create(map, {model.vocab, model.seed, model.builder});
}

GroupedFfnProblem FfnProblemOf(const SessionOptions& options, uint32_t rows) {
  GroupedFfnProblem p;
  p.d_model = options.model.d_model;
  p.d_ff = options.model.d_ff;
  p.activation = options.model.activation;
  p.dtype = options.model.dtype;
  p.saved = SavedActivation::kRecompute;
  p.rows = rows;
  return p;
}

double ComputeOpSeconds(const SessionOptions& options, const PlanOp& op,
                        const DeviceProfile& profile) {
  const ModelSpec& m = options.model;
  std::vector<uint32_t> offsets = {0};
  for (uint32_t rows : op.rows) offsets.push_back(offsets.back() + rows);
  GroupedFfnProblem p = FfnProblemOf(options, offsets.back());
  p.num_groups = static_cast<uint32_t>(op.experts.size());
  p.group_offsets = offsets.data();
  // Rows of the layer: its tokens times the choices per token (the permutation's rows).
  const uint32_t rows = offsets.back();
  double seconds = 0;
  if (op.kind == OpKind::kForward) {
    seconds += ModeledSeconds(RowsOpCost(rows, {m.d_model, m.dtype, false}), profile);  // permute
    seconds += ModeledSeconds(FfnForwardCost(p), profile);
    seconds += ModeledSeconds(RowsOpCost(rows, {m.d_model, m.dtype, true}), profile);  // combine
    return seconds;
  }
  seconds += ModeledSeconds(RowsOpCost(rows, {m.d_model, m.dtype, true}), profile);  // permute dy
  seconds += ModeledSeconds(FfnBackwardCost(p), profile);
  seconds += ModeledSeconds(RowsOpCost(rows, {m.d_model, m.dtype, false}), profile);  // combine dx
  if (options.gradient_dtype != DType::kF32) {
    seconds += ModeledSeconds(CastCost(m.expert_params() * op.experts.size()), profile);
  }
  return seconds;
}

}  // namespace ecss
