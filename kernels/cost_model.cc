#include "kernels/cost_model.h"

namespace ecss {
namespace {

double WeightBytes(const GroupedFfnProblem& p) {
  return static_cast<double>(p.num_groups) *
         (static_cast<double>(p.d_model) * p.d_in() + static_cast<double>(p.d_ff) * p.d_model) *
         DTypeSize(p.dtype);
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
  const double e = DTypeSize(p.dtype);
  OpCost cost;
  cost.compute_dtype = p.dtype;
  cost.flops = FfnForwardGemmFlops(p);
  // Weights once; x read, h written (fp32) and read by the activation, a written and read, y
  // written.
  cost.bytes =
      WeightBytes(p) + p.rows * (2.0 * p.d_model * e + 2.0 * p.d_in() * 4 + 2.0 * p.d_ff * e);
  cost.launches = 2 * p.num_groups + 1;  // two GEMMs per expert, one activation kernel
  return cost;
}

OpCost FfnBackwardCost(const GroupedFfnProblem& p) {
  const double e = DTypeSize(p.dtype);
  OpCost cost;
  cost.compute_dtype = p.dtype;
  cost.flops = FfnBackwardGemmFlops(p);
  const double dw_bytes =
      2.0 * 4 * static_cast<double>(p.num_groups) *
      (static_cast<double>(p.d_model) * p.d_in() + static_cast<double>(p.d_ff) * p.d_model);
  // Weights twice (dA and dX), dW read-modify-written, x and dy read twice, dx written, h read,
  // dA written and dH read twice.
  cost.bytes = 2 * WeightBytes(p) + dw_bytes +
               p.rows * (5.0 * p.d_model * e + p.d_in() * 4.0 + 3.0 * p.d_in() * e);
  cost.launches = 4 * p.num_groups + 1;
  if (p.saved == SavedActivation::kRecompute) {
    cost.launches += p.num_groups;
    cost.bytes += WeightBytes(p) + p.rows * (p.d_model * e + p.d_in() * 4.0);
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
