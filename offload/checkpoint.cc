#include "offload/checkpoint.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

const CheckpointBlob* FindBlob(const std::vector<CheckpointBlob>& blobs, std::string_view name) {
  for (const CheckpointBlob& blob : blobs) {
    if (blob.name == name) return &blob;
  }
  return nullptr;
}

namespace {

constexpr char kMagic[] = "ecss-checkpoint";
// The manifest's format: 1, or 2 when an expert written at version 0 is stored with its
// blocks (format 1 has none, so a build that reads only 1 refuses it by its format, not as
// damage).
constexpr uint32_t kFormat = 1, kFormatWrittenAtZero = 2;
constexpr char kManifestName[] = "checkpoint.manifest";
constexpr char kExpertsName[] = "experts.bin";
constexpr char kBlobsName[] = "blobs.bin";
constexpr ExpertState kAllStates[] = {ExpertState::kWeights, ExpertState::kMaster,
                                      ExpertState::kMoments, ExpertState::kGradient};

// One expert as a checkpoint records it.
struct ExpertRecord {
  uint64_t version = 0;
  std::string holder;  // the checkpoint whose experts.bin holds its blocks; none: initial
  uint64_t offset = 0;
  std::vector<uint32_t> crcs;  // one per saved state
};

struct BlobRecord {
  std::string name;
  uint64_t offset = 0, bytes = 0;
  uint32_t crc = 0;
};

struct Manifest {
  uint64_t sequence = 0;
  uint64_t store_id = 0;  // of the store saved (ExpertStore::store_id)
  ExpertStoreLayout layout;
  std::string initial_id;
  std::vector<ExpertState> states;
  std::vector<BlobRecord> blobs;
  std::vector<ExpertRecord> experts;  // by flat id
};

std::string Hex(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "%08x", value);
  return text;
}

bool ParseHex(std::string_view token, uint32_t* value) {
  if (token.size() != 8) return false;
  *value = 0;
  for (char c : token) {
    const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (digit < 0) return false;
    *value = *value << 4 | static_cast<uint32_t>(digit);
  }
  return true;
}

// One directory or blob name: never a path (a manifest naming "../x" is damaged).
bool IsPlainName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         std::all_of(name.begin(), name.end(),
                     [](unsigned char c) { return c > ' ' && c != '/' && c != 0x7f; });
}

std::string FormatManifest(const Manifest& m) {
  const bool at_zero = std::any_of(m.experts.begin(), m.experts.end(), [](const ExpertRecord& x) {
    return x.version == 0 && !x.holder.empty();
  });
  std::string text =
      StrCat(kMagic, "\nformat ", at_zero ? kFormatWrittenAtZero : kFormat, "\nsequence ",
             m.sequence, "\nstore ", m.store_id, "\nexperts_per_layer");
  for (uint32_t n : m.layout.experts_per_layer) text += StrCat(" ", n);
  text += StrCat("\nparams_per_expert ", m.layout.params_per_expert, "\nweights_dtype ",
                 DTypeName(m.layout.weights_dtype), "\nmoments ", m.layout.moments, "\ninitial ",
                 m.initial_id, "\nstates");
  for (ExpertState state : m.states) text += StrCat(" ", ExpertStateName(state));
  text += "\n";
  for (const BlobRecord& b : m.blobs) {
    text += StrCat("blob ", b.name, " ", b.offset, " ", b.bytes, " ", Hex(b.crc), "\n");
  }
  for (size_t e = 0; e < m.experts.size(); ++e) {
    const ExpertRecord& x = m.experts[e];
    if (x.holder.empty()) {
      text += StrCat("expert ", e, " initial\n");
      continue;
    }
    text += StrCat("expert ", e, " ", x.version, " ", x.holder, " ", x.offset);
    for (uint32_t crc : x.crcs) text += StrCat(" ", Hex(crc));
    text += "\n";
  }
  return SealText(std::move(text));
}

