#include "runtime/device/backend_factory.h"

#include <gtest/gtest.h>

namespace ecss {
namespace {

TEST(BackendFactoryTest, ParsesKindsAndModes) {
  EXPECT_EQ(*ParseBackendKind("sim"), BackendKind::kSim);
  EXPECT_EQ(*ParseBackendKind("cuda"), BackendKind::kCuda);
  StatusOr<BackendKind> bad = ParseBackendKind("rocm");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("rocm"), std::string_view::npos);
  EXPECT_EQ(*ParseKernelMode("timed"), KernelMode::kTimed);
  EXPECT_EQ(ParseKernelMode("fast").status().code(), StatusCode::kInvalidArgument);
}

TEST(BackendFactoryTest, CreatesSim) {
  BackendOptions options;
  options.sim.device_memory_bytes = 1 << 20;
  StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->capabilities().name, "sim");
  EXPECT_EQ((*backend)->device(), Device::Sim(0));
}

TEST(BackendFactoryTest, CudaFailsClearlyWithoutADevice) {
  BackendOptions options;
  options.kind = BackendKind::kCuda;
  options.cuda.device_memory_bytes = 1 << 20;
  StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(options);
  if (backend.ok()) GTEST_SKIP() << "a CUDA device is present";
  // Built without CUDA: Unimplemented; built with it but no device/driver: Unavailable.
  const StatusCode expected =
      CudaBackendCompiled() ? StatusCode::kUnavailable : StatusCode::kUnimplemented;
  EXPECT_EQ(backend.status().code(), expected) << backend.status();
  EXPECT_FALSE(backend.status().message().empty());
}

}  // namespace
}  // namespace ecss
