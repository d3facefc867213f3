#include "tests/kernels/kernel_conformance.h"

#include <cstring>

#include <gtest/gtest.h>

#include "kernels/kernel_runner.h"
#include "router/routing_plan.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/kernels/ffn_run.h"

namespace ecss::testing {
namespace {

// Device copies of host data, and the way back. Uploads are asynchronous: the host data must
// stay alive until the next Download (which synchronises).
class DeviceData {
 public:
  DeviceData(Backend& backend, Stream stream) : backend_(backend), stream_(stream) {}

  void* Upload(const void* data, uint64_t bytes) {
    auto buffer =
        backend_.device_memory().Allocate(std::max<uint64_t>(bytes, 1), MemoryTag::kActivations);
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    void* ptr = buffer->data();
    if (bytes > 0) {
      EXPECT_TRUE(backend_.CopyAsync(stream_, ptr, data, bytes, CopyKind::kHostToDevice).ok());
    }
    buffers_.push_back(std::move(buffer).value());
    return ptr;
  }
  template <typename T>
  T* Upload(const std::vector<T>& values) {
    return static_cast<T*>(Upload(values.data(), values.size() * sizeof(T)));
  }
  void* Zeros(uint64_t bytes) {
    auto buffer =
        backend_.device_memory().Allocate(std::max<uint64_t>(bytes, 1), MemoryTag::kActivations);
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    void* ptr = buffer->data();
    EXPECT_TRUE(backend_.MemsetAsync(stream_, ptr, 0, buffer->size()).ok());
    buffers_.push_back(std::move(buffer).value());
    return ptr;
  }
  template <typename T>
  std::vector<T> Download(const void* ptr, uint64_t count) {
    std::vector<T> out(count);
    if (count > 0) {
      EXPECT_TRUE(
          backend_.CopyAsync(stream_, out.data(), ptr, count * sizeof(T), CopyKind::kDeviceToHost)
              .ok());
    }
    EXPECT_TRUE(backend_.SynchronizeStream(stream_).ok());
    return out;
  }

