#include "offload/state_file.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>

#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'S', 'S', 'T', '0', '1'};
constexpr char kFileMagic[8] = {'E', 'C', 'S', 'S', 'S', 'F', '0', '1'};
// 2: element size and sequence number in the header. 3: a file header (store id, generation).
constexpr uint32_t kVersion = 3;
constexpr uint32_t kHeaderBytes = 4096;  // a slot's header, and a file's
constexpr size_t kNameBytes = 64;        // of StateFileOptions::name in the file header

// One version of one expert: its header and its arrays, each padded to 4 KiB.
uint64_t SlotBytes(const StateFileOptions& options) {
  return kHeaderBytes +
         options.arrays * StateBlockBytes(options.max_expert_elements * options.element_bytes);
}
constexpr uint32_t kMaxArrays = 8;

uint32_t Copies(const StateFileOptions& options) { return options.shadow ? 2 : 1; }

// Experts in one file of a directory: as many whole slots as max_file_bytes holds, one at least.
uint32_t ExpertsPerFile(const StateFileOptions& options) {
  const uint64_t max_bytes =
      options.max_file_bytes > 0 ? options.max_file_bytes : kDefaultMaxFileBytes;
  const uint64_t per_file = (std::max<uint64_t>(max_bytes, kHeaderBytes) - kHeaderBytes) /
                            (Copies(options) * SlotBytes(options));
  return static_cast<uint32_t>(std::clamp<uint64_t>(per_file, 1, std::max(1u, options.experts)));
}

// Experts directory `dir` holds (expert e lives in directory e % dirs).
uint32_t ExpertsIn(const StateFileOptions& options, size_t dir) {
  const size_t dirs = options.dirs.size();
  return static_cast<uint32_t>((options.experts + dirs - 1 - dir) / dirs);
}

// Every file in order (each directory's parts), with its size.
struct FileSpec {
  std::string path;
  uint64_t bytes = 0;
};
std::vector<FileSpec> FileSpecs(const StateFileOptions& options) {
  const uint32_t per_file = ExpertsPerFile(options);
  const uint64_t slot_bytes = Copies(options) * SlotBytes(options);
  std::vector<FileSpec> files;
  for (size_t d = 0; d < options.dirs.size(); ++d) {
    const uint32_t here = ExpertsIn(options, d);
    for (uint32_t first = 0, part = 0; first < here; first += per_file, ++part) {
      const std::string suffix = part == 0 ? "" : StrCat("-part", part);
      files.push_back({StrCat(options.dirs[d], "/", options.name, "-", d, suffix, ".bin"),
                       kHeaderBytes + std::min(per_file, here - first) * slot_bytes});
    }
  }
  return files;
}

// What RunAll calls around its requests (either may be empty).
struct RunHooks {
  // Before request i is submitted; when set, each request is also sent at once, so that it
  // runs while the next one is prepared.
  std::function<void(size_t)> before_submit;
  // Once request i and every request before it have completed, in order, while none failed.
  std::function<void(size_t)> arrived;
};

// Submits every request, then waits for all of them (also after a failure, so that nothing is
// left in flight); returns the first error. FailedPrecondition when the engine already has
// requests in flight: their completions would be taken for these.
Status RunAll(IoEngine& engine, std::vector<IoRequest>& requests, const RunHooks& hooks = {}) {
  if (engine.in_flight() != 0) {
    return FailedPreconditionError(
        StrCat("state file: ", engine.in_flight(), " requests already in flight on its engine"));
  }
  Status first;
  std::vector<bool> done(requests.size(), false);
  size_t in_order = 0;  // requests completed with every one before them
  IoCompletion completions[16];
  auto reap = [&](std::chrono::microseconds wait) {
    const size_t n = engine.Poll(completions, 16, wait);
    for (size_t i = 0; i < n; ++i) {
      if (first.ok() && !completions[i].status.ok()) first = completions[i].status;
      if (completions[i].user_data >= done.size()) {
        if (first.ok()) first = InternalError("state file: a completion of no request of ours");
        continue;
      }
      done[completions[i].user_data] = true;
    }
    while (in_order < done.size() && done[in_order]) {
      if (hooks.arrived && first.ok()) hooks.arrived(in_order);
      ++in_order;
    }
  };
  for (size_t i = 0; i < requests.size() && first.ok(); ++i) {
    requests[i].user_data = i;
    if (hooks.before_submit) hooks.before_submit(i);
    while (true) {
      Status submitted = engine.Submit(requests[i]);
      if (submitted.ok()) break;
      if (!submitted.retryable()) {
        first = submitted;
        break;
      }
      reap(std::chrono::milliseconds(10));  // a full queue: let something finish
    }
    if (hooks.before_submit) reap(std::chrono::microseconds(0));
  }
  while (engine.in_flight() > 0) reap(std::chrono::seconds(10));
  return first;
}

