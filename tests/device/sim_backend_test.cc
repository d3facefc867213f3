// Behaviour specific to the simulated device: the copy-engine bandwidth model (lower bounds
// only: a throttled copy can never be faster than the model), kernel modes, error propagation
// through events, option validation, and its trace.
#include "runtime/device/sim/sim_backend.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <set>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/base/str_cat.h"
#include "runtime/device/pinned_pool.h"

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

// Timed mode keeps the model's time, not the host's: every op's modelled duration is the
// model's figure, it starts when it is ready and its engine is free, the engines' busy sums
// are the sums of those durations, and no byte moves. None of this depends on how fast the
// host is, so the assertions are exact.
TEST(SimBackendTest, TimedModeKeepsTheModelsTimeExactly) {
  SimOptions options;
  options.device_memory_bytes = 64 * kMiB;
  options.kernel_mode = KernelMode::kTimed;
  options.h2d_bandwidth_gbps = 10;
  options.d2h_bandwidth_gbps = 5;
  options.copy_latency_us = 7;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> a = CreateOwnedStream(*sim, "a");
  StatusOr<OwnedStream> b = CreateOwnedStream(*sim, "b");
  StatusOr<OwnedEvent> a_done = CreateOwnedEvent(*sim);
  StatusOr<Buffer> device = sim->device_memory().Allocate(16 * kMiB, MemoryTag::kOther);
  ASSERT_TRUE(a.ok() && b.ok() && a_done.ok() && device.ok());
  std::vector<uint8_t> host(16 * kMiB, 7);
  bool computed = false;
  auto kernel = [&computed](const char* name, double seconds) {
    return KernelTask{name,
                      [&computed] {
                        computed = true;
                        return Status::Ok();
                      },
                      seconds};
  };
  Stream sa = a->get(), sb = b->get();
  ASSERT_TRUE(
      sim->CopyAsync(sa, device->data(), host.data(), 8 * kMiB, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(sim->LaunchKernel(sa, kernel("a.ffn", 0.003)).ok());
  ASSERT_TRUE(sim->RecordEvent(a_done->get(), sa).ok());
  ASSERT_TRUE(
      sim->CopyAsync(sb, device->data(), host.data(), 4 * kMiB, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(sim->LaunchKernel(sb, kernel("b.ffn", 0.001)).ok());
  ASSERT_TRUE(sim->WaitEvent(sb, a_done->get()).ok());
  ASSERT_TRUE(
      sim->CopyAsync(sb, host.data(), device->data(), 2 * kMiB, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(
      sim->CopyAsync(sa, host.data() + 2 * kMiB, device->data(), kMiB, CopyKind::kDeviceToHost)
          .ok());
  ASSERT_TRUE(sim->SynchronizeAll().ok());

  EXPECT_FALSE(computed) << "timed kernels compute nothing";
  EXPECT_EQ(std::count(host.begin(), host.end(), 7), static_cast<ptrdiff_t>(host.size()))
      << "a timed device-to-host copy moved bytes";
  EXPECT_EQ(std::count(device->as<uint8_t>(), device->as<uint8_t>() + 8 * kMiB, 0),
            static_cast<ptrdiff_t>(8 * kMiB))
      << "a timed host-to-device copy moved bytes";

  auto copy_time = [&](double bytes, double gbps) {
    return std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(7e-6 + bytes / (gbps * 1e9)));
  };
  auto kernel_time = [](double seconds) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  };
  std::vector<SimEngineOp> ops = sim->EngineOps();
  ASSERT_EQ(ops.size(), 6u);
  std::map<DeviceEngine, std::vector<SimEngineOp>> by_engine;
  std::map<std::string, SimEngineOp> by_name;  // the ops are told apart by engine and bytes
  for (const SimEngineOp& op : ops) {
    by_engine[op.engine].push_back(op);
    by_name[StrCat(op.name, "/", op.bytes)] = op;
  }
  const double mib = static_cast<double>(kMiB);
  EXPECT_EQ(by_name.at(StrCat("h2d/", 8 * mib)).modelled, copy_time(8 * mib, 10));
  EXPECT_EQ(by_name.at(StrCat("h2d/", 4 * mib)).modelled, copy_time(4 * mib, 10));
  EXPECT_EQ(by_name.at(StrCat("d2h/", 2 * mib)).modelled, copy_time(2 * mib, 5));
  EXPECT_EQ(by_name.at(StrCat("d2h/", mib)).modelled, copy_time(mib, 5));
  EXPECT_EQ(by_name.at("a.ffn/-1").modelled, kernel_time(0.003));
  EXPECT_EQ(by_name.at("b.ffn/-1").modelled, kernel_time(0.001));

  EngineBusyTimes busy = sim->busy_times();
  for (auto& [engine, engine_ops] : by_engine) {
    std::sort(engine_ops.begin(), engine_ops.end(),
              [](const SimEngineOp& x, const SimEngineOp& y) { return x.start < y.start; });
    int64_t busy_ns = 0;
    for (size_t i = 0; i < engine_ops.size(); ++i) {
      const SimEngineOp& op = engine_ops[i];
      EXPECT_EQ(op.end - op.start, op.modelled) << op.name;
      // It starts when it is ready and the engine is free, not when the host got to it.
      const Clock::time_point free = i == 0 ? op.ready : engine_ops[i - 1].end;
      EXPECT_EQ(op.start, std::max(op.ready, free)) << op.name;
      EXPECT_GE(op.woke, op.end);
      busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(op.modelled).count();
    }
    const double seconds = static_cast<double>(busy_ns) * 1e-9;
    const double measured = engine == DeviceEngine::kH2D   ? busy.h2d_busy_seconds
                            : engine == DeviceEngine::kD2H ? busy.d2h_busy_seconds
                                                           : busy.compute_busy_seconds;
    EXPECT_EQ(measured, seconds) << static_cast<int>(engine);
  }
  // Stream order and the event, in modelled time.
  EXPECT_GE(by_name.at("a.ffn/-1").ready, by_name.at(StrCat("h2d/", 8 * mib)).end);
  EXPECT_GE(by_name.at("b.ffn/-1").ready, by_name.at(StrCat("h2d/", 4 * mib)).end);
  EXPECT_GE(by_name.at(StrCat("d2h/", 2 * mib)).ready, by_name.at("a.ffn/-1").end);
  EXPECT_GE(by_name.at(StrCat("d2h/", 2 * mib)).ready, by_name.at("b.ffn/-1").end);
}

TEST(SimBackendTest, TimedHostFunctionsHoldTheirStreamForTheirRunNotTheWakeUp) {
  // A copy, a host function that works for 2 ms, another copy, on one stream. In timed mode
  // the host function holds the stream for its run, counted from the first copy's modelled
  // end: the second copy starts that long after the first ended, not after the host
  // function returned. The worker that runs the function wakes after the first copy's end
  // (its `woke`), and a start that counted from then (as a host function's end on the host's
  // clock would) is at least that wake-up later: at or after the function's return. The executor's
  // op stamps are such host functions, one per op: their wake-ups must not leak into the device's
  // time. The first copy (168 ms) outlasts the enqueueing of the rest, so the host function is
  // ready when the copy ends, not when it was enqueued. The checks compare clock readings of one
  // run with each other, not with a duration: the function's run and the worker's wake-up are
  // whatever this machine takes.
  SimOptions options;
  options.device_memory_bytes = 16 * kMiB;
  options.kernel_mode = KernelMode::kTimed;
  options.h2d_bandwidth_gbps = 0.05;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "s");
  StatusOr<Buffer> device = sim->device_memory().Allocate(8 * kMiB, MemoryTag::kOther);
  ASSERT_TRUE(stream.ok() && device.ok());
  std::vector<uint8_t> host(8 * kMiB, 1);
  Clock::time_point ran_from, ran_to;
  const Stream s = stream->get();
  ASSERT_TRUE(
      sim->CopyAsync(s, device->data(), host.data(), 8 * kMiB, CopyKind::kHostToDevice).ok());
  auto work = [&] {
    ran_from = Clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ran_to = Clock::now();
    return Status::Ok();
  };
  ASSERT_TRUE(sim->LaunchHostFunction(s, "work", work).ok());
  ASSERT_TRUE(
      sim->CopyAsync(s, device->data(), host.data(), 2 * kMiB, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(sim->SynchronizeAll().ok());
  std::vector<SimEngineOp> ops = sim->EngineOps();
  ASSERT_EQ(ops.size(), 2u);
  const SimEngineOp& first = ops[0].bytes > ops[1].bytes ? ops[0] : ops[1];  // the 8 MiB
  const SimEngineOp& second = ops[0].bytes > ops[1].bytes ? ops[1] : ops[0];
  const Clock::duration held = second.start - first.end;
  EXPECT_GE(held, ran_to - ran_from) << "the host function's run holds the stream";
  EXPECT_LT(held, ran_to - first.end)
      << "the worker's wake-up after the first copy ended counted as device time";
}

// A timed op's engine thread sleeps until the op's modelled end: it takes no CPU from the
// host's own work (the real optimizer, in a timed step).
TEST(SimBackendTest, TimedOpsSleepInsteadOfWorking) {
  SimOptions options;
  options.device_memory_bytes = 64 * kMiB;
  options.kernel_mode = KernelMode::kTimed;
  options.h2d_bandwidth_gbps = 0.4;  // 64 MiB: 0.17 s
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "s");
  StatusOr<Buffer> device = sim->device_memory().Allocate(64 * kMiB, MemoryTag::kOther);
  ASSERT_TRUE(stream.ok() && device.ok());
  std::vector<uint8_t> host(64 * kMiB, 1);
  auto cpu_seconds = [] {
    timespec now{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
  };
  const double cpu_before = cpu_seconds();
  ASSERT_TRUE(sim->CopyAsync(stream->get(), device->data(), host.data(), host.size(),
                             CopyKind::kHostToDevice)
                  .ok());
  ASSERT_TRUE(
      sim->LaunchKernel(stream->get(), KernelTask{"ffn", [] { return Status::Ok(); }, 0.2}).ok());
  ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  const double modelled =
      sim->busy_times().h2d_busy_seconds + sim->busy_times().compute_busy_seconds;
  const double cpu = cpu_seconds() - cpu_before;
  EXPECT_GT(modelled, 0.35);
  // Sleeping threads: a spin would cost the whole modelled time. The bound leaves room for
  // thread wake-ups under a sanitizer on a loaded machine (8.6 ms seen under tsan).
  EXPECT_LT(cpu, 0.1 * modelled);
  // And no bytes moved: the device memory still reads as the zeros it was made with.
  const auto* bytes = static_cast<const uint8_t*>(device->data());
  EXPECT_EQ(std::count(bytes, bytes + host.size(), 0), static_cast<std::ptrdiff_t>(host.size()));
}

// The pages of a region that are resident in memory, by mincore.
size_t ResidentPages(const void* base, uint64_t bytes) {
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((bytes + page - 1) / page);
  EXPECT_EQ(::mincore(const_cast<void*>(base), bytes, resident.data()), 0) << errno;
  return static_cast<size_t>(std::count_if(resident.begin(), resident.end(),
                                           [](unsigned char flags) { return (flags & 1) != 0; }));
}

// Memory that behaves like the device's: the device arena and a pinned pool are resident as
// soon as they exist (no step pays their page faults), and the pool is locked unless asked not
// to be (as root the memlock limit does not apply).
TEST(SimBackendTest, DeviceMemoryAndPinnedPoolsAreResidentAtCreation) {
  SimOptions options;
  options.device_memory_bytes = 48 * kMiB;
  auto sim = MakeSim(options);
  auto* arena = dynamic_cast<ArenaAllocator*>(&sim->device_memory());
  ASSERT_NE(arena, nullptr);
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  EXPECT_EQ(ResidentPages(arena->region(), arena->region_bytes()), arena->region_bytes() / page);

  for (bool lock : {true, false}) {
    PinnedPoolOptions pool_options;
    pool_options.capacity_bytes = 24 * kMiB;
    pool_options.lock_pages = lock;
    StatusOr<std::unique_ptr<PinnedHostPool>> pool = sim->CreatePinnedPool(pool_options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ(ResidentPages((*pool)->region(), (*pool)->region_bytes()),
              (*pool)->region_bytes() / page);
    rlimit limit{};
    ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &limit), 0);
    const bool may_lock = ::geteuid() == 0 || limit.rlim_cur == RLIM_INFINITY ||
                          limit.rlim_cur >= (*pool)->region_bytes();
    if (!lock) {
      EXPECT_FALSE((*pool)->pages_locked());
    } else if (may_lock) {
      EXPECT_TRUE((*pool)->pages_locked());
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

// The op log is bounded, except that a caller reading engine_intervals step by step loses no
// op of its step however many the step has (StepMetrics were silently short past kKeptOps).
TEST(SimBackendTest, EngineIntervalsKeepEveryOpSinceTheLastQuery) {
  SimOptions options;
  options.device_memory_bytes = kMiB;
  auto sim = MakeSim(options);
  StatusOr<OwnedStream> stream = CreateOwnedStream(*sim, "s");
  StatusOr<Buffer> device = sim->device_memory().Allocate(64, MemoryTag::kOther);
  ASSERT_TRUE(stream.ok() && device.ok());
  std::vector<uint8_t> host(64, 1);
  const size_t more = SimBackend::kKeptOps + 100;
  auto copies = [&] {
    for (size_t i = 0; i < more; ++i) {
      ASSERT_TRUE(sim->CopyAsync(stream->get(), device->data(), host.data(), host.size(),
                                 CopyKind::kHostToDevice)
                      .ok());
    }
    ASSERT_TRUE(sim->SynchronizeStream(stream->get()).ok());
  };
  copies();  // nobody asked: the log keeps the last kKeptOps
  EXPECT_EQ(sim->EngineOps().size(), SimBackend::kKeptOps);
  const Clock::time_point since = Clock::now();
  EXPECT_TRUE(sim->engine_intervals(since).empty());
  copies();
  const std::vector<EngineInterval> step = sim->engine_intervals(since);
  EXPECT_EQ(step.size(), more) << "every op since the last query";
  for (const EngineInterval& each : step) {
    EXPECT_EQ(each.engine, DeviceEngine::kH2D);
    EXPECT_GT(each.end, since);
  }
}

}  // namespace
}  // namespace ecss