 private:
  Backend& backend_;
  Stream stream_;
  std::vector<Buffer> buffers_;
};

void ExpectMatches(const std::vector<float>& got, const std::vector<float>& want, double tol,
                   const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  if (tol == 0) {
    EXPECT_EQ(got, want) << what;
    return;
  }
  double max_want = 1, max_err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_want = std::max(max_want, double{std::abs(want[i])});
    max_err = std::max(max_err, double{std::abs(got[i] - want[i])});
  }
  EXPECT_LT(max_err / max_want, tol) << what;
}

// The grouped FFN through the runner, forward and backward, against CpuKernels directly.
TEST_P(KernelConformanceTest, GroupedFfnMatchesCpu) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (Activation act : {Activation::kGelu, Activation::kSwiGlu}) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " " << ActivationName(act));
      const ReferenceFfn ref = MakeReference(48, 80, act, {13, 0, 1, 70}, dtype == DType::kBF16);
      const GroupedFfnProblem p = ProblemFor(ref, dtype, SavedActivation::kKeep);
      DeviceData dev(*backend_, stream_.get());
      std::vector<char> x = AsBytes(ref.x, dtype), dy = AsBytes(ref.dy, dtype);
      void* d_x = dev.Upload(x.data(), x.size());
      void* d_dy = dev.Upload(dy.data(), dy.size());
      void* d_y = dev.Zeros(x.size());
      void* d_dx = dev.Zeros(x.size());
      auto* d_saved = static_cast<float*>(dev.Zeros(uint64_t{p.rows} * p.d_in() * 4));
      std::vector<const void*> w_in, w_out;
      std::vector<float*> dw_in, dw_out;
      std::vector<std::vector<char>> host_w_in, host_w_out;
      for (uint32_t g = 0; g < ref.groups(); ++g) {
        host_w_in.push_back(AsBytes(ref.w_in[g], dtype));
        host_w_out.push_back(AsBytes(ref.w_out[g], dtype));
        w_in.push_back(dev.Upload(host_w_in[g].data(), host_w_in[g].size()));
        w_out.push_back(dev.Upload(host_w_out[g].data(), host_w_out[g].size()));
        dw_in.push_back(static_cast<float*>(dev.Zeros(ref.w_in[g].size() * 4)));
        dw_out.push_back(static_cast<float*>(dev.Zeros(ref.w_out[g].size() * 4)));
      }
      void* ws_f = dev.Zeros(runner_->FfnForwardWorkspaceBytes(p));
      void* ws_b = dev.Zeros(runner_->FfnBackwardWorkspaceBytes(p));
      ASSERT_TRUE(runner_
                      ->FfnForward(stream_.get(), p, {d_x, w_in.data(), w_out.data(), d_y, d_saved},
                                   {ws_f, runner_->FfnForwardWorkspaceBytes(p)})
                      .ok());
      Status status = runner_->FfnBackward(
          stream_.get(), p,
          {d_x, w_in.data(), w_out.data(), d_saved, d_dy, d_dx, dw_in.data(), dw_out.data()},
          {ws_b, runner_->FfnBackwardWorkspaceBytes(p)});
      ASSERT_TRUE(status.ok()) << status;

      // The same on the CPU directly, with host buffers.
      std::vector<char> y(x.size()), dx(x.size());
      std::vector<float> saved(uint64_t{p.rows} * p.d_in());
      std::vector<std::vector<float>> cdw_in, cdw_out;
      std::vector<const void*> hw_in, hw_out;
      std::vector<float*> hdw_in, hdw_out;
      for (uint32_t g = 0; g < ref.groups(); ++g) {
        cdw_in.emplace_back(ref.w_in[g].size());
        cdw_out.emplace_back(ref.w_out[g].size());
      }
      for (uint32_t g = 0; g < ref.groups(); ++g) {
        hw_in.push_back(host_w_in[g].data());
        hw_out.push_back(host_w_out[g].data());
        hdw_in.push_back(cdw_in[g].data());
        hdw_out.push_back(cdw_out[g].data());
      }
      AlignedBuffer wf(cpu_->FfnForwardWorkspaceBytes(p)), wb(cpu_->FfnBackwardWorkspaceBytes(p));
      ASSERT_TRUE(cpu_->FfnForward(p,
                                   {x.data(), hw_in.data(), hw_out.data(), y.data(), saved.data()},
                                   {wf.data.get(), wf.size})
                      .ok());
      ASSERT_TRUE(cpu_->FfnBackward(p,
                                    {x.data(), hw_in.data(), hw_out.data(), saved.data(), dy.data(),
                                     dx.data(), hdw_in.data(), hdw_out.data()},
                                    {wb.data.get(), wb.size})
                      .ok());

      const double tol = Tolerance(dtype);
      ExpectMatches(FromBytes(dev.Download<char>(d_y, x.size()), dtype), FromBytes(y, dtype), tol,
                    "y");
      ExpectMatches(FromBytes(dev.Download<char>(d_dx, x.size()), dtype), FromBytes(dx, dtype), tol,
                    "dx");
      for (uint32_t g = 0; g < ref.groups(); ++g) {
        ExpectMatches(dev.Download<float>(dw_in[g], cdw_in[g].size()), cdw_in[g], tol, "dw_in");
        ExpectMatches(dev.Download<float>(dw_out[g], cdw_out[g].size()), cdw_out[g], tol, "dw_out");
      }
    }
  }
}

