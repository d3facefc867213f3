// stream_experts: the end-to-end demo of the runtime foundation. Expert weights live in a
// pinned host pool; the simulated device's memory budget holds only a few of them, so each
// step streams the experts its tokens are routed to through a ring of device slots:
//   h2d stream:     copy expert -> slot            (waits until the slot's last kernel is done)
//   compute stream: kernel on the slot             (waits until the copy is done)
//   d2h stream:     copy the kernel's result back  (waits until the kernel is done)
// Copies overlap compute because the three streams are ordered by events, not by each other.
// Every result is checked against the host, and a Chrome trace shows the overlap.
//
// Options: stream_experts --help.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/base/check.h"
#include "runtime/base/file_util.h"
#include "runtime/base/str_cat.h"
#include "runtime/base/trace.h"
#include "runtime/device/sim/sim_backend.h"

namespace ecss {
namespace {

constexpr const char* kUsage =
    "usage: stream_experts [options]\n"
    "  --experts N       experts in the pinned host pool (default 32)\n"
    "  --expert-mib X    MiB of weights per expert (default 8)\n"
    "  --device-mib X    the simulated device's memory: the ring of slots (default 64)\n"
    "  --steps N         steps streamed (default 4)\n"
    "  --h2d-gbps X      the host-to-device link, GB/s (default 12, PCIe-like)\n"
    "  --trace FILE      the Chrome trace (default stream_experts.trace.json)\n"
    "  --help            this text\n"
    "The device is the simulated one in real mode: the demo shows its copy engines' overlap.\n";

struct DemoOptions {
  bool help = false;
  int experts = 32;
  uint64_t expert_bytes = uint64_t{8} << 20;
  uint64_t device_bytes = uint64_t{64} << 20;
  int steps = 4;
  double h2d_gbps = 12.0;  // a PCIe-like link, so that copies take visible time
  std::string trace_path = "stream_experts.trace.json";
};

StatusOr<DemoOptions> ParseOptions(int argc, char** argv) {
  DemoOptions options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      options.help = true;
      return options;
    }
    if (i + 1 >= argc) return InvalidArgumentError(StrCat("option ", arg, " needs a value"));
    const char* value = argv[++i];
    char* end = nullptr;
    const double number = std::strtod(value, &end);
    const bool numeric = end != value && *end == '\0' && number > 0;
    if (arg == "--trace") {
      options.trace_path = value;
      continue;
    }
    if (!numeric) return InvalidArgumentError(StrCat(arg, " = '", value, "' must be a number > 0"));
    if (arg == "--experts")
      options.experts = static_cast<int>(number);
    else if (arg == "--expert-mib")
      options.expert_bytes = static_cast<uint64_t>(number * (1 << 20));
    else if (arg == "--device-mib")
      options.device_bytes = static_cast<uint64_t>(number * (1 << 20));
    else if (arg == "--steps")
      options.steps = static_cast<int>(number);
    else if (arg == "--h2d-gbps")
      options.h2d_gbps = number;
    else
      return InvalidArgumentError(StrCat("unknown option ", arg, " (see --help)"));
  }
  options.expert_bytes = options.expert_bytes / sizeof(float) * sizeof(float);
  if (options.expert_bytes == 0) return InvalidArgumentError("--expert-mib is too small");
  // The trace is written when the run ends: a path that cannot take it is refused now.
  ECSS_RETURN_IF_ERROR(CheckFileWritable(options.trace_path).Annotate("--trace"));
  return options;
}

// The experts a step's tokens are routed to: known before the step starts (RRE), here a fixed
// pseudo-random half of them.
std::vector<int> RoutedExperts(int step, int experts) {
  std::vector<int> routed;
  for (int e = 0; e < experts; ++e) {
    if (((static_cast<uint32_t>(e) * 2654435761u) ^ static_cast<uint32_t>(step * 40503)) % 2 == 0) {
      routed.push_back(e);
    }
  }
  return routed;
}

double SumOfSquares(const float* data, size_t n) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(data[i]) * data[i];
  return sum;
}

