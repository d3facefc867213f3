#include "offload/state_file.h"

#include <cstdlib>
#include <cstring>

#include "runtime/base/checksum.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'S', 'S', 'T', '0', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kHeaderBytes = 4096;
constexpr uint32_t kMaxArrays = 8;

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t expert;
  uint64_t elements;
  uint64_t update_count;
  uint32_t arrays;
  uint32_t array_crc[kMaxArrays];
  uint32_t header_crc;  // of every byte before it
};

// Submits every request, then waits for all of them (also after a failure, so that nothing is
// left in flight); returns the first error.
Status RunAll(IoEngine& engine, std::vector<IoRequest>& requests) {
  Status first;
  IoCompletion completions[16];
  auto reap = [&](std::chrono::microseconds wait) {
    const size_t n = engine.Poll(completions, 16, wait);
    for (size_t i = 0; i < n; ++i) {
      if (first.ok() && !completions[i].status.ok()) first = completions[i].status;
    }
  };
  for (size_t i = 0; i < requests.size() && first.ok(); ++i) {
    requests[i].user_data = i;
    while (true) {
      Status submitted = engine.Submit(requests[i]);
      if (submitted.ok()) break;
      if (!submitted.retryable()) {
        first = submitted;
        break;
      }
      reap(std::chrono::milliseconds(10));  // a full queue: let something finish
    }
  }
  while (engine.in_flight() > 0) reap(std::chrono::seconds(10));
  return first;
}

}  // namespace

ExpertStateFile::ExpertStateFile(IoEngine* engine, const StateFileOptions& options)
    : engine_(engine),
      options_(options),
      slot_bytes_(kHeaderBytes + options.arrays * StateArrayBytes(options.max_expert_elements)),
      header_(std::aligned_alloc(4096, kHeaderBytes)) {}

ExpertStateFile::~ExpertStateFile() {
  for (IoFileId file : files_) engine_->Close(file).IgnoreError();
  std::free(header_);
}

std::string ExpertStateFile::PathOf(size_t dir) const {
  return StrCat(options_.dirs[dir], "/ecss-states-", dir, ".bin");
}

namespace {
Status CheckOptions(IoEngine* engine, const StateFileOptions& o) {
  if (engine == nullptr) return InvalidArgumentError("state file needs an io engine");
  if (o.dirs.empty() || o.arrays == 0 || o.arrays > kMaxArrays || o.max_expert_elements == 0 ||
      o.experts == 0) {
    return InvalidArgumentError(StrCat("state file needs directories, 1-", kMaxArrays,
                                       " arrays, experts and max_expert_elements > 0"));
  }
  return Status::Ok();
}
}  // namespace

StatusOr<std::unique_ptr<ExpertStateFile>> ExpertStateFile::Create(
    IoEngine* engine, const StateFileOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(engine, options));
  std::unique_ptr<ExpertStateFile> file(new ExpertStateFile(engine, options));
  const size_t dirs = options.dirs.size();
  for (size_t d = 0; d < dirs; ++d) {
    ECSS_ASSIGN_OR_RETURN(IoFileId id, engine->Open(file->PathOf(d), OpenMode::kCreate));
    file->files_.push_back(id);
    const uint64_t experts_here = (options.experts + dirs - 1 - d) / dirs;
    Status reserved = engine->Allocate(id, experts_here * file->slot_bytes_);
    if (!reserved.ok()) return reserved.Annotate(StrCat("state file '", file->PathOf(d), "'"));
  }
  return file;
}

StatusOr<std::unique_ptr<ExpertStateFile>> ExpertStateFile::Open(IoEngine* engine,
                                                                 const StateFileOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(engine, options));
  std::unique_ptr<ExpertStateFile> file(new ExpertStateFile(engine, options));
  const size_t dirs = options.dirs.size();
  for (size_t d = 0; d < dirs; ++d) {
    ECSS_ASSIGN_OR_RETURN(IoFileId id, engine->Open(file->PathOf(d), OpenMode::kReadWrite));
    file->files_.push_back(id);
    ECSS_ASSIGN_OR_RETURN(uint64_t size, engine->FileSize(id));
    const uint64_t experts_here = (options.experts + dirs - 1 - d) / dirs;
    if (size < experts_here * file->slot_bytes_) {
      return FailedPreconditionError(
          StrCat("state file '", file->PathOf(d), "' has ", size, " bytes; this layout needs ",
                 experts_here * file->slot_bytes_, " (made for another model?)"));
    }
  }
  return file;
}

