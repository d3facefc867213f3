// `ecss-bench optimizer`: the fused CPU AdamW update (unscale, clip, moments, master, bf16
// copy in one pass) against, measured in the same run:
//   - the roofline: a plain streaming kernel that reads 4 and writes 3 fp32 arrays of the same
//     length plus the bf16 array, with non-temporal stores: the memory traffic of an update
//     with almost no arithmetic, i.e. the most updates/s this machine's memory allows;
//   - the unfused baseline: the same work as a straightforward loop per operation (a
//     temporary unscaled gradient, moments, master, copy), as frameworks do op by op.
// 1 thread runs on the calling thread; "all threads" splits the range over every core.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <thread>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "optimizer/cpu_optimizer.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/host_allocator.h"

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

}  // namespace

Status RunOptimizerSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t params, args.Uint("params", uint64_t{64} << 20));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 5));
  ECSS_ASSIGN_OR_RETURN(std::string states, args.String("states", "host"));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (states != "host") {
    return UnimplementedError(StrCat("--states ", states,
                                     ": NVMe-resident states need the offload tier, which is not "
                                     "built yet; only --states host is measured"));
  }
  if (params < 1024 || samples == 0)
    return InvalidArgumentError("need --params >= 1024 and --samples >= 1");
  const size_t n = params;
  // Host memory through the project's own allocator (64-byte aligned blocks).
  HostAllocatorOptions host_options;
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
