// ecss-bench: the offload benchmark suite. `ecss-bench SUITE [options] [--json]`.
// Each suite measures one capability against a reference measured in the same run and prints
// a human table, or with --json a single JSON object on stdout.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/arena_allocator.h"
#include "runtime/device/device_profile.h"

namespace ecss::bench {

namespace {

const std::vector<Suite>& Suites() {
  static const std::vector<Suite> suites = {
      {"device",
       "H2D/D2H GB/s through the simulated device's copy engines vs memcpy; how closely "
       "timed mode's wall clock follows the modelled time",
       "  --sizes LIST            copy sizes, e.g. 64K,1M,16M,64M (default)\n"
       "  --bytes-per-sample N    bytes copied per timed sample (default 536870912)\n"
       "  --samples N             samples per size; the median is reported (default 5)\n"
       "  --profile NAME          timed part: the link bandwidths and kernel speed "
       "(default h100-sxm)\n"
       "  --timed-rounds N        timed part: rounds of h2d, 2 kernels, d2h; 0 skips it "
       "(default 400)\n"
       "  --load-threads N        timed part: spinning threads of the loaded run "
       "(default: the cores)\n",
       RunDeviceSuite},
      {"router", "RRE routing-plan building, token-layer routings/s on one core",
       "  --layers N              RRE layers per plan (default 4)\n"
       "  --tokens N              tokens per micro-batch (default 65536)\n"
       "  --seq-len N             tokens per sample (default 2048)\n"
       "  --vocab N               vocabulary size (default 50257)\n"
       "  --domains N             domains in the model (default 40)\n"
       "  --experts-per-domain N  group size (default 8)\n"
       "  --domains-per-batch N   domains the batch's samples come from (default 4)\n"
       "  --iterations N          timed builds; the median is reported (default 30)\n",
       RunRouterSuite},
      {"router-imbalance", "per-domain expert load on real text: uniform vs frequency-aware RRE",
       "  --vocab N                 tokenizer vocabulary (default 16384)\n"
       "  --experts-per-domain N    group size (default 16)\n"
       "  --max-bytes-per-domain N  corpus bytes read per domain (default 4194304)\n",
       RunRouterImbalanceSuite},
      {"optimizer", "fused CPU AdamW updates/s vs the memory roofline and an unfused loop",
       "  --params N    fp32 parameters updated (default 67108864)\n"
       "  --samples N   timed passes per variant; the median is reported (default 5); nvme: "
       "rounds\n"
       "                of a read pass, a write pass and a pipeline pass, interleaved\n"
       "  --states S    where master and moments live: host or nvme (default host)\n"
       "  --dir DIR     nvme: directory of the state file (default .)\n"
       "  --expert-elements N  nvme: parameters per expert, at most 2^32 (default 1048576)\n"
       "  --buffers N   nvme: staging slots of the pipeline, at least 2, --loads and --stores,\n"
       "                at most 256 (default: a session's: loads + stores + 1 for experts of\n"
       "                up to 32 MiB of states, else the most of 3, loads and stores)\n"
       "  --loads N     nvme: loads at once, 1 to 64 (default: a session's, 2)\n"
       "  --stores N    nvme: stores at once, 1 to 64 (default: a session's, 2)\n",
       RunOptimizerSuite},
      {"nvme", "read/write GB/s of 1 MiB blocks through the io_uring engine vs fio",
       "  --dir DIR            directory of the test files (default .)\n"
       "  --file-size N        bytes per test file (default 1073741824)\n"
       "  --samples N          runs per pattern, each of ECSS and fio; medians (default 3)\n"
       "  --block-size N       bytes per request (default 1048576)\n"
       "  --queue-depth N      requests in flight (default 32)\n"
       "  --engine E           uring, posix or memory (default uring)\n"
       "  --fio auto|yes|no    run fio as the reference (default auto: when installed)\n",
       RunNvmeSuite},
      {"cache", "device cache hit rate and bytes moved: Belady vs LRU on real routing plans",
       "  --layers N             RRE layers (default 4)\n"
       "  --experts-per-domain N group size (default 16)\n"
       "  --steps N              training steps replayed (default 20)\n"
       "  --budget-percent N     device slots as a share of all experts (default 25)\n"
       "  --expert-bytes N       bytes per expert copy (default 65536)\n",
       RunCacheSuite},
      {"kernels", "grouped expert FFN forward+backward GFLOPS (CPU, fp32 and bf16) vs BLAS sgemm",
       "  --d-model N            model width (default 1024)\n"
       "  --d-ff N               FFN width (default 4096)\n"
       "  --experts N            active experts (default 8)\n"
       "  --tokens-per-expert N  rows per expert (default 512)\n"
       "  --activation A         gelu or swiglu (default gelu)\n"
       "  --threads N            CPU threads for both sides; 0 = all (default 0)\n"
       "  --samples N            timed runs; the median is reported (default 3)\n"
       "  --profile NAME         device profile for the modelled time (default h100-sxm)\n",
       RunKernelsSuite},
      {"step",
       "whole training steps (timed sim or a GPU + real CPU optimizer): ecss, zero-offload, "
       "no-overlap, naive, or all of them interleaved",
       "  --strategy S           ecss, zero-offload, no-overlap, naive, or all: every one "
       "interleaved, with ecss's ratio to each (default ecss)\n"
       "  --rounds N             runs of each strategy, interleaved (default 3 with all, "
       "else 1)\n"
       "  --device D             sim-timed, sim (real CPU kernels), cuda or cuda:N "
       "(default sim-timed)\n"
       "  --layers N             sparse layers (default 4)\n"
       "  --d-model N            (default 512)\n"
       "  --d-ff N               (default 1024)\n"
       "  --domains N            (default 40)\n"
       "  --experts-per-domain N (default 2)\n"
       "  --domains-per-step N   domains each step's samples come from (default 4)\n"
       "  --samples N            samples per micro-batch (default 8)\n"
       "  --seq-len N            tokens per sample (default 256)\n"
       "  --micro-batches N      micro-batches per step (default 1)\n"
       "  --steps N              steps run (default 6)\n"
       "  --warmup N             first steps not measured (default 2)\n"
       "  --optimizer-threads N  CPU optimizer threads (default 1)\n"
       "  --cache-fraction F     the device's expert cache holds this share of the experts, "
       "at least what a step needs (default 0.25)\n"
       "  --device-mib N         the session's device budget instead (default: from "
       "--cache-fraction)\n"
       "  --profile NAME         the sim's device profile: kernel time and link bandwidth; sim "
       "only (default h100-sxm)\n"
       "  --states S             master weights and moments: host or nvme (default host)\n"
       "  --weights W            compute weights: pinned, or nvme with --states nvme "
       "(default pinned)\n"
       "  --dir DIR              nvme: where each run's store directory is made (default .)\n"
       "  --initial-states S     nvme: written (into both shadow slots at creation, untimed: "
       "every measured step reads and overwrites, as training does) or unwritten (a new "
       "store: unwritten states read without I/O, first stores allocate; the bound counts "
       "reads that do not happen) (default written)\n"
       "  --routing R            rre, or gate: a learned gate's reactive routing (default rre)\n"
       "  --gate-k N             gate: experts per token (default 2)\n"
       "  --delayed-update 0|1   the one-step delayed update, DPU (default 0)\n"
       "  --gradient-dtype T     f32 or bf16: the gradients' dtype to the host and the optimizer "
       "(default f32)\n"
       "  --dump-plan FILE       write the executed plan of the last step as JSON "
       "(one strategy)\n"
       "  --dump-plans FILE      write the executed plans of the measured steps the session "
       "keeps (its last 8) as JSON: {\"steps\": [{\"step\", \"plan\"}, ...]} (one strategy)\n"
       "  --model M --hardware H [--workload W]\n"
       "                         ecss-plan's files or presets (tools/plan/README.md) instead of "
       "the shape, placement and budget options above: the busiest device's share of the "
       "model, its workload and budgets; with them only --strategy (default the workload's), "
       "--rounds, --device, --steps, --warmup, --dir, --dump-plan and --dump-plans are taken "
       "(default steps: "
       "the planner's, 4 to warm up and then the workload's steps)\n",
       RunStepSuite},
  };
  return suites;
}

void PrintUsage(std::ostream& out) {
  out << "usage: ecss-bench SUITE [options] [--json]\n"
         "       ecss-bench SUITE --help\n\nsuites:\n";
  for (const Suite& suite : Suites()) out << "  " << suite.name << "\t" << suite.summary << "\n";
}

int Run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    PrintUsage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  auto suite = std::find_if(Suites().begin(), Suites().end(),
                            [&](const Suite& s) { return s.name == name; });
  if (suite == Suites().end()) {
    std::cerr << "ecss-bench: unknown suite '" << name << "'\n";
    PrintUsage(std::cerr);
    return 2;
  }
  StatusOr<BenchArgs> args = BenchArgs::Parse(std::vector<std::string>(argv + 2, argv + argc));
  if (!args.ok()) {
    std::cerr << "ecss-bench " << name << ": " << args.status() << "\n";
    return 2;
  }
  if (args->help()) {
    std::cout << "ecss-bench " << name << ": " << suite->summary << "\noptions:\n"
              << suite->options << "  --json                  print one JSON object\n";
    if (suite->options.find("--profile") != std::string::npos) {
      std::cout << "device profiles (datasheet figures, runtime/device/device_profile.cc):";
      for (const std::string& profile : DeviceProfileNames()) std::cout << " " << profile;
      std::cout << "\n";
    }
    return 0;
  }

