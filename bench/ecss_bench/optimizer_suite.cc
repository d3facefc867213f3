// `ecss-bench optimizer`: the fused CPU AdamW update (unscale, clip, moments, master, bf16
// copy in one pass) against, measured in the same run:
//   - the roofline: a plain streaming kernel that reads 4 and writes 3 fp32 arrays of the same
//     length plus the bf16 array, with non-temporal stores: the memory traffic of an update
//     with almost no arithmetic, i.e. the most updates/s this machine's memory allows;
//   - the unfused baseline: the same work as a straightforward loop per operation (a
//     temporary unscaled gradient, moments, master, copy), as frameworks do op by op.
// 1 thread runs on the calling thread; "all threads" splits the range over every core.
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <thread>
#include <utility>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "engine/expert_updater.h"
#include "engine/store_state_tier.h"
#include "offload/expert_store.h"
#include "offload/io/io_engines.h"
#include "offload/state_file.h"
#include "optimizer/cpu_optimizer.h"
#include "optimizer/state_pipeline.h"
#include "runtime/base/file_util.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/host_allocator.h"
#include "runtime/device/pinned_pool.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss::bench {

namespace {

using Clock = std::chrono::steady_clock;

struct Arrays {
  float* p;
  const float* g;
  float* m;
  float* v;
  BFloat16* copy;
  float* scratch;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
// Reads p, g, m, v; writes p, m, v and a 16-bit copy; streaming stores; trivial arithmetic.
void RooflineAvx512(const Arrays& a, size_t begin, size_t end) {
  size_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 g = _mm512_load_ps(a.g + i);
    const __m512 p = _mm512_add_ps(_mm512_load_ps(a.p + i), g);
    _mm512_stream_ps(a.m + i, _mm512_add_ps(_mm512_load_ps(a.m + i), g));
    _mm512_stream_ps(a.v + i, _mm512_add_ps(_mm512_load_ps(a.v + i), g));
    _mm512_stream_ps(a.p + i, p);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(a.copy + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(p), 16)));
  }
  _mm_sfence();
}
#pragma GCC pop_options

void RooflineScalar(const Arrays& a, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    const float g = a.g[i];
    a.p[i] += g;
    a.m[i] += g;
    a.v[i] += g;
    a.copy[i].bits = static_cast<uint16_t>(FloatBits(a.p[i]) >> 16);
  }
}

void Roofline(const Arrays& a, size_t begin, size_t end) {
  if (SimdIsaSupported(SimdIsa::kAvx512)) {
    RooflineAvx512(a, begin, end);
  } else {
    RooflineScalar(a, begin, end);
  }
}

// The same AdamW step as separate passes over memory.
void Unfused(const Arrays& a, const UpdateScalars& s, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) a.scratch[i] = a.g[i] * s.grad_multiplier;
  for (size_t i = begin; i < end; ++i) a.m[i] = s.beta1 * a.m[i] + s.one_minus_beta1 * a.scratch[i];
  for (size_t i = begin; i < end; ++i) {
    a.v[i] = s.beta2 * a.v[i] + s.one_minus_beta2 * a.scratch[i] * a.scratch[i];
  }
  for (size_t i = begin; i < end; ++i) a.p[i] *= s.decay_factor;
  for (size_t i = begin; i < end; ++i) {
    a.p[i] -= s.step_size * a.m[i] / (std::sqrt(a.v[i]) * s.inverse_bias2_sqrt + s.eps);
  }
  for (size_t i = begin; i < end; ++i) a.copy[i] = FloatToBf16(a.p[i]);
}

