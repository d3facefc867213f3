// Behaviour specific to the simulated device: the copy-engine bandwidth model (lower bounds
// only: a throttled copy can never be faster than the model), kernel modes, error propagation
// through events, option validation, and its trace.
#include "runtime/device/sim/sim_backend.h"

#include <chrono>
#include <cmath>
#include <set>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace ecss {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMiB = uint64_t{1} << 20;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::unique_ptr<SimBackend> MakeSim(SimOptions options) {
  auto backend = SimBackend::Create(options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return std::move(backend).value();
}

TEST(SimBackendTest, ThrottledCopyTakesAtLeastSizeOverBandwidth) {
  SimOptions options;
  options.device_memory_bytes = 64 * kMiB;
  options.h2d_bandwidth_gbps = 1.0;  // 1e9 bytes/s
  options.d2h_bandwidth_gbps = 2.0;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "copy");
  StatusOr<Buffer> device = sim->device_memory().Allocate(16 * kMiB, MemoryTag::kOther);
  ASSERT_TRUE(stream.ok() && device.ok());
  std::vector<uint8_t> host(16 * kMiB, 9);

  Clock::time_point start = Clock::now();
  ASSERT_TRUE(sim->CopyAsync(stream->get(), device->data(), host.data(), host.size(),
                             CopyKind::kHostToDevice)
                  .ok());
  ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  EXPECT_GE(SecondsSince(start), 16.0 * kMiB / 1e9);

  start = Clock::now();
  ASSERT_TRUE(sim->CopyAsync(stream->get(), host.data(), device->data(), host.size(),
                             CopyKind::kDeviceToHost)
                  .ok());
  ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  EXPECT_GE(SecondsSince(start), 16.0 * kMiB / 2e9);

  const EngineBusyTimes stats = sim->busy_times();
  EXPECT_TRUE(stats.measured);
  EXPECT_GE(stats.h2d_busy_seconds, 16.0 * kMiB / 1e9);
  EXPECT_GE(stats.d2h_busy_seconds, 16.0 * kMiB / 2e9);
}

TEST(SimBackendTest, LatencyAppliesToEveryCopy) {
  SimOptions options;
  options.device_memory_bytes = kMiB;
  options.h2d_bandwidth_gbps = 100;
  options.copy_latency_us = 200;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "latency");
  StatusOr<Buffer> device = sim->device_memory().Allocate(64, MemoryTag::kOther);
  ASSERT_TRUE(stream.ok() && device.ok());
  uint8_t byte = 1;
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(
        sim->CopyAsync(stream->get(), device->data(), &byte, 1, CopyKind::kHostToDevice).ok());
  }
  ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  EXPECT_GE(SecondsSince(start), 50 * 200e-6);
}

