// An ecss-bench suite: one capability measured against a reference taken in the same run
// (DESIGN.md section 9). A suite reads its options from BenchArgs, adds its figures to the
// open JSON object (main() has already written "suite" and "machine"), and writes a human
// table. Suites run on the calling thread and block until done.
#pragma once

#include <ostream>
#include <string>
#include <string_view>

#include "bench/ecss_bench/bench_args.h"
#include "offload/io/io_engine.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/median.h"

namespace ecss::bench {

struct Suite {
  std::string name;
  std::string summary;  // one line for `ecss-bench --help`
  std::string options;  // the suite's options with their defaults, for `ecss-bench SUITE --help`
  Status (*run)(BenchArgs& args, JsonWriter& json, std::ostream& table);
};

// Machine description written into every report.
struct MachineInfo {
  unsigned cores = 0;
  std::string cpu_model;
  uint64_t memory_bytes = 0;
};
MachineInfo DescribeMachine();

// Whether `dir` (the --dir given as `flag_dir`, checked at `dir`, which may be a directory made
// under it) has `need` bytes free for a run's files: NotFound naming --dir when its space cannot
// be read, ResourceExhausted "--dir D has F free; WHAT" when it is short (`what` says what
// takes the bytes and what to change).
Status CheckDirHasRoom(const std::string& flag_dir, const std::string& dir, uint64_t need,
                       std::string_view what);

// One storage access pattern (fio's --rw name).
struct Pattern {
  const char* name;
  IoOp op;
  bool random;
};
// Moves every block of `file` once through `engine`, its queue kept full; returns GB/s.
StatusOr<double> RunIoPattern(IoEngine& engine, IoFileId file, const Pattern& pattern,
                              uint64_t blocks, size_t block, uint8_t* buffers);

// The suites. Each lives in its own file.
Status RunDeviceSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunRouterSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunRouterImbalanceSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunOptimizerSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunNvmeSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunCacheSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunKernelsSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);
Status RunStepSuite(BenchArgs& args, JsonWriter& json, std::ostream& table);

}  // namespace ecss::bench