// Strict, as the expert store's manifest: each header key once, experts in order, nothing
// unknown.
StatusOr<Manifest> ParseManifest(const std::string& path, const std::string& sealed) {
  const Status damaged = DataLossError(StrCat("checkpoint manifest '", path, "' is damaged"));
  if (sealed.rfind(StrCat(kMagic, "\n"), 0) != 0) {
    return DataLossError(StrCat("'", path, "' is not a checkpoint manifest"));
  }
  std::vector<SealedLine> lines;
  if (!SealedLines(sealed, &lines)) {
    return damaged.Annotate("checksum mismatch, or its last line is not its checksum");
  }
  Manifest m;
  uint32_t format = 0;
  std::set<std::string> seen, blob_names;
  for (const SealedLine& sealed_line : lines) {
    const std::string& line = sealed_line.text;
    const std::string key = sealed_line.fields.empty() ? "" : sealed_line.fields[0];
    const std::vector<std::string> v(sealed_line.fields.begin() + (key.empty() ? 0 : 1),
                                     sealed_line.fields.end());
    const Status bad = damaged.Annotate(StrCat("line '", line, "'"));
    uint64_t n = 0;
    if (key == "expert") {
      ExpertRecord x;
      if (v.size() < 2 || !ParseUint(v[0], UINT32_MAX, &n) || n != m.experts.size()) return bad;
      if (v.size() == 2 && v[1] == "initial") {
        m.experts.push_back(x);
        continue;
      }
      if (v.size() != 4 + m.states.size() || !ParseUint(v[1], UINT64_MAX, &x.version) ||
          (x.version == 0 && format != kFormatWrittenAtZero) ||
          !ParseUint(v[3], UINT64_MAX, &x.offset)) {
        return bad;
      }
      x.holder = v[2];
      if (!IsPlainName(x.holder)) return bad;
      for (size_t s = 0; s < m.states.size(); ++s) {
        uint32_t crc = 0;
        if (!ParseHex(v[4 + s], &crc)) return bad;
        x.crcs.push_back(crc);
      }
      m.experts.push_back(std::move(x));
      continue;
    }
    if (key == "blob") {
      BlobRecord b;
      if (v.size() != 4 || !blob_names.insert(v[0]).second ||
          !ParseUint(v[1], UINT64_MAX, &b.offset) || !ParseUint(v[2], UINT64_MAX, &b.bytes) ||
          !ParseHex(v[3], &b.crc)) {
        return bad;
      }
      b.name = v[0];
      if (!IsPlainName(b.name)) return bad;
      m.blobs.push_back(std::move(b));
      continue;
    }
    if (key.empty() || !seen.insert(key).second || !m.experts.empty()) return bad;
    if (key == "format") {
      if (v.size() != 1 || !ParseUint(v[0], UINT32_MAX, &n)) return bad;
      if (n != kFormat && n != kFormatWrittenAtZero) {
        return FailedPreconditionError(StrCat("checkpoint '", path, "' has format version ", n,
                                              "; this build reads versions ", kFormat, " and ",
                                              kFormatWrittenAtZero));
      }
      format = static_cast<uint32_t>(n);
    } else if (key == "sequence" || key == "store" || key == "params_per_expert" ||
               key == "moments") {
      if (v.size() != 1 || !ParseUint(v[0], key == "moments" ? UINT32_MAX : UINT64_MAX, &n)) {
        return bad;
      }
      if (key == "sequence") m.sequence = n;
      if (key == "store") m.store_id = n;
      if (key == "params_per_expert") m.layout.params_per_expert = n;
      if (key == "moments") m.layout.moments = static_cast<uint32_t>(n);
    } else if (key == "experts_per_layer") {
      for (const std::string& count : v) {
        if (!ParseUint(count, UINT32_MAX, &n)) return bad;
        m.layout.experts_per_layer.push_back(static_cast<uint32_t>(n));
      }
    } else if (key == "weights_dtype") {
      StatusOr<DType> dtype = v.size() == 1 ? ParseDType(v[0]) : StatusOr<DType>(bad);
      if (!dtype.ok()) return bad;
      m.layout.weights_dtype = *dtype;
    } else if (key == "initial") {
      if (v.empty()) return bad;
      m.initial_id = line.substr(key.size() + 1);
    } else if (key == "states") {
      for (const std::string& name : v) {
        auto state = std::find_if(std::begin(kAllStates), std::end(kAllStates),
                                  [&](ExpertState s) { return ExpertStateName(s) == name; });
        if (state == std::end(kAllStates)) return bad;
        m.states.push_back(*state);
      }
    } else {
      return damaged.Annotate(StrCat("unknown key '", key, "'"));
    }
  }
  for (const char* key : {"format", "sequence", "store", "experts_per_layer", "params_per_expert",
                          "weights_dtype", "moments", "initial", "states"}) {
    if (seen.count(key) == 0) return damaged.Annotate(StrCat("no '", key, "' line"));
  }
  uint64_t experts = 0;
  for (uint32_t count : m.layout.experts_per_layer) experts += count;
  if (m.experts.size() != experts) {
    return damaged.Annotate(StrCat(m.experts.size(), " expert lines for ", experts, " experts"));
  }
  return m;
}

std::string Dir(const std::string& root, const std::string& name) {
  return root.empty() ? name : StrCat(root, "/", name);  // "": the working directory
}

StatusOr<Manifest> ReadManifest(const std::string& root, const std::string& name) {
  const std::string path = StrCat(Dir(root, name), "/", kManifestName);
  ECSS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseManifest(path, text);
}

