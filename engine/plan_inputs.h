// What a step plan is built from, as a session's options, memory plan and routing give it: one
// source for the executor (engine/step_executor.cc) and the planner (tools/plan), so that the
// planner builds the very plan the engine runs.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/memory_plan.h"
#include "engine/session_options.h"
#include "engine/step_plan.h"
#include "kernels/expert_ops.h"
#include "router/routing_plan.h"
#include "router/rre_router.h"
#include "runtime/base/status.h"
#include "runtime/device/device_profile.h"

namespace ecss {

// The model as the plan needs it. REQUIRES: options.Validate() passed.
PlanModel PlanModelOf(const SessionOptions& options, const MemoryPlan& memory);
// The plan's policy for a step of a session with `cache_slots` device cache slots.
PlanPolicy PlanPolicyOf(const SessionOptions& options, uint32_t cache_slots, bool evaluation);
// One layer's active experts and their rows, as the router planned them.
LayerRoute RouteOf(const LayerPlan& layer);
// A micro-batch routed by RRE: every layer's route and its routing plan's upload.
MicroBatchRoute RouteOf(const RoutingPlan& plan);
// The RRE tables of a model: every domain's group in every sparse layer, built from its seed.
StatusOr<RreRouter> RouterOf(const ModelSpec& model);

// One (micro-batch, layer)'s grouped FFN of `rows` rows (groups still to fill in).
GroupedFfnProblem FfnProblemOf(const SessionOptions& options, uint32_t rows);
// The device time of a compute op (forward or backward) of a plan: the kernels the executor
// enqueues for it (permute, grouped FFN, combine; backward: and the gradients' cast to a
// 16-bit gradient dtype; not a learned gate's optional per-choice outputs), each priced by the cost
// model on `profile`, summed. The executor's Forward and Backward must enqueue what this lists
// (PlannerTest holds the sim's timed compute busy time to it).
double ComputeOpSeconds(const SessionOptions& options, const PlanOp& op,
                        const DeviceProfile& profile);

}  // namespace ecss
