// The backend conformance suite: every Backend implementation must pass the same tests
// (conformance_test.cc). Each test binary instantiates it over the backends it can build
// (conformance_sim.cc, conformance_cuda.cc).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "runtime/device/backend.h"

namespace ecss::testing {

struct BackendUnderTest {
  std::string name;
  // Creates the backend with `device_memory_bytes` of device memory. Unavailable means "no
  // such device here": the test is skipped.
  std::function<StatusOr<std::unique_ptr<Backend>>(uint64_t device_memory_bytes)> create;
};

// gtest prints the parameter in test names and failures: show the backend's name.
inline void PrintTo(const BackendUnderTest& backend, std::ostream* out) { *out << backend.name; }

inline std::string BackendTestName(const ::testing::TestParamInfo<BackendUnderTest>& info) {
  return info.param.name;
}

class BackendConformanceTest : public ::testing::TestWithParam<BackendUnderTest> {
 protected:
  static constexpr uint64_t kDeviceMemoryBytes = uint64_t{640} << 20;

  void SetUp() override {
    StatusOr<std::unique_ptr<Backend>> created = GetParam().create(kDeviceMemoryBytes);
    if (created.status().code() == StatusCode::kUnavailable) {
      GTEST_SKIP() << GetParam().name << " is not available here: " << created.status();
    }
    ASSERT_TRUE(created.ok()) << created.status();
    backend_ = std::move(created).value();
  }

  // Timed mode moves no bytes (its data does not matter): the tests of copied data skip it.
  bool CopiesMoveNoBytes() const {
    return backend_->capabilities().kernel_mode == KernelMode::kTimed;
  }

  std::unique_ptr<Backend> backend_;
};

}  // namespace ecss::testing