// Runs fn over [0, n) split into `threads` contiguous, 64-byte aligned parts; returns seconds.
template <typename Fn>
double TimeSplit(size_t n, unsigned threads, Fn&& fn) {
  const Clock::time_point start = Clock::now();
  if (threads <= 1) {
    fn(size_t{0}, n);
  } else {
    std::vector<std::thread> workers;
    const size_t part = (n / threads + 15) / 16 * 16;
    for (unsigned t = 0; t < threads; ++t) {
      const size_t begin = std::min(n, t * part);
      const size_t end = t + 1 == threads ? n : std::min(n, begin + part);
      workers.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
    for (auto& w : workers) w.join();
  }
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The directories the runs' states live in: kStatesPrefix + pid + digits under --dir (ScratchDir).
constexpr std::string_view kStatesPrefix = "ecss-bench-states.";

// One round of --states nvme: the drive's rates measured right before a pipeline pass, and
// the pass. Each update reads 12 bytes and writes 12 (master, m, v), so the bound is
// 1 / (12 / read + 12 / write).
struct NvmeRound {
  double read_gbps = 0, write_gbps = 0, updates_per_s = 0;
  StreamingReport report;
  double bound() const { return 1e9 / (12.0 / read_gbps + 12.0 / write_gbps); }
  double fraction() const { return updates_per_s / bound(); }
};

// The rounds' figures: every scalar from the median round (by fraction; of an even count the
// lower of the two middle ones), so that they agree with each other, and each round's
// fraction, rate and bound beside them.
void ReportNvmeRounds(const std::vector<NvmeRound>& rounds, const std::string& dir,
                      uint32_t experts, uint64_t expert_elements, uint64_t buffers, uint64_t loads,
                      uint64_t stores, JsonWriter& json, std::ostream& table) {
  std::vector<size_t> order(rounds.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t x, size_t y) { return rounds[x].fraction() < rounds[y].fraction(); });
  const NvmeRound& median = rounds[order[(order.size() - 1) / 2]];
  const StreamingReport& report = median.report;
  json.Field("optimizer", "adamw")
      .Field("states", "nvme")
      .Field("dir", dir)
      .Field("params", static_cast<uint64_t>(experts) * expert_elements)
      .Field("experts", static_cast<uint64_t>(experts))
      .Field("buffers", buffers)
      .Field("loads_in_flight", loads)
      .Field("stores_in_flight", stores)
      .Field("rounds", static_cast<uint64_t>(rounds.size()))
      .Field("updates_per_s", median.updates_per_s)
      .Field("nvme_bound_updates_per_s", median.bound())
      .Field("fraction_of_nvme_bound", median.fraction())
      .Field("nvme_read_gbps", median.read_gbps)
      .Field("nvme_write_gbps", median.write_gbps)
      .Field("nvme_bytes_per_update", 24)
      .Field("load_busy_s", report.load_seconds)
      .Field("update_busy_s", report.update_seconds)
      .Field("store_busy_s", report.store_seconds)
      .Field("wall_s", report.wall_seconds);
  const std::pair<const char*, double (*)(const NvmeRound&)> series[] = {
      {"round_fractions", [](const NvmeRound& r) { return r.fraction(); }},
      {"round_updates_per_s", [](const NvmeRound& r) { return r.updates_per_s; }},
      {"round_nvme_bound_updates_per_s", [](const NvmeRound& r) { return r.bound(); }}};
  for (const auto& [key, value] : series) {
    json.Key(key).BeginArray();
    for (const NvmeRound& r : rounds) json.Double(value(r));
    json.EndArray();
  }
  json.Field("reference",
             "rounds of: NVMe read GB/s of the state files and write GB/s of a scratch file of "
             "their size, through the same engine in the same directory, then the pipeline; "
             "bound = 1 / (12 B / read + 12 B / write) of the round's rates; the figures are "
             "the median round's (by fraction)");
  table << std::fixed << std::setprecision(2) << "optimizer suite, states on NVMe (" << dir
        << "): " << experts << " experts x " << expert_elements << " parameters, " << buffers
        << " staging buffers, " << loads << " loads and " << stores << " stores at once, "
        << rounds.size() << " rounds\n"
        << "  updates/s       " << median.updates_per_s / 1e6 << " M (the median round)\n"
        << "  NVMe bound      " << median.bound() / 1e6 << " M (read " << median.read_gbps
        << " GB/s, write " << median.write_gbps << " GB/s; 24 B per update)\n"
        << "  fraction        " << median.fraction() << " (rounds:";
  for (const NvmeRound& r : rounds) table << " " << r.fraction();
  table << ")\n"
        << "  stages busy     load " << report.load_seconds << " s, update "
        << report.update_seconds << " s, store " << report.store_seconds
        << " s (threads summed), wall " << report.wall_seconds << " s\n";
}

// --states nvme: master and moments on NVMe, streamed through pinned staging slots (load ->
// update -> store), with a session's slots, loads and stores at once unless told otherwise,
// in `rounds` rounds of (the drive's rates, a pipeline pass): this VM's disk moves by 2-3x
// between minutes, so each pass is held to the rates measured right before it.
Status RunNvmeStates(BenchArgs& args, uint64_t params, uint64_t rounds, JsonWriter& json,
                     std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(std::string dir, args.String("dir", "."));
  ECSS_ASSIGN_OR_RETURN(uint64_t expert_elements, args.Uint("expert-elements", uint64_t{1} << 20));
  // Each load, store and slot is a thread or a pinned slot of an expert: a few dozen at most.
  constexpr uint64_t kMaxInFlight = 64, kMaxSlots = 256;
  constexpr uint64_t kMaxExpertElements = uint64_t{1} << 32;  // 16 GiB an array
  NvmeUpdaterOptions session;
  ECSS_ASSIGN_OR_RETURN(uint64_t loads, args.Uint("loads", session.loads_in_flight));
  ECSS_ASSIGN_OR_RETURN(uint64_t stores, args.Uint("stores", session.stores_in_flight));
  session.expert_elements = expert_elements;
  session.loads_in_flight = static_cast<int>(std::min(loads, kMaxInFlight));
  session.stores_in_flight = static_cast<int>(std::min(stores, kMaxInFlight));
  ECSS_ASSIGN_OR_RETURN(uint64_t buffers, args.Uint("buffers", StagingSlots(session)));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (expert_elements == 0 || expert_elements > kMaxExpertElements) {
    return InvalidArgumentError(
        StrCat("--expert-elements ", expert_elements, ": must be 1 to ", kMaxExpertElements));
  }
  if (params < expert_elements || params / expert_elements > UINT32_MAX) {
    return InvalidArgumentError(StrCat("--params ", params,
                                       ": must be at least --expert-elements (", expert_elements,
                                       ") and at most ", UINT32_MAX, " experts of them"));
  }
  for (const auto& [flag, value] : {std::pair{"--loads", loads}, std::pair{"--stores", stores}}) {
    if (value < 1 || value > kMaxInFlight) {
      return InvalidArgumentError(StrCat(flag, " ", value, ": must be 1 to ", kMaxInFlight));
    }
  }
  if (buffers < std::max<uint64_t>({2, loads, stores}) || buffers > kMaxSlots) {
    return InvalidArgumentError(StrCat("--buffers ", buffers, ": must be at least 2, --loads (",
                                       loads, ") and --stores (", stores, "), and at most ",
                                       kMaxSlots));
  }
  if (rounds == 0) return InvalidArgumentError("--samples 0: must be >= 1");
  const auto experts = static_cast<uint32_t>(params / expert_elements);
  IoEngineOptions io;
  io.queue_depth = 8;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> load_engine,
                        CreateIoEngine(IoEngineKind::kUring, io));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> store_engine,
                        CreateIoEngine(IoEngineKind::kUring, io));
  // The states live where a session keeps them: an expert store (its staging in the sim's
  // pinned memory), in a directory of its own that the run removes again (and the next run,
  // after a kill).
  ECSS_ASSIGN_OR_RETURN(ScratchDir scratch_dir, ScratchDir::Create(dir, kStatesPrefix));
  const std::string& store_dir = scratch_dir.path();
  const size_t block = StateArrayBytes(expert_elements);
  // Blocks of one array: the master's file holds one a shadow slot, the moments' two.
  const uint64_t master_blocks = static_cast<uint64_t>(experts) * 2;
  const uint64_t moment_blocks = master_blocks * 2;
  const uint64_t blocks = master_blocks + moment_blocks;
  // The state files, and the write measurement's scratch file of their size.
  const uint64_t need = 2 * blocks * (block + 4096);
  ECSS_RETURN_IF_ERROR(
      CheckDirHasRoom(dir, store_dir, need,
                      StrCat("the run's state files and its write measurement's file take ",
                             HumanBytes(need), ": choose a smaller --params or another --dir")));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> sim, SimBackend::Create({}));
  ExpertStoreOptions store_options;
  store_options.layout.experts_per_layer = {experts};
  store_options.layout.params_per_expert = expert_elements;
  store_options.layout.weights_dtype = DType::kBF16;
  store_options.layout.moments = 2;
  store_options.placement = {Tier::kNone, Tier::kNvme, Tier::kNvme, Tier::kNone};
  store_options.dirs = {store_dir};
  store_options.io_engines = [io] { return CreateIoEngine(IoEngineKind::kUring, io); };
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ExpertStore> store,
                        ExpertStore::Create(*sim, store_options));

  PinnedPoolOptions pool_options;
  pool_options.name = "state staging";
  // Staging slots, the initial master, the gradient, and one buffer per request in flight for
  // the bandwidth measurement.
  pool_options.capacity_bytes =
      (buffers * 3 + 1 + io.queue_depth) * block + expert_elements * 4 + 4096;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<PinnedHostPool> pool, PinnedHostPool::Create(pool_options));
  // Every expert's master and moments, twice (untimed): both shadow slots are written, as
  // after the first updates, so that every read below comes from the disk (a new store's
  // files are sparse, and a hole reads without I/O).
  {
    std::vector<float> master(expert_elements);
    const std::vector<float> moments(2 * expert_elements, 0.0f);
    for (uint64_t i = 0; i < expert_elements; ++i) master[i] = 0.01f * static_cast<float>(i % 97);
    for (uint64_t version : {1, 2}) {
      for (uint32_t e = 0; e < experts; ++e) {
        ECSS_RETURN_IF_ERROR(store->Write(ExpertState::kMaster, {0, e}, master.data(), version));
        ECSS_RETURN_IF_ERROR(store->Write(ExpertState::kMoments, {0, e}, moments.data(), version));
      }
    }
    ECSS_RETURN_IF_ERROR(store->Flush());
  }
  // The rates: reads of the state files themselves, the master's and the moments' (two
  // shadow slots per expert: what the pipeline reads from, half of it), and writes of a
  // scratch file of their size (rewriting the state files would break their checksums).
  ECSS_ASSIGN_OR_RETURN(Buffer io_buffers,
                        pool->Allocate(io.queue_depth * block, MemoryTag::kStaging));
  std::memset(io_buffers.data(), 0, io_buffers.size());
  ECSS_ASSIGN_OR_RETURN(IoFileId master_file,
                        load_engine->Open(store_dir + "/ecss-store-master-0.bin", OpenMode::kRead));
  ECSS_ASSIGN_OR_RETURN(
      IoFileId moments_file,
      load_engine->Open(store_dir + "/ecss-store-moments-0.bin", OpenMode::kRead));
  ECSS_ASSIGN_OR_RETURN(IoFileId scratch,
                        store_engine->Open(store_dir + "/ecss-bench-write.dat", OpenMode::kCreate));
  ECSS_RETURN_IF_ERROR(store_engine->Allocate(scratch, blocks * block));
  const Pattern read{"read", IoOp::kRead, false}, write{"write", IoOp::kWrite, false};
  // Laid out, untimed.
  ECSS_RETURN_IF_ERROR(
      RunIoPattern(*store_engine, scratch, write, blocks, block, io_buffers.as<uint8_t>())
          .status());
  ECSS_ASSIGN_OR_RETURN(Buffer gradient,
                        pool->Allocate(expert_elements * 4, MemoryTag::kGradients));
  for (uint64_t i = 0; i < expert_elements; ++i)
    gradient.as<float>()[i] = 1e-3f * static_cast<float>(i % 89) - 0.04f;

  StoreStateTier tier(store.get());
  StreamingOptions options;
  options.buffers = static_cast<int>(buffers);
  options.loads_in_flight = static_cast<int>(loads);
  options.stores_in_flight = static_cast<int>(stores);
  options.max_expert_elements = expert_elements;
  options.params.lr = 1e-4f;
  ECSS_ASSIGN_OR_RETURN(const uint64_t workspace_bytes,
                        StateStreamingUpdater::WorkspaceBytes(options));
  ECSS_ASSIGN_OR_RETURN(Buffer workspace, pool->Allocate(workspace_bytes, MemoryTag::kStaging));
  ECSS_ASSIGN_OR_RETURN(
      std::unique_ptr<StateStreamingUpdater> updater,
      StateStreamingUpdater::Create(options, &tier, workspace.data(), workspace_bytes));
  std::vector<StreamedGradient> work;
  for (uint32_t e = 0; e < experts; ++e) work.push_back({e, gradient.data(), DType::kF32, nullptr});
  std::vector<NvmeRound> measured(rounds);
  for (NvmeRound& round : measured) {
    uint8_t* buffer = io_buffers.as<uint8_t>();
    // Both state files once each: their bytes over the time they took.
    ECSS_ASSIGN_OR_RETURN(const double master, RunIoPattern(*load_engine, master_file, read,
                                                            master_blocks, block, buffer));
    ECSS_ASSIGN_OR_RETURN(const double moments, RunIoPattern(*load_engine, moments_file, read,
                                                             moment_blocks, block, buffer));
    round.read_gbps =
        static_cast<double>(blocks) / (master_blocks / master + moment_blocks / moments);
    ECSS_ASSIGN_OR_RETURN(round.write_gbps,
                          RunIoPattern(*store_engine, scratch, write, blocks, block, buffer));
    ECSS_ASSIGN_OR_RETURN(round.report, updater->Run(work, 1024.0f, 0.9f));
    round.updates_per_s =
        static_cast<double>(experts) * expert_elements / round.report.wall_seconds;
  }
  load_engine->Close(master_file).IgnoreError();
  load_engine->Close(moments_file).IgnoreError();
  store_engine->Close(scratch).IgnoreError();
  ReportNvmeRounds(measured, dir, experts, expert_elements, buffers, loads, stores, json, table);
  return Status::Ok();
}

}  // namespace

