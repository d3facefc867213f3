// ecss-plan: will a model fit, where will each byte live, how fast will a step be and what
// limits it, for a model, hardware and workload (JSON files or presets), before launching.
// Exit codes: 0 fits, 3 does not fit (the table or JSON says what is short and what would
// fit), 2 bad input (the message names the field's JSON path).
#include <unistd.h>

#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/file_util.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/str_cat.h"
#include "tools/plan/calibrate.h"
#include "tools/plan/plan_config.h"
#include "tools/plan/planner.h"

namespace {

constexpr int kFits = 0, kBadInput = 2, kDoesNotFit = 3;

constexpr std::string_view kUsage =
    "usage: ecss-plan --model FILE|PRESET --hardware FILE|PRESET [--workload FILE]\n"
    "                 [--optimize] [--only-workload-strategy] [--json] [--no-bars]\n"
    "                 [--dump-plan FILE]\n"
    "       ecss-plan --list-presets\n"
    "       ecss-plan --calibrate OUT.json [--hardware FILE|PRESET] [--dir DIR]\n"
    "Plans one training step of an ECSS session per device: where every byte lives (device,\n"
    "pinned, host, NVMe) and whether it fits, then the engine's own step plan run in virtual\n"
    "time for ecss, zero-offload, no-overlap and naive. Exit 0: fits; 3: does not fit; 2: bad\n"
    "input. --optimize: the placement and micro-batch split of the step's tokens that run\n"
    "fastest within the budgets, with the bottleneck before and after. --dump-plan: the last\n"
    "simulated step's plan of the workload's strategy as JSON, each op's simulated times (the\n"
    "format of ecss-bench step --dump-plan's executed plan). --only-workload-strategy: the\n"
    "workload's strategy alone, not the others (the same prediction, no comparison, sooner).\n"
    "Without --workload: 2,048 tokens a micro-batch, 4 domains a step, ecss, states in host\n"
    "memory. --calibrate measures this machine's CPU optimizer, NVMe (in DIR, default .), the\n"
    "host's work at a step's begin, its gradient additions and its wait for the simulated\n"
    "device through the runtime's code and writes the base hardware (default this-machine)\n"
    "with them; it takes no other option, and --dir is its alone.\n"
    "tools/plan/README.md describes the files' fields.\n";

int BadInput(std::string_view message) {
  std::cerr << "ecss-plan: " << message << "\n";
  return kBadInput;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_arg, hardware_arg, workload_arg, calibrate_arg, dump_arg, dir_arg = ".";
  bool json = false, optimize = false, bars = isatty(STDOUT_FILENO) != 0;
  ecss::plan::Strategies strategies = ecss::plan::Strategies::kEvery;
  // Given options that only a plan (or only a calibration) reads: refused by the other.
  std::vector<std::string_view> plan_only;
  bool dir_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return kFits;
    }
    if (arg == "--list-presets") {
      for (const ecss::plan::Preset& p : ecss::plan::Presets()) {
        std::cout << p.kind << "\t" << p.name << "\t" << p.about << "\n";
      }
      return kFits;
    }
    bool ok = true;
    if (arg == "--model" || arg == "--workload" || arg == "--dump-plan" || arg == "--optimize" ||
        arg == "--only-workload-strategy" || arg == "--json" || arg == "--no-bars") {
      plan_only.push_back(arg);
    }
    dir_given = dir_given || arg == "--dir";
    if (arg == "--model") {
      ok = value(&model_arg);
    } else if (arg == "--hardware") {
      ok = value(&hardware_arg);
    } else if (arg == "--workload") {
      ok = value(&workload_arg);
    } else if (arg == "--calibrate") {
      ok = value(&calibrate_arg);
    } else if (arg == "--dir") {
      ok = value(&dir_arg);
    } else if (arg == "--dump-plan") {
      ok = value(&dump_arg);
    } else if (arg == "--optimize") {
      optimize = true;
    } else if (arg == "--only-workload-strategy") {
      strategies = ecss::plan::Strategies::kWorkloadOnly;
    } else if (arg == "--json") {
      json = true;
    } else if (arg == "--no-bars") {
      bars = false;
    } else {
      return BadInput(ecss::StrCat("unknown argument '", arg, "'\n", kUsage));
    }
    if (!ok) return BadInput(ecss::StrCat(arg, " needs a value\n", kUsage));
  }
  if (!calibrate_arg.empty() && !plan_only.empty()) {
    return BadInput(
        ecss::StrCat(plan_only.front(),
                     ": not an option of --calibrate, which takes --hardware and --dir\n", kUsage));
  }
  if (calibrate_arg.empty() && dir_given) {
    return BadInput(
        ecss::StrCat("--dir: where --calibrate measures NVMe; only with --calibrate\n", kUsage));
  }
  if (!calibrate_arg.empty()) {
    auto base = ecss::plan::LoadHardware(hardware_arg.empty() ? "this-machine" : hardware_arg);
    if (!base.ok()) return BadInput(base.status().ToString());
    // The output must be writable before seconds of measuring.
    const ecss::Status writable = ecss::CheckFileWritable(calibrate_arg);
    if (!writable.ok()) return BadInput(ecss::StrCat("--calibrate: ", writable.ToString()));
    ecss::plan::CalibrationOptions options;
    options.dir = dir_arg;
    auto measured = ecss::plan::Calibrate(*base, options);
    if (!measured.ok()) return BadInput(measured.status().ToString());
    const ecss::Status written =
        ecss::WriteFileAtomically(calibrate_arg, ecss::plan::HardwareJson(*measured));
    if (!written.ok()) return BadInput(ecss::StrCat("--calibrate: ", written.ToString()));
    std::cout << ecss::plan::HardwareJson(*measured);
    return kFits;
  }
  if (model_arg.empty() || hardware_arg.empty()) {
    return BadInput(ecss::StrCat("--model and --hardware are required\n", kUsage));
  }
  auto model = ecss::plan::LoadModel(model_arg);
  if (!model.ok()) return BadInput(model.status().ToString());
  auto hardware = ecss::plan::LoadHardware(hardware_arg);
  if (!hardware.ok()) return BadInput(hardware.status().ToString());
  ecss::StatusOr<ecss::plan::WorkloadConfig> workload = ecss::plan::DefaultWorkloadFor(*model);
  if (!workload_arg.empty()) workload = ecss::plan::LoadWorkload(workload_arg);
  if (!workload.ok()) return BadInput(workload.status().ToString());
  if (!dump_arg.empty()) {  // before the search's seconds
    const ecss::Status writable = ecss::CheckFileWritable(dump_arg);
    if (!writable.ok()) return BadInput(ecss::StrCat("--dump-plan: ", writable.ToString()));
  }
  auto report = optimize ? ecss::plan::Optimize(*model, *hardware, *workload, strategies)
                         : ecss::plan::Plan(*model, *hardware, *workload, strategies);
  if (!report.ok()) return BadInput(report.status().ToString());
  if (!dump_arg.empty()) {
    const ecss::plan::StrategyPrediction& given = report->predictions.at(0);
    if (given.feasible) {
      ecss::JsonWriter plan;
      given.last_plan.WriteJson(plan);
      const ecss::Status written = ecss::WriteFileAtomically(dump_arg, plan.str() + "\n");
      if (!written.ok()) return BadInput(ecss::StrCat("--dump-plan: ", written.ToString()));
    } else {
      std::cerr << "ecss-plan: --dump-plan: nothing written, the workload's strategy does not "
                   "run: "
                << given.why_not << "\n";
    }
  }
  if (json) {
    ecss::JsonWriter out;
    ecss::plan::WriteJson(*report, out);
    std::cout << out.str() << "\n";
  } else {
    std::cout << ecss::plan::Table(*report, bars);
  }
  return report->feasible ? kFits : kDoesNotFit;
}
