// CUDA implementation of the expert ops; see cuda_kernels.h.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

Status CudaError(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return Status::Ok();
  return InternalError(StrCat(what, ": ", cudaGetErrorString(error)));
}

Status CublasError(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return InternalError(StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

cudaDataType_t CudaType(DType dtype) { return dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF; }

// ---- Element access -----------------------------------------------------------------------
__device__ inline float Load(const void* p, DType dtype, uint64_t i) {
  return dtype == DType::kF32 ? static_cast<const float*>(p)[i]
                              : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
__device__ inline void Store(void* p, DType dtype, uint64_t i, float v) {
  if (dtype == DType::kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

// ---- Rows ---------------------------------------------------------------------------------
__global__ void PermuteKernel(TokenPermutation perm, RowsOp op, const void* src, void* dst) {
  const uint64_t r = blockIdx.x;
  const uint64_t token = perm.row_to_slot[r] / perm.k;
  const float scale = op.use_weights ? perm.row_weights[r] : 1.0f;
  for (uint32_t c = threadIdx.x; c < op.width; c += blockDim.x) {
    const float v = Load(src, op.dtype, token * op.width + c);
    Store(dst, op.dtype, r * op.width + c, op.use_weights ? v * scale : v);
  }
}

__global__ void CombineKernel(TokenPermutation perm, RowsOp op, const void* src, void* dst) {
  const uint64_t t = blockIdx.x;
  for (uint32_t c = threadIdx.x; c < op.width; c += blockDim.x) {
    float sum = 0;
    for (uint32_t j = 0; j < perm.k; ++j) {
      const uint64_t row = perm.slot_to_row[t * perm.k + j];
      const float weight = op.use_weights ? perm.row_weights[row] : 1.0f;
      const float term = weight * Load(src, op.dtype, row * op.width + c);
      sum = j == 0 ? term : sum + term;
    }
    Store(dst, op.dtype, t * op.width + c, sum);
  }
}

// ---- Activations: h [rows, d_in] fp32 -> a [rows, d_ff] dtype ------------------------------
__device__ inline float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void ActivateKernel(const float* h, void* a, DType dtype, Activation act, uint64_t rows,
                               uint32_t d_ff) {
  const uint32_t d_in = act == Activation::kSwiGlu ? 2 * d_ff : d_ff;
  const uint64_t total = rows * d_ff;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t r = i / d_ff;
    const uint32_t c = static_cast<uint32_t>(i % d_ff);
    const float x = h[r * d_in + c];
    float v;
    if (act == Activation::kGelu) {
      v = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    } else {
      v = x * Sigmoid(x) * h[r * d_in + d_ff + c];
    }
    Store(a, dtype, i, v);
  }
}

// dh [rows, d_in] fp32 holds dA in its first d_ff columns; becomes dh. dh_operand gets the
// dtype copy the following GEMMs read (the same buffer for fp32).
__global__ void ActivationGradKernel(const float* h, float* dh, void* dh_operand, DType dtype,
                                     Activation act, uint64_t rows, uint32_t d_ff) {
  const uint32_t d_in = act == Activation::kSwiGlu ? 2 * d_ff : d_ff;
  const uint64_t total = rows * d_ff;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t r = i / d_ff;
    const uint32_t c = static_cast<uint32_t>(i % d_ff);
    const uint64_t at = r * d_in + c;
    const float x = h[at];
    const float da = dh[at];
    if (act == Activation::kGelu) {
      const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
      const float g = da * (cdf + x * pdf);
      dh[at] = g;
      Store(dh_operand, dtype, at, g);
    } else {
      const float s = Sigmoid(x);
      const float b = h[at + d_ff];
      const float ga = da * b * s * (1.0f + x * (1.0f - s));
      const float gb = da * x * s;
      dh[at] = ga;
      dh[at + d_ff] = gb;
      Store(dh_operand, dtype, at, ga);
      Store(dh_operand, dtype, at + d_ff, gb);
    }
  }
}

// ---- Casts and norms ----------------------------------------------------------------------
__global__ void CastKernel(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                           uint64_t count) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < count;
       i += uint64_t{gridDim.x} * blockDim.x) {
    Store(dst, dst_dtype, i, Load(src, src_dtype, i));
  }
}

constexpr int kSumThreads = 256;
constexpr uint32_t kSumGroupsPerLaunch = 256;

struct SumBatch {
  const float* grads[kSumGroupsPerLaunch];
  uint64_t counts[kSumGroupsPerLaunch];
};

// One block per group; a fixed block size and a fixed tree make the result deterministic.
__global__ void SumOfSquaresKernel(SumBatch batch, double* out) {
  __shared__ double partial[kSumThreads];
  const float* grad = batch.grads[blockIdx.x];
  const uint64_t count = batch.counts[blockIdx.x];
  double sum = 0;
  for (uint64_t i = threadIdx.x; i < count; i += kSumThreads) {
    sum += static_cast<double>(grad[i]) * grad[i];
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

unsigned GridFor(uint64_t total, unsigned threads) {
  return static_cast<unsigned>(std::min<uint64_t>((total + threads - 1) / threads, 65535));
}

uint64_t Align(uint64_t bytes) { return AlignWorkspace(bytes); }

// Device workspace of an FFN call: h (when recomputing or not kept), a, and in backward dh
// (fp32) plus its dtype copy for bf16.
struct FfnLayout {
  uint64_t h = 0, a = 0, dh = 0, dh_operand = 0, total = 0;
};

FfnLayout Layout(const GroupedFfnProblem& p, bool backward) {
  const uint64_t rows = p.rows;
  FfnLayout l;
  uint64_t at = 0;
  if (p.saved == SavedActivation::kRecompute) {
    l.h = at;
    at += Align(rows * p.d_in() * 4);
  }
  l.a = at;
  at += Align(rows * p.d_ff * DTypeSize(p.dtype));
  if (backward) {
    l.dh = at;
    at += Align(rows * p.d_in() * 4);
    l.dh_operand = l.dh;
    if (p.dtype != DType::kF32) {
      l.dh_operand = at;
      at += Align(rows * p.d_in() * DTypeSize(p.dtype));
    }
  }
  l.total = at;
  return l;
}

class CudaKernelsImpl final : public CudaKernels {
 public:
  CudaKernelsImpl(int device, cublasHandle_t handle) : device_(device), handle_(handle) {}
  ~CudaKernelsImpl() override { cublasDestroy(handle_); }

  uint64_t FfnForwardWorkspaceBytes(const GroupedFfnProblem& p) const override {
    return Layout(p, false).total;
  }
  uint64_t FfnBackwardWorkspaceBytes(const GroupedFfnProblem& p) const override {
    return Layout(p, true).total;
  }

  Status FfnForward(void* stream, const GroupedFfnProblem& p, const FfnForwardArgs& args,
                    const Workspace& ws) override {
    ECSS_RETURN_IF_ERROR(CheckFfnForwardArgs(p, args));
    ECSS_RETURN_IF_ERROR(CheckWorkspace(ws, FfnForwardWorkspaceBytes(p), "grouped FFN forward"));
    if (p.rows == 0) return Status::Ok();
    const FfnLayout l = Layout(p, false);
    char* base = static_cast<char*>(ws.data);
    float* h =
        p.saved == SavedActivation::kKeep ? args.saved : reinterpret_cast<float*>(base + l.h);
    void* a = base + l.a;
    auto s = static_cast<cudaStream_t>(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    ECSS_RETURN_IF_ERROR(Bind(s));
    const uint64_t e = DTypeSize(p.dtype);
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      ECSS_RETURN_IF_ERROR(GemmH(p, args.x, args.w_in[g], h, g));
    }
    ECSS_RETURN_IF_ERROR(Activate(s, p, h, a));
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      const uint64_t r0 = p.group_offsets[g];
      // y_g [n, d_model] = a_g [n, d_ff] W_out [d_ff, d_model]
      ECSS_RETURN_IF_ERROR(
          Gemm(false, false, p.group_rows(g), p.d_model, p.d_ff,
               static_cast<char*>(a) + r0 * p.d_ff * e, p.dtype, p.d_ff, args.w_out[g], p.dtype,
               p.d_model, 0, static_cast<char*>(args.y) + r0 * p.d_model * e, p.dtype, p.d_model));
    }
    return CudaError(cudaGetLastError(), "grouped FFN forward");
  }

  Status FfnBackward(void* stream, const GroupedFfnProblem& p, const FfnBackwardArgs& args,
                     const Workspace& ws) override {
    ECSS_RETURN_IF_ERROR(CheckFfnBackwardArgs(p, args));
    ECSS_RETURN_IF_ERROR(CheckWorkspace(ws, FfnBackwardWorkspaceBytes(p), "grouped FFN backward"));
    const FfnLayout l = Layout(p, true);
    char* base = static_cast<char*>(ws.data);
    float* h = p.saved == SavedActivation::kKeep ? const_cast<float*>(args.saved)
                                                 : reinterpret_cast<float*>(base + l.h);
    void* a = base + l.a;
    float* dh = reinterpret_cast<float*>(base + l.dh);
    void* dh_operand = base + l.dh_operand;
    auto s = static_cast<cudaStream_t>(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    ECSS_RETURN_IF_ERROR(Bind(s));
    const uint64_t e = DTypeSize(p.dtype);
    const uint32_t d_in = p.d_in();
    const float beta = args.accumulate ? 1.0f : 0.0f;
    if (p.rows > 0) {
      if (p.saved == SavedActivation::kRecompute) {
        for (uint32_t g = 0; g < p.num_groups; ++g) {
          ECSS_RETURN_IF_ERROR(GemmH(p, args.x, args.w_in[g], h, g));
        }
      }
      ECSS_RETURN_IF_ERROR(Activate(s, p, h, a));
      for (uint32_t g = 0; g < p.num_groups; ++g) {
        const uint64_t r0 = p.group_offsets[g];
        // dA_g [n, d_ff] = dy_g [n, d_model] W_out^T, into dh's first d_ff columns
        ECSS_RETURN_IF_ERROR(Gemm(false, true, p.group_rows(g), p.d_ff, p.d_model,
                                  static_cast<const char*>(args.dy) + r0 * p.d_model * e, p.dtype,
                                  p.d_model, args.w_out[g], p.dtype, p.d_model, 0, dh + r0 * d_in,
                                  DType::kF32, d_in));
      }
      ActivationGradKernel<<<GridFor(uint64_t{p.rows} * p.d_ff, 256), 256, 0, s>>>(
          h, dh, dh_operand, p.dtype, p.activation, p.rows, p.d_ff);
    }
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      const uint64_t r0 = p.group_offsets[g];
      const uint32_t n = p.group_rows(g);
      // dW_out [d_ff, d_model] = a_g^T dy_g ; dW_in [d_model, d_in] = x_g^T dh_g
      ECSS_RETURN_IF_ERROR(Gemm(true, false, p.d_ff, p.d_model, n,
                                static_cast<char*>(a) + r0 * p.d_ff * e, p.dtype, p.d_ff,
                                static_cast<const char*>(args.dy) + r0 * p.d_model * e, p.dtype,
                                p.d_model, beta, args.dw_out[g], DType::kF32, p.d_model, s));
      ECSS_RETURN_IF_ERROR(Gemm(true, false, p.d_model, d_in, n,
                                static_cast<const char*>(args.x) + r0 * p.d_model * e, p.dtype,
                                p.d_model, static_cast<char*>(dh_operand) + r0 * d_in * e, p.dtype,
                                d_in, beta, args.dw_in[g], DType::kF32, d_in, s));
      // dx_g [n, d_model] = dh_g [n, d_in] W_in^T
      ECSS_RETURN_IF_ERROR(
          Gemm(false, true, n, p.d_model, d_in, static_cast<char*>(dh_operand) + r0 * d_in * e,
               p.dtype, d_in, args.w_in[g], p.dtype, d_in, 0,
               static_cast<char*>(args.dx) + r0 * p.d_model * e, p.dtype, p.d_model));
    }
    return CudaError(cudaGetLastError(), "grouped FFN backward");
  }

  Status Permute(void* stream, const TokenPermutation& perm, const RowsOp& op, const void* src,
                 void* dst) override {
    ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
    if (perm.rows() == 0) return Status::Ok();
    PermuteKernel<<<perm.rows(), 128, 0, static_cast<cudaStream_t>(stream)>>>(perm, op, src, dst);
    return CudaError(cudaGetLastError(), "permute");
  }

  Status Combine(void* stream, const TokenPermutation& perm, const RowsOp& op, const void* src,
                 void* dst) override {
    ECSS_RETURN_IF_ERROR(CheckRowsOp(perm, op, src, dst));
    if (perm.num_tokens == 0) return Status::Ok();
    CombineKernel<<<perm.num_tokens, 128, 0, static_cast<cudaStream_t>(stream)>>>(perm, op, src,
                                                                                  dst);
    return CudaError(cudaGetLastError(), "combine");
  }

  Status Cast(void* stream, const void* src, DType src_dtype, void* dst, DType dst_dtype,
              uint64_t count) override {
    if (count == 0) return Status::Ok();
    ECSS_RETURN_IF_ERROR(CheckCast(src, src_dtype, dst, dst_dtype));
    CastKernel<<<GridFor(count, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        src, src_dtype, dst, dst_dtype, count);
    return CudaError(cudaGetLastError(), "cast");
  }

  Status SumOfSquares(void* stream, const SumOfSquaresArgs& args) override {
    ECSS_RETURN_IF_ERROR(CheckSumOfSquares(args));
    for (uint32_t first = 0; first < args.num_groups; first += kSumGroupsPerLaunch) {
      const uint32_t count = std::min(kSumGroupsPerLaunch, args.num_groups - first);
      SumBatch batch{};
      for (uint32_t i = 0; i < count; ++i) {
        batch.grads[i] = args.grads[first + i];
        batch.counts[i] = args.counts[first + i];
      }
      SumOfSquaresKernel<<<count, kSumThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          batch, args.out + first);
    }
    return CudaError(cudaGetLastError(), "sum of squares");
  }

 private:
  Status Bind(cudaStream_t stream) {
    ECSS_RETURN_IF_ERROR(CudaError(cudaSetDevice(device_), "cudaSetDevice"));
    return CublasError(cublasSetStream(handle_, stream), "cublasSetStream");
  }

  Status Activate(cudaStream_t s, const GroupedFfnProblem& p, const float* h, void* a) {
    ActivateKernel<<<GridFor(uint64_t{p.rows} * p.d_ff, 256), 256, 0, s>>>(
        h, a, p.dtype, p.activation, p.rows, p.d_ff);
    return CudaError(cudaGetLastError(), "activation");
  }

  // h_g [n, d_in] (fp32) = x_g [n, d_model] W_in [d_model, d_in]
  Status GemmH(const GroupedFfnProblem& p, const void* x, const void* w_in, float* h, uint32_t g) {
    const uint64_t r0 = p.group_offsets[g];
    return Gemm(false, false, p.group_rows(g), p.d_in(), p.d_model,
                static_cast<const char*>(x) + r0 * p.d_model * DTypeSize(p.dtype), p.dtype,
                p.d_model, w_in, p.dtype, p.d_in(), 0, h + r0 * p.d_in(), DType::kF32, p.d_in());
  }

  // Row-major C [m, n] = op(A) op(B) + beta C with fp32 accumulation, as the column-major
  // product C^T = op(B)^T op(A)^T. With k == 0 and beta == 0, C is zeroed on `zero_stream`.
  Status Gemm(bool trans_a, bool trans_b, uint32_t m, uint32_t n, uint32_t k, const void* a,
              DType a_type, uint32_t lda, const void* b, DType b_type, uint32_t ldb, float beta,
              void* c, DType c_type, uint32_t ldc, cudaStream_t zero_stream = nullptr) {
    if (m == 0 || n == 0) return Status::Ok();
    if (k == 0) {
      if (beta != 0) return Status::Ok();
      return CudaError(cudaMemset2DAsync(c, uint64_t{ldc} * DTypeSize(c_type), 0,
                                         uint64_t{n} * DTypeSize(c_type), m, zero_stream),
                       "zero dW");
    }
    const float alpha = 1.0f;
    return CublasError(
        cublasGemmEx(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                     trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                     static_cast<int>(k), &alpha, b, CudaType(b_type), static_cast<int>(ldb), a,
                     CudaType(a_type), static_cast<int>(lda), &beta, c, CudaType(c_type),
                     static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  }

  const int device_;
  cublasHandle_t handle_;
  std::mutex mutex_;  // cuBLAS handles bind one stream at a time
};

}  // namespace

bool CudaKernelsCompiled() { return true; }

StatusOr<std::unique_ptr<CudaKernels>> CudaKernels::Create(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return UnavailableError("no CUDA device or driver");
  }
  if (device < 0 || device >= count) {
    return InvalidArgumentError(StrCat("CUDA device ", device, " does not exist (", count, ")"));
  }
  ECSS_RETURN_IF_ERROR(CudaError(cudaSetDevice(device), "cudaSetDevice"));
  cublasHandle_t handle = nullptr;
  ECSS_RETURN_IF_ERROR(CublasError(cublasCreate(&handle), "cublasCreate"));
  return std::unique_ptr<CudaKernels>(new CudaKernelsImpl(device, handle));
}

}  // namespace ecss
