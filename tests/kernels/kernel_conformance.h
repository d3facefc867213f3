// The kernel conformance suite: the expert ops through KernelRunner on a backend, compared
// with the CPU implementation run directly. Each binary instantiates it over the backends it
// can build (kernel_conformance_sim.cc; kernel_conformance_cuda.cc, label gpu).
#pragma once

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernel_runner.h"
#include "runtime/base/dtype.h"
#include "tests/device/conformance.h"

namespace ecss::testing {

class KernelConformanceTest : public BackendConformanceTest {
 protected:
  // The runner on the backend under test, a stream for it, and the CPU kernels it is
  // compared with.
  void SetUp() override {
    BackendConformanceTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    auto runner = KernelRunner::Create(*backend_);
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(runner).value();
    auto stream = CreateOwnedStream(*backend_, "compute");
    ASSERT_TRUE(stream.ok()) << stream.status();
    stream_ = std::move(stream).value();
    auto cpu = CpuKernels::Create();
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = std::move(cpu).value();
  }
  void TearDown() override {
    stream_ = OwnedStream();  // before the backend goes
    runner_.reset();
  }

  std::unique_ptr<KernelRunner> runner_;
  OwnedStream stream_;
  std::unique_ptr<CpuKernels> cpu_;

  // Relative tolerance against the CPU result: 0 (bit-identical) where the backend runs the
  // CPU implementation itself.
  double Tolerance(DType dtype) const {
    if (backend_->capabilities().host_kernels) return 0;
    return dtype == DType::kF32 ? 1e-4 : 2e-2;
  }
};

}  // namespace ecss::testing