// An array's transfer is cut into pieces of this size so that its checksum runs beside the
// transfer: a piece's checksum hides under the next piece's I/O.
constexpr uint64_t kPieceBytes = uint64_t{4} << 20;

// Moves `count` arrays between memory and the file (array a: `block_bytes` at offsets[a]) in
// pieces of at most kPieceBytes, with crcs[a] set to the CRC-32C of array a's first
// `checksummed_bytes` (the rest of its block is padding), computed beside the transfer: a
// write checksums a piece, sends it, and checksums the next while it is written; a read
// checksums each piece once it and every piece before it have arrived. So a store or a load
// takes its transfer plus one piece's checksum, not its transfer plus the whole expert's.
// A write only reads `arrays`; a read fills them (Load's, which are writable). `alongside`
// are sent first, in the same round trip, with no checksum (a load's headers). Errors as
// RunAll's.
Status TransferChecksummed(IoEngine& engine, IoOp op, IoFileId file, const uint64_t* offsets,
                           const void* const* arrays, uint32_t count, uint64_t block_bytes,
                           uint64_t checksummed_bytes, uint32_t* crcs,
                           std::vector<IoRequest> alongside = {}) {
  struct Piece {
    uint32_t array;
    uint64_t start, bytes;
  };
  const size_t first = alongside.size();  // requests[first + i] moves pieces[i]
  std::vector<Piece> pieces;
  std::vector<IoRequest> requests = std::move(alongside);
  for (uint32_t a = 0; a < count; ++a) {
    crcs[a] = 0;
    for (uint64_t start = 0; start < block_bytes; start += kPieceBytes) {
      const Piece piece{a, start, std::min(kPieceBytes, block_bytes - start)};
      pieces.push_back(piece);
      // The request type is shared with reads; a write's buffer is only read.
      requests.push_back({op, file, offsets[a] + start,
                          const_cast<char*>(static_cast<const char*>(arrays[a])) + start,
                          static_cast<size_t>(piece.bytes), 0});
    }
  }
  auto checksum = [&](size_t request) {
    if (request < first) return;
    const Piece& piece = pieces[request - first];
    if (piece.start >= checksummed_bytes) return;
    crcs[piece.array] =
        Crc32c(static_cast<const char*>(arrays[piece.array]) + piece.start,
               std::min(piece.bytes, checksummed_bytes - piece.start), crcs[piece.array]);
  };
  RunHooks hooks;
  (op == IoOp::kWrite ? hooks.before_submit : hooks.arrived) = checksum;
  return RunAll(engine, requests, hooks);
}

}  // namespace

struct ExpertStateFile::Header {
  char magic[8];
  uint32_t version;
  uint32_t expert;
  uint64_t elements;
  uint64_t update_count;
  uint64_t sequence;  // versions of this expert stored so far (shadow: the newest wins)
  uint32_t arrays;
  uint32_t element_bytes;
  uint32_t array_crc[kMaxArrays];
  uint32_t header_crc;  // of every byte before it
};

