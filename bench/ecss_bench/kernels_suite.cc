// `ecss-bench kernels`: the grouped expert FFN (forward + backward, the CPU implementation that
// the simulated device runs) in GFLOPS, against the BLAS library's own single sgemm measured in
// the same run with as many threads, on the same total work: one [rows, d_model] x
// [d_model, d_ff] product repeated until it has done as many FLOPs. Reports fp32 and bf16, and
// the cost model's time for the same problem on a device profile.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <thread>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "kernels/cost_model.h"
#include "kernels/cpu/cpu_kernels.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss::bench {
namespace {

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Fill(float* data, uint64_t count, uint64_t stream, float scale) {
  CounterRng rng(42, stream);
  for (uint64_t i = 0; i < count; ++i) data[i] = (rng.UniformFloat() * 2 - 1) * scale;
}

// Page-aligned zeroed host memory that frees itself.
struct HostArray {
  explicit HostArray(uint64_t bytes)
      : data(static_cast<char*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096)),
             &std::free) {
    std::memset(data.get(), 0, (bytes + 4095) / 4096 * 4096);
  }
  std::unique_ptr<char, decltype(&std::free)> data;
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data.get());
  }
};

struct DtypeResult {
  DType dtype;
  double seconds;
  double gflops;
  double modeled_seconds;
};

}  // namespace