// The directories directly under `dir` (errors, e.g. a symlink loop, returned, never thrown).
StatusOr<std::vector<std::filesystem::path>> Subdirectories(const std::string& dir) {
  std::vector<std::filesystem::path> found;
  std::error_code error;
  for (auto it = std::filesystem::directory_iterator(dir, error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    std::error_code type_error;
    if (it->is_directory(type_error)) found.push_back(it->path());
  }
  if (error) return ErrnoError(error.value(), StrCat("listing '", dir, "'"));
  return found;
}

bool Exists(const std::string& path) {
  std::error_code error;
  return std::filesystem::exists(path, error);
}

// The checkpoints under a root: those whose manifest reads, by name, and those whose manifest
// is damaged (logged, never used, and nothing is removed while one exists, since what it
// refers to is unknown). A manifest that cannot be read (an I/O error) is an error.
struct Checkpoints {
  std::map<std::string, Manifest> intact;
  std::vector<std::string> damaged;
};

StatusOr<Checkpoints> ReadAll(const std::string& root) {
  ECSS_RETURN_IF_ERROR(CheckDirectory(root, "checkpoint root"));
  ECSS_ASSIGN_OR_RETURN(std::vector<std::filesystem::path> dirs, Subdirectories(root));
  Checkpoints all;
  for (const std::filesystem::path& dir : dirs) {
    const std::string name = dir.filename().string();
    if (!Exists(StrCat(dir.string(), "/", kManifestName))) continue;
    StatusOr<Manifest> m = ReadManifest(root, name);
    if (m.ok()) {
      all.intact[name] = std::move(m).value();
    } else if (m.status().code() == StatusCode::kDataLoss ||
               m.status().code() == StatusCode::kFailedPrecondition) {
      ECSS_LOG(Warning) << "checkpoint '" << name << "' is not used: " << m.status();
      all.damaged.push_back(name);
    } else {
      return m.status();
    }
  }
  return all;
}

std::vector<std::string> BySequence(const std::map<std::string, Manifest>& all) {
  std::vector<std::string> names;
  names.reserve(all.size());
  for (const auto& [name, m] : all) names.push_back(name);
  std::sort(names.begin(), names.end(), [&](const std::string& a, const std::string& b) {
    return all.at(a).sequence < all.at(b).sequence;
  });
  return names;
}

// Whether `dir` holds a checkpoint's files and nothing else (what a save cut short, or a deleted
// checkpoint, leaves): anything else under the root, an empty directory too, is the user's.
bool HoldsOnlyCheckpointFiles(const std::filesystem::path& dir) {
  std::error_code error;
  bool any = false;
  for (auto it = std::filesystem::directory_iterator(dir, error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    const std::string f = it->path().filename().string();
    if (f != kExpertsName && f != kBlobsName && f.rfind(TemporaryPrefixOf(kBlobsName), 0) != 0 &&
        f.rfind(TemporaryPrefixOf(kManifestName), 0) != 0) {
      return false;
    }
    any = true;
  }
  return any && !error;
}

// Removes directories without a manifest whose data no manifest refers to: saves cut short,
// and deleted checkpoints nothing needs any more. REQUIRES: the root's lock.
// Removes directory `dir` of a save that did not finish, unless it now holds something no
// save writes (or is no directory: someone replaced it), which stays.
void RemoveUnfinished(const std::string& dir) {
  std::error_code error;
  if (!std::filesystem::is_directory(std::filesystem::symlink_status(dir, error))) return;
  if (std::filesystem::is_empty(dir, error) || HoldsOnlyCheckpointFiles(dir)) {
    std::filesystem::remove_all(dir, error);
  }
}

Status CollectGarbage(const std::string& root, const Checkpoints& checkpoints) {
  if (!checkpoints.damaged.empty()) return Status::Ok();
  std::set<std::string> referenced;
  for (const auto& [name, m] : checkpoints.intact) {
    for (const ExpertRecord& x : m.experts) {
      if (!x.holder.empty()) referenced.insert(x.holder);
    }
  }
  ECSS_ASSIGN_OR_RETURN(std::vector<std::filesystem::path> dirs, Subdirectories(root));
  for (const std::filesystem::path& dir : dirs) {
    const std::string name = dir.filename().string();
    if (checkpoints.intact.count(name) != 0 || referenced.count(name) != 0 ||
        !HoldsOnlyCheckpointFiles(dir)) {
      continue;
    }
    std::error_code error;
    std::filesystem::remove_all(dir, error);
    if (error) return ErrnoError(error.value(), StrCat("removing '", dir.string(), "'"));
  }
  return SyncDirectory(root);
}

// One writer per root: Save and Delete hold ROOT/checkpoints.lock.
StatusOr<std::unique_ptr<FileLock>> LockRoot(const std::string& root) {
  ECSS_RETURN_IF_ERROR(CheckWritableDirectory(root, "checkpoint root"));
  return FileLock::Acquire(StrCat(root, "/checkpoints.lock"),
                           StrCat("checkpoint root '", root, "'"));
}

// The states a checkpoint of `store` saves: options.states (each one the store keeps), or
// every state the store keeps.
StatusOr<std::vector<ExpertState>> StatesToSave(const ExpertStore& store,
                                                const std::vector<ExpertState>& asked) {
  std::vector<ExpertState> states;
  for (ExpertState state : kAllStates) {
    const bool wanted =
        asked.empty() || std::find(asked.begin(), asked.end(), state) != asked.end();
    if (!wanted || (asked.empty() && store.placement(state) == Tier::kNone)) continue;
    if (store.placement(state) == Tier::kNone) {
      return InvalidArgumentError(
          StrCat("checkpoint: the store keeps no ", ExpertStateName(state), " state to save"));
    }
    states.push_back(state);
  }
  if (states.empty()) return InvalidArgumentError("checkpoint: no state to save");
  return states;
}

// 4 KiB-aligned blocks, one per saved state, for `sets` experts at once, contiguous per set.
class BlockSets {
 public:
  BlockSets(const ExpertStoreLayout& layout, const std::vector<ExpertState>& states,
            uint32_t sets) {
    for (ExpertState state : states) {
      bytes_.push_back(StateBlockBytes(ExpertStore::StateBytes(layout, state)));
    }
    for (uint64_t b : bytes_) set_bytes_ += b;
    memory_ = static_cast<uint8_t*>(std::aligned_alloc(4096, set_bytes_ * sets));
    for (uint32_t s = 0; s < sets && memory_ != nullptr; ++s) {
      std::vector<void*> blocks;
      uint64_t at = s * set_bytes_;
      for (uint64_t b : bytes_) {
        blocks.push_back(memory_ + at);
        at += b;
      }
      sets_.push_back(std::move(blocks));
    }
  }
  ~BlockSets() { std::free(memory_); }
  BlockSets(const BlockSets&) = delete;
  BlockSets& operator=(const BlockSets&) = delete;
  bool ok() const { return memory_ != nullptr; }
  uint32_t sets() const { return static_cast<uint32_t>(sets_.size()); }
  void* const* blocks(uint32_t set) const { return sets_[set].data(); }
  uint8_t* set_data(uint32_t set) { return memory_ + set * set_bytes_; }
  uint64_t set_bytes() const { return set_bytes_; }

 private:
  std::vector<uint64_t> bytes_;
  uint64_t set_bytes_ = 0;
  uint8_t* memory_ = nullptr;
  std::vector<std::vector<void*>> sets_;
};

// Waits for every request in flight; the first error.
Status Drain(IoEngine& engine, const std::string& path) {
  Status first;
  IoCompletion done[16];
  while (engine.in_flight() > 0) {
    const size_t n = engine.Poll(done, 16, std::chrono::seconds(1));
    for (size_t i = 0; i < n; ++i) {
      if (first.ok() && !done[i].status.ok()) first = done[i].status;
    }
  }
  return first.Annotate(StrCat("writing '", path, "'"));
}

// InvalidArgument naming a blob name that is empty, repeated, a path or has whitespace.
Status CheckBlobNames(const std::vector<CheckpointBlob>& blobs) {
  std::set<std::string> names;
  for (const CheckpointBlob& blob : blobs) {
    if (!IsPlainName(blob.name) || !names.insert(blob.name).second) {
      return InvalidArgumentError(StrCat("checkpoint blob name '", blob.name,
                                         "' is empty, repeated, a path or has whitespace"));
    }
  }
  return Status::Ok();
}

// Writes the blobs (their names checked) into DIR/blobs.bin (synced) and records them.
Status WriteBlobs(const std::string& dir, const std::vector<CheckpointBlob>& blobs, Manifest* m,
                  uint64_t* bytes) {
  std::string data;
  for (const CheckpointBlob& blob : blobs) {
    m->blobs.push_back(
        {blob.name, data.size(), blob.bytes.size(), Crc32c(blob.bytes.data(), blob.bytes.size())});
    data += blob.bytes;
  }
  *bytes += data.size();
  return WriteFileAtomically(StrCat(dir, "/", kBlobsName), data);
}

// A checkpoint's experts.bin being written: each expert read from the store into a free set of
// blocks and written at the file's end, several sets in flight.
class ExpertsWriter {
 public:
  ExpertsWriter(IoEngine& engine, IoFileId file, std::string path, BlockSets& blocks)
      : engine_(engine), file_(file), path_(std::move(path)), blocks_(blocks) {}
  // Waits for whatever is in flight (also after an error: no buffer is freed under a write).
  ~ExpertsWriter() { Drain(engine_, path_).IgnoreError(); }
  // The next free set (waiting for the sets in flight when none is).
  StatusOr<uint32_t> NextSet() {
    if (next_ == blocks_.sets()) {
      ECSS_RETURN_IF_ERROR(Drain(engine_, path_));
      next_ = 0;
    }
    return next_;
  }
  // Queues the set NextSet gave, filled, as the next record; returns its offset.
  StatusOr<uint64_t> Append(uint64_t user_data) {
    const uint64_t at = offset_;
    while (true) {
      Status submitted = engine_.Submit(
          {IoOp::kWrite, file_, at, blocks_.set_data(next_), blocks_.set_bytes(), user_data});
      if (submitted.ok()) break;
      if (!submitted.retryable()) return submitted.Annotate(StrCat("writing '", path_, "'"));
      ECSS_RETURN_IF_ERROR(Drain(engine_, path_));  // a full queue
    }
    offset_ += blocks_.set_bytes();
    ++next_;
    return at;
  }
  Status Finish() {
    ECSS_RETURN_IF_ERROR(Drain(engine_, path_));
    return engine_.Sync(file_).Annotate(StrCat("syncing '", path_, "'"));
  }
  uint64_t bytes() const { return offset_; }

 private:
  IoEngine& engine_;
  const IoFileId file_;
  const std::string path_;
  BlockSets& blocks_;
  uint32_t next_ = 0;
  uint64_t offset_ = 0;
};

}  // namespace

StatusOr<std::vector<std::string>> ListCheckpoints(const std::string& root) {
  ECSS_ASSIGN_OR_RETURN(Checkpoints all, ReadAll(root));
  return BySequence(all.intact);
}

StatusOr<std::string> LatestCheckpoint(const std::string& root) {
  ECSS_ASSIGN_OR_RETURN(std::vector<std::string> names, ListCheckpoints(root));
  if (names.empty()) return NotFoundError(StrCat("no checkpoint in '", root, "'"));
  return names.back();
}

namespace {
// NotFound naming the checkpoints that do exist.
Status NoCheckpoint(const std::string& root, const std::string& name) {
  std::string names;
  StatusOr<std::vector<std::string>> listed = ListCheckpoints(root);
  if (listed.ok()) {
    for (const std::string& n : *listed) names += StrCat(names.empty() ? "" : ", ", n);
  }
  return NotFoundError(StrCat("no checkpoint '", name, "' in '", root,
                              "' (there are: ", names.empty() ? "none" : names, ")"));
}
}  // namespace

// ---- Saving ---------------------------------------------------------------------------------

struct CheckpointSave::Impl {
  explicit Impl(ExpertStore& s) : store(s) {}

  // Where an expert Begin chose to copy stands (the others are kCopied from the start).
  enum class Copy : uint8_t {
    kPending,
    kReading,    // by the copy, or by Preserve
    kPreserved,  // held in `preserved` until the copy writes it
    kCopied,
    kFailed,  // Preserve could not keep it: the save fails with preserve_error
  };

  ExpertStore& store;
  std::string name;
  std::string dir;
  CheckpointOptions options;
  std::unique_ptr<FileLock> lock;  // the root's, until the save is over
  // Every expert's version (Begin); the copied ones' blocks once copied, the shared ones' then.
  Manifest m;
  // The experts to copy, in the order a step's updates reach them (the backward's: the last
  // layer first), so that the copy is ahead of the updates of the step it overlaps.
  std::vector<uint32_t> to_copy;
  std::vector<uint32_t> shares_with;  // per flat: the source whose record it takes, else itself
  CheckpointStats stats;
  uint64_t set_bytes = 0;      // one expert's blocks
  bool memory_states = false;  // a saved state lives in memory (Preserve has work)

  std::mutex mutex;
  std::condition_variable changed;  // an expert's Copy, `urgent` or `over` changed
  // GUARDED_BY(mutex):
  std::vector<Copy> copy;  // per flat
  std::map<uint32_t, std::unique_ptr<BlockSets>> preserved;
  uint64_t preserved_bytes = 0;  // at most options.buffer_bytes
  std::deque<uint32_t> urgent;   // experts an update waits for: the copy takes them next
  Status preserve_error;
  bool started = false;  // the copy runs on `thread`
  bool over = false;     // the copy ended (done or failed): nothing more to preserve

  std::thread thread;
  std::optional<StatusOr<CheckpointStats>> result;

  Status DecideExperts(const Manifest* newest);
  // The next expert to copy and its blocks if Preserve kept them; nullopt when none is left.
  StatusOr<std::optional<uint32_t>> Next(size_t* next, std::unique_ptr<BlockSets>* kept);
  Status CopyExperts();
  StatusOr<CheckpointStats> Run();
  void Finish() {  // Run, on the save's thread or inside Wait
    result = Run();
    lock.reset();
  }
};

// Records every expert in `m` as of the version its states hold now (headers only): initial,
// held by the newest checkpoint of this store (`newest`, when incremental), sharing the
// blocks of one saved before it (ExpertStore::Share, not written since: stored once), or to
// be copied.
Status CheckpointSave::Impl::DecideExperts(const Manifest* newest) {
  const ExpertIndex& index = store.index();
  copy.assign(index.size(), Copy::kCopied);
  shares_with.resize(index.size());
  for (uint32_t flat = 0; flat < index.size(); ++flat) {
    const ExpertId id = index.Id(flat);
    shares_with[flat] = flat;
    // States at different versions: an update cut short wrote some ahead; the version all of
    // them hold is the oldest (ExpertStore::ReadStates).
    std::vector<std::pair<uint64_t, bool>> held;  // each state's version, and if written
    for (ExpertState state : m.states) {
      bool written = false;
      ECSS_ASSIGN_OR_RETURN(const uint64_t v, store.Version(state, id, &written));
      held.emplace_back(v, written);
    }
    const uint64_t version = std::min_element(held.begin(), held.end())->first;
    const bool agreed =
        std::all_of(held.begin(), held.end(), [&](const auto& h) { return h.first == version; });
    // Written as of that version (at 0 too: then not its initial value, but what its writer
    // chose).
    const bool written = std::any_of(held.begin(), held.end(),
                                     [&](const auto& h) { return h.first == version && h.second; });
    const uint32_t source = index.Flat(store.SourceOf(id));
    // Its source saved before it, at this version, with blocks.
    const bool source_stored =
        source < flat && m.experts[source].version == version &&
        (copy[source] == Copy::kPending || !m.experts[source].holder.empty());
    const bool shares = source_stored && agreed && written &&
                        std::all_of(m.states.begin(), m.states.end(), [&](ExpertState state) {
                          return store.ReadsSourceStorage(id, state);
                        });
    ExpertRecord x;
    x.version = version;
    if (shares) {
      shares_with[flat] = source;
      ++stats.experts_shared;
    } else if (!written) {
      ++stats.experts_initial;
    } else if (newest != nullptr && !newest->experts[flat].holder.empty() &&
               newest->experts[flat].version == version) {
      x = newest->experts[flat];
      ++stats.experts_referenced;
    } else {
      to_copy.push_back(flat);
      copy[flat] = Copy::kPending;
    }
    if (!shares && written) stats.full_bytes += set_bytes;
    m.experts.push_back(std::move(x));
  }
  std::stable_sort(to_copy.begin(), to_copy.end(),
                   [&](uint32_t a, uint32_t b) { return index.Id(a).layer > index.Id(b).layer; });
  return Status::Ok();
}

StatusOr<std::optional<uint32_t>> CheckpointSave::Impl::Next(size_t* next,
                                                             std::unique_ptr<BlockSets>* kept) {
  std::unique_lock<std::mutex> guard(mutex);
  while (true) {
    uint32_t flat = 0;
    if (!urgent.empty()) {  // an update waits for these
      flat = urgent.front();
      urgent.pop_front();
    } else if (*next < to_copy.size()) {
      flat = to_copy[(*next)++];
    } else {
      return std::optional<uint32_t>();
    }
    // Preserve is reading it: it is kept, or failed, in a moment.
    changed.wait(guard, [&] { return copy[flat] != Copy::kReading; });
    switch (copy[flat]) {
      case Copy::kPending:
        copy[flat] = Copy::kReading;
        return std::optional<uint32_t>(flat);
      case Copy::kPreserved:
        *kept = std::move(preserved[flat]);
        preserved.erase(flat);
        preserved_bytes -= set_bytes;
        copy[flat] = Copy::kCopied;
        changed.notify_all();
        return std::optional<uint32_t>(flat);
      case Copy::kFailed:
        return preserve_error;
      case Copy::kReading:
      case Copy::kCopied:  // taken already (urgent, then met again in order)
        break;
    }
  }
}

// Copies the experts to copy into DIR/experts.bin, as of the versions DecideExperts saw: each
// from the blocks Preserve kept, else read from the store at that version.
Status CheckpointSave::Impl::CopyExperts() {
  const std::string path = StrCat(dir, "/", kExpertsName);
  // Declared before the engine and the writer: freed after every write that uses it.
  std::unique_ptr<BlockSets> blocks;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> engine, CreateIoEngine(options.io_engines));
  const auto sets = static_cast<uint32_t>(std::clamp<uint64_t>(
      options.buffer_bytes / std::max<uint64_t>(set_bytes, 1), 1, engine->queue_depth()));
  blocks = std::make_unique<BlockSets>(store.layout(), m.states, sets);
  if (!blocks->ok()) return ResourceExhaustedError("checkpoint: no memory for its blocks");
  ECSS_ASSIGN_OR_RETURN(const IoFileId file, engine->Open(path, OpenMode::kCreate));
  Status copied = [&] {
    ExpertsWriter writer(*engine, file, path, *blocks);
    size_t next = 0;
    while (true) {
      std::unique_ptr<BlockSets> kept;
      ECSS_ASSIGN_OR_RETURN(const std::optional<uint32_t> taken, Next(&next, &kept));
      if (!taken.has_value()) break;
      const uint32_t flat = *taken;
      ExpertRecord& x = m.experts[flat];
      ECSS_ASSIGN_OR_RETURN(const uint32_t set, writer.NextSet());
      if (kept != nullptr) {
        std::memcpy(blocks->set_data(set), kept->set_data(0), blocks->set_bytes());
        ++stats.experts_preserved;
      } else {
        Status got =
            store.ReadStatesAt(store.index().Id(flat), m.states, blocks->blocks(set), x.version);
        {
          std::lock_guard<std::mutex> guard(mutex);
          copy[flat] = Copy::kCopied;
        }
        changed.notify_all();
        ECSS_RETURN_IF_ERROR(got);
      }
      // The blocks' padding zeroed, not whatever the set held before: equal stores save equal
      // files.
      for (size_t s = 0; s < m.states.size(); ++s) {
        const uint64_t used = store.StateBytes(m.states[s]);
        std::memset(static_cast<char*>(blocks->blocks(set)[s]) + used, 0,
                    store.BlockBytes(m.states[s]) - used);
        x.crcs.push_back(Crc32c(blocks->blocks(set)[s], used));
      }
      x.holder = name;
      ECSS_ASSIGN_OR_RETURN(x.offset, writer.Append(flat));
      ++stats.experts_copied;
    }
    ECSS_RETURN_IF_ERROR(writer.Finish());
    stats.bytes_written += writer.bytes();
    return Status::Ok();
  }();
  Status closed = engine->Close(file);
  if (!copied.ok()) return copied.Annotate("saving a checkpoint");
  ECSS_RETURN_IF_ERROR(closed);
  for (uint32_t flat = 0; flat < m.experts.size(); ++flat) {  // sources come first
    if (shares_with[flat] != flat) m.experts[flat] = m.experts[shares_with[flat]];
  }
  return Status::Ok();
}

