// ExpertStateFile: the NVMe home of experts' fp32 state arrays (master weights and optimizer
// moments), which the CPU optimizer streams through staging slots. Experts are striped over
// one or more directories (expert e lives in directory e % dirs, like several drives), each in
// a fixed-size slot of its file:
//   [4 KiB header: magic, version, expert, elements, arrays, update count, CRC-32C of each
//    array, CRC of the header] [array 0, padded to 4 KiB] [array 1] ...
// Every load verifies both checksums: a mismatch is DataLoss naming the expert, the array and
// the file, and the data is never handed out as good. A store writes the arrays, then the
// header: a store cut short leaves a slot whose checksums do not match (detected, not used).
// Array buffers must be 4 KiB aligned and hold the element count rounded up to 4 KiB (the
// staging slots are laid out that way). Blocking; one thread at a time (it drives the engine).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "offload/io/io_engine.h"
#include "runtime/base/status.h"

namespace ecss {

struct StateFileOptions {
  std::vector<std::string> dirs;  // one or more directories; expert e goes to dirs[e % dirs]
  uint32_t arrays = 3;            // state arrays per expert (AdamW: master, m, v)
  uint64_t max_expert_elements = 0;
  uint32_t experts = 0;  // expert ids are [0, experts)
};

// Bytes an array of `elements` fp32 values occupies on disk and in a staging slot.
inline uint64_t StateArrayBytes(uint64_t elements) { return (elements * 4 + 4095) / 4096 * 4096; }

class ExpertStateFile {
 public:
  // Creates (truncating) one file per directory and reserves its space up front, so that a
  // full disk is reported now (ResourceExhausted), not half way through training.
  // NotFound / PermissionDenied name a missing or read-only directory.
  static StatusOr<std::unique_ptr<ExpertStateFile>> Create(IoEngine* engine,
                                                           const StateFileOptions& options);
  // Opens files made by Create with the same options (FailedPrecondition when they were made
  // for another layout).
  static StatusOr<std::unique_ptr<ExpertStateFile>> Open(IoEngine* engine,
                                                         const StateFileOptions& options);
  ~ExpertStateFile();

  // Writes `elements` values of each array, then the header. arrays[i] is 4 KiB aligned.
  Status Store(uint32_t expert, const float* const* arrays, uint64_t elements,
               uint64_t update_count);
  // Reads and verifies. elements must be what was stored (InvalidArgument otherwise).
  Status Load(uint32_t expert, float* const* arrays, uint64_t elements, uint64_t* update_count);

  // Makes completed stores durable (fdatasync of every file).
  Status Sync();

  uint64_t slot_bytes() const { return slot_bytes_; }
  const StateFileOptions& options() const { return options_; }

 private:
  ExpertStateFile(IoEngine* engine, const StateFileOptions& options);
  Status CheckExpert(uint32_t expert, uint64_t elements) const;
  std::string PathOf(size_t dir) const;
  uint64_t OffsetOf(uint32_t expert) const { return (expert / options_.dirs.size()) * slot_bytes_; }

  IoEngine* engine_;
  StateFileOptions options_;
  uint64_t slot_bytes_;
  std::vector<IoFileId> files_;
  void* header_ = nullptr;  // one aligned 4 KiB header buffer
};

}  // namespace ecss