struct ExpertStateFile::FileHeader {
  char magic[8];
  uint32_t version;
  uint32_t file_index;    // among Paths()
  char name[kNameBytes];  // StateFileOptions::name, zero-padded (truncated past 63 bytes)
  uint64_t store_id;
  uint64_t generation;
  uint32_t header_crc;  // of every byte before it
};

ExpertStateFile::ExpertStateFile(IoEngine* engine, const StateFileOptions& options,
                                 std::shared_ptr<std::vector<std::atomic<uint8_t>>> guesses)
    : engine_(engine),
      options_(options),
      slot_bytes_(SlotBytes(options)),
      experts_per_file_(ExpertsPerFile(options)),
      header_(std::aligned_alloc(4096, 2 * kHeaderBytes)),
      newest_sequence_(options.experts, UINT64_MAX),
      newest_copy_(options.experts, 0),
      newest_count_(options.experts, 0),
      newest_copy_guess_(std::move(guesses)),
      slots_stored_(options.experts, kSlotsUnknown) {
  if (newest_copy_guess_ == nullptr) {  // the first handle of its files
    newest_copy_guess_ = std::make_shared<std::vector<std::atomic<uint8_t>>>(options.experts);
    for (std::atomic<uint8_t>& guess : *newest_copy_guess_) guess.store(kCopyUnknown);
  }
  for (const FileSpec& file : FileSpecs(options)) {
    paths_.push_back(file.path);
    file_bytes_.push_back(file.bytes);
  }
  size_t first = 0;
  for (size_t d = 0; d < options.dirs.size(); ++d) {
    first_file_.push_back(first);
    first += (ExpertsIn(options, d) + experts_per_file_ - 1) / experts_per_file_;
  }
}

ExpertStateFile::~ExpertStateFile() {
  for (IoFileId file : files_) engine_->Close(file).IgnoreError();
  std::free(header_);
}

ExpertStateFile::Place ExpertStateFile::PlaceOf(uint32_t expert) const {
  const size_t dirs = options_.dirs.size();
  const size_t dir = expert % dirs;
  const uint64_t local = expert / dirs;  // within its directory
  return {first_file_[dir] + local / experts_per_file_,
          kHeaderBytes + (local % experts_per_file_) * copies() * slot_bytes_};
}

uint64_t ExpertStateFile::ArrayOffset(uint32_t a) const {
  return kHeaderBytes + a * StateBlockBytes(options_.max_expert_elements * options_.element_bytes);
}

namespace {
Status CheckOptions(IoEngine* engine, const StateFileOptions& o) {
  if (engine == nullptr) return InvalidArgumentError("state file needs an io engine");
  if (o.dirs.empty() || o.arrays == 0 || o.arrays > kMaxArrays || o.max_expert_elements == 0 ||
      o.experts == 0 || (o.element_bytes != 2 && o.element_bytes != 4) || o.name.empty()) {
    return InvalidArgumentError(StrCat("state file needs directories, a name, 1-", kMaxArrays,
                                       " arrays of 2- or 4-byte elements, experts and "
                                       "max_expert_elements > 0"));
  }
  const uint64_t expert_bytes = kHeaderBytes + Copies(o) * SlotBytes(o);
  if (o.max_file_bytes != 0 && o.max_file_bytes < expert_bytes) {
    return InvalidArgumentError(StrCat("state file: max_file_bytes ", o.max_file_bytes,
                                       " is less than a file header and one expert's slots (",
                                       expert_bytes, " bytes)"));
  }
  return Status::Ok();
}
}  // namespace

uint64_t ExpertStateFile::DiskBytes(const StateFileOptions& options) {
  return FileSpecs(options).size() * kHeaderBytes +
         uint64_t{options.experts} * Copies(options) * SlotBytes(options);
}

std::vector<std::string> ExpertStateFile::Paths(const StateFileOptions& options) {
  std::vector<std::string> paths;
  for (FileSpec& file : FileSpecs(options)) paths.push_back(std::move(file.path));
  return paths;
}