StatusOr<CheckpointStats> CheckpointSave::Impl::Run() {
  Status saved = CopyExperts();
  {  // nothing more to preserve, whatever the outcome
    std::lock_guard<std::mutex> guard(mutex);
    over = true;
    preserved.clear();
    preserved_bytes = 0;
  }
  changed.notify_all();
  if (saved.ok()) saved = WriteBlobs(dir, options.blobs, &m, &stats.bytes_written);
  if (saved.ok()) {
    const std::string manifest = FormatManifest(m);
    stats.bytes_written += manifest.size();
    saved = WriteFileAtomically(StrCat(dir, "/", kManifestName), manifest);
  }
  if (!saved.ok()) {  // no manifest: the directory is no checkpoint; its files go
    RemoveUnfinished(dir);
    return saved.Annotate(StrCat("checkpoint '", dir, "'"));
  }
  return stats;
}

StatusOr<std::unique_ptr<CheckpointSave>> CheckpointSave::Begin(ExpertStore& store,
                                                                const std::string& root,
                                                                const std::string& name,
                                                                CheckpointOptions options) {
  if (!IsPlainName(name)) {
    return InvalidArgumentError(StrCat("checkpoint name '", name, "' is not a directory name"));
  }
  ECSS_RETURN_IF_ERROR(CheckBlobNames(options.blobs));
  auto s = std::make_unique<Impl>(store);
  s->name = name;
  s->options = std::move(options);
  ECSS_ASSIGN_OR_RETURN(s->lock, LockRoot(root));
  std::error_code error;
  // Absolute: the copy may run after the process changed its working directory.
  s->dir = std::filesystem::absolute(Dir(root, name), error).string();
  if (error) return ErrnoError(error.value(), StrCat("checkpoint root '", root, "'"));
  ECSS_ASSIGN_OR_RETURN(Checkpoints all, ReadAll(root));
  ECSS_RETURN_IF_ERROR(CollectGarbage(root, all));  // a save of this name cut short too
  if (std::filesystem::is_empty(s->dir, error)) {   // a save cut short right after its mkdir
    std::filesystem::remove(s->dir, error);
  }
  if (Exists(s->dir)) {
    return AlreadyExistsError(StrCat("'", s->dir,
                                     "' exists (a checkpoint, or the data of a deleted "
                                     "one that newer checkpoints refer to)"));
  }
  const std::vector<std::string> order = BySequence(all.intact);
  const Manifest* newest = order.empty() ? nullptr : &all.intact.at(order.back());
  Manifest& m = s->m;
  m.sequence = newest == nullptr ? 1 : newest->sequence + 1;
  m.store_id = store.store_id();
  m.layout = store.layout();
  m.initial_id = store.initial_id();
  ECSS_ASSIGN_OR_RETURN(m.states, StatesToSave(store, s->options.states));
  for (ExpertState state : m.states) {
    s->set_bytes += store.BlockBytes(state);
    s->memory_states |= store.placement(state) != Tier::kNvme;
  }
  // Incremental when the newest checkpoint is of this store (where a version names one value:
  // a store restored from an older checkpoint, or another run's, may reach the same version
  // with other values) and the new one would refer to at most max_chain others.
  bool incremental = !s->options.full && newest != nullptr && newest->store_id == m.store_id &&
                     newest->states == m.states;
  if (incremental) {
    std::set<std::string> holders;
    for (const ExpertRecord& x : newest->experts) {
      if (!x.holder.empty()) holders.insert(x.holder);
    }
    incremental = holders.size() <= s->options.max_chain;
  }
  s->stats.sequence = m.sequence;
  s->stats.full = !incremental;
  ECSS_RETURN_IF_ERROR(s->DecideExperts(incremental ? newest : nullptr)
                           .Annotate(StrCat("checkpoint '", s->dir, "'")));
  if (!std::filesystem::create_directory(s->dir, error)) {
    return error ? ErrnoError(error.value(), StrCat("cannot create '", s->dir, "'"))
                 : AlreadyExistsError(StrCat("'", s->dir, "' exists"));
  }
  Status synced = SyncDirectory(root);
  if (!synced.ok()) {
    RemoveUnfinished(s->dir);
    return synced.Annotate(StrCat("checkpoint '", s->dir, "'"));
  }
  return std::unique_ptr<CheckpointSave>(new CheckpointSave(std::move(s)));
}

