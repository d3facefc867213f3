// The expert compute ops of one sparse layer (DESIGN.md section 3), described independently of
// where they run: the problem (shapes, dtypes, per-expert row counts from the host-side routing
// plan), the arguments (device pointers), and the checks every implementation shares.
//
// Each op follows can-implement -> workspace bytes -> run (CUTLASS's shape): the checks here
// run before anything is enqueued, workspace is the caller's (aligned to kWorkspaceAlignment),
// and run never allocates and never synchronises. Errors, each with a message naming the
// field:
//   InvalidArgument     shapes that do not fit together; counts that do not sum to the rows;
//                       null pointers where data is required
//   Unimplemented       a dtype the op does not support
//   ResourceExhausted   a workspace smaller than the op needs
//   FailedPrecondition  a workspace or operand that is not aligned as required
// Layouts are row-major. Host arrays in a problem or args (offsets, per-expert pointer tables)
// are read when the op is enqueued and may be released when the call returns.
// C++17 (nvcc sees it); plain values, thread-compatible.
#pragma once

#include <cstdint>
#include <string_view>

#include "runtime/base/dtype.h"
#include "runtime/base/status.h"

namespace ecss {

inline constexpr uint64_t kWorkspaceAlignment = 256;

enum class Activation : uint8_t {
  kGelu,    // gelu(h) = h * Phi(h), the exact (erf) form; W_in is [d_model, d_ff]
  kSwiGlu,  // silu(a) * b with [a | b] = h; W_in is [d_model, 2 * d_ff], a first
};
std::string_view ActivationName(Activation activation);  // "gelu", "swiglu"
StatusOr<Activation> ParseActivation(std::string_view name);

// What backward uses for the pre-activation h = x W_in.
enum class SavedActivation : uint8_t {
  kKeep,       // forward writes h to args.saved; backward reads it (memory: rows * d_in * 4 B)
  kRecompute,  // backward recomputes h from x (one more GEMM; no memory between the passes)
};

// Caller-provided scratch memory on the op's device.
struct Workspace {
  void* data = nullptr;
  uint64_t bytes = 0;
};

// One grouped FFN call: Y_g = act(X_g W_in_g) W_out_g for each active expert g, where X_g is
// rows [offsets[g], offsets[g+1]) of X (tokens sorted by expert; see TokenPermutation).
// Accumulation is fp32. With dtype bf16, X, weights, Y and dX are bf16; the activation and the
// activation gradient are rounded to bf16 before the GEMM that reads them (as a device's bf16
// GEMM operands are); h, dW are fp32.
struct GroupedFfnProblem {
  uint32_t d_model = 0;
  uint32_t d_ff = 0;
  Activation activation = Activation::kGelu;
  DType dtype = DType::kF32;  // kF32 or kBF16
  SavedActivation saved = SavedActivation::kKeep;
  uint32_t num_groups = 0;                  // active experts, >= 1
  const uint32_t* group_offsets = nullptr;  // host [num_groups + 1], non-decreasing, [0] == 0
  uint32_t rows = 0;                        // rows of X; must equal group_offsets[num_groups]

  uint32_t d_in() const { return activation == Activation::kSwiGlu ? 2 * d_ff : d_ff; }
  uint32_t group_rows(uint32_t g) const { return group_offsets[g + 1] - group_offsets[g]; }
};

struct FfnForwardArgs {
  const void* x = nullptr;             // [rows, d_model] dtype
  const void* const* w_in = nullptr;   // host [num_groups] -> [d_model, d_in] dtype
  const void* const* w_out = nullptr;  // host [num_groups] -> [d_ff, d_model] dtype
  void* y = nullptr;                   // [rows, d_model] dtype
  float* saved = nullptr;              // [rows, d_in]: required with kKeep, ignored otherwise
};

struct FfnBackwardArgs {
  const void* x = nullptr;             // forward's input, [rows, d_model] dtype
  const void* const* w_in = nullptr;   // host [num_groups] -> [d_model, d_in] dtype
  const void* const* w_out = nullptr;  // host [num_groups] -> [d_ff, d_model] dtype
  const float* saved = nullptr;        // kKeep: what forward wrote, [rows, d_in]
  const void* dy = nullptr;            // [rows, d_model] dtype
  void* dx = nullptr;                  // [rows, d_model] dtype
  float* const* dw_in = nullptr;       // host [num_groups] -> [d_model, d_in] fp32
  float* const* dw_out = nullptr;      // host [num_groups] -> [d_ff, d_model] fp32
  // dW += the gradient (accumulation over micro-batches) instead of dW = the gradient.
  bool accumulate = false;
};

// The row order of a sparse layer (router/routing_plan.h's LayerPlan, as kernels see it: this
// folder does not depend on router/). Slot = token * k + choice; rows are slots sorted by expert.
// Arrays are in the op's device memory.
struct TokenPermutation {
  uint32_t num_tokens = 0;
  uint32_t k = 0;
  const uint32_t* row_to_slot = nullptr;  // [num_tokens * k]
  const uint32_t* slot_to_row = nullptr;  // [num_tokens * k]
  const float* row_weights = nullptr;     // [num_tokens * k] combine weight of each row

  uint32_t rows() const { return num_tokens * k; }
};

// Permute:  dst[r] = src[row_to_slot[r] / k]           (* row_weights[r] when scaled)
// Combine:  dst[t] = sum over j < k of src[slot_to_row[t*k + j]]
//                                                     (* row_weights[that row] when weighted)
// Combine sums in choice order in fp32, so it is deterministic. The backward of Permute is an
// unweighted Combine; the backward of a weighted Combine is a scaled Permute.
struct RowsOp {
  uint32_t width = 0;  // elements per row (d_model)
  DType dtype = DType::kF32;
  bool use_weights = false;
};

// Per-group sum of squares of fp32 gradients, accumulated in fp64 in a fixed order.
struct SumOfSquaresArgs {
  uint32_t num_groups = 0;
  const float* const* grads = nullptr;  // host [num_groups] -> device arrays
  const uint64_t* counts = nullptr;     // host [num_groups] elements of each
  double* out = nullptr;                // device [num_groups]
};

// ---- Checks shared by every implementation ------------------------------------------------
Status CheckFfnProblem(const GroupedFfnProblem& problem);
Status CheckFfnForwardArgs(const GroupedFfnProblem& problem, const FfnForwardArgs& args);
Status CheckFfnBackwardArgs(const GroupedFfnProblem& problem, const FfnBackwardArgs& args);
Status CheckRowsOp(const TokenPermutation& permutation, const RowsOp& op, const void* src,
                   const void* dst);
Status CheckCast(const void* src, DType src_dtype, const void* dst, DType dst_dtype);
Status CheckSumOfSquares(const SumOfSquaresArgs& args);
// ResourceExhausted when smaller than `needed`, FailedPrecondition when misaligned.
Status CheckWorkspace(const Workspace& workspace, uint64_t needed, std::string_view op);

inline uint64_t AlignWorkspace(uint64_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

}  // namespace ecss