StatusOr<std::unique_ptr<ExpertStateFile>> ExpertStateFile::Create(
    IoEngine* engine, const StateFileOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(engine, options));
  std::unique_ptr<ExpertStateFile> file(new ExpertStateFile(engine, options));
  Status made = [&] {
    for (size_t i = 0; i < file->paths_.size(); ++i) {
      ECSS_ASSIGN_OR_RETURN(IoFileId id, engine->Open(file->paths_[i], OpenMode::kCreate));
      file->files_.push_back(id);
      Status sized = engine->Resize(id, file->file_bytes_[i]);
      if (sized.ok()) sized = file->WriteFileHeader(i, options.generation);
      if (!sized.ok()) return sized.Annotate(StrCat("state file '", file->paths_[i], "'"));
    }
    ECSS_RETURN_IF_ERROR(file->Sync());
    for (const std::string& dir : options.dirs) ECSS_RETURN_IF_ERROR(SyncDirectory(dir));
    return Status::Ok();
  }();
  if (made.ok()) {
    file->KnowFilesAreNew();
  } else {  // nothing of it stays behind: the files it opened (and so made) go
    const std::vector<std::string> made_paths(file->paths_.begin(),
                                              file->paths_.begin() + file->files_.size());
    file.reset();
    std::error_code error;
    for (const std::string& path : made_paths) std::filesystem::remove(path, error);
    return made;
  }
  return file;
}

Status ExpertStateFile::WriteFileHeader(size_t i, uint64_t generation) {
  FileHeader header{};
  std::memcpy(header.magic, kFileMagic, sizeof(kFileMagic));
  header.version = kVersion;
  header.file_index = static_cast<uint32_t>(i);
  std::memcpy(header.name, options_.name.data(), std::min(options_.name.size(), kNameBytes - 1));
  header.store_id = options_.store_id;
  header.generation = generation;
  header.header_crc = Crc32c(&header, offsetof(FileHeader, header_crc));
  std::memset(header_, 0, kHeaderBytes);
  std::memcpy(header_, &header, sizeof(header));
  return WriteAt(*engine_, files_[i], 0, header_, kHeaderBytes)
      .Annotate(StrCat("writing the file header of '", paths_[i], "'"));
}

Status ExpertStateFile::CheckFileHeader(size_t i) {
  const std::string& path = paths_[i];
  ECSS_RETURN_IF_ERROR(ReadAt(*engine_, files_[i], 0, header_, kHeaderBytes)
                           .Annotate(StrCat("reading the file header of '", path, "'")));
  FileHeader header{};
  std::memcpy(&header, header_, sizeof(header));
  const std::string file = StrCat("state file '", path, "'");
  if (std::memcmp(header.magic, kFileMagic, sizeof(kFileMagic)) != 0) {
    return DataLossError(StrCat(file, " has no state-file header (overwritten, or not made by ",
                                "ExpertStateFile::Create)"));
  }
  if (header.version != kVersion) {  // its fields may differ: before the checksum
    return FailedPreconditionError(StrCat(file, " has state-file format version ", header.version,
                                          "; this build reads version ", kVersion));
  }
  if (Crc32c(&header, offsetof(FileHeader, header_crc)) != header.header_crc) {
    return DataLossError(StrCat(file, ": file header checksum mismatch (damaged)"));
  }
  header.name[kNameBytes - 1] = 0;
  const std::string name = options_.name.substr(0, kNameBytes - 1);
  if (header.file_index != i || name != header.name) {
    return DataLossError(StrCat(file, " holds file ", header.file_index, " of '", header.name,
                                "', not file ", i, " of '", name, "': files renamed or swapped?"));
  }
  if (header.store_id != options_.store_id) {
    return DataLossError(StrCat(file, " belongs to another store (id ", header.store_id,
                                "; this store's is ", options_.store_id, ")"));
  }
  const uint64_t oldest =
      options_.previous_generation != 0 ? options_.previous_generation : options_.generation;
  if (header.generation < oldest || header.generation > options_.generation) {
    return DataLossError(StrCat(
        file, " is of generation ", header.generation, ", the store's is ", options_.generation,
        header.generation < oldest ? ": an older copy of the file, from an earlier run?"
                                   : ": newer than the store's manifest (an older manifest?)"));
  }
  return Status::Ok();
}