Status RunOptimizerSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t params, args.Uint("params", uint64_t{64} << 20));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 5));
  ECSS_ASSIGN_OR_RETURN(std::string states, args.String("states", "host"));
  if (states == "nvme") return RunNvmeStates(args, params, samples, json, table);
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (states != "host")
    return InvalidArgumentError(StrCat("--states ", states, ": expected host or nvme"));
  if (params < 1024 || samples == 0)
    return InvalidArgumentError("need --params >= 1024 and --samples >= 1");
  const size_t n = params;
  // Host memory through the project's own allocator, as a session's host states have it
  // (64-byte aligned blocks, huge pages).
  HostAllocatorOptions host_options;
  host_options.huge_pages = true;
  host_options.capacity_bytes = n * (4 * 5 + 2) + (uint64_t{1} << 20);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<HostAllocator> host, HostAllocator::Create(host_options));
  ECSS_ASSIGN_OR_RETURN(Buffer p, host->Allocate(n * 4, MemoryTag::kMasterWeights));
  ECSS_ASSIGN_OR_RETURN(Buffer g, host->Allocate(n * 4, MemoryTag::kGradients));
  ECSS_ASSIGN_OR_RETURN(Buffer m, host->Allocate(n * 4, MemoryTag::kOptimizerMoments));
  ECSS_ASSIGN_OR_RETURN(Buffer v, host->Allocate(n * 4, MemoryTag::kOptimizerMoments));
  ECSS_ASSIGN_OR_RETURN(Buffer copy, host->Allocate(n * 2, MemoryTag::kExpertWeights));
  ECSS_ASSIGN_OR_RETURN(Buffer scratch, host->Allocate(n * 4, MemoryTag::kWorkspace));
  const Arrays a{p.as<float>(), g.as<float>(),       m.as<float>(),
                 v.as<float>(), copy.as<BFloat16>(), scratch.as<float>()};
  for (size_t i = 0; i < n; ++i) {  // touch every page; small, finite values
    a.p[i] = 0.01f * static_cast<float>(i % 97);
    g.as<float>()[i] = 1e-3f * static_cast<float>(i % 89) - 0.04f;
    a.m[i] = 0;
    a.v[i] = 0;
    a.scratch[i] = 0;
  }
  std::memset(copy.data(), 0, n * 2);

  const SimdIsa isa = DetectSimdIsa();
  const unsigned all_threads = std::max(1u, std::thread::hardware_concurrency());
  HyperParams hp;
  hp.lr = 1e-4f;
  hp.weight_decay = 0.01f;
  hp.eps = 1e-20f;  // PanGu-Σ's expert epsilon
  const ParamArrays fused{a.p, a.g, DType::kF32, a.m, a.v, a.copy, n};

  struct Row {
    unsigned threads;
    double fused, roofline, unfused;
  };
  std::vector<Row> rows;
  uint64_t step = 0;
  for (unsigned threads : {1u, all_threads}) {
    std::vector<double> fused_s, roofline_s, unfused_s;
    for (uint64_t sample = 0; sample < samples; ++sample) {
      // gradient unscaling (1/1024) and a clip coefficient (0.9) ride in the same pass
      const UpdateScalars s = MakeUpdateScalars(OptimizerKind::kAdamW, hp, ++step, 1024.0f, 0.9f);
      fused_s.push_back(
          TimeSplit(n, threads, [&](size_t b, size_t e) { UpdateRange(isa, s, fused, b, e); }));
      roofline_s.push_back(TimeSplit(n, threads, [&](size_t b, size_t e) { Roofline(a, b, e); }));
      unfused_s.push_back(TimeSplit(n, threads, [&](size_t b, size_t e) { Unfused(a, s, b, e); }));
    }
    rows.push_back({threads, n / Median(fused_s), n / Median(roofline_s), n / Median(unfused_s)});
    if (all_threads == 1) break;
  }

  // Bytes per update: read p, g, m, v (16) + write p, m, v (12) + bf16 copy (2).
  constexpr double kBytesPerUpdate = 30;
  json.Field("optimizer", "adamw")
      .Field("params", params)
      .Field("isa", SimdIsaName(isa))
      .Field("states", "host")
      .Field("bytes_per_update", kBytesPerUpdate)
      .Field("updates_per_s", rows[0].fused)
      .Field("roofline_updates_per_s", rows[0].roofline)
      .Field("fraction_of_roofline", rows[0].fused / rows[0].roofline)
      .Field("unfused_updates_per_s", rows[0].unfused)
      .Field("target_fraction_of_roofline", 0.9)
      .Field("reference",
             "roofline: streaming kernel reading 4 and writing 3 fp32 arrays plus the bf16 copy "
             "with non-temporal stores; unfused: the same AdamW as one loop per operation; same "
             "run, medians over samples")
      .Key("by_threads")
      .BeginArray();
  for (const Row& r : rows) {
    json.BeginObject()
        .Field("threads", static_cast<uint64_t>(r.threads))
        .Field("updates_per_s", r.fused)
        .Field("roofline_updates_per_s", r.roofline)
        .Field("unfused_updates_per_s", r.unfused)
        .Field("fraction_of_roofline", r.fused / r.roofline)
        .Field("memory_gbps", r.fused * kBytesPerUpdate / 1e9)
        .EndObject();
  }
  json.EndArray();

  table << "optimizer suite: AdamW on " << HumanBytes(params * 4) << " of fp32 parameters ("
        << params << "), fp32 grads, bf16 copy, " << SimdIsaName(isa) << ", median of " << samples
        << "\n"
        << std::setw(8) << "threads" << std::setw(14) << "fused M/s" << std::setw(14)
        << "roofline M/s" << std::setw(12) << "fraction" << std::setw(14) << "unfused M/s"
        << std::setw(12) << "fused GB/s"
        << "\n"
        << std::fixed << std::setprecision(2);
  for (const Row& r : rows) {
    table << std::setw(8) << r.threads << std::setw(14) << r.fused / 1e6 << std::setw(14)
          << r.roofline / 1e6 << std::setw(12) << r.fused / r.roofline << std::setw(14)
          << r.unfused / 1e6 << std::setw(12) << r.fused * kBytesPerUpdate / 1e9 << "\n";
  }
  return Status::Ok();
}

}  // namespace ecss::bench
