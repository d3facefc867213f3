// `ecss-bench device`, two parts.
// 1. Host<->device copy bandwidth through the simulated device's copy engines (unthrottled),
//    against plain memcpy between the same buffers in the same run. The ratio is the overhead
//    of the stream machinery (queueing, worker hand-off, engine lock).
// 2. Timed mode: how closely the wall clock follows the modelled time. Three streams run a
//    step-like mix (expert fetches, FFN kernels, gradient copies, an event between streams)
//    on a timed sim with a profile's link bandwidths, once on an idle host and once with
//    `--load-threads` threads spinning (as the CPU optimizer loads the host in a step). The
//    modelled figures are exact by construction (the test asserts them); what is measured is
//    the wall clock: how late each engine thread woke after its op's modelled end, the wall
//    makespan over the modelled one, and the CPU the simulated device itself used.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <iomanip>
#include <thread>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/device_profile.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss::bench {

namespace {

using Clock = std::chrono::steady_clock;

struct SizeResult {
  uint64_t bytes = 0;
  uint64_t copies_per_sample = 0;
  double memcpy_gbps = 0;
  double h2d_gbps = 0;
  double d2h_gbps = 0;
};

double Gbps(uint64_t bytes, Clock::duration elapsed) {
  return static_cast<double>(bytes) / std::chrono::duration<double>(elapsed).count() / 1e9;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double ProcessCpuSeconds() {
  timespec now{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

// One timed run: how the wall clock followed the modelled time.
struct TimedResult {
  int load_threads = 0;
  uint64_t ops = 0;
  double modelled_makespan_s = 0;  // first op ready to last op's modelled end
  double wall_makespan_s = 0;      // first op enqueued to SynchronizeAll returning
  double late_median_us = 0, late_p99_us = 0, late_max_us = 0;  // woke - modelled end
  double sim_cpu_s = 0;  // the process's CPU in an idle run (-1 with load threads)
};

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const auto at = static_cast<size_t>(std::lround(q * static_cast<double>(values.size() - 1)));
  return values[std::min(at, values.size() - 1)];
}

// `rounds` rounds of: stream "fetch" copies an expert in (h2d) and records an event; stream
// "compute" waits for it and runs a forward and a backward kernel; stream "grads" waits for
// the backward and copies its gradients out (d2h). `load_threads` threads spin meanwhile.
StatusOr<TimedResult> RunTimed(const DeviceProfile& profile, uint64_t rounds, int load_threads,
                               uint64_t expert_bytes) {
  SimOptions options;
  options.kernel_mode = KernelMode::kTimed;
  options.h2d_bandwidth_gbps = profile.h2d_bandwidth_gbps;
  options.d2h_bandwidth_gbps = profile.d2h_bandwidth_gbps;
  options.device_memory_bytes = 4 * expert_bytes;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> sim, SimBackend::Create(options));
  ECSS_ASSIGN_OR_RETURN(Buffer device,
                        sim->device_memory().Allocate(2 * expert_bytes, MemoryTag::kOther));
  std::vector<uint8_t> host(2 * expert_bytes);
  ECSS_ASSIGN_OR_RETURN(OwnedStream fetch, CreateOwnedStream(*sim, "fetch"));
  ECSS_ASSIGN_OR_RETURN(OwnedStream compute, CreateOwnedStream(*sim, "compute"));
  ECSS_ASSIGN_OR_RETURN(OwnedStream grads, CreateOwnedStream(*sim, "grads"));
  ECSS_ASSIGN_OR_RETURN(OwnedEvent fetched, CreateOwnedEvent(*sim));
  ECSS_ASSIGN_OR_RETURN(OwnedEvent computed, CreateOwnedEvent(*sim));
  // An expert's bf16 FFN forward at d_model 4096, d_ff 16384, 2048 rows, on the profile's
  // tensor cores (the cost model's GEMM efficiency); the backward twice that.
  const double forward_s = 2.0 * 2048 * 4096 * 16384 * 2 / (profile.peak_tflops_bf16 * 1e12 * 0.7);

  std::atomic<bool> stop{false};
  std::vector<std::thread> load;
  load.reserve(static_cast<size_t>(load_threads));
  for (int t = 0; t < load_threads; ++t) {
    load.emplace_back([&stop] {
      volatile double x = 1;
      while (!stop.load(std::memory_order_relaxed)) {
        for (int i = 0; i < 1000; ++i) x = x * 1.0000001 + 1e-9;
      }
    });
  }
  const double cpu_before = ProcessCpuSeconds();
  const Clock::time_point start = Clock::now();
  Status issued = Status::Ok();
  for (uint64_t r = 0; r < rounds && issued.ok(); ++r) {
    issued = sim->CopyAsync(fetch.get(), device.data(), host.data(), expert_bytes,
                            CopyKind::kHostToDevice);
    if (issued.ok()) issued = sim->RecordEvent(fetched.get(), fetch.get());
    if (issued.ok()) issued = sim->WaitEvent(compute.get(), fetched.get());
    for (double seconds : {forward_s, 2 * forward_s}) {
      if (issued.ok()) {
        issued = sim->LaunchKernel(compute.get(),
                                   KernelTask{"ffn", [] { return Status::Ok(); }, seconds});
      }
    }
    if (issued.ok()) issued = sim->RecordEvent(computed.get(), compute.get());
    if (issued.ok()) issued = sim->WaitEvent(grads.get(), computed.get());
    if (issued.ok()) {
      issued = sim->CopyAsync(grads.get(), host.data() + expert_bytes,
                              device.as<uint8_t>() + expert_bytes, expert_bytes,
                              CopyKind::kDeviceToHost);
    }
  }
  Status synced = sim->SynchronizeAll();
  const Clock::time_point end = Clock::now();
  const double cpu_after = ProcessCpuSeconds();
  stop = true;
  for (std::thread& thread : load) thread.join();
  ECSS_RETURN_IF_ERROR(issued);
  ECSS_RETURN_IF_ERROR(synced);

  TimedResult result;
  result.load_threads = load_threads;
  std::vector<SimEngineOp> ops = sim->EngineOps();
  result.ops = ops.size();
  Clock::time_point first_ready = Clock::time_point::max(), last_end = start;
  std::vector<double> late_us;
  for (const SimEngineOp& op : ops) {
    first_ready = std::min(first_ready, op.ready);
    last_end = std::max(last_end, op.end);
    late_us.push_back(Seconds(op.woke - op.end) * 1e6);
  }
  result.modelled_makespan_s = ops.empty() ? 0 : Seconds(last_end - first_ready);
  result.wall_makespan_s = Seconds(end - start);
  result.late_median_us = Percentile(late_us, 0.5);
  result.late_p99_us = Percentile(late_us, 0.99);
  result.late_max_us = Percentile(late_us, 1.0);
  // Without load threads the process's CPU in the run is the device's own (and the issuing).
  result.sim_cpu_s = load_threads == 0 ? cpu_after - cpu_before : -1;
  return result;
}

}  // namespace

Status RunDeviceSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  ECSS_ASSIGN_OR_RETURN(std::vector<uint64_t> sizes,
                        args.Sizes("sizes", {64 * 1024, kMiB, 16 * kMiB, 64 * kMiB}));
  ECSS_ASSIGN_OR_RETURN(uint64_t bytes_per_sample, args.Uint("bytes-per-sample", 512 * kMiB));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 5));
  ECSS_ASSIGN_OR_RETURN(std::string profile_name, args.String("profile", "h100-sxm"));
  ECSS_ASSIGN_OR_RETURN(uint64_t timed_rounds, args.Uint("timed-rounds", 400));
  ECSS_ASSIGN_OR_RETURN(
      uint64_t load_threads,
      args.Uint("load-threads", std::max(1u, std::thread::hardware_concurrency())));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (samples == 0) return InvalidArgumentError("option --samples must be >= 1");
  ECSS_ASSIGN_OR_RETURN(DeviceProfile profile, FindDeviceProfile(profile_name));
  uint64_t largest = 0;
  for (uint64_t size : sizes) largest = std::max(largest, size);

  SimOptions options;  // unthrottled engines: measure the machinery, not a model
  options.device_memory_bytes = largest;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> sim, SimBackend::Create(options));
  PinnedPoolOptions pool_options;
  pool_options.capacity_bytes = largest;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<PinnedHostPool> pool, sim->CreatePinnedPool(pool_options));
  ECSS_ASSIGN_OR_RETURN(Buffer host, pool->Allocate(largest, MemoryTag::kStaging));
  ECSS_ASSIGN_OR_RETURN(Buffer device, sim->device_memory().Allocate(largest, MemoryTag::kOther));
  ECSS_ASSIGN_OR_RETURN(OwnedStream stream, CreateOwnedStream(*sim, "bench"));
  // Fault every page in before timing anything.
  std::memset(host.data(), 1, largest);
  std::memset(device.data(), 2, largest);

  std::vector<SizeResult> results;
  for (uint64_t size : sizes) {
    SizeResult result;
    result.bytes = size;
    result.copies_per_sample = std::max<uint64_t>(1, bytes_per_sample / size);
    const uint64_t sample_bytes = result.copies_per_sample * size;
    std::vector<double> memcpy_gbps, h2d_gbps, d2h_gbps;
    for (uint64_t sample = 0; sample < samples; ++sample) {
      Clock::time_point start = Clock::now();
      for (uint64_t i = 0; i < result.copies_per_sample; ++i) {
        std::memcpy(device.data(), host.data(), size);
      }
      memcpy_gbps.push_back(Gbps(sample_bytes, Clock::now() - start));

      start = Clock::now();
      for (uint64_t i = 0; i < result.copies_per_sample; ++i) {
        ECSS_RETURN_IF_ERROR(sim->CopyAsync(stream.get(), device.data(), host.data(), size,
                                            CopyKind::kHostToDevice));
      }
      ECSS_RETURN_IF_ERROR(sim->SynchronizeStream(stream.get()));
      h2d_gbps.push_back(Gbps(sample_bytes, Clock::now() - start));

      start = Clock::now();
      for (uint64_t i = 0; i < result.copies_per_sample; ++i) {
        ECSS_RETURN_IF_ERROR(sim->CopyAsync(stream.get(), host.data(), device.data(), size,
                                            CopyKind::kDeviceToHost));
      }
      ECSS_RETURN_IF_ERROR(sim->SynchronizeStream(stream.get()));
      d2h_gbps.push_back(Gbps(sample_bytes, Clock::now() - start));
    }
    result.memcpy_gbps = Median(memcpy_gbps);
    result.h2d_gbps = Median(h2d_gbps);
    result.d2h_gbps = Median(d2h_gbps);
    results.push_back(result);
  }

  json.Field("backend", "sim")
      .Field("engines", "unthrottled")
      .Field("samples", samples)
      .Field("reference",
             "memcpy of the same sizes between the same pinned-host and device buffers, "
             "measured in the same run; figures are medians over samples")
      .Key("results")
      .BeginArray();
  for (const SizeResult& r : results) {
    json.BeginObject()
        .Field("bytes", r.bytes)
        .Field("copies_per_sample", r.copies_per_sample)
        .Field("h2d_gbps", r.h2d_gbps)
        .Field("d2h_gbps", r.d2h_gbps)
        .Field("memcpy_gbps", r.memcpy_gbps)
        .Field("h2d_vs_memcpy", r.h2d_gbps / r.memcpy_gbps)
        .Field("d2h_vs_memcpy", r.d2h_gbps / r.memcpy_gbps)
        .EndObject();
  }
  json.EndArray();
  // Headline figures: the largest size, where per-copy overheads are amortised.
  const SizeResult& headline = results.back();
  json.Field("h2d_gbps", headline.h2d_gbps)
      .Field("d2h_gbps", headline.d2h_gbps)
      .Field("memcpy_gbps", headline.memcpy_gbps);

  std::vector<TimedResult> timed;
  if (timed_rounds > 0) {
    for (int load : {0, static_cast<int>(load_threads)}) {
      ECSS_ASSIGN_OR_RETURN(TimedResult result, RunTimed(profile, timed_rounds, load, 16 * kMiB));
      timed.push_back(result);
    }
  }
  json.Key("timed").BeginObject();
  json.Field("profile", profile.name)
      .Field("rounds", timed_rounds)
      .Field("reference",
             "the modelled time of the same ops (exact by construction); wall figures are "
             "this host's")
      .Key("runs")
      .BeginArray();
  for (const TimedResult& r : timed) {
    json.BeginObject()
        .Field("load_threads", r.load_threads)
        .Field("ops", r.ops)
        .Field("modelled_makespan_s", r.modelled_makespan_s)
        .Field("wall_makespan_s", r.wall_makespan_s)
        .Field("wall_over_modelled", r.wall_makespan_s / r.modelled_makespan_s)
        .Field("late_median_us", r.late_median_us)
        .Field("late_p99_us", r.late_p99_us)
        .Field("late_max_us", r.late_max_us)
        .Key("device_cpu_us_per_op");
    if (r.sim_cpu_s >= 0) {
      json.Double(r.sim_cpu_s * 1e6 / static_cast<double>(r.ops));
    } else {
      json.Null();
    }
    json.EndObject();
  }
  json.EndArray().EndObject();

  table << "device suite: sim copy engines (unthrottled) vs memcpy, median of " << samples
        << " samples\n"
        << std::left << std::setw(12) << "size" << std::right << std::setw(12) << "h2d GB/s"
        << std::setw(12) << "d2h GB/s" << std::setw(14) << "memcpy GB/s" << std::setw(10)
        << "h2d/mc" << std::setw(10) << "d2h/mc"
        << "\n"
        << std::fixed << std::setprecision(2);
  for (const SizeResult& r : results) {
    table << std::left << std::setw(12) << HumanBytes(r.bytes) << std::right << std::setw(12)
          << r.h2d_gbps << std::setw(12) << r.d2h_gbps << std::setw(14) << r.memcpy_gbps
          << std::setw(10) << r.h2d_gbps / r.memcpy_gbps << std::setw(10)
          << r.d2h_gbps / r.memcpy_gbps << "\n";
  }
  if (!timed.empty()) {
    table << "timed mode (" << profile.name << ", " << timed_rounds
          << " rounds of h2d, 2 kernels, d2h on 3 streams): wall clock vs modelled time\n"
          << std::left << std::setw(8) << "load" << std::right << std::setw(14) << "modelled s"
          << std::setw(10) << "wall s" << std::setw(11) << "wall/mod" << std::setw(14)
          << "late med us" << std::setw(13) << "late p99 us" << std::setw(13) << "late max us"
          << std::setw(14) << "CPU us/op"
          << "\n";
    for (const TimedResult& r : timed) {
      table << std::left << std::setw(8) << r.load_threads << std::right << std::setw(14)
            << r.modelled_makespan_s << std::setw(10) << r.wall_makespan_s << std::setw(11)
            << r.wall_makespan_s / r.modelled_makespan_s << std::setw(14) << r.late_median_us
            << std::setw(13) << r.late_p99_us << std::setw(13) << r.late_max_us << std::setw(14)
            << (r.sim_cpu_s >= 0 ? StrCat(r.sim_cpu_s * 1e6 / static_cast<double>(r.ops))
                                 : std::string("-"))
            << "\n";
    }
  }
  return Status::Ok();
}

}  // namespace ecss::bench
