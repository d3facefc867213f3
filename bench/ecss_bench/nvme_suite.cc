// `ecss-bench nvme --dir DIR`: sequential and random reads and writes of whole blocks through
// an IoEngine (io_uring by default: O_DIRECT, registered file and buffers, batched
// submission, buffers in the pinned pool's huge-page-backed memory), against two fio runs
// with the same file, block size, queue depth and --direct=1 --ioengine=io_uring: plain, and
// with --fixedbufs --registerfiles (fio's fastest io_uring setup), run by this suite
// interleaved with the engine's samples when fio is installed.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/ecss_bench/suite.h"
#include "offload/io/io_engines.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/pinned_pool.h"

namespace ecss::bench {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::array<Pattern, 4> kPatterns = {{{"write", IoOp::kWrite, false},
                                               {"read", IoOp::kRead, false},
                                               {"randread", IoOp::kRead, true},
                                               {"randwrite", IoOp::kWrite, true}}};

}  // namespace

StatusOr<double> RunIoPattern(IoEngine& engine, IoFileId file, const Pattern& pattern,
                              uint64_t blocks, size_t block, uint8_t* buffers) {
  return TransferGbps(engine, file, pattern.op, pattern.random, blocks, block, buffers);
}

namespace {

bool HaveFio() {
  return ::access("/usr/bin/fio", X_OK) == 0 || ::access("/usr/local/bin/fio", X_OK) == 0;
}

// The two fio references: plain io_uring, and with registered buffers and files.
struct FioReference {
  const char* name;   // JSON key prefix
  const char* title;  // table column
  int width;          // of the column
  const char* flags;  // added to fio's command line
};
constexpr std::array<FioReference, 2> kFioReferences = {
    {{"fio", "fio GB/s", 12, ""},
     {"fio_registered", "fio reg. GB/s", 15, " --fixedbufs --registerfiles"}}};

// fio's bandwidth for one pattern in GB/s, or a Status saying why there is none.
StatusOr<double> RunFio(const std::string& path, const Pattern& pattern, uint64_t file_bytes,
                        size_t block, uint32_t depth, const FioReference& reference) {
  const std::string command =
      StrCat("fio --name=ecss --filename=", path, " --size=", file_bytes, " --bs=", block,
             " --iodepth=", depth, " --rw=", pattern.name, " --direct=1 --ioengine=io_uring",
             reference.flags, " --numjobs=1 --output-format=json 2>/dev/null");
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(command.c_str(), "r"), ::pclose);
  if (!pipe) return UnavailableError("cannot start fio");
  std::string output;
  char chunk[4096];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof(chunk), pipe.get())) > 0) output.append(chunk, n);
  const auto json = nlohmann::json::parse(output, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.contains("jobs") || json["jobs"].empty()) {
    return UnavailableError("fio printed no JSON result");
  }
  const auto& job = json["jobs"][0][pattern.op == IoOp::kRead ? "read" : "write"];
  return job.value("bw_bytes", 0.0) / 1e9;
}

}  // namespace

