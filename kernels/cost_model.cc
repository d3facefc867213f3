#include "kernels/cost_model.h"

namespace ecss {
namespace {

// Groups with rows: the CUDA kernels launch nothing for a group without rows (its GEMMs have
// m == 0), except the backward's zeroing of its weight gradients.
uint32_t BusyGroups(const GroupedFfnProblem& p) {
  if (p.group_offsets == nullptr) return p.num_groups;
  uint32_t busy = 0;
  for (uint32_t g = 0; g < p.num_groups; ++g) busy += p.group_rows(g) > 0 ? 1 : 0;
  return busy;
}

// One expert's weights (w_in and w_out), in elements.
double ExpertElements(const GroupedFfnProblem& p) {
  return static_cast<double>(p.d_model) * p.d_in() + static_cast<double>(p.d_ff) * p.d_model;
}

}  // namespace

double FfnForwardGemmFlops(const GroupedFfnProblem& p) {
  return 2.0 * p.rows * p.d_model * (static_cast<double>(p.d_in()) + p.d_ff);
}

double FfnBackwardGemmFlops(const GroupedFfnProblem& p) {
  // dA = dY W_out^T, dW_out = A^T dY, dW_in = X^T dH, dX = dH W_in^T, and h again when
  // recomputing.
  double flops = 2.0 * p.rows * p.d_model * (2.0 * p.d_ff + 2.0 * p.d_in());
  if (p.saved == SavedActivation::kRecompute) flops += 2.0 * p.rows * p.d_model * p.d_in();
  return flops;
}

OpCost FfnForwardCost(const GroupedFfnProblem& p) {
  OpCost cost;
  cost.compute_dtype = p.dtype;
  if (p.rows == 0) return cost;  // nothing launched
  const double e = DTypeSize(p.dtype);
  const uint32_t busy = BusyGroups(p);
  cost.flops = FfnForwardGemmFlops(p);
  // The busy experts' weights once; x read, h written (fp32) and read by the activation, a
  // written and read, y written.
  cost.bytes = busy * ExpertElements(p) * e +
               p.rows * (2.0 * p.d_model * e + 2.0 * p.d_in() * 4 + 2.0 * p.d_ff * e);
  cost.launches = 2 * busy + 1;  // two GEMMs per busy expert, one activation kernel
  return cost;
}

OpCost FfnBackwardCost(const GroupedFfnProblem& p, bool accumulate) {
  const double e = DTypeSize(p.dtype);
  const uint32_t busy = BusyGroups(p);
  const uint32_t idle = p.num_groups - busy;
  OpCost cost;
  cost.compute_dtype = p.dtype;
  cost.flops = FfnBackwardGemmFlops(p);
  // A busy expert: four GEMMs (dA, dW_out, dW_in, dx), its weights read twice (dA and dx)
  // and its fp32 weight gradients read-modify-written. An idle one: its weight gradients
  // zeroed (two memsets) unless accumulating, when nothing runs.
  cost.launches = 4 * busy + (accumulate ? 0 : 2 * idle);
  cost.bytes = busy * ExpertElements(p) * (2 * e + 2.0 * 4) +
               (accumulate ? 0 : idle * ExpertElements(p) * 4.0);
  if (p.rows > 0) {
    // The activation and its gradient; x and dy read twice, dx written, h read, dA written
    // and dH read twice.
    cost.launches += 2;
    cost.bytes += p.rows * (5.0 * p.d_model * e + p.d_in() * 4.0 + 3.0 * p.d_in() * e);
    if (p.saved == SavedActivation::kRecompute) {
      cost.launches += busy;
      cost.bytes += busy * static_cast<double>(p.d_model) * p.d_in() * e +
                    p.rows * (p.d_model * e + p.d_in() * 4.0);
    }
  }
  return cost;
}

OpCost RowsOpCost(uint32_t rows, const RowsOp& op) {
  OpCost cost;
  const double n = rows;
  cost.bytes = n * (2.0 * op.width * DTypeSize(op.dtype) + 8 + (op.use_weights ? 4 : 0));
  cost.flops = op.use_weights ? n * op.width : 0;
  cost.launches = 1;
  return cost;
}

OpCost CastCost(uint64_t count) {
  OpCost cost;
  cost.bytes = static_cast<double>(count) * 6;
  cost.launches = 1;
  return cost;
}

OpCost SumOfSquaresCost(uint64_t total_count, uint32_t num_groups) {
  OpCost cost;
  cost.bytes = static_cast<double>(total_count) * 4 + num_groups * 8.0;
  cost.flops = static_cast<double>(total_count) * 2;
  cost.launches = 1;
  return cost;
}

}  // namespace ecss