CheckpointSave::CheckpointSave(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CheckpointSave::~CheckpointSave() {
  Impl& s = *impl_;
  if (s.thread.joinable()) {
    s.thread.join();
  } else if (!s.result.has_value()) {  // never run: abandoned, nothing of it is a checkpoint
    RemoveUnfinished(s.dir);
  }
}

Status CheckpointSave::Start() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> guard(s.mutex);
    if (s.started || s.result.has_value()) return Status::Ok();
    s.started = true;
  }
  try {
    s.thread = std::thread([&s] { s.Finish(); });
  } catch (const std::system_error& e) {
    std::lock_guard<std::mutex> guard(s.mutex);
    s.started = false;
    return ResourceExhaustedError(StrCat("checkpoint: no thread for the save (", e.what(), ")"));
  }
  return Status::Ok();
}

void CheckpointSave::Preserve(ExpertId id) {
  Impl& s = *impl_;
  if (!s.memory_states) return;
  const uint32_t flat = s.store.index().Flat(id);
  std::unique_lock<std::mutex> guard(s.mutex);
  s.changed.wait(guard, [&] { return s.over || s.copy[flat] != Impl::Copy::kReading; });
  if (s.over || s.copy[flat] != Impl::Copy::kPending) return;
  if (s.started && s.preserved_bytes + s.set_bytes > s.options.buffer_bytes) {
    // No room to keep it: the copy takes it next, and the update waits for that.
    s.urgent.push_back(flat);
    s.changed.notify_all();
    s.changed.wait(guard, [&] {
      return s.over || s.copy[flat] == Impl::Copy::kCopied || s.copy[flat] == Impl::Copy::kFailed;
    });
    return;
  }
  s.copy[flat] = Impl::Copy::kReading;
  s.preserved_bytes += s.set_bytes;
  guard.unlock();
  auto kept = std::make_unique<BlockSets>(s.store.layout(), s.m.states, 1);
  Status got =
      kept->ok() ? s.store.ReadStatesAt(id, s.m.states, kept->blocks(0), s.m.experts[flat].version)
                 : ResourceExhaustedError("no memory for its blocks");
  guard.lock();
  if (got.ok() && !s.over) {
    s.preserved[flat] = std::move(kept);
    s.copy[flat] = Impl::Copy::kPreserved;
  } else if (!got.ok()) {
    s.preserved_bytes -= s.set_bytes;
    s.copy[flat] = Impl::Copy::kFailed;
    if (s.preserve_error.ok()) {
      s.preserve_error =
          got.Annotate(StrCat("keeping layer ", id.layer, " expert ", id.expert, " as of version ",
                              s.m.experts[flat].version, " while it was updated"));
    }
  }
  s.changed.notify_all();
}