TEST(SimBackendTest, CopyEngineIsSharedByAllStreams) {
  SimOptions options;
  options.device_memory_bytes = 32 * kMiB;
  options.h2d_bandwidth_gbps = 1.0;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> a = CreateOwnedStream(*sim, "a");
  StatusOr<OwnedStream> b = CreateOwnedStream(*sim, "b");
  StatusOr<Buffer> da = sim->device_memory().Allocate(8 * kMiB, MemoryTag::kOther);
  StatusOr<Buffer> db = sim->device_memory().Allocate(8 * kMiB, MemoryTag::kOther);
  ASSERT_TRUE(a.ok() && b.ok() && da.ok() && db.ok());
  std::vector<uint8_t> host(8 * kMiB, 1);
  const Clock::time_point start = Clock::now();
  ASSERT_TRUE(
      sim->CopyAsync(a->get(), da->data(), host.data(), host.size(), CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(
      sim->CopyAsync(b->get(), db->data(), host.data(), host.size(), CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(sim->SynchronizeAll().ok());
  // One engine: the two copies cannot overlap, so together they take at least twice as long.
  EXPECT_GE(SecondsSince(start), 2 * 8.0 * kMiB / 1e9);
}

TEST(SimBackendTest, RealModeComputesTimedModeOnlyTakesTime) {
  for (KernelMode mode : {KernelMode::kReal, KernelMode::kTimed}) {
    SimOptions options;
    options.device_memory_bytes = kMiB;
    options.kernel_mode = mode;
    auto sim = MakeSim(options);
    EXPECT_TRUE(sim->capabilities().host_kernels);
    EXPECT_EQ(sim->capabilities().kernel_mode, mode);
    StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "compute");
    ASSERT_TRUE(stream.ok());
    bool computed = false;
    const Clock::time_point start = Clock::now();
    ASSERT_TRUE(sim->LaunchKernel(stream->get(), KernelTask{"ffn",
                                                            [&computed] {
                                                              computed = true;
                                                              return Status::Ok();
                                                            },
                                                            0.02})
                    .ok());
    ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
    if (mode == KernelMode::kReal) {
      EXPECT_TRUE(computed);
    } else {
      EXPECT_FALSE(computed) << "timed mode skips the numbers";
      EXPECT_GE(SecondsSince(start), 0.02);
      EXPECT_GE(sim->busy_times().compute_busy_seconds, 0.02);
    }
  }
}

TEST(SimBackendTest, KernelArgumentsAreChecked) {
  SimOptions options;
  options.device_memory_bytes = kMiB;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "k");
  ASSERT_TRUE(stream.ok());
  EXPECT_EQ(sim->LaunchKernel(stream->get(), KernelTask{"empty", nullptr, 0}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      sim->LaunchKernel(stream->get(), KernelTask{"negative", [] { return Status::Ok(); }, -1})
          .code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(
      sim->LaunchKernel(stream->get(), KernelTask{"nan", [] { return Status::Ok(); }, std::nan("")})
          .code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(sim->LaunchHostFunction(stream->get(), "none", nullptr).code(),
            StatusCode::kInvalidArgument);
}

TEST(SimBackendTest, KernelErrorIsStickyAndPropagatesThroughEvents) {
  SimOptions options;
  options.device_memory_bytes = kMiB;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> producer = CreateOwnedStream(*sim, "producer");
  StatusOr<OwnedStream> consumer = CreateOwnedStream(*sim, "consumer");
  StatusOr<OwnedEvent> event = CreateOwnedEvent(*sim);
  ASSERT_TRUE(producer.ok() && consumer.ok() && event.ok());
  ASSERT_TRUE(sim->LaunchKernel(
                     producer->get(),
                     KernelTask{"bad kernel", [] { return InternalError("NaN in expert 4"); }, 0})
                  .ok());
  ASSERT_TRUE(sim->RecordEvent(event->get(), producer->get()).ok());
  ASSERT_TRUE(sim->WaitEvent(consumer->get(), event->get()).ok());
  bool consumer_ran = false;
  ASSERT_TRUE(sim->LaunchHostFunction(consumer->get(), "use",
                                      [&consumer_ran] {
                                        consumer_ran = true;
                                        return Status::Ok();
                                      })
                  .ok());
  Status consumer_status = sim->SynchronizeStream(consumer->get());
  EXPECT_EQ(consumer_status.code(), StatusCode::kInternal);
  EXPECT_NE(consumer_status.message().find("waited on an event"), std::string_view::npos);
  EXPECT_NE(consumer_status.message().find("NaN in expert 4"), std::string_view::npos);
  EXPECT_FALSE(consumer_ran);
  EXPECT_EQ(sim->SynchronizeAll().code(), StatusCode::kInternal);
}

TEST(SimBackendTest, InvalidOptionsNameTheField) {
  SimOptions options;
  options.h2d_bandwidth_gbps = -1;
  StatusOr<std::unique_ptr<SimBackend>> bad = SimBackend::Create(options);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("h2d_bandwidth_gbps"), std::string_view::npos);

  options = SimOptions{};
  options.copy_latency_us = std::numeric_limits<double>::infinity();
  EXPECT_NE(SimBackend::Create(options).status().message().find("copy_latency_us"),
            std::string_view::npos);

  options = SimOptions{};
  options.device_memory_bytes = 0;
  EXPECT_EQ(SimBackend::Create(options).status().code(), StatusCode::kInvalidArgument);

  options.device_memory_bytes = uint64_t{1} << 62;  // absurd: more than any machine
  StatusOr<std::unique_ptr<SimBackend>> absurd = SimBackend::Create(options);
  EXPECT_EQ(absurd.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(absurd.status().message().find("sim:0 device memory"), std::string_view::npos)
      << absurd.status();

  options = SimOptions{};
  options.device_index = -2;
  EXPECT_EQ(SimBackend::Create(options).status().code(), StatusCode::kInvalidArgument);
}

TEST(SimBackendTest, TraceHasOneLanePerStreamAndEngine) {
  TraceRecorder trace;
  {
    SimOptions options;
    options.device_memory_bytes = kMiB;
    options.trace = &trace;
    auto sim = MakeSim(options);
    StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "weights");
    StatusOr<Buffer> device = sim->device_memory().Allocate(4096, MemoryTag::kExpertWeights);
    ASSERT_TRUE(stream.ok() && device.ok());
    std::vector<uint8_t> host(4096);
    ASSERT_TRUE(sim->CopyAsync(stream->get(), device->data(), host.data(), host.size(),
                               CopyKind::kHostToDevice)
                    .ok());
    ASSERT_TRUE(sim->CopyAsync(stream->get(), host.data(), device->data(), host.size(),
                               CopyKind::kDeviceToHost)
                    .ok());
    ASSERT_TRUE(
        sim->LaunchKernel(stream->get(), KernelTask{"ffn", [] { return Status::Ok(); }, 0}).ok());
    ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  }
  nlohmann::json parsed = nlohmann::json::parse(trace.ToJson());
  std::set<std::string> lanes;
  std::set<std::string> names;
  for (const auto& event : parsed["traceEvents"]) {
    if (event["ph"] == "M" && event["name"] == "thread_name") {
      lanes.insert(event["args"]["name"].get<std::string>());
    }
    if (event["ph"] == "X") names.insert(event["name"].get<std::string>());
  }
  EXPECT_EQ(lanes, (std::set<std::string>{"H2D", "D2H", "compute", "stream:weights"}));
  EXPECT_TRUE(names.count("h2d"));
  EXPECT_TRUE(names.count("d2h"));
  EXPECT_TRUE(names.count("ffn"));
}

}  // namespace
}  // namespace ecss