Status RunKernelsSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t d_model, args.Uint("d-model", 1024));
  ECSS_ASSIGN_OR_RETURN(uint64_t d_ff, args.Uint("d-ff", 4096));
  ECSS_ASSIGN_OR_RETURN(uint64_t experts, args.Uint("experts", 8));
  ECSS_ASSIGN_OR_RETURN(uint64_t tokens, args.Uint("tokens-per-expert", 512));
  ECSS_ASSIGN_OR_RETURN(std::string activation_name, args.String("activation", "gelu"));
  ECSS_ASSIGN_OR_RETURN(uint64_t threads, args.Uint("threads", 0));
  ECSS_ASSIGN_OR_RETURN(uint64_t samples, args.Uint("samples", 3));
  ECSS_ASSIGN_OR_RETURN(std::string profile_name, args.String("profile", "h100-sxm"));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (d_model == 0 || d_ff == 0 || experts == 0 || tokens == 0 || samples == 0 || d_model > 65536 ||
      d_ff > 65536 || experts * tokens > (uint64_t{1} << 24)) {
    return InvalidArgumentError(
        "need d-model, d-ff, experts, tokens-per-expert, samples > 0 "
        "(d-model, d-ff <= 65536; experts x tokens <= 2^24)");
  }
  ECSS_ASSIGN_OR_RETURN(Activation activation, ParseActivation(activation_name));
  ECSS_ASSIGN_OR_RETURN(DeviceProfile profile, FindDeviceProfile(profile_name));
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());

  CpuKernelOptions options;
  options.threads = static_cast<int>(threads);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CpuKernels> kernels, CpuKernels::Create(options));

  std::vector<uint32_t> offsets(experts + 1);
  for (uint64_t g = 0; g <= experts; ++g) offsets[g] = static_cast<uint32_t>(g * tokens);
  GroupedFfnProblem p;
  p.d_model = static_cast<uint32_t>(d_model);
  p.d_ff = static_cast<uint32_t>(d_ff);
  p.activation = activation;
  p.num_groups = static_cast<uint32_t>(experts);
  p.group_offsets = offsets.data();
  p.rows = static_cast<uint32_t>(experts * tokens);
  p.saved = SavedActivation::kKeep;
  const uint64_t rows = p.rows;
  const uint64_t in_elems = d_model * p.d_in(), out_elems = d_ff * d_model;

  // fp32 data; the bf16 run converts it.
  HostArray x(rows * d_model * 4), dy(rows * d_model * 4), y(rows * d_model * 4),
      dx(rows * d_model * 4), saved(rows * p.d_in() * 4);
  Fill(x.as<float>(), rows * d_model, 1, 1.0f);
  Fill(dy.as<float>(), rows * d_model, 2, 1.0f);
  std::vector<HostArray> w_in, w_out, dw_in, dw_out;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_model));
  for (uint64_t g = 0; g < experts; ++g) {
    w_in.emplace_back(in_elems * 4);
    w_out.emplace_back(out_elems * 4);
    dw_in.emplace_back(in_elems * 4);
    dw_out.emplace_back(out_elems * 4);
    Fill(w_in.back().as<float>(), in_elems, 10 + g, scale);
    Fill(w_out.back().as<float>(), out_elems, 100 + g, scale);
  }
  const double flops = FfnForwardGemmFlops(p) + FfnBackwardGemmFlops(p);

  // The inputs of each dtype (bf16 converted once, outside the timing).
  struct Variant {
    DType dtype;
    HostArray x, dy;
    std::vector<HostArray> w_in, w_out;
    std::vector<const void*> w_in_ptr, w_out_ptr;
  };
  std::vector<float*> dw_in_ptr, dw_out_ptr;
  for (uint64_t g = 0; g < experts; ++g) {
    dw_in_ptr.push_back(dw_in[g].as<float>());
    dw_out_ptr.push_back(dw_out[g].as<float>());
  }
  std::vector<Variant> variants;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const uint64_t e = DTypeSize(dtype);
    Variant v{dtype, HostArray(rows * d_model * e), HostArray(rows * d_model * e), {}, {}, {}, {}};
    ConvertFromF32(x.as<float>(), v.x.data.get(), dtype, rows * d_model);
    ConvertFromF32(dy.as<float>(), v.dy.data.get(), dtype, rows * d_model);
    for (uint64_t g = 0; g < experts; ++g) {
      v.w_in.emplace_back(in_elems * e);
      v.w_out.emplace_back(out_elems * e);
      ConvertFromF32(w_in[g].as<float>(), v.w_in.back().data.get(), dtype, in_elems);
      ConvertFromF32(w_out[g].as<float>(), v.w_out.back().data.get(), dtype, out_elems);
    }
    for (uint64_t g = 0; g < experts; ++g) {
      v.w_in_ptr.push_back(v.w_in[g].data.get());
      v.w_out_ptr.push_back(v.w_out[g].data.get());
    }
    variants.push_back(std::move(v));
  }
  uint64_t ws_bytes = 0;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    p.dtype = dtype;
    ws_bytes = std::max<uint64_t>(
        {ws_bytes, kernels->FfnForwardWorkspaceBytes(p), kernels->FfnBackwardWorkspaceBytes(p)});
  }
  HostArray ws(ws_bytes);
  auto run_grouped = [&](const Variant& v) -> Status {
    p.dtype = v.dtype;
    ECSS_RETURN_IF_ERROR(kernels->FfnForward(
        p, {v.x.data.get(), v.w_in_ptr.data(), v.w_out_ptr.data(), y.data.get(), saved.as<float>()},
        {ws.data.get(), ws_bytes}));
    return kernels->FfnBackward(
        p,
        {v.x.data.get(), v.w_in_ptr.data(), v.w_out_ptr.data(), saved.as<float>(), v.dy.data.get(),
         dx.data.get(), dw_in_ptr.data(), dw_out_ptr.data()},
        {ws.data.get(), ws_bytes});
  };

  // The reference: OpenBLAS's own threading on one big sgemm of the same M, N, K, repeated to
  // the same FLOPs. (CpuKernels keeps OpenBLAS single-threaded; the reference sets it to
  // `threads` for its own calls.)
  const double gemm_flops = 2.0 * static_cast<double>(rows) * d_model * d_ff;
  const auto repeats = static_cast<uint64_t>(std::max(1.0, std::round(flops / gemm_flops)));
  HostArray big_b(d_model * d_ff * 4), big_c(rows * d_ff * 4);
  Fill(big_b.as<float>(), d_model * d_ff, 7, scale);
  auto run_blas = [&] {
    openblas_set_num_threads(static_cast<int>(threads));
    for (uint64_t r = 0; r < repeats; ++r) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(rows),
                  static_cast<blasint>(d_ff), static_cast<blasint>(d_model), 1.0f, x.as<float>(),
                  static_cast<blasint>(d_model), big_b.as<float>(), static_cast<blasint>(d_ff),
                  0.0f, big_c.as<float>(), static_cast<blasint>(d_ff));
    }
    openblas_set_num_threads(1);
  };
  // OpenBLAS's workers spin for a while after a parallel call, and TBB's briefly after a
  // parallel loop: each timed run starts after a pause, so that it never competes with the
  // previous one's idle threads (that cost the grouped runs 20% here).
  auto settle = [] { std::this_thread::sleep_for(std::chrono::milliseconds(300)); };

  // Samples interleave the variants and the reference, so that a machine whose speed drifts
  // (shared VMs do) slows all of them alike; the first round warms up and is not counted.
  std::vector<std::vector<double>> times(variants.size());
  std::vector<double> blas_times;
  for (uint64_t s = 0; s <= samples; ++s) {
    for (size_t v = 0; v < variants.size(); ++v) {
      settle();
      const auto start = std::chrono::steady_clock::now();
      ECSS_RETURN_IF_ERROR(run_grouped(variants[v]));
      if (s > 0) times[v].push_back(Seconds(start));
    }
    settle();
    const auto start = std::chrono::steady_clock::now();
    run_blas();
    if (s > 0) blas_times.push_back(Seconds(start));
  }
  const double blas_gflops = gemm_flops * static_cast<double>(repeats) / Median(blas_times) * 1e-9;
  std::vector<DtypeResult> results;
  for (size_t v = 0; v < variants.size(); ++v) {
    p.dtype = variants[v].dtype;
    const double seconds = Median(times[v]);
    results.push_back(
        {p.dtype, seconds, flops / seconds * 1e-9,
         ModeledSeconds(FfnForwardCost(p), profile) + ModeledSeconds(FfnBackwardCost(p), profile)});
  }

  json.Field("d_model", d_model)
      .Field("d_ff", d_ff)
      .Field("experts", experts)
      .Field("tokens_per_expert", tokens)
      .Field("activation", ActivationName(activation))
      .Field("threads", threads)
      .Field("gemm_flops_per_step", flops)
      .Field("blas_gflops", blas_gflops)
      .Field("reference",
             StrCat("OpenBLAS cblas_sgemm [", rows, " x ", d_model, "] x [", d_model, " x ", d_ff,
                    "] with ", threads, " threads, repeated to the same FLOPs, same run"));
  for (const DtypeResult& r : results) {
    json.Key(DTypeName(r.dtype))
        .BeginObject()
        .Field("seconds", r.seconds)
        .Field("grouped_gflops", r.gflops)
        .Field("grouped_vs_blas", r.gflops / blas_gflops)
        .Field("modeled_seconds", r.modeled_seconds)
        .EndObject();
  }
  json.Field("grouped_gflops", results[0].gflops).Field("profile", profile.name);
  table << "kernels suite: grouped FFN forward+backward, " << experts << " experts x " << tokens
        << " tokens, d_model " << d_model << ", d_ff " << d_ff << ", " << ActivationName(activation)
        << ", " << threads << " threads\n"
        << std::fixed << std::setprecision(1) << "  BLAS sgemm reference: " << blas_gflops
        << " GFLOPS\n";
  for (const DtypeResult& r : results) {
    table << "  " << std::left << std::setw(5) << DTypeName(r.dtype) << std::right
          << std::setprecision(1) << std::setw(8) << r.gflops << " GFLOPS  " << std::setprecision(2)
          << r.gflops / blas_gflops << "x BLAS  (" << std::setprecision(3) << r.seconds << " s; "
          << profile.name << " model: " << r.modeled_seconds * 1e3 << " ms)\n";
  }
  return Status::Ok();
}

}  // namespace ecss::bench