Status Run(const DemoOptions& options) {
  using Clock = std::chrono::steady_clock;
  TraceRecorder trace("stream_experts");
  SimOptions sim_options;
  sim_options.device_memory_bytes = options.device_bytes;
  sim_options.h2d_bandwidth_gbps = options.h2d_gbps;
  sim_options.d2h_bandwidth_gbps = options.h2d_gbps;
  sim_options.trace = &trace;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> sim, SimBackend::Create(sim_options));

  const uint64_t total_bytes = options.expert_bytes * static_cast<uint64_t>(options.experts);
  std::printf("experts: %d x %s = %s in pinned host memory; device budget %s\n", options.experts,
              HumanBytes(options.expert_bytes).c_str(), HumanBytes(total_bytes).c_str(),
              HumanBytes(options.device_bytes).c_str());

  // The host tier: every expert's weights in one pinned pool.
  PinnedPoolOptions pool_options;
  pool_options.capacity_bytes = total_bytes + options.experts * sizeof(double);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<PinnedHostPool> pool, sim->CreatePinnedPool(pool_options));
  std::vector<Buffer> weights;
  std::vector<double> expected(options.experts);
  const size_t floats = options.expert_bytes / sizeof(float);
  for (int e = 0; e < options.experts; ++e) {
    ECSS_ASSIGN_OR_RETURN(Buffer buffer,
                          pool->Allocate(options.expert_bytes, MemoryTag::kExpertWeights));
    float* data = buffer.as<float>();
    for (size_t i = 0; i < floats; ++i)
      data[i] = std::sin(0.001f * static_cast<float>(i + e * 7919));
    expected[e] = SumOfSquares(data, floats);
    weights.push_back(std::move(buffer));
  }
  ECSS_ASSIGN_OR_RETURN(Buffer results,
                        pool->Allocate(options.experts * sizeof(double), MemoryTag::kActivations));

  // Putting every expert on the device is refused by the budget, as on a GPU.
  StatusOr<Buffer> everything =
      sim->device_memory().Allocate(total_bytes, MemoryTag::kExpertWeights);
  std::printf("all experts on the device: %s\n",
              everything.ok() ? "fits" : everything.status().ToString().c_str());

  // Device slots: as many as the budget holds, less room for the per-slot results.
  const uint64_t result_bytes = 256;
  const int slots = static_cast<int>((options.device_bytes - result_bytes * 8) /
                                     (options.expert_bytes + result_bytes));
  if (slots < 2) {
    return InvalidArgumentError(StrCat(
        "device budget ", HumanBytes(options.device_bytes), " holds fewer than two experts of ",
        HumanBytes(options.expert_bytes), "; streaming needs at least two slots"));
  }
  std::vector<Buffer> slot_weights, slot_results;
  std::vector<OwnedEvent> loaded, computed, drained;
  for (int s = 0; s < slots; ++s) {
    ECSS_ASSIGN_OR_RETURN(
        Buffer w, sim->device_memory().Allocate(options.expert_bytes, MemoryTag::kExpertWeights));
    ECSS_ASSIGN_OR_RETURN(Buffer r,
                          sim->device_memory().Allocate(result_bytes, MemoryTag::kActivations));
    slot_weights.push_back(std::move(w));
    slot_results.push_back(std::move(r));
    ECSS_ASSIGN_OR_RETURN(OwnedEvent a, CreateOwnedEvent(*sim));
    ECSS_ASSIGN_OR_RETURN(OwnedEvent b, CreateOwnedEvent(*sim));
    ECSS_ASSIGN_OR_RETURN(OwnedEvent c, CreateOwnedEvent(*sim));
    loaded.push_back(std::move(a));
    computed.push_back(std::move(b));
    drained.push_back(std::move(c));
  }
  std::printf("device slots: %d (peak device use %s of %s)\n\n", slots,
              HumanBytes(sim->device_memory().stats().used_bytes).c_str(),
              HumanBytes(options.device_bytes).c_str());
  ECSS_ASSIGN_OR_RETURN(OwnedStream h2d, CreateOwnedStream(*sim, "h2d"));
  ECSS_ASSIGN_OR_RETURN(OwnedStream compute, CreateOwnedStream(*sim, "compute"));
  ECSS_ASSIGN_OR_RETURN(OwnedStream d2h, CreateOwnedStream(*sim, "d2h"));

  // Overlap efficiency: the busiest engine's busy time over the step's time (1.0 = the step
  // took no longer than its bottleneck resource needed).
  std::printf("%-5s %-8s %-12s %-9s %-9s %-8s %s\n", "step", "experts", "streamed", "time ms",
              "H2D GB/s", "overlap", "results");
  int slot = 0;
  for (int step = 0; step < options.steps; ++step) {
    const std::vector<int> routed = RoutedExperts(step, options.experts);
    double* host_results = results.as<double>();
    for (int e : routed) host_results[e] = -1;
    const EngineBusyTimes before = sim->busy_times();
    const Clock::time_point start = Clock::now();
    for (int e : routed) {
      // Reuse the slot only after its previous kernel finished reading it.
      ECSS_RETURN_IF_ERROR(sim->WaitEvent(h2d.get(), computed[slot].get()));
      ECSS_RETURN_IF_ERROR(sim->CopyAsync(h2d.get(), slot_weights[slot].data(), weights[e].data(),
                                          options.expert_bytes, CopyKind::kHostToDevice));
      ECSS_RETURN_IF_ERROR(sim->RecordEvent(loaded[slot].get(), h2d.get()));

      ECSS_RETURN_IF_ERROR(sim->WaitEvent(compute.get(), loaded[slot].get()));
      ECSS_RETURN_IF_ERROR(sim->WaitEvent(compute.get(), drained[slot].get()));
      const float* slot_data = slot_weights[slot].as<float>();
      double* slot_result = slot_results[slot].as<double>();
      KernelTask kernel{StrCat("expert ", e),
                        [slot_data, slot_result, floats] {
                          *slot_result = SumOfSquares(slot_data, floats);
                          return Status::Ok();
                        },
                        0};
      ECSS_RETURN_IF_ERROR(sim->LaunchKernel(compute.get(), std::move(kernel)));
      ECSS_RETURN_IF_ERROR(sim->RecordEvent(computed[slot].get(), compute.get()));

      ECSS_RETURN_IF_ERROR(sim->WaitEvent(d2h.get(), computed[slot].get()));
      ECSS_RETURN_IF_ERROR(sim->CopyAsync(d2h.get(), &host_results[e], slot_result, sizeof(double),
                                          CopyKind::kDeviceToHost));
      ECSS_RETURN_IF_ERROR(sim->RecordEvent(drained[slot].get(), d2h.get()));
      slot = (slot + 1) % slots;
    }
    ECSS_RETURN_IF_ERROR(sim->SynchronizeAll());
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    int correct = 0;
    for (int e : routed) correct += host_results[e] == expected[e] ? 1 : 0;
    const uint64_t streamed = routed.size() * options.expert_bytes;
    const EngineBusyTimes after = sim->busy_times();
    const double busiest = std::max({after.h2d_busy_seconds - before.h2d_busy_seconds,
                                     after.compute_busy_seconds - before.compute_busy_seconds,
                                     after.d2h_busy_seconds - before.d2h_busy_seconds});
    std::printf("%-5d %-8zu %-12s %-9.1f %-9.2f %-8.2f %d/%zu exact\n", step, routed.size(),
                HumanBytes(streamed).c_str(), seconds * 1e3, streamed / seconds / 1e9,
                busiest / seconds, correct, routed.size());
    if (correct != static_cast<int>(routed.size())) {
      return InternalError(StrCat("step ", step, ": ", routed.size() - correct,
                                  " expert results differ from the host's"));
    }
  }

  const EngineBusyTimes engines = sim->busy_times();
  std::printf("\nengines busy: H2D %.1f ms, compute %.1f ms, D2H %.1f ms\n",
              engines.h2d_busy_seconds * 1e3, engines.compute_busy_seconds * 1e3,
              engines.d2h_busy_seconds * 1e3);
  std::printf("device memory: peak %s of budget %s (%s)\n",
              HumanBytes(sim->device_memory().stats().peak_used_bytes).c_str(),
              HumanBytes(options.device_bytes).c_str(),
              sim->device_memory().accounting().Summary().c_str());
  h2d.Destroy().IgnoreError();
  compute.Destroy().IgnoreError();
  d2h.Destroy().IgnoreError();
  ECSS_RETURN_IF_ERROR(trace.WriteJson(options.trace_path));
  std::printf("trace: %s (%zu events; open in https://ui.perfetto.dev)\n",
              options.trace_path.c_str(), trace.event_count());
  return Status::Ok();
}

}  // namespace
}  // namespace ecss

int main(int argc, char** argv) {
  ecss::StatusOr<ecss::DemoOptions> options = ecss::ParseOptions(argc, argv);
  if (!options.ok()) {
    std::fprintf(stderr, "stream_experts: %s\n", options.status().ToString().c_str());
    return 2;
  }
  if (options->help) {
    std::fputs(ecss::kUsage, stdout);
    return 0;
  }
  ecss::Status status = ecss::Run(*options);
  if (!status.ok()) {
    std::fprintf(stderr, "stream_experts: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