StatusOr<CheckpointStats> CheckpointSave::Wait() {
  Impl& s = *impl_;
  if (s.thread.joinable()) {
    s.thread.join();
  } else if (!s.result.has_value()) {
    s.Finish();
  }
  return *s.result;
}

StatusOr<CheckpointStats> SaveCheckpoint(ExpertStore& store, const std::string& root,
                                         const std::string& name,
                                         const CheckpointOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointSave> save,
                        CheckpointSave::Begin(store, root, name, options));
  return save->Wait();
}

namespace {

// Whether checkpoint `m` (at `where`) restores into `store`: the same model, initial values
// and states.
Status CheckRestorable(const Manifest& m, const ExpertStore& store, const std::string& where) {
  const ExpertStoreLayout& layout = store.layout();
  auto differs = [&](std::string_view what, const std::string& there, const std::string& here) {
    return FailedPreconditionError(StrCat("checkpoint '", where, "' is of another ", what, ": ",
                                          there, " there, ", here, " here"));
  };
  auto model = [](const ExpertStoreLayout& l) {
    std::string list;
    for (uint32_t n : l.experts_per_layer) list += StrCat(list.empty() ? "" : " ", n);
    return StrCat("experts_per_layer [", list, "] params_per_expert ", l.params_per_expert, " ",
                  DTypeName(l.weights_dtype), " moments ", l.moments);
  };
  if (m.layout.experts_per_layer != layout.experts_per_layer ||
      m.layout.params_per_expert != layout.params_per_expert ||
      m.layout.weights_dtype != layout.weights_dtype || m.layout.moments != layout.moments) {
    return differs("model", model(m.layout), model(layout));
  }
  if (m.initial_id != store.initial_id()) {
    return differs("initial values", m.initial_id, store.initial_id());
  }
  for (ExpertState state : m.states) {
    if (store.placement(state) == Tier::kNone) {
      return FailedPreconditionError(StrCat("checkpoint '", where, "' holds the ",
                                            ExpertStateName(state),
                                            " state, which this store does not keep"));
    }
  }
  return Status::Ok();
}

// The blobs of checkpoint `m` in `dir`, each verified.
StatusOr<std::vector<CheckpointBlob>> ReadBlobs(const Manifest& m, const std::string& dir) {
  std::vector<CheckpointBlob> blobs;
  if (m.blobs.empty()) return blobs;
  const std::string path = StrCat(dir, "/", kBlobsName);
  StatusOr<std::string> data = ReadFileToString(path);
  if (!data.ok()) {
    return DataLossError(
               StrCat("checkpoint blobs '", path, "' cannot be read: ", data.status().message()))
        .WithErrno(data.status().sys_errno());
  }
  for (const BlobRecord& b : m.blobs) {
    if (b.offset > data->size() || b.bytes > data->size() - b.offset ||
        Crc32c(data->data() + b.offset, b.bytes) != b.crc) {
      return DataLossError(
          StrCat("checkpoint blob '", b.name, "' in '", path, "' is damaged or truncated"));
    }
    blobs.push_back({b.name, data->substr(b.offset, b.bytes)});
  }
  return blobs;
}

}  // namespace

