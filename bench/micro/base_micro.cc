// Google Benchmark microbenchmarks for runtime/base and runtime/device: the costs that sit on
// every hot path (conversions, Status, range allocation, stream hand-off, copies).
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "runtime/base/checksum.h"
#include "runtime/base/checksum_paths.h"
#include "runtime/base/dtype.h"
#include "runtime/base/status.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/range_allocator.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

std::vector<float> RandomFloats(size_t n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

void BM_ConvertF32ToBf16(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<float> src = RandomFloats(n);
  std::vector<BFloat16> dst(n);
  for (auto _ : state) {
    ConvertF32ToBf16(src.data(), dst.data(), n);
    benchmark::DoNotOptimize(dst.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * 6));
}
BENCHMARK(BM_ConvertF32ToBf16)->Arg(1 << 20);

void BM_ConvertF32ToF16(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<float> src = RandomFloats(n);
  std::vector<Float16> dst(n);
  for (auto _ : state) {
    ConvertF32ToF16(src.data(), dst.data(), n);
    benchmark::DoNotOptimize(dst.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * 6));
}
BENCHMARK(BM_ConvertF32ToF16)->Arg(1 << 20);

Status MaybeFail(int i) { return i < 0 ? InternalError("negative") : Status::Ok(); }

void BM_StatusOkPath(benchmark::State& state) {
  int i = 0;
  for (auto _ : state) {
    Status status = MaybeFail(i++);
    benchmark::DoNotOptimize(status.ok());
  }
}
BENCHMARK(BM_StatusOkPath);

void BM_RangeAllocatorChurn(benchmark::State& state) {
  RangeAllocator ranges(uint64_t{1} << 30, 256);
  std::mt19937 rng(2);
  std::vector<std::pair<uint64_t, uint64_t>> live;
  for (auto _ : state) {
    if (live.size() < 256) {
      const uint64_t bytes = 256 + rng() % (1 << 20);
      if (auto offset = ranges.Allocate(bytes)) live.emplace_back(*offset, bytes);
    } else {
      const size_t pick = rng() % live.size();
      ranges.Free(live[pick].first, live[pick].second);
      live[pick] = live.back();
      live.pop_back();
    }
  }
}
BENCHMARK(BM_RangeAllocatorChurn);

// Latency of one host function through a sim stream: the cost of the worker hand-off.
void BM_SimStreamRoundTrip(benchmark::State& state) {
  SimOptions options;
  options.device_memory_bytes = 1 << 20;
  auto sim = SimBackend::Create(options);
  auto stream = CreateOwnedStream(**sim, "bench");
  for (auto _ : state) {
    (void)(*sim)->LaunchHostFunction(stream->get(), "nop", [] { return Status::Ok(); });
    (void)(*sim)->SynchronizeStream(stream->get());
  }
}
BENCHMARK(BM_SimStreamRoundTrip)->UseRealTime();

void BM_SimH2DCopy(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  SimOptions options;
  options.device_memory_bytes = bytes;
  auto sim = SimBackend::Create(options);
  auto stream = CreateOwnedStream(**sim, "bench");
  auto device = (*sim)->device_memory().Allocate(bytes, MemoryTag::kOther);
  std::vector<uint8_t> host(bytes, 1);
  for (auto _ : state) {
    (void)(*sim)->CopyAsync(stream->get(), device->data(), host.data(), bytes,
                            CopyKind::kHostToDevice);
    (void)(*sim)->SynchronizeStream(stream->get());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_SimH2DCopy)->Arg(64 << 10)->Arg(16 << 20)->UseRealTime();

// CRC-32C of a 4 MiB block, the piece a state file's load or store checksums, by every path
// this CPU runs, so the one Crc32c picks is timed beside the others in one run. "cold" walks
// 256 MiB, so that each block comes from memory as one a read just brought in does.
void BM_Crc32c(benchmark::State& state, checksum_internal::Crc32cPath path, bool cold) {
  constexpr size_t kBlock = size_t{4} << 20;
  static const std::vector<uint8_t> data = [] {  // built once for every path and run
    std::vector<uint8_t> bytes(size_t{256} << 20);
    for (size_t i = 0; i < bytes.size(); ++i) {
      bytes[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
    }
    return bytes;
  }();
  const size_t span = cold ? data.size() : kBlock;
  size_t at = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(checksum_internal::Crc32cWith(path, data.data() + at, kBlock));
    at = (at + kBlock) % span;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
const bool kCrc32cRegistered = [] {
  using checksum_internal::Crc32cPath;
  for (Crc32cPath path :
       {Crc32cPath::kTable, Crc32cPath::kCrc32, Crc32cPath::kCrc32Lanes, Crc32cPath::kClmulFold}) {
    if (!checksum_internal::Crc32cPathRuns(path)) continue;
    for (bool cold : {false, true}) {
      const std::string name =
          StrCat("BM_Crc32c/", checksum_internal::Crc32cPathName(path), cold ? "/cold" : "/warm");
      benchmark::RegisterBenchmark(name.c_str(), BM_Crc32c, path, cold);
    }
  }
  return true;
}();

// Joining two CRC-32Cs, as the optimizer's checksums join a chunk's onto the ones before it:
// a chunk of 64 Ki fp32 elements (256 KiB), and a length with many bits set.
void BM_Crc32cCombine(benchmark::State& state) {
  const auto bytes = static_cast<uint64_t>(state.range(0));
  uint32_t crc = 0x12345678u;
  for (auto _ : state) {
    crc = Crc32cCombine(crc, 0x9abcdef0u, bytes);
    benchmark::DoNotOptimize(crc);
  }
}
BENCHMARK(BM_Crc32cCombine)->Arg(256 << 10)->Arg((256 << 10) - 8);

}  // namespace
}  // namespace ecss

BENCHMARK_MAIN();
