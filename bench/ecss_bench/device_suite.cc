// `ecss-bench device`: host<->device copy bandwidth through the simulated device's copy
// engines (unthrottled), against plain memcpy between the same buffers in the same run. The
// ratio is the overhead of the stream machinery (queueing, worker hand-off, engine lock);
// throttled engines are a model, so only the unthrottled path says anything about the code.
#include <chrono>
#include <cstring>
#include <iomanip>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "runtime/base/str_cat.h"
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

}  // namespace

Status RunDeviceSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  ECSS_ASSIGN_OR_RETURN(std::vector<uint64_t> sizes,
                        args.Sizes("sizes", {64 * 1024, kMiB, 16 * kMiB, 64 * kMiB}));
  ECSS_ASSIGN_OR_RETURN(uint64_t bytes_per_sample, args.Uint("bytes-per-sample", 512 * kMiB));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 5));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (samples == 0) return InvalidArgumentError("option --samples must be >= 1");
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
  return Status::Ok();
}

}  // namespace ecss::bench