Status ExpertStateFile::SetGeneration(uint64_t generation) {
  for (size_t i = 0; i < files_.size(); ++i) ECSS_RETURN_IF_ERROR(WriteFileHeader(i, generation));
  return Sync();
}

StatusOr<std::unique_ptr<ExpertStateFile>> ExpertStateFile::Open(IoEngine* engine,
                                                                 const StateFileOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(engine, options));
  std::unique_ptr<ExpertStateFile> file(new ExpertStateFile(engine, options));
  for (size_t i = 0; i < file->paths_.size(); ++i) {
    ECSS_ASSIGN_OR_RETURN(IoFileId id, engine->Open(file->paths_[i], OpenMode::kReadWrite));
    file->files_.push_back(id);
    ECSS_RETURN_IF_ERROR(file->CheckFileHeader(i));  // first: it names a swapped file
    ECSS_ASSIGN_OR_RETURN(uint64_t size, engine->FileSize(id));
    if (size < file->file_bytes_[i]) {
      return FailedPreconditionError(StrCat("state file '", file->paths_[i], "' has ", size,
                                            " bytes; this layout needs ", file->file_bytes_[i],
                                            " (made for another model?)"));
    }
  }
  return file;
}

StatusOr<std::unique_ptr<ExpertStateFile>> ExpertStateFile::AnotherHandle(IoEngine* engine) const {
  ECSS_RETURN_IF_ERROR(CheckOptions(engine, options_));
  std::unique_ptr<ExpertStateFile> file(new ExpertStateFile(engine, options_, newest_copy_guess_));
  for (const std::string& path : paths_) {  // checked by this handle's Create or Open
    ECSS_ASSIGN_OR_RETURN(IoFileId id, engine->Open(path, OpenMode::kReadWrite));
    file->files_.push_back(id);
  }
  return file;
}

