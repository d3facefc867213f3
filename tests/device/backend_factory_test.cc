#include "runtime/device/backend_factory.h"

#include <gtest/gtest.h>

#include "runtime/base/str_cat.h"

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

TEST(BackendFactoryTest, ParsesDeviceSettings) {
  StatusOr<BackendOptions> sim = ParseDeviceSetting("sim");
  ASSERT_TRUE(sim.ok()) << sim.status();
  EXPECT_EQ(sim->kind, BackendKind::kSim);
  EXPECT_EQ(sim->sim.kernel_mode, KernelMode::kReal);
  StatusOr<BackendOptions> timed = ParseDeviceSetting("sim-timed");
  ASSERT_TRUE(timed.ok()) << timed.status();
  EXPECT_EQ(timed->kind, BackendKind::kSim);
  EXPECT_EQ(timed->sim.kernel_mode, KernelMode::kTimed);
  StatusOr<BackendOptions> cuda = ParseDeviceSetting("cuda");
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  EXPECT_EQ(cuda->kind, BackendKind::kCuda);
  EXPECT_EQ(cuda->cuda.device, 0);
  StatusOr<BackendOptions> third = ParseDeviceSetting("cuda:3");
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->cuda.device, 3);
  for (const char* bad : {"", "gpu", "cuda:", "cuda:-1", "cuda:1x", "cuda1", "cuda:99999999999",
                          "cuda:-0", "cuda:+1", "sim:0", "simtimed"}) {
    StatusOr<BackendOptions> refused = ParseDeviceSetting(bad);
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(refused.status().message().find(StrCat("'", bad, "'")), std::string_view::npos)
        << refused.status();
  }
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
