#include "kernels/cpu/cpu_kernels.h"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/cpu/activation.h"
#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

void UseSingleThreadedBlas() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

// C[m, n] = op(A) op(B) + beta C, row-major. With k == 0 the product is empty: C = beta C.
void Sgemm(bool trans_a, bool trans_b, uint32_t m, uint32_t n, uint32_t k, const float* a,
           uint32_t lda, const float* b, uint32_t ldb, float beta, float* c, uint32_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0) {
      for (uint32_t i = 0; i < m; ++i) std::memset(c + uint64_t{i} * ldc, 0, n * sizeof(float));
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), 1.0f, a, static_cast<blasint>(lda), b,
              static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

// A block of a weight matrix as sgemm reads it: contiguous fp32 in `scratch` (its leading
// dimension is the block's width), or the fp32 weights in place where they are contiguous.
struct Block {
  const float* data;
  uint32_t ld;
};

// Columns [c0, c0 + cols) of a [rows, ld] matrix.
Block ColumnBlock(const void* w, DType dtype, uint32_t rows, uint32_t ld, uint32_t c0,
                  uint32_t cols, float* scratch) {
  // fp32 is gathered too: sgemm reading a narrow block of a wide matrix in place (a row
  // stride of 16 KiB and more) ran 25% slower than on the contiguous copy.
  for (uint32_t r = 0; r < rows; ++r) {
    ConvertToF32(static_cast<const char*>(w) + (uint64_t{r} * ld + c0) * DTypeSize(dtype), dtype,
                 scratch + uint64_t{r} * cols, cols);
  }
  return {scratch, cols};
}

// Rows [r0, r0 + count) of a [*, ld] matrix.
Block RowBlock(const void* w, DType dtype, uint32_t ld, uint32_t r0, uint32_t count,
               float* scratch) {
  if (dtype == DType::kF32) return {static_cast<const float*>(w) + uint64_t{r0} * ld, ld};
  ConvertBf16ToF32(static_cast<const BFloat16*>(w) + uint64_t{r0} * ld, scratch,
                   uint64_t{count} * ld);
  return {scratch, ld};
}

// Carves a workspace into aligned regions.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  float* Take(uint64_t floats) {
    float* region = base_ == nullptr ? nullptr : reinterpret_cast<float*>(base_ + used_);
    used_ += AlignWorkspace(floats * sizeof(float));
    return region;
  }
  uint64_t used() const { return used_; }

 private:
  char* base_;
  uint64_t used_ = 0;
};

// The fp32 buffers one FFN call works in. Built once to size the workspace (base == null) and
// once to carve it, so the two can never disagree.
struct FfnBuffers {
  const float* x = nullptr;   // [rows, d_model]
  const float* dy = nullptr;  // [rows, d_model] (backward)
  float* h = nullptr;         // [rows, d_in]
  float* a = nullptr;         // [rows, d_ff]
  float* dh = nullptr;        // [rows, d_in] (backward)
  float* out = nullptr;       // y or dx, [rows, d_model]
  float* scratch = nullptr;   // [slots, scratch_floats]
  uint64_t scratch_floats = 0;
  uint64_t bytes = 0;
};

uint32_t TileCount(uint32_t extent, uint32_t tile) { return (extent + tile - 1) / tile; }

// One unit of parallel work: a tile of columns (or rows) `tile` of group `group`.
struct Item {
  uint32_t group;
  uint32_t tile;
  uint32_t kind;  // backward phase 2: 0 dW_out, 1 dW_in, 2 dX
};

}  // namespace

struct CpuKernels::Impl {
  CpuKernelOptions options;
  mutable tbb::task_arena arena;  // execute() is non-const; the arena is shared by design

  explicit Impl(const CpuKernelOptions& opts) : options(opts), arena(opts.threads) {}

  int slots() const { return options.threads; }
  uint32_t tile() const { return options.tile_columns; }

  FfnBuffers Layout(const GroupedFfnProblem& p, bool backward, void* base, const void* x,
                    const void* dy, float* saved, void* out) const {
    const uint64_t rows = p.rows;
    const bool bf16 = p.dtype == DType::kBF16;
    Carver carve(base);
    FfnBuffers b;
    b.x = bf16 ? carve.Take(rows * p.d_model) : static_cast<const float*>(x);
    if (backward) b.dy = bf16 ? carve.Take(rows * p.d_model) : static_cast<const float*>(dy);
    b.h = p.saved == SavedActivation::kKeep ? saved : carve.Take(rows * p.d_in());
    b.a = carve.Take(rows * p.d_ff);
    if (backward) b.dh = carve.Take(rows * p.d_in());
    b.out = bf16 ? carve.Take(rows * p.d_model) : static_cast<float*>(out);
    // The widest weight block a tile gathers: two column blocks of W_in (both SwiGLU halves),
    // a column block of W_out, or (bf16) a row block of W_out or W_in.
    // (a tile is never wider than the widest matrix it cuts)
    const uint32_t widest_tile = std::min(tile(), std::max(p.d_model, p.d_in()));
    b.scratch_floats = uint64_t{widest_tile} * std::max({2u * p.d_model, p.d_ff, p.d_in()});
    b.scratch = carve.Take(b.scratch_floats * slots());
    b.bytes = carve.used();
    return b;
  }