std::pair<std::string, std::string> SplitCheckpointPath(const std::string& path) {
  std::filesystem::path from(path);
  if (!from.has_filename()) from = from.parent_path();
  return {from.parent_path().string(), from.filename().string()};
}

StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::OpenPath(
    const std::string& checkpoint, const IoEngineFactory& io_engines) {
  const auto [root, name] = SplitCheckpointPath(checkpoint);
  return Open(root, name, io_engines);
}

struct CheckpointReader::Impl {
  Impl(Manifest manifest, const std::string& checkpoints, const std::string& name)
      : m(std::move(manifest)),
        root(checkpoints),
        where(Dir(root, name)),
        index(m.layout.experts_per_layer) {}
  ~Impl() {
    for (const auto& [holder, file] : files) engine->Close(file.first).IgnoreError();
  }
  const Manifest m;
  const std::string root;
  const std::string where;
  const ExpertIndex index;
  std::vector<CheckpointBlob> blobs;
  std::unique_ptr<BlockSets> blocks;  // at the first Read; before the engine: freed after it
  std::unique_ptr<IoEngine> engine;
  std::map<std::string, std::pair<IoFileId, uint64_t>> files;  // holder -> (file, size)
};

StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(
    const std::string& root, const std::string& name, const IoEngineFactory& io_engines) {
  if (!IsPlainName(name) || !Exists(StrCat(Dir(root, name), "/", kManifestName))) {
    return NoCheckpoint(root, name);
  }
  ECSS_ASSIGN_OR_RETURN(Manifest m, ReadManifest(root, name));
  auto impl = std::make_unique<Impl>(std::move(m), root, name);
  ECSS_ASSIGN_OR_RETURN(impl->blobs, ReadBlobs(impl->m, impl->where));
  ECSS_ASSIGN_OR_RETURN(impl->engine, CreateIoEngine(io_engines));
  return std::unique_ptr<CheckpointReader>(new CheckpointReader(std::move(impl)));
}

CheckpointReader::CheckpointReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CheckpointReader::~CheckpointReader() = default;

const std::string& CheckpointReader::where() const { return impl_->where; }
const ExpertStoreLayout& CheckpointReader::layout() const { return impl_->m.layout; }
const std::string& CheckpointReader::initial_id() const { return impl_->m.initial_id; }
const std::vector<ExpertState>& CheckpointReader::states() const { return impl_->m.states; }
const std::vector<CheckpointBlob>& CheckpointReader::blobs() const { return impl_->blobs; }
const ExpertIndex& CheckpointReader::index() const { return impl_->index; }
uint64_t CheckpointReader::version(uint32_t flat) const {
  return flat < impl_->m.experts.size() ? impl_->m.experts[flat].version : 0;
}
bool CheckpointReader::written(uint32_t flat) const {
  return flat < impl_->m.experts.size() && !impl_->m.experts[flat].holder.empty();
}
void* const* CheckpointReader::blocks() const { return impl_->blocks->blocks(0); }