// Every slot of new files is unwritten: no header to read before a store.
void ExpertStateFile::KnowFilesAreNew() {
  std::fill(newest_sequence_.begin(), newest_sequence_.end(), 0);
  std::fill(slots_stored_.begin(), slots_stored_.end(), 0);
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

std::vector<IoRequest> ExpertStateFile::HeaderRequests(uint32_t expert) const {
  std::vector<IoRequest> requests;
  for (uint32_t c = 0; c < copies(); ++c) {
    requests.push_back({IoOp::kRead, FileOf(expert), OffsetOf(expert, c),
                        static_cast<char*>(header_) + c * kHeaderBytes, kHeaderBytes, 0});
  }
  return requests;
}

Status ExpertStateFile::ReadHeaders(uint32_t expert, Header* headers, CopyState* state,
                                    std::string* why) {
  std::vector<IoRequest> requests = HeaderRequests(expert);  // every copy's: one round trip
  Status read = RunAll(*engine_, requests);
  if (!read.ok()) return read.Annotate(StrCat("reading expert ", expert, " header"));
  ParseHeaders(expert, headers, state, why);
  return Status::Ok();
}

void ExpertStateFile::ParseHeaders(uint32_t expert, Header* headers, CopyState* state,
                                   std::string* why) const {
  for (uint32_t c = 0; c < copies(); ++c) {
    Header* header = &headers[c];
    const char* raw = static_cast<const char*>(header_) + c * kHeaderBytes;
    std::memcpy(header, raw, sizeof(*header));
    state[c] = CopyState::kDamaged;
    // Every byte zero: what a sparse file reads where nothing was stored.
    if (std::all_of(raw, raw + kHeaderBytes, [](char b) { return b == 0; })) {
      state[c] = CopyState::kUnwritten;
      why[c] = "never stored";
    } else if (std::memcmp(header->magic, kMagic, sizeof(kMagic)) != 0) {
      why[c] = "no state header (overwritten)";
    } else if (Crc32c(header, offsetof(Header, header_crc)) != header->header_crc) {
      why[c] = "header checksum mismatch";
    } else if (header->version != kVersion || header->expert != expert ||
               header->arrays != options_.arrays ||
               header->element_bytes != options_.element_bytes) {
      why[c] = StrCat("header describes expert ", header->expert, " with ", header->arrays,
                      " arrays of ", header->element_bytes, "-byte elements (format ",
                      header->version, ")");
    } else {
      state[c] = CopyState::kValid;
    }
  }
}

Status ExpertStateFile::Store(uint32_t expert, const void* const* arrays, uint64_t elements,
                              uint64_t update_count, bool supersede, const uint32_t* checksums) {
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, elements));
  const IoFileId file = FileOf(expert);
  uint64_t sequence = 1;
  uint32_t copy = 0;
  if (options_.shadow) {
    if (newest_sequence_[expert] == UINT64_MAX) {  // learn which copy is newest
      Header seen[2];
      CopyState state[2];
      std::string why[2];
      // Learnt only from headers read: a failed read leaves it unknown (taking sequence 0
      // then would write sequence 1 over the newest copy, and the older one would outrank it).
      ECSS_RETURN_IF_ERROR(ReadHeaders(expert, seen, state, why));
      newest_sequence_[expert] = 0;
      slots_stored_[expert] = 0;
      for (uint32_t c = 0; c < 2; ++c) {
        if (state[c] != CopyState::kUnwritten) {
          slots_stored_[expert] |= static_cast<uint8_t>(1u << c);
        }
        if (state[c] == CopyState::kValid && seen[c].sequence > newest_sequence_[expert]) {
          newest_sequence_[expert] = seen[c].sequence;
          newest_copy_[expert] = static_cast<uint8_t>(c);
          newest_count_[expert] = seen[c].update_count;
        }
      }
    }
    sequence = newest_sequence_[expert] + 1;
    copy = newest_sequence_[expert] == 0 ? 0 : 1 - newest_copy_[expert];
    if (supersede && newest_sequence_[expert] > 0 && newest_count_[expert] >= update_count) {
      // Written ahead: retract it (its header zeroed, the copy before it the newest again), and
      // store into its slot. Until the new header lands, reads find the copy before.
      copy = newest_copy_[expert];
      newest_sequence_[expert] = UINT64_MAX;  // learnt again should this store fail
      // Loads guess the copy before it, newest until this store's header lands.
      (*newest_copy_guess_)[expert].store(static_cast<uint8_t>(1 - copy),
                                          std::memory_order_relaxed);
      std::memset(header_, 0, kHeaderBytes);
      Status retracted = WriteAt(*engine_, file, OffsetOf(expert, copy), header_, kHeaderBytes);
      if (!retracted.ok()) {
        return retracted.Annotate(
            StrCat("retracting expert ", expert, " update count ", update_count, " written ahead"));
      }
    }
  }
  const uint64_t base = OffsetOf(expert, copy);
  const uint64_t bytes = elements * options_.element_bytes;
  // The header's fields fit in the first 512-byte sector of its 4 KiB block and the rest is
  // zeros, old or new: a drive that writes one sector atomically never tears it.
  static_assert(sizeof(Header) <= 512);
  Header header{};
  std::memcpy(header.magic, kMagic, sizeof(kMagic));
  header.version = kVersion;
  header.expert = expert;
  header.elements = elements;
  header.update_count = update_count;
  header.sequence = sequence;
  header.arrays = options_.arrays;
  header.element_bytes = options_.element_bytes;
  uint64_t offsets[kMaxArrays];
  for (uint32_t a = 0; a < options_.arrays; ++a) offsets[a] = base + ArrayOffset(a);
  // Given checksums: no byte is checksummed while written.
  Status written = TransferChecksummed(*engine_, IoOp::kWrite, file, offsets, arrays,
                                       options_.arrays, StateBlockBytes(bytes),
                                       checksums == nullptr ? bytes : 0, header.array_crc);
  if (checksums != nullptr) std::copy_n(checksums, options_.arrays, header.array_crc);
  if (!written.ok()) return written.Annotate(StrCat("storing expert ", expert, " states"));
  header.header_crc = Crc32c(&header, offsetof(Header, header_crc));
  std::memset(header_, 0, kHeaderBytes);
  std::memcpy(header_, &header, sizeof(header));
  Status committed = WriteAt(*engine_, file, base, header_, kHeaderBytes);
  if (!committed.ok()) return committed.Annotate(StrCat("storing expert ", expert, " header"));
  if (options_.shadow) {
    newest_sequence_[expert] = sequence;
    newest_copy_[expert] = static_cast<uint8_t>(copy);
    newest_count_[expert] = update_count;
  }
  // Newest once its header landed (before, loads found the copy before it).
  (*newest_copy_guess_)[expert].store(static_cast<uint8_t>(copy), std::memory_order_relaxed);
  if (slots_stored_[expert] != kSlotsUnknown) {
    if ((slots_stored_[expert] & (1u << copy)) == 0) {
      fresh_written_bytes_ += StateBlockBytes(bytes) * options_.arrays + kHeaderBytes;
    }
    slots_stored_[expert] |= static_cast<uint8_t>(1u << copy);
  }
  return Status::Ok();
}

