// The kernel conformance suite: the expert ops through KernelRunner on a backend, compared
// with the CPU implementation run directly. Each binary instantiates it over the backends it
// can build (kernel_conformance_sim.cc; kernel_conformance_cuda.cc, label gpu).
#pragma once

#include "runtime/base/dtype.h"
#include "tests/device/conformance.h"

namespace ecss::testing {

class KernelConformanceTest : public BackendConformanceTest {
 protected:
  // Relative tolerance against the CPU result: 0 (bit-identical) where the backend runs the
  // CPU implementation itself.
  double Tolerance(DType dtype) const {
    if (backend_->capabilities().host_kernels) return 0;
    return dtype == DType::kF32 ? 1e-4 : 2e-2;
  }
};

}  // namespace ecss::testing