Status ExpertStateFile::Sync() {
  for (IoFileId file : files_) ECSS_RETURN_IF_ERROR(engine_->Sync(file));
  return Status::Ok();
}

Status ExpertStateFile::CheckExpert(uint32_t expert, uint64_t elements) const {
  if (expert >= options_.experts) {
    return InvalidArgumentError(
        StrCat("expert ", expert, " is outside the state file's ", options_.experts));
  }
  if (elements == 0 || elements > options_.max_expert_elements) {
    return InvalidArgumentError(StrCat("expert ", expert, ": ", elements, " elements (at most ",
                                       options_.max_expert_elements, ")"));
  }
  return Status::Ok();
}

Status ExpertStateFile::Store(uint32_t expert, const float* const* arrays, uint64_t elements,
                              uint64_t update_count) {
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, elements));
  const IoFileId file = files_[expert % options_.dirs.size()];
  const uint64_t base = OffsetOf(expert);
  const uint64_t array_bytes = StateArrayBytes(elements);
  Header header{};
  std::memcpy(header.magic, kMagic, sizeof(kMagic));
  header.version = kVersion;
  header.expert = expert;
  header.elements = elements;
  header.update_count = update_count;
  header.arrays = options_.arrays;
  std::vector<IoRequest> requests;
  for (uint32_t a = 0; a < options_.arrays; ++a) {
    header.array_crc[a] = Crc32c(arrays[a], elements * 4);
    requests.push_back({IoOp::kWrite, file,
                        base + kHeaderBytes + a * StateArrayBytes(options_.max_expert_elements),
                        const_cast<float*>(arrays[a]), static_cast<size_t>(array_bytes), 0});
  }
  Status written = RunAll(*engine_, requests);
  if (!written.ok()) return written.Annotate(StrCat("storing expert ", expert, " states"));
  header.header_crc = Crc32c(&header, offsetof(Header, header_crc));
  std::memset(header_, 0, kHeaderBytes);
  std::memcpy(header_, &header, sizeof(header));
  Status committed = WriteAt(*engine_, file, base, header_, kHeaderBytes);
  return committed.Annotate(StrCat("storing expert ", expert, " header"));
}

Status ExpertStateFile::Load(uint32_t expert, float* const* arrays, uint64_t elements,
                             uint64_t* update_count) {
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, elements));
  const size_t dir = expert % options_.dirs.size();
  const IoFileId file = files_[dir];
  const uint64_t base = OffsetOf(expert);
  std::vector<IoRequest> requests = {{IoOp::kRead, file, base, header_, kHeaderBytes, 0}};
  for (uint32_t a = 0; a < options_.arrays; ++a) {
    requests.push_back({IoOp::kRead, file,
                        base + kHeaderBytes + a * StateArrayBytes(options_.max_expert_elements),
                        arrays[a], static_cast<size_t>(StateArrayBytes(elements)), 0});
  }
  Status read = RunAll(*engine_, requests);
  if (!read.ok()) return read.Annotate(StrCat("loading expert ", expert, " states"));
  Header header;
  std::memcpy(&header, header_, sizeof(header));
  const std::string where = StrCat("expert ", expert, " in '", PathOf(dir), "' at offset ", base);
  if (std::memcmp(header.magic, kMagic, sizeof(kMagic)) != 0) {
    return DataLossError(StrCat(where, ": no state header (never stored, or overwritten)"));
  }
  if (Crc32c(&header, offsetof(Header, header_crc)) != header.header_crc) {
    return DataLossError(StrCat(where, ": header checksum mismatch"));
  }
  if (header.version != kVersion || header.expert != expert || header.arrays != options_.arrays ||
      header.elements != elements) {
    return DataLossError(StrCat(where, ": header describes expert ", header.expert, " with ",
                                header.elements, " elements in ", header.arrays, " arrays (format ",
                                header.version, ")"));
  }
  static constexpr const char* kArrayNames[] = {"master",  "state 0", "state 1", "state 2",
                                                "state 3", "state 4", "state 5", "state 6"};
  for (uint32_t a = 0; a < options_.arrays; ++a) {
    if (Crc32c(arrays[a], elements * 4) != header.array_crc[a]) {
      return DataLossError(StrCat(where, ": ", kArrayNames[a], " checksum mismatch"));
    }
  }
  *update_count = header.update_count;
  return Status::Ok();
}

}  // namespace ecss