  const MachineInfo machine = DescribeMachine();
  JsonWriter json;
  json.BeginObject()
      .Field("suite", name)
      .Key("machine")
      .BeginObject()
      .Field("cores", static_cast<uint64_t>(machine.cores))
      .Field("cpu_model", machine.cpu_model)
      .Field("memory_bytes", machine.memory_bytes)
      .EndObject();
  std::ostringstream table;
  Status status = suite->run(*args, json, table);
  if (!status.ok()) {
    std::cerr << "ecss-bench " << name << ": " << status << "\n";
    return status.code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  json.EndObject();
  if (args->json()) {
    std::cout << json.str() << "\n";
  } else {
    std::cout << "machine: " << machine.cpu_model << ", " << machine.cores << " cores, "
              << HumanBytes(machine.memory_bytes) << "\n"
              << table.str();
  }
  return 0;
}

}  // namespace

Status CheckDirHasRoom(const std::string& flag_dir, const std::string& dir, uint64_t need,
                       std::string_view what) {
  std::error_code error;
  const std::filesystem::space_info space = std::filesystem::space(dir, error);
  if (error) return NotFoundError(StrCat("--dir ", flag_dir, ": ", error.message()));
  if (space.available >= need) return Status::Ok();
  return ResourceExhaustedError(
      StrCat("--dir ", flag_dir, " has ", HumanBytes(space.available), " free; ", what));
}

MachineInfo DescribeMachine() {
  MachineInfo info;
  info.cores = std::thread::hardware_concurrency();
  info.memory_bytes = PhysicalMemoryBytes();
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) info.cpu_model = line.substr(colon + 2);
      break;
    }
  }
  if (info.cpu_model.empty()) info.cpu_model = "unknown";
  return info;
}

}  // namespace ecss::bench

int main(int argc, char** argv) { return ecss::bench::Run(argc, argv); }