Status RunNvmeSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(std::string dir, args.String("dir", "."));
  ECSS_ASSIGN_OR_RETURN(uint64_t file_bytes, args.Uint("file-size", uint64_t{1} << 30));
  ECSS_ASSIGN_OR_RETURN(uint64_t block, args.Uint("block-size", uint64_t{1} << 20));
  ECSS_ASSIGN_OR_RETURN(uint64_t depth, args.Uint("queue-depth", 32));
  ECSS_ASSIGN_OR_RETURN(std::string engine_name, args.String("engine", "uring"));
  ECSS_ASSIGN_OR_RETURN(std::string with_fio, args.String("fio", "auto"));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 3));
  ECSS_ASSIGN_OR_RETURN(uint64_t fixed_buffers, args.Uint("fixed-buffers", 1));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  ECSS_ASSIGN_OR_RETURN(IoEngineKind kind, ParseIoEngineKind(engine_name));
  if (with_fio != "auto" && with_fio != "yes" && with_fio != "no") {
    return InvalidArgumentError(StrCat("--fio ", with_fio, ": auto, yes or no"));
  }
  if (block == 0 || block % 4096 != 0 || file_bytes < block || file_bytes % block != 0 ||
      depth == 0 || depth > 1024 || samples == 0) {
    return InvalidArgumentError(
        "need --block-size a multiple of 4096, --file-size a multiple of it, 1 <= --queue-depth <= "
        "1024");
  }
  IoEngineOptions options;
  options.queue_depth = static_cast<uint32_t>(depth);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> engine, CreateIoEngine(kind, options));
  PinnedPoolOptions pool_options;
  pool_options.name = "nvme bench buffers";
  pool_options.capacity_bytes = depth * block;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<PinnedHostPool> pool, PinnedHostPool::Create(pool_options));
  ECSS_ASSIGN_OR_RETURN(Buffer buffers, pool->Allocate(depth * block, MemoryTag::kStaging));
  // Pseudo-random, as fio's buffers are: data that storage which compresses cannot move faster
  // than model states.
  CounterRng(1, 1).FillBytes(buffers.data(), buffers.size());
  const bool registered = kind == IoEngineKind::kUring && fixed_buffers != 0 &&
                          RegisterIoBuffers(*engine, pool->region(), pool->region_bytes()).ok();
  const std::string path = dir + "/ecss-nvme-bench.dat";
  StatusOr<IoFileId> file = engine->Open(path, OpenMode::kCreate);
  if (!file.ok()) return file.status().Annotate(StrCat("--dir ", dir));
  ECSS_RETURN_IF_ERROR(engine->Allocate(*file, file_bytes));
  // Lay the file out once, untimed, as fio does before it measures: later writes then
  // overwrite written blocks instead of converting unwritten extents.
  ECSS_RETURN_IF_ERROR(
      RunIoPattern(*engine, *file, kPatterns[0], file_bytes / block, block, buffers.as<uint8_t>())
          .status());
  const bool run_fio = with_fio == "yes" || (with_fio == "auto" && HaveFio());

  const char* reference =
      run_fio ? "fio --direct=1 --ioengine=io_uring (fio_*) and with --fixedbufs --registerfiles "
                "(fio_registered_*), same file size, block size and queue depth, same directory, "
                "interleaved with the engine's samples"
      : with_fio == "no" ? "--fio no: no reference measured"
                         : "fio not installed: no reference measured";
  json.Field("engine", engine->name())
      .Field("dir", dir)
      .Field("file_bytes", file_bytes)
      .Field("block_bytes", block)
      .Field("queue_depth", depth)
      .Field("registered_buffers", registered)
      .Field("samples", samples)
      .Field("reference", reference)
      .Key("patterns")
      .BeginArray();
  table << "nvme suite: " << engine->name() << ", " << HumanBytes(file_bytes) << " file in " << dir
        << ", " << HumanBytes(block) << " blocks, queue depth " << depth << ", median of "
        << samples << "\n"
        << std::left << std::setw(11) << "pattern" << std::right << std::setw(12) << "ecss GB/s";
  for (size_t r = 0; run_fio && r < kFioReferences.size(); ++r) {
    table << std::setw(kFioReferences[r].width) << kFioReferences[r].title << std::setw(10)
          << "ratio";
  }
  table << "\n" << std::fixed << std::setprecision(3);
  double read_gbps = 0, write_gbps = 0;
  for (const Pattern& pattern : kPatterns) {
    std::vector<double> ecss_samples;
    std::array<std::vector<double>, kFioReferences.size()> fio_samples;
    std::array<Status, kFioReferences.size()> fio_status;
    for (uint64_t s = 0; s < samples; ++s) {
      ECSS_ASSIGN_OR_RETURN(double sample, RunIoPattern(*engine, *file, pattern, file_bytes / block,
                                                        block, buffers.as<uint8_t>()));
      ecss_samples.push_back(sample);
      for (size_t r = 0; run_fio && r < kFioReferences.size(); ++r) {
        StatusOr<double> fio = RunFio(dir + "/ecss-fio-bench.dat", pattern, file_bytes, block,
                                      static_cast<uint32_t>(depth), kFioReferences[r]);
        if (fio.ok() && *fio > 0)
          fio_samples[r].push_back(*fio);
        else
          fio_status[r] = fio.ok() ? UnavailableError("fio reported no bandwidth") : fio.status();
      }
    }
    const double gbps = Median(ecss_samples);
    if (std::string_view(pattern.name) == "read") read_gbps = gbps;
    if (std::string_view(pattern.name) == "write") write_gbps = gbps;
    json.BeginObject().Field("rw", pattern.name).Field("gbps", gbps);
    table << std::left << std::setw(11) << pattern.name << std::right << std::setw(12) << gbps;
    for (size_t r = 0; run_fio && r < kFioReferences.size(); ++r) {
      const std::string key = kFioReferences[r].name;
      const int width = kFioReferences[r].width;
      if (!fio_samples[r].empty()) {
        const double fio = Median(fio_samples[r]);
        json.Field(key + "_gbps", fio).Field("vs_" + key, gbps / fio);
        table << std::setw(width) << fio << std::setw(10) << gbps / fio;
      } else {
        json.Field(key + "_error", std::string(fio_status[r].message()));
        table << std::setw(width) << "-" << std::setw(10) << "-";
      }
    }
    json.EndObject();
    table << "\n";
  }
  json.EndArray().Field("read_gbps", read_gbps).Field("write_gbps", write_gbps);
  engine->Close(*file).IgnoreError();
  ::unlink(path.c_str());
  if (run_fio) ::unlink((dir + "/ecss-fio-bench.dat").c_str());
  return Status::Ok();
}

}  // namespace ecss::bench