  float* Scratch(const FfnBuffers& b) const {
    if (b.scratch == nullptr) return nullptr;
    const int slot = tbb::this_task_arena::current_thread_index();
    ECSS_CHECK(slot >= 0 && slot < slots()) << "scratch slot " << slot;
    return b.scratch + static_cast<uint64_t>(slot) * b.scratch_floats;
  }

  template <typename Fn>
  void ParallelItems(const std::vector<Item>& items, const Fn& fn) const {
    arena.execute([&] {
      tbb::parallel_for(tbb::blocked_range<size_t>(0, items.size(), 1),
                        [&](const tbb::blocked_range<size_t>& range) {
                          for (size_t i = range.begin(); i != range.end(); ++i) fn(items[i]);
                        });
    });
  }

  template <typename Fn>
  void ParallelRows(uint64_t count, uint64_t grain, const Fn& fn) const {
    arena.execute([&] {
      tbb::parallel_for(
          tbb::blocked_range<uint64_t>(0, count, grain),
          [&](const tbb::blocked_range<uint64_t>& range) { fn(range.begin(), range.end()); });
    });
  }

  void WidenRows(const void* src, float* dst, uint64_t elements) const {
    ParallelRows(elements, uint64_t{1} << 16, [&](uint64_t begin, uint64_t end) {
      ConvertBf16ToF32(static_cast<const BFloat16*>(src) + begin, dst + begin, end - begin);
    });
  }

  // dst rows [r0, r0 + n), columns [c0, c0 + cols) of a [*, ld] bf16 matrix from fp32.
  static void NarrowBlock(const float* src, BFloat16* dst, uint64_t ld, uint32_t r0, uint32_t n,
                          uint32_t c0, uint32_t cols) {
    for (uint64_t r = r0; r < uint64_t{r0} + n; ++r) {
      ConvertF32ToBf16(src + r * ld + c0, dst + r * ld + c0, cols);
    }
  }

  // h[:, c0:c0+cols] (and the SwiGLU b half) of group g.
  void ComputeH(const GroupedFfnProblem& p, const FfnBuffers& b, const void* w_in, uint32_t g,
                uint32_t c0, uint32_t cols, float* scratch) const {
    const uint32_t r0 = p.group_offsets[g];
    const uint32_t n = p.group_rows(g);
    const uint32_t d_in = p.d_in();
    const float* x = b.x + uint64_t{r0} * p.d_model;
    float* h = b.h + uint64_t{r0} * d_in;
    const Block wa = ColumnBlock(w_in, p.dtype, p.d_model, d_in, c0, cols, scratch);
    Sgemm(false, false, n, cols, p.d_model, x, p.d_model, wa.data, wa.ld, 0, h + c0, d_in);
    if (p.activation == Activation::kSwiGlu) {
      float* scratch_b = scratch == nullptr ? nullptr : scratch + uint64_t{p.d_model} * cols;
      const Block wb = ColumnBlock(w_in, p.dtype, p.d_model, d_in, p.d_ff + c0, cols, scratch_b);
      Sgemm(false, false, n, cols, p.d_model, x, p.d_model, wb.data, wb.ld, 0, h + p.d_ff + c0,
            d_in);
    }
  }

  // a[:, c0:c0+cols] of group g from h.
  static void Activate(const GroupedFfnProblem& p, const FfnBuffers& b, uint32_t g, uint32_t c0,
                       uint32_t cols) {
    const uint32_t d_in = p.d_in();
    for (uint32_t r = p.group_offsets[g]; r < p.group_offsets[g + 1]; ++r) {
      const float* h = b.h + uint64_t{r} * d_in;
      float* a = b.a + uint64_t{r} * p.d_ff + c0;
      if (p.activation == Activation::kGelu) {
        cpu::GeluForward(h + c0, a, cols);
      } else {
        cpu::SwiGluForward(h + c0, h + p.d_ff + c0, a, cols);
      }
      if (p.dtype == DType::kBF16) cpu::RoundToBf16(a, cols);
    }
  }