// Permute, combine, casts and sums of squares through the runner, from a real routing plan
// copied to the device in one transfer.
TEST_P(KernelConformanceTest, RowOpsCastsAndNormsMatchCpu) {
  const uint32_t tokens = 29, k = 2, width = 40;
  std::vector<uint32_t> choice(tokens * k);
  std::vector<float> weights(tokens * k);
  for (uint32_t i = 0; i < tokens * k; ++i) {
    choice[i] = (i / k * 3 + i % k) % 6;
    weights[i] = 0.25f + 0.01f * static_cast<float>(i);
  }
  auto plan = RoutingPlan::FromAssignments(0, 6, tokens, k, choice.data(), weights.data());
  ASSERT_TRUE(plan.ok());
  DeviceData dev(*backend_, stream_.get());
  void* d_plan = dev.Upload(plan->data(), plan->bytes());
  const LayerPlan host = plan->layer(0);
  const LayerPlan on_device = plan->DeviceLayer(0, d_plan);
  const TokenPermutation host_perm{host.num_tokens, host.k, host.permutation, host.inverse,
                                   host.combine_weights};
  const TokenPermutation dev_perm{on_device.num_tokens, on_device.k, on_device.permutation,
                                  on_device.inverse, on_device.combine_weights};
  const std::vector<float> x = RandomValues(tokens * width, 3, 1.0f, false);
  float* d_x = dev.Upload(x);
  auto* d_perm = static_cast<float*>(dev.Zeros(tokens * k * width * 4));
  auto* d_out = static_cast<float*>(dev.Zeros(tokens * width * 4));
  const RowsOp scaled{width, DType::kF32, true};
  ASSERT_TRUE(runner_->Permute(stream_.get(), dev_perm, scaled, d_x, d_perm).ok());
  ASSERT_TRUE(runner_->Combine(stream_.get(), dev_perm, scaled, d_perm, d_out).ok());
  std::vector<float> perm(tokens * k * width), out(tokens * width);
  ASSERT_TRUE(cpu_->Permute(host_perm, scaled, x.data(), perm.data()).ok());
  ASSERT_TRUE(cpu_->Combine(host_perm, scaled, perm.data(), out.data()).ok());
  const double tol = Tolerance(DType::kF32) == 0 ? 0 : 1e-6;
  ExpectMatches(dev.Download<float>(d_perm, perm.size()), perm, tol, "permute");
  ExpectMatches(dev.Download<float>(d_out, out.size()), out, tol, "combine");

  auto* d_b = static_cast<BFloat16*>(dev.Zeros(x.size() * 2));
  ASSERT_TRUE(runner_->Cast(stream_.get(), d_x, DType::kF32, d_b, DType::kBF16, x.size()).ok());
  const std::vector<BFloat16> cast = dev.Download<BFloat16>(d_b, x.size());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(cast[i].bits, FloatToBf16(x[i]).bits);

  const float* grads[] = {d_x, d_perm};
  const uint64_t counts[] = {x.size(), perm.size()};
  auto* d_sums = static_cast<double*>(dev.Zeros(16));
  ASSERT_TRUE(runner_->SumOfSquares(stream_.get(), {2, grads, counts, d_sums}).ok());
  const std::vector<double> sums = dev.Download<double>(d_sums, 2);
  const float* host_grads[] = {x.data(), perm.data()};
  double want[2];
  ASSERT_TRUE(cpu_->SumOfSquares({2, host_grads, counts, want}).ok());
  EXPECT_NEAR(sums[0], want[0], 1e-12 * want[0]);
  EXPECT_NEAR(sums[1], want[1], 1e-12 * want[1]);
}

// Operands outside the backend's device memory are refused before anything is enqueued.
TEST_P(KernelConformanceTest, RefusesOperandsOutsideDeviceMemory) {
  DeviceData dev(*backend_, stream_.get());
  std::vector<float> host(64);
  auto* d_a = static_cast<float*>(dev.Zeros(256));
  EXPECT_EQ(runner_->Cast(stream_.get(), host.data(), DType::kF32, d_a, DType::kBF16, 64).code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(runner_->Cast(stream_.get(), d_a, DType::kF32, d_a, DType::kBF16, 65).code(),
            StatusCode::kOutOfRange);
  EXPECT_TRUE(backend_->SynchronizeStream(stream_.get()).ok());
}

}  // namespace
}  // namespace ecss::testing