StatusOr<bool> ExpertStateFile::Written(uint32_t expert) {
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, options_.max_expert_elements));
  Header seen[2];
  CopyState state[2];
  std::string why[2];
  ECSS_RETURN_IF_ERROR(ReadHeaders(expert, seen, state, why));
  for (uint32_t c = 0; c < copies(); ++c) {
    if (state[c] != CopyState::kUnwritten) return true;  // a damaged copy was stored once
  }
  return false;
}

StatusOr<std::optional<uint64_t>> ExpertStateFile::NewestCount(uint32_t expert) {
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, options_.max_expert_elements));
  Header seen[2];
  CopyState state[2];
  std::string why[2];
  ECSS_RETURN_IF_ERROR(ReadHeaders(expert, seen, state, why));
  ECSS_ASSIGN_OR_RETURN(const Choice choice, Choose(expert, seen, state, why, nullptr));
  if (!choice.found) return std::optional<uint64_t>();
  return std::optional<uint64_t>(seen[choice.copy].update_count);
}

StatusOr<ExpertStateFile::Choice> ExpertStateFile::Choose(uint32_t expert, const Header* seen,
                                                          const CopyState* state,
                                                          const std::string* reason,
                                                          const uint64_t* want) const {
  Choice choice;
  for (uint32_t c = 0; c < copies(); ++c) {
    if (state[c] == CopyState::kDamaged) {  // never a crash's doing (see the file comment)
      return DataLossError(StrCat("expert ", expert, " in '", PathOf(expert), "' at offset ",
                                  OffsetOf(expert, c), ": ", reason[c], " (damaged slot header)"));
    }
    choice.unwritten |= state[c] == CopyState::kUnwritten;
    if (state[c] == CopyState::kUnwritten) {
      if (choice.why.empty()) choice.why = reason[c];
    } else if (want != nullptr && seen[c].update_count != *want) {
      if (choice.why.empty())
        choice.why = StrCat("update count ", seen[c].update_count, ", not ", *want);
    } else if (!choice.found || seen[c].sequence > seen[choice.copy].sequence) {
      choice.copy = c;
      choice.found = true;
    }
  }
  return choice;
}