  std::vector<Item> GroupTiles(const GroupedFfnProblem& p, uint32_t extent, bool skip_empty,
                               uint32_t kind) const {
    std::vector<Item> items;
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      if (skip_empty && p.group_rows(g) == 0) continue;
      for (uint32_t t = 0; t < TileCount(extent, tile()); ++t) items.push_back({g, t, kind});
    }
    return items;
  }

  uint32_t TileWidth(uint32_t t, uint32_t extent) const {
    return std::min(tile(), extent - t * tile());
  }
};

StatusOr<std::unique_ptr<CpuKernels>> CpuKernels::Create(const CpuKernelOptions& options) {
  CpuKernelOptions resolved = options;
  if (resolved.threads < 0) {
    return InvalidArgumentError(StrCat("CpuKernelOptions.threads is ", resolved.threads));
  }
  if (resolved.threads == 0) {
    resolved.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  if (resolved.tile_columns == 0 || resolved.tile_columns % 16 != 0) {
    return InvalidArgumentError(StrCat("CpuKernelOptions.tile_columns is ", resolved.tile_columns,
                                       ", must be a multiple of 16"));
  }
  UseSingleThreadedBlas();
  return std::unique_ptr<CpuKernels>(new CpuKernels(std::make_unique<Impl>(resolved)));
}

CpuKernels::CpuKernels(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CpuKernels::~CpuKernels() = default;

int CpuKernels::threads() const { return impl_->options.threads; }

uint64_t CpuKernels::FfnForwardWorkspaceBytes(const GroupedFfnProblem& problem) const {
  return impl_->Layout(problem, false, nullptr, nullptr, nullptr, nullptr, nullptr).bytes;
}

uint64_t CpuKernels::FfnBackwardWorkspaceBytes(const GroupedFfnProblem& problem) const {
  return impl_->Layout(problem, true, nullptr, nullptr, nullptr, nullptr, nullptr).bytes;
}

Status CpuKernels::FfnForward(const GroupedFfnProblem& p, const FfnForwardArgs& args,
                              const Workspace& workspace) const {
  ECSS_RETURN_IF_ERROR(CheckFfnForwardArgs(p, args));
  ECSS_RETURN_IF_ERROR(
      CheckWorkspace(workspace, FfnForwardWorkspaceBytes(p), "grouped FFN forward"));
  if (p.rows == 0) return Status::Ok();
  const Impl& impl = *impl_;
  const FfnBuffers b = impl.Layout(p, false, workspace.data, args.x, nullptr, args.saved, args.y);
  const bool bf16 = p.dtype == DType::kBF16;
  if (bf16) impl.WidenRows(args.x, const_cast<float*>(b.x), uint64_t{p.rows} * p.d_model);

  // Phase 1: h = x W_in and a = act(h), per (expert, column tile of d_ff).
  impl.ParallelItems(impl.GroupTiles(p, p.d_ff, true, 0), [&](const Item& item) {
    const uint32_t c0 = item.tile * impl.tile();
    const uint32_t cols = impl.TileWidth(item.tile, p.d_ff);
    impl.ComputeH(p, b, args.w_in[item.group], item.group, c0, cols, impl.Scratch(b));
    Impl::Activate(p, b, item.group, c0, cols);
  });
  // Phase 2: y = a W_out, per (expert, column tile of d_model).
  impl.ParallelItems(impl.GroupTiles(p, p.d_model, true, 0), [&](const Item& item) {
    const uint32_t g = item.group;
    const uint32_t r0 = p.group_offsets[g];
    const uint32_t n = p.group_rows(g);
    const uint32_t c0 = item.tile * impl.tile();
    const uint32_t cols = impl.TileWidth(item.tile, p.d_model);
    const Block w =
        ColumnBlock(args.w_out[g], p.dtype, p.d_ff, p.d_model, c0, cols, impl.Scratch(b));
    Sgemm(false, false, n, cols, p.d_ff, b.a + uint64_t{r0} * p.d_ff, p.d_ff, w.data, w.ld, 0,
          b.out + uint64_t{r0} * p.d_model + c0, p.d_model);
    if (bf16) {
      Impl::NarrowBlock(b.out, static_cast<BFloat16*>(args.y), p.d_model, r0, n, c0, cols);
    }
  });
  return Status::Ok();
}

Status CpuKernels::FfnBackward(const GroupedFfnProblem& p, const FfnBackwardArgs& args,
                               const Workspace& workspace) const {
  ECSS_RETURN_IF_ERROR(CheckFfnBackwardArgs(p, args));
  ECSS_RETURN_IF_ERROR(
      CheckWorkspace(workspace, FfnBackwardWorkspaceBytes(p), "grouped FFN backward"));
  const Impl& impl = *impl_;
  const FfnBuffers b = impl.Layout(p, true, workspace.data, args.x, args.dy,
                                   const_cast<float*>(args.saved), args.dx);
  const bool bf16 = p.dtype == DType::kBF16;
  const uint32_t d_in = p.d_in();
  if (bf16 && p.rows > 0) {
    impl.WidenRows(args.x, const_cast<float*>(b.x), uint64_t{p.rows} * p.d_model);
    impl.WidenRows(args.dy, const_cast<float*>(b.dy), uint64_t{p.rows} * p.d_model);
  }

  // Phase 1, per (expert, column tile of d_ff): h again if recomputing, a = act(h),
  // dA = dy W_out^T (into dh's first half), dh = dA * act'(h).
  impl.ParallelItems(impl.GroupTiles(p, p.d_ff, true, 0), [&](const Item& item) {
    const uint32_t g = item.group;
    const uint32_t r0 = p.group_offsets[g];
    const uint32_t n = p.group_rows(g);
    const uint32_t c0 = item.tile * impl.tile();
    const uint32_t cols = impl.TileWidth(item.tile, p.d_ff);
    float* scratch = impl.Scratch(b);
    if (p.saved == SavedActivation::kRecompute) {
      impl.ComputeH(p, b, args.w_in[g], g, c0, cols, scratch);
    }
    Impl::Activate(p, b, g, c0, cols);
    const Block w_rows = RowBlock(args.w_out[g], p.dtype, p.d_model, c0, cols, scratch);
    Sgemm(false, true, n, cols, p.d_model, b.dy + uint64_t{r0} * p.d_model, p.d_model, w_rows.data,
          w_rows.ld, 0, b.dh + uint64_t{r0} * d_in + c0, d_in);
    for (uint64_t r = r0; r < uint64_t{r0} + n; ++r) {
      const float* h = b.h + r * d_in;
      float* dh = b.dh + r * d_in;
      if (p.activation == Activation::kGelu) {
        cpu::GeluBackward(h + c0, dh + c0, cols);
      } else {
        cpu::SwiGluBackward(h + c0, h + p.d_ff + c0, dh + c0, dh + p.d_ff + c0, cols);
        if (bf16) cpu::RoundToBf16(dh + p.d_ff + c0, cols);
      }
      if (bf16) cpu::RoundToBf16(dh + c0, cols);
    }
  });

  // Phase 2: dW_out = a^T dy (row tiles of d_ff), dW_in = x^T dh (column tiles of d_in), and
  // dx = dh W_in^T (column tiles of d_model). Empty experts still get dW (zero, or unchanged
  // when accumulating).
  std::vector<Item> items = impl.GroupTiles(p, p.d_ff, false, 0);
  for (const Item& item : impl.GroupTiles(p, d_in, false, 1)) items.push_back(item);
  for (const Item& item : impl.GroupTiles(p, p.d_model, true, 2)) items.push_back(item);
  const float beta = args.accumulate ? 1.0f : 0.0f;
  impl.ParallelItems(items, [&](const Item& item) {
    const uint32_t g = item.group;
    const uint32_t r0 = p.group_offsets[g];
    const uint32_t n = p.group_rows(g);
    const uint32_t c0 = item.tile * impl.tile();
    if (item.kind == 0) {
      const uint32_t count = impl.TileWidth(item.tile, p.d_ff);
      Sgemm(true, false, count, p.d_model, n, b.a + uint64_t{r0} * p.d_ff + c0, p.d_ff,
            b.dy + uint64_t{r0} * p.d_model, p.d_model, beta,
            args.dw_out[g] + uint64_t{c0} * p.d_model, p.d_model);
    } else if (item.kind == 1) {
      const uint32_t cols = impl.TileWidth(item.tile, d_in);
      Sgemm(true, false, p.d_model, cols, n, b.x + uint64_t{r0} * p.d_model, p.d_model,
            b.dh + uint64_t{r0} * d_in + c0, d_in, beta, args.dw_in[g] + c0, d_in);
    } else {
      const uint32_t cols = impl.TileWidth(item.tile, p.d_model);
      const Block w_rows = RowBlock(args.w_in[g], p.dtype, d_in, c0, cols, impl.Scratch(b));
      Sgemm(false, true, n, cols, d_in, b.dh + uint64_t{r0} * d_in, d_in, w_rows.data, w_rows.ld, 0,
            b.out + uint64_t{r0} * p.d_model + c0, p.d_model);
      if (bf16) {
        Impl::NarrowBlock(b.out, static_cast<BFloat16*>(args.dx), p.d_model, r0, n, c0, cols);
      }
    }
  });
  return Status::Ok();
}

namespace {

// Rows are moved `kChunk` elements at a time through an fp32 buffer on the stack, so one path
// serves both dtypes and bf16 results are rounded once.
constexpr uint32_t kChunk = 256;

void LoadChunk(const void* src, DType dtype, uint64_t offset, uint32_t count, float* out) {
  ConvertToF32(static_cast<const char*>(src) + offset * DTypeSize(dtype), dtype, out, count);
}

void StoreChunk(const float* in, DType dtype, uint64_t offset, uint32_t count, void* dst) {
  ConvertFromF32(in, static_cast<char*>(dst) + offset * DTypeSize(dtype), dtype, count);
}

}  // namespace

Status CpuKernels::Permute(const TokenPermutation& perm, const RowsOp& op, const void* src,
                           void* dst) const {
  ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
  impl_->ParallelRows(perm.rows(), 64, [&](uint64_t begin, uint64_t end) {
    float chunk[kChunk];
    for (uint64_t r = begin; r < end; ++r) {
      const uint64_t token = perm.row_to_slot[r] / perm.k;
      const float scale = op.use_weights ? perm.row_weights[r] : 1.0f;
      for (uint32_t c0 = 0; c0 < op.width; c0 += kChunk) {
        const uint32_t count = std::min(kChunk, op.width - c0);
        LoadChunk(src, op.dtype, token * op.width + c0, count, chunk);
        if (op.use_weights) {
          for (uint32_t i = 0; i < count; ++i) chunk[i] *= scale;
        }
        StoreChunk(chunk, op.dtype, r * op.width + c0, count, dst);
      }
    }
  });
  return Status::Ok();
}

Status CpuKernels::Combine(const TokenPermutation& perm, const RowsOp& op, const void* src,
                           void* dst) const {
  ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
  impl_->ParallelRows(perm.num_tokens, 16, [&](uint64_t begin, uint64_t end) {
    float sum[kChunk];
    float term[kChunk];
    for (uint64_t t = begin; t < end; ++t) {
      for (uint32_t c0 = 0; c0 < op.width; c0 += kChunk) {
        const uint32_t count = std::min(kChunk, op.width - c0);
        for (uint32_t j = 0; j < perm.k; ++j) {
          const uint64_t row = perm.slot_to_row[t * perm.k + j];
          const float weight = op.use_weights ? perm.row_weights[row] : 1.0f;
          LoadChunk(src, op.dtype, row * op.width + c0, count, term);
          for (uint32_t i = 0; i < count; ++i) {
            sum[i] = j == 0 ? weight * term[i] : sum[i] + weight * term[i];
          }
        }
        StoreChunk(sum, op.dtype, t * op.width + c0, count, dst);
      }
    }
  });
  return Status::Ok();
}

Status CpuKernels::Cast(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                        uint64_t count) const {
  if (count == 0) return Status::Ok();
  ECSS_RETURN_IF_ERROR(CheckCast(src, src_dtype, dst, dst_dtype));
  impl_->ParallelRows(count, uint64_t{1} << 16, [&](uint64_t begin, uint64_t end) {
    if (src_dtype == DType::kF32) {
      ConvertF32ToBf16(static_cast<const float*>(src) + begin, static_cast<BFloat16*>(dst) + begin,
                       end - begin);
    } else {
      ConvertBf16ToF32(static_cast<const BFloat16*>(src) + begin, static_cast<float*>(dst) + begin,
                       end - begin);
    }
  });
  return Status::Ok();
}

Status CpuKernels::SumOfSquares(const SumOfSquaresArgs& args) const {
  ECSS_RETURN_IF_ERROR(CheckSumOfSquares(args));
  impl_->ParallelRows(args.num_groups, 1, [&](uint64_t begin, uint64_t end) {
    for (uint64_t g = begin; g < end; ++g) {
      // Eight lanes in a fixed order, then a fixed-order fold: deterministic and vectorisable.
      double lanes[8] = {};
      const float* grad = args.grads[g];
      const uint64_t count = args.counts[g];
      uint64_t i = 0;
      for (; i + 8 <= count; i += 8) {
        for (int l = 0; l < 8; ++l) lanes[l] += double{grad[i + l]} * grad[i + l];
      }
      for (; i < count; ++i) lanes[i % 8] += double{grad[i]} * grad[i];
      args.out[g] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                    ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
  });
  return Status::Ok();
}

}  // namespace ecss