Status CheckpointReader::Read(uint32_t flat) {
  Impl& s = *impl_;
  if (flat >= s.m.experts.size()) {
    return OutOfRangeError(StrCat("checkpoint '", s.where, "': no expert ", flat, " (",
                                  s.m.experts.size(), " experts)"));
  }
  const ExpertRecord& x = s.m.experts[flat];
  const ExpertId id = s.index.Id(flat);
  const std::string expert = StrCat("layer ", id.layer, " expert ", id.expert);
  if (x.holder.empty()) {
    return FailedPreconditionError(
        StrCat("checkpoint '", s.where, "': ", expert, " was never written (its initial value)"));
  }
  const std::string path = StrCat(Dir(s.root, x.holder), "/", kExpertsName);
  if (s.blocks == nullptr) {
    auto blocks = std::make_unique<BlockSets>(s.m.layout, s.m.states, 1);
    if (!blocks->ok()) {
      return ResourceExhaustedError(
          StrCat("checkpoint '", s.where, "': no memory for one expert's blocks"));
    }
    s.blocks = std::move(blocks);
  }
  if (s.files.count(x.holder) == 0) {
    StatusOr<IoFileId> opened = s.engine->Open(path, OpenMode::kRead);
    if (!opened.ok()) {
      return DataLossError(StrCat("checkpoint data '", path, "' that ", expert,
                                  " is in cannot be read: ", opened.status().message()))
          .WithErrno(opened.status().sys_errno());
    }
    StatusOr<uint64_t> size = s.engine->FileSize(*opened);
    if (!size.ok()) {
      s.engine->Close(*opened).IgnoreError();
      return size.status().Annotate(StrCat("checkpoint data '", path, "'"));
    }
    s.files[x.holder] = {*opened, *size};
  }
  const auto [file, size] = s.files[x.holder];
  if (x.offset > size || s.blocks->set_bytes() > size - x.offset) {
    return DataLossError(StrCat("checkpoint data '", path, "' is truncated: ", expert,
                                " is at offset ", x.offset, ", the file has ", size, " bytes"));
  }
  ECSS_RETURN_IF_ERROR(
      ReadAt(*s.engine, file, x.offset, s.blocks->set_data(0), s.blocks->set_bytes())
          .Annotate(StrCat("reading ", expert, " from '", path, "'")));
  for (size_t i = 0; i < s.m.states.size(); ++i) {
    const uint64_t bytes = ExpertStore::StateBytes(s.m.layout, s.m.states[i]);
    if (Crc32c(s.blocks->blocks(0)[i], bytes) != x.crcs[i]) {
      return DataLossError(StrCat("checkpoint data '", path, "': ", expert, " ",
                                  ExpertStateName(s.m.states[i]), " checksum mismatch"));
    }
  }
  return Status::Ok();
}

StatusOr<std::vector<CheckpointBlob>> RestoreCheckpoint(const std::string& root,
                                                        const std::string& name, ExpertStore& store,
                                                        const IoEngineFactory& io_engines) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::Open(root, name, io_engines));
  const Manifest& m = reader->impl_->m;
  ECSS_RETURN_IF_ERROR(CheckRestorable(m, store, reader->where()));
  // The store checked new in full (headers only, no state read): a failure before any write
  // leaves it untouched.
  for (uint32_t flat = 0; flat < m.experts.size(); ++flat) {
    const ExpertId id = store.index().Id(flat);
    for (ExpertState state : m.states) {
      bool written = false;
      ECSS_ASSIGN_OR_RETURN(const uint64_t version, store.Version(state, id, &written));
      if (written) {
        return FailedPreconditionError(
            StrCat("restoring a checkpoint needs a new store: layer ", id.layer, " expert ",
                   id.expert, " ", ExpertStateName(state), " is written (version ", version, ")"));
      }
    }
  }
  // Experts saved as one (the same blocks: shared storage when saved, or a deep model grown
  // from a shallow one) share the storage of the first of them again, without a write.
  std::map<std::pair<std::string, uint64_t>, uint32_t> restored_at;  // (holder, offset) -> flat
  std::vector<std::pair<ExpertId, ExpertId>> shared;
  for (uint32_t flat = 0; flat < m.experts.size(); ++flat) {
    const ExpertRecord& x = m.experts[flat];
    if (x.holder.empty()) continue;  // stays unwritten
    const auto [first, added] = restored_at.insert({{x.holder, x.offset}, flat});
    if (!added) {
      const ExpertRecord& y = m.experts[first->second];
      if (y.version != x.version || y.crcs != x.crcs) {
        const ExpertId a = store.index().Id(first->second), b = store.index().Id(flat);
        return DataLossError(StrCat("checkpoint '", reader->where(), "': layer ", a.layer,
                                    " expert ", a.expert, " (version ", y.version, ") and layer ",
                                    b.layer, " expert ", b.expert, " (version ", x.version,
                                    ") name the same blocks"));
      }
      shared.emplace_back(store.index().Id(flat), store.index().Id(first->second));
      continue;
    }
    Status restored = reader->Read(flat);
    if (restored.ok()) {
      restored = store.WriteStates(store.index().Id(flat), m.states, reader->blocks(), x.version);
    }
    if (!restored.ok()) return restored.Annotate(StrCat("restoring '", reader->where(), "'"));
  }
  if (!shared.empty()) {
    ECSS_RETURN_IF_ERROR(store.Share(shared).Annotate(StrCat("restoring '", reader->where(), "'")));
  }
  return reader->blobs();
}

Status DeleteCheckpoint(const std::string& root, const std::string& name) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<FileLock> lock, LockRoot(root));
  const std::string manifest = StrCat(Dir(root, name), "/", kManifestName);
  if (!IsPlainName(name) || !Exists(manifest)) {
    return NoCheckpoint(root, name);
  }
  std::error_code error;
  if (!std::filesystem::remove(manifest, error)) {
    return ErrnoError(error.value(), StrCat("cannot remove '", manifest, "'"));
  }
  ECSS_RETURN_IF_ERROR(SyncDirectory(Dir(root, name)));
  ECSS_ASSIGN_OR_RETURN(Checkpoints all, ReadAll(root));
  return CollectGarbage(root, all);
}

}  // namespace ecss