Status ExpertStateFile::Load(uint32_t expert, void* const* arrays, uint64_t elements,
                             uint64_t* update_count, const uint64_t* want, bool* unwritten_out,
                             uint32_t* checksums) {
  if (unwritten_out != nullptr) *unwritten_out = false;
  ECSS_RETURN_IF_ERROR(CheckExpert(expert, elements));
  const uint64_t bytes = elements * options_.element_bytes;
  uint32_t crcs[kMaxArrays];
  // Copy `copy`'s arrays into `arrays` (crcs: their checksums), `alongside` sent with them.
  auto read_arrays = [&](uint32_t copy, std::vector<IoRequest> alongside) {
    uint64_t offsets[kMaxArrays];
    for (uint32_t a = 0; a < options_.arrays; ++a) {
      offsets[a] = OffsetOf(expert, copy) + ArrayOffset(a);
    }
    return TransferChecksummed(*engine_, IoOp::kRead, FileOf(expert), offsets, arrays,
                               options_.arrays, StateBlockBytes(bytes),
                               checksums == nullptr ? bytes : 0, crcs, std::move(alongside));
  };
  Header seen[2];
  CopyState state[2];
  std::string reason[2];
  // The headers, and beside them the arrays of the copy guessed newest (not for an older
  // version, which is mostly in the other copy). Those arrays may be older than the header
  // read beside them (a store into that copy under way); the checksums tell.
  std::atomic<uint8_t>& guess = (*newest_copy_guess_)[expert];
  const uint8_t guessed = want == nullptr ? guess.load(std::memory_order_relaxed) : kCopyUnknown;
  Status guessed_read = FailedPreconditionError("no guess");  // OK: copy `guessed` is in arrays
  if (guessed != kCopyUnknown) {
    guessed_read = read_arrays(guessed, HeaderRequests(expert));
    if (guessed_read.ok()) ParseHeaders(expert, seen, state, reason);
  }
  // No guess, or its round trip failed (perhaps in a copy this load does not need): the
  // headers alone.
  if (!guessed_read.ok()) ECSS_RETURN_IF_ERROR(ReadHeaders(expert, seen, state, reason));
  ECSS_ASSIGN_OR_RETURN(const Choice choice, Choose(expert, seen, state, reason, want));
  const uint64_t base = OffsetOf(expert, choice.copy);
  const std::string where =
      StrCat("expert ", expert, " in '", PathOf(expert), "' at offset ", base);
  if (!choice.found && choice.unwritten && unwritten_out != nullptr) {
    *unwritten_out = true;
    return Status::Ok();
  }
  if (!choice.found && choice.unwritten && (want == nullptr || *want == 0)) {
    return NotFoundError(StrCat(where, ": unwritten (", choice.why, ")"));
  }
  if (!choice.found) {  // every copy is intact and holds another update count
    return DataLossError(
        StrCat(where, ": no intact copy of update count ", *want, " (", choice.why, ")"));
  }
  const Header& header = seen[choice.copy];
  if (header.elements != elements) {
    return DataLossError(
        StrCat(where, ": stored with ", header.elements, " elements, read as ", elements));
  }
  if (choice.copy == guessed && !guessed_read.ok()) {
    return guessed_read.Annotate(StrCat("loading expert ", expert, " states"));
  }
  if (choice.copy != guessed) {  // a wrong guess, or none: the arrays of the copy found
    // The copy found newest is the guess now, unless a store changed it since (newer).
    uint8_t expected = guessed;
    if (want == nullptr) {
      guess.compare_exchange_strong(expected, static_cast<uint8_t>(choice.copy));
    }
    Status read = read_arrays(choice.copy, {});
    if (!read.ok()) return read.Annotate(StrCat("loading expert ", expert, " states"));
  }
  if (checksums != nullptr) std::copy_n(header.array_crc, options_.arrays, checksums);
  for (uint32_t a = 0; a < options_.arrays && checksums == nullptr; ++a) {
    if (crcs[a] != header.array_crc[a]) {
      const std::string name =
          a < options_.array_names.size() ? options_.array_names[a] : StrCat("array ", a);
      return DataLossError(StrCat(where, ": ", name, " checksum mismatch"));
    }
  }
  *update_count = header.update_count;
  return Status::Ok();
}

}  // namespace ecss
