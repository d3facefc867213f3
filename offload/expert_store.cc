#include "offload/expert_store.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <thread>

#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

// 2: per-layer expert counts, optimizer states (versions in the files' headers).
// 3: sparse files (unwritten experts read as their initial values), split at max_file_bytes.
// 4: the initial values' name and shared experts in the manifest.
// 5: the store's id and generation, in the manifest and every state file's header.
constexpr uint32_t kFormat = 5;
// The NVMe state files that sessions kept master weights and moments in before the store did.
constexpr char kLegacyStateFile[] = "ecss-states-0.bin";
constexpr char kManifestName[] = "ecss-store.manifest";
constexpr char kLockName[] = "ecss-store.lock";
constexpr char kManifestMagic[] = "ecss-expert-store";
constexpr ExpertState kStates[kExpertStates] = {ExpertState::kWeights, ExpertState::kMaster,
                                                ExpertState::kMoments, ExpertState::kGradient};
constexpr MemoryTag kTags[kExpertStates] = {MemoryTag::kExpertWeights, MemoryTag::kMasterWeights,
                                            MemoryTag::kOptimizerMoments, MemoryTag::kGradients};
constexpr uint64_t kDeviceAlignment = 256;

std::string ManifestPath(const ExpertStoreOptions& options) {
  return StrCat(options.dirs[0], "/", kManifestName);
}

// The locks that say a store object owns its directories (FileLock), one in each: state files
// striped over several directories are named by the directory's index, so two stores sharing
// any one of them would write the same files.
StatusOr<std::vector<std::unique_ptr<FileLock>>> LockDirectories(
    const ExpertStoreOptions& options) {
  std::vector<std::unique_ptr<FileLock>> locks;
  for (const std::string& dir : options.dirs) {
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<FileLock> lock,
                          FileLock::Acquire(StrCat(dir, "/", kLockName),
                                            StrCat("expert store directory '", dir, "'")));
    locks.push_back(std::move(lock));
  }
  return locks;
}

uint64_t RoundUp(uint64_t value, uint64_t to) { return (value + to - 1) / to * to; }

// What a manifest says. Its text is one "key value" per line, then "crc <hex>" of the rest.
struct Manifest {
  uint32_t format = 0;
  uint64_t store_id = 0;
  uint64_t generation = 0;
  uint64_t previous_generation = 0;  // StateFileOptions::previous_generation
  ExpertStoreLayout layout;
  uint32_t dirs = 0;
  std::array<Tier, kExpertStates> placement{};
  bool durable_memory_states = true;
  uint64_t max_file_bytes = 0;
  std::string initial_id;
  std::vector<std::pair<uint32_t, uint32_t>> shared;  // (expert, source), flat ids
  bool closed = false;
};

std::string FormatManifest(const Manifest& m) {
  std::string text =
      StrCat(kManifestMagic, "\nformat ", m.format, "\nstore ", m.store_id, "\ngeneration ",
             m.generation, "\nprevious_generation ", m.previous_generation, "\nexperts_per_layer");
  for (uint32_t n : m.layout.experts_per_layer) text += StrCat(" ", n);
  text += StrCat("\nparams_per_expert ", m.layout.params_per_expert, "\nweights_dtype ",
                 DTypeName(m.layout.weights_dtype), "\nmoments ", m.layout.moments, "\ndirs ",
                 m.dirs, "\nplacement");
  for (ExpertState state : kStates) {
    text +=
        StrCat(" ", ExpertStateName(state), "=", TierName(m.placement[static_cast<int>(state)]));
  }
  text += StrCat("\nmemory_states ", m.durable_memory_states ? "durable" : "volatile");
  text += StrCat("\nmax_file_bytes ", m.max_file_bytes, "\ninitial ", m.initial_id);
  text += "\nshared";
  for (const auto& [expert, source] : m.shared) text += StrCat(" ", expert, ":", source);
  text += StrCat("\nstate ", m.closed ? "closed" : "open", "\n");
  return SealText(std::move(text));
}

// Strict: every key of this format exactly once, in any order, each with exactly its values,
// and nothing after the crc line; anything else is DataLoss naming the line. A manifest of
// another format is returned with only `format` set (the caller names the version).
StatusOr<Manifest> ParseManifest(const std::string& path, const std::string& text) {
  const Status damaged = DataLossError(StrCat("expert store manifest '", path, "' is damaged"));
  if (text.rfind(StrCat(kManifestMagic, "\n"), 0) != 0) {
    return DataLossError(StrCat("'", path, "' is not an expert store manifest"));
  }
  std::vector<SealedLine> lines;
  if (!SealedLines(text, &lines)) {
    return damaged.Annotate("checksum mismatch, or its last line is not its checksum");
  }
  Manifest m;
  std::set<std::string> seen;
  for (const SealedLine& sealed : lines) {
    const std::string& line = sealed.text;
    if (sealed.fields.empty()) return damaged.Annotate("a blank line");
    const std::string& key = sealed.fields[0];
    const std::vector<std::string> values(sealed.fields.begin() + 1, sealed.fields.end());
    const Status bad = damaged.Annotate(StrCat("line '", line, "'"));
    if (!seen.insert(key).second) return bad;  // a key twice
    uint64_t number = 0;
    auto one_number = [&](uint64_t max) {
      return values.size() == 1 && ParseUint(values[0], max, &number);
    };
    if (key == "format") {
      if (!one_number(UINT32_MAX)) return bad;
      m.format = static_cast<uint32_t>(number);
      if (m.format != kFormat) return m;  // its keys may differ
    } else if (key == "store" || key == "generation" || key == "previous_generation" ||
               key == "params_per_expert" || key == "max_file_bytes") {
      if (!one_number(UINT64_MAX)) return bad;
      (key == "store"                 ? m.store_id
       : key == "generation"          ? m.generation
       : key == "previous_generation" ? m.previous_generation
       : key == "params_per_expert"   ? m.layout.params_per_expert
                                      : m.max_file_bytes) = number;
    } else if (key == "moments" || key == "dirs") {
      if (!one_number(UINT32_MAX)) return bad;
      (key == "moments" ? m.layout.moments : m.dirs) = static_cast<uint32_t>(number);
    } else if (key == "experts_per_layer") {
      for (const std::string& value : values) {
        if (!ParseUint(value, UINT32_MAX, &number)) return bad;
        m.layout.experts_per_layer.push_back(static_cast<uint32_t>(number));
      }
    } else if (key == "weights_dtype") {
      if (values.size() != 1) return bad;
      StatusOr<DType> dtype = ParseDType(values[0]);
      if (!dtype.ok()) return bad;
      m.layout.weights_dtype = *dtype;
    } else if (key == "placement") {
      if (values.size() != kExpertStates) return bad;
      for (ExpertState state : kStates) {
        const std::string& entry = values[static_cast<int>(state)];
        const std::string prefix = StrCat(ExpertStateName(state), "=");
        StatusOr<Tier> tier = entry.rfind(prefix, 0) == 0 ? ParseTier(entry.substr(prefix.size()))
                                                          : StatusOr<Tier>(bad);
        if (!tier.ok()) return bad;
        m.placement[static_cast<int>(state)] = *tier;
      }
    } else if (key == "memory_states" || key == "state") {
      const char* yes = key == "state" ? "closed" : "durable";
      const char* no = key == "state" ? "open" : "volatile";
      if (values.size() != 1 || (values[0] != yes && values[0] != no)) return bad;
      (key == "state" ? m.closed : m.durable_memory_states) = values[0] == yes;
    } else if (key == "shared") {
      for (const std::string& pair : values) {
        const std::string_view entry = pair;
        const size_t colon = entry.find(':');
        uint64_t expert = 0, source = 0;
        if (colon == std::string::npos || !ParseUint(entry.substr(0, colon), UINT32_MAX, &expert) ||
            !ParseUint(entry.substr(colon + 1), UINT32_MAX, &source)) {
          return damaged.Annotate(StrCat("shared: ", pair));
        }
        m.shared.emplace_back(static_cast<uint32_t>(expert), static_cast<uint32_t>(source));
      }
    } else if (key == "initial") {  // the rest of the line
      if (values.empty()) return bad;
      m.initial_id = line.substr(key.size() + 1);
    } else {
      return damaged.Annotate(StrCat("unknown key '", key, "'"));
    }
  }
  for (const char* key :
       {"format", "store", "generation", "previous_generation", "experts_per_layer",
        "params_per_expert", "weights_dtype", "moments", "dirs", "placement", "memory_states",
        "max_file_bytes", "initial", "shared", "state"}) {
    if (seen.count(key) == 0) return damaged.Annotate(StrCat("no '", key, "' line"));
  }
  return m;
}

// "state-file format version N" as the header of `path`'s first slot says, for errors.
std::string StateFileFormat(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char head[12] = {};
  uint32_t version = 0;
  if (!in.read(head, sizeof(head)) || std::memcmp(head, "ECSSST", 6) != 0) {
    return "an unknown state-file format";
  }
  std::memcpy(&version, head + 8, sizeof(version));
  return StrCat("state-file format version ", version);
}

// The manifest of the store in options.dirs: NotFound without one (FailedPrecondition naming
// the old state files of builds before the store), FailedPrecondition naming another format.
StatusOr<Manifest> ReadManifest(const ExpertStoreOptions& options) {
  const std::string path = ManifestPath(options);
  std::error_code error;
  if (!std::filesystem::exists(path, error)) {
    const std::string legacy = StrCat(options.dirs[0], "/", kLegacyStateFile);
    if (std::filesystem::exists(legacy, error)) {
      return FailedPreconditionError(
          StrCat("'", options.dirs[0], "' holds NVMe state files of ", StateFileFormat(legacy),
                 " (ecss-states-*.bin), written before master weights and moments moved into the "
                 "expert store (format ",
                 kFormat,
                 "); this build does not read or migrate them: resume with the build that "
                 "wrote them, or start a new store in an empty directory"));
    }
    return NotFoundError(
        StrCat("no expert store in '", options.dirs[0], "' (no ", kManifestName, ")"));
  }
  ECSS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ECSS_ASSIGN_OR_RETURN(Manifest m, ParseManifest(path, text));
  if (m.format != kFormat) {
    return FailedPreconditionError(StrCat("expert store in '", options.dirs[0],
                                          "' has format version ", m.format,
                                          "; this build reads version ", kFormat));
  }
  return m;
}

// What the initial values are called in the manifest.
std::string InitialId(const ExpertStoreOptions& options) {
  return options.initial ? options.initial_id : "zeros";
}

}  // namespace

std::string_view ExpertStateName(ExpertState state) {
  switch (state) {
    case ExpertState::kWeights:
      return "weights";
    case ExpertState::kMaster:
      return "master";
    case ExpertState::kMoments:
      return "moments";
    case ExpertState::kGradient:
      return "gradient";
  }
  return "?";
}

uint64_t ExpertStore::StateBytes(ExpertState state) const {
  return StateBytes(options_.layout, state);
}

uint64_t ExpertStore::StateBytes(const ExpertStoreLayout& l, ExpertState state) {
  switch (state) {
    case ExpertState::kWeights:
      return l.params_per_expert * DTypeSize(l.weights_dtype);
    case ExpertState::kMoments:
      return l.params_per_expert * 4 * l.moments;
    case ExpertState::kMaster:
    case ExpertState::kGradient:
      return l.params_per_expert * 4;
  }
  return 0;
}

bool ExpertStore::HasState(const ExpertStoreOptions& options, ExpertState state) {
  return StateBytes(options.layout, state) > 0 && options.placement[Index(state)] != Tier::kNone;
}

bool ExpertStore::HasFile(const ExpertStoreOptions& options, ExpertState state) {
  return HasState(options, state) &&
         (options.placement[Index(state)] == Tier::kNvme || options.durable_memory_states);
}

// Durable memory states move between their region and their file with O_DIRECT: 4 KiB
// blocks. Others need only the host allocator's 64 B (the device's 256 B).
uint64_t ExpertStore::Stride(const ExpertStoreOptions& options, ExpertState state) {
  const uint64_t bytes = StateBytes(options.layout, state);
  switch (options.placement[Index(state)]) {
    case Tier::kDevice:
      return RoundUp(bytes, kDeviceAlignment);
    case Tier::kPinned:
    case Tier::kHost:
      return options.durable_memory_states ? StateBlockBytes(bytes) : RoundUp(bytes, 64);
    case Tier::kNvme:
    case Tier::kNone:
      return 0;
  }
  return 0;
}

uint64_t ExpertStore::RegionBytes(const ExpertStoreOptions& options, ExpertState state) {
  if (!HasState(options, state)) return 0;
  uint64_t experts = 0;
  for (uint32_t n : options.layout.experts_per_layer) experts += n;
  return Stride(options, state) * experts;
}

uint64_t ExpertStore::DiskBytes(const ExpertStoreOptions& options) {
  uint64_t bytes = 0;
  for (ExpertState state : kStates) {
    if (HasState(options, state) && HasFile(options, state)) {
      bytes += ExpertStateFile::DiskBytes(FileOptions(options, state));
    }
  }
  return bytes;
}

// Read and Write of nvme states go through it, and device states on their way to and from
// their files.
uint64_t ExpertStore::StagingBytes(const ExpertStoreOptions& options) {
  uint64_t staging = 0;
  for (ExpertState state : kStates) {
    const Tier tier = options.placement[Index(state)];
    if (HasState(options, state) &&
        (tier == Tier::kNvme || (tier == Tier::kDevice && HasFile(options, state)))) {
      staging = std::max(staging, StateBlockBytes(StateBytes(options.layout, state)));
    }
  }
  return staging;
}

Status ExpertStore::CheckOptions(Backend& backend, const ExpertStoreOptions& options) {
  const ExpertStoreLayout& l = options.layout;
  uint64_t experts = 0;
  for (uint32_t n : l.experts_per_layer) experts += n;
  if (experts == 0 || l.params_per_expert == 0) {
    return InvalidArgumentError(
        "expert store needs a layer with experts (experts_per_layer) and params_per_expert > 0");
  }
  if (l.weights_dtype != DType::kBF16 && l.weights_dtype != DType::kF32) {
    return InvalidArgumentError(
        StrCat("expert store: compute weights are bf16 or f32, not ", DTypeName(l.weights_dtype)));
  }
  if (experts > UINT32_MAX) {
    return InvalidArgumentError("expert store: more than 2^32 experts");
  }
  const std::string& id = options.initial_id;
  if (options.initial && (id.empty() || id.find('\n') != std::string::npos ||
                          std::isspace(static_cast<unsigned char>(id.front())) ||
                          std::isspace(static_cast<unsigned char>(id.back())))) {
    return InvalidArgumentError(
        "expert store: `initial` needs initial_id, one line that names the initial values");
  }
  bool files = false;
  for (ExpertState state : kStates) files |= HasFile(options, state);
  if (files && options.dirs.empty()) {
    return InvalidArgumentError(
        "expert store needs a directory (nvme states, or durable memory states, have files)");
  }
  for (const std::string& dir : options.dirs)
    ECSS_RETURN_IF_ERROR(CheckWritableDirectory(dir, "expert store directory"));
  if (options.device_budget_bytes > backend.device_memory().capacity_bytes()) {
    return InvalidArgumentError(StrCat(
        "expert store: device budget ", HumanBytes(options.device_budget_bytes),
        " is more than the device's ", HumanBytes(backend.device_memory().capacity_bytes())));
  }
  return Status::Ok();
}

StateFileOptions ExpertStore::FileOptions(const ExpertStoreOptions& options, ExpertState state) {
  StateFileOptions file;
  file.dirs = options.dirs;
  file.arrays = 1;
  file.element_bytes = state == ExpertState::kWeights
                           ? static_cast<uint32_t>(DTypeSize(options.layout.weights_dtype))
                           : 4;
  file.max_expert_elements = StateBytes(options.layout, state) / file.element_bytes;
  uint32_t experts = 0;
  for (uint32_t n : options.layout.experts_per_layer) experts += n;
  file.experts = experts;
  file.name = StrCat("ecss-store-", ExpertStateName(state));
  file.shadow = true;
  file.array_names = {std::string(ExpertStateName(state))};
  file.max_file_bytes = options.max_file_bytes;
  return file;
}

// Budgets first (nothing touched yet), then the memory of the device, pinned and host tiers.
Status ExpertStore::Allocate() {
  source_.resize(index_.size());
  std::iota(source_.begin(), source_.end(), 0u);
  uint64_t device = 0, pinned = 0, host = 0;
  for (ExpertState state : kStates) {
    const uint64_t region = RegionBytes(options_, state);
    if (placement(state) == Tier::kDevice) device += region;
    if (placement(state) == Tier::kPinned) pinned += region;
    if (placement(state) == Tier::kHost) host += region;
  }
  const uint64_t staging = StagingBytes(options_);
  const uint64_t n = index_.size();
  auto refuse = [&](std::string_view tier, uint64_t budget, uint64_t all, uint64_t fixed) {
    const uint64_t one = all / n;
    return ResourceExhaustedError(StrCat(
        "expert store: the ", tier, " budget (", HumanBytes(budget), ", ", budget, " bytes) ",
        budget < one + fixed ? "holds no expert" : "cannot hold every expert", ": one expert's ",
        tier, " states need ", one, " bytes, all ", n, " experts ", all + fixed, " bytes"));
  };
  if (device > options_.device_budget_bytes) {
    return refuse("device", options_.device_budget_bytes, device, 0);
  }
  if (options_.pinned_budget_bytes == 0) options_.pinned_budget_bytes = pinned + staging;
  if (pinned + staging > options_.pinned_budget_bytes) {
    return refuse("pinned", options_.pinned_budget_bytes, pinned, staging);
  }
  if (options_.host_budget_bytes == 0) options_.host_budget_bytes = host;
  if (host > options_.host_budget_bytes) {
    return refuse("host", options_.host_budget_bytes, host, 0);
  }
  if (options_.pinned_budget_bytes > 0) {
    PinnedPoolOptions pool;
    pool.name = "expert store";
    pool.capacity_bytes = options_.pinned_budget_bytes;
    pool.lock_pages = options_.lock_pinned_pages;
    ECSS_ASSIGN_OR_RETURN(pinned_, backend_.CreatePinnedPool(pool));
  }
  if (host > 0) {
    HostAllocatorOptions host_options;
    host_options.name = "expert store host states";
    host_options.capacity_bytes = options_.host_budget_bytes;
    host_options.alignment = options_.durable_memory_states ? 4096 : 64;
    host_options.huge_pages = true;  // each state's region: one block, all experts' copies
    ECSS_ASSIGN_OR_RETURN(host_, HostAllocator::Create(host_options));
  }
  if (staging > 0) {
    ECSS_ASSIGN_OR_RETURN(staging_, pinned_->Allocate(staging, MemoryTag::kStaging));
  }
  for (ExpertState state : kStates) {
    if (RegionBytes(options_, state) == 0) continue;
    Region& region = regions_[Index(state)];
    region.stride = Stride(options_, state);
    Allocator* memory = nullptr;
    switch (placement(state)) {
      case Tier::kDevice:
        memory = &backend_.device_memory();
        break;
      case Tier::kPinned:
        memory = pinned_.get();
        break;
      default:
        memory = host_.get();
        break;
    }
    ECSS_ASSIGN_OR_RETURN(region.memory,
                          memory->Allocate(RegionBytes(options_, state), kTags[Index(state)]));
    region.versions.assign(n, 0);
    region.written.assign(n, 0);
  }
  return Status::Ok();
}

void ExpertStore::Initial(ExpertState state, ExpertId id, void* dst) const {
  if (options_.initial) {
    options_.initial(state, id, dst, StateBytes(state));
  } else {
    std::memset(dst, 0, StateBytes(state));
  }
}

Status ExpertStore::InitRegion(ExpertState state) {
  if (RegionBytes(options_, state) == 0) return Status::Ok();
  if (placement(state) != Tier::kDevice) {
    for (uint32_t flat = 0; flat < index_.size(); ++flat) {
      Initial(state, index_.Id(flat), MemoryOf(state, flat));
    }
    return Status::Ok();
  }
  std::vector<char> host(StateBytes(state));
  for (uint32_t flat = 0; flat < index_.size(); ++flat) {
    Initial(state, index_.Id(flat), host.data());
    ECSS_RETURN_IF_ERROR(backend_.CopyAsync(stream_.get(), MemoryOf(state, flat), host.data(),
                                            host.size(), CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(backend_.SynchronizeStream(stream_.get()));
  }
  return Status::Ok();
}

void ExpertStore::WarnIfSpaceShort() const {
  const uint64_t need = DiskBytes(options_);
  uint64_t free = 0;
  std::set<dev_t> counted;  // directories on one file system share its space
  std::error_code error;
  for (const std::string& dir : options_.dirs) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) return;  // the writes will report what is wrong
    if (!counted.insert(st.st_dev).second) continue;
    const std::filesystem::space_info space = std::filesystem::space(dir, error);
    if (error) return;
    free += space.available;
  }
  if (free < need) {
    ECSS_LOG(Warning) << "expert store in '" << options_.dirs[0] << "': its files take up to "
                      << HumanBytes(need) << " once every expert is written, and its "
                      << options_.dirs.size() << " directories have " << HumanBytes(free)
                      << " free: training stops at the first write that does not fit";
  }
}

// Each state's writing handles (the first creates the files) and reading handles.
Status ExpertStore::OpenFiles(bool create) {
  for (ExpertState state : kStates) {
    if (!HasFile(state)) continue;
    Files& files = files_[Index(state)];
    StateFileOptions file = FileOptions(options_, state);
    file.store_id = store_id_;
    file.generation = generation_;
    file.previous_generation = previous_generation_;
    auto opened = [&]() -> Status {
      Handle& first = files.writers[0];
      ECSS_ASSIGN_OR_RETURN(first.io, CreateIoEngine(options_.io_engines));
      ECSS_ASSIGN_OR_RETURN(first.file, create ? ExpertStateFile::Create(first.io.get(), file)
                                               : ExpertStateFile::Open(first.io.get(), file));
      auto another = [&](Handle& handle) -> Status {
        ECSS_ASSIGN_OR_RETURN(handle.io, CreateIoEngine(options_.io_engines));
        ECSS_ASSIGN_OR_RETURN(handle.file, first.file->AnotherHandle(handle.io.get()));
        return Status::Ok();
      };
      for (size_t i = 1; i < kWriters; ++i) {
        ECSS_RETURN_IF_ERROR(another(files.writers[i]));
        if (create) files.writers[i].file->KnowFilesAreNew();
      }
      for (Handle& reader : files.readers) ECSS_RETURN_IF_ERROR(another(reader));
      return Status::Ok();
    }();
    if (!opened.ok())
      return opened.Annotate(StrCat("expert store ", ExpertStateName(state), " file"));
  }
  return Status::Ok();
}

// A manifest that accepts files of the new generation and of the old ones (written by
// `accept_both`, otherwise as it was), then every file's header, then the manifest that
// `closed` says, with the old ones no longer accepted: a crash or failure anywhere leaves a
// store that opens as before, and files copied back from before never pass for this one.
Status ExpertStore::NextGeneration(const std::function<Status()>& accept_both, bool closed) {
  if (previous_generation_ == 0) previous_generation_ = generation_;
  ++generation_;
  ECSS_RETURN_IF_ERROR(accept_both());
  for (Files& files : files_) {
    if (files.writers[0].file != nullptr) {
      ECSS_RETURN_IF_ERROR(files.writers[0].file->SetGeneration(generation_));
    }
  }
  previous_generation_ = 0;
  return WriteManifest(closed);
}

Status ExpertStore::WriteManifest(bool closed) {
  Manifest m;
  m.format = kFormat;
  m.store_id = store_id_;
  m.generation = generation_;
  m.previous_generation = previous_generation_;
  m.layout = options_.layout;
  m.dirs = static_cast<uint32_t>(options_.dirs.size());
  m.placement = options_.placement;
  m.durable_memory_states = options_.durable_memory_states;
  m.max_file_bytes = options_.max_file_bytes;
  m.initial_id = options_.initial_id;
  for (uint32_t flat = 0; flat < source_.size(); ++flat) {
    if (source_[flat] != flat) m.shared.emplace_back(flat, source_[flat]);
  }
  m.closed = closed;
  return WriteFileAtomically(ManifestPath(options_), FormatManifest(m))
      .Annotate("writing the expert store manifest");
}

// A store's manifest lives in its first directory: one in any other of `options.dirs` is
// another store's (striped over these directories in another order, or over fewer), whose
// files this store would mix with its own. AlreadyExists naming it.
Status ExpertStore::CheckNoOtherManifest(const ExpertStoreOptions& options) {
  std::error_code error;
  for (size_t i = 1; i < options.dirs.size(); ++i) {
    const std::string path = StrCat(options.dirs[i], "/", kManifestName);
    if (std::filesystem::exists(path, error)) {
      return AlreadyExistsError(StrCat("'", options.dirs[i],
                                       "' holds another expert store (its first directory): "
                                       "open that store, or remove it"));
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Create(Backend& backend,
                                                           const ExpertStoreOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(backend, options));
  ECSS_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<FileLock>> locks, LockDirectories(options));
  ECSS_RETURN_IF_ERROR(CheckNoOtherManifest(options));
  std::error_code error;
  if (!options.replace_existing && !options.dirs.empty() &&
      std::filesystem::exists(ManifestPath(options), error)) {
    return AlreadyExistsError(
        StrCat("'", options.dirs[0], "' already holds an expert store: open it, or remove it"));
  }
  for (ExpertState state : kStates) {  // another store's files, striped over a directory
    if (options.replace_existing || !HasFile(options, state)) continue;
    for (const std::string& path : ExpertStateFile::Paths(FileOptions(options, state))) {
      if (std::filesystem::exists(path, error)) {
        return AlreadyExistsError(StrCat("'", path,
                                         "' exists: a file of another expert store (striped "
                                         "over this directory?); open that store, or remove it"));
      }
    }
  }
  ExpertStoreOptions recorded = options;  // as the manifest records it
  if (recorded.max_file_bytes == 0) recorded.max_file_bytes = kDefaultMaxFileBytes;
  recorded.initial_id = InitialId(options);
  std::unique_ptr<ExpertStore> store(new ExpertStore(backend, recorded));
  store->locks_ = std::move(locks);
  std::random_device entropy;
  store->store_id_ = (uint64_t{entropy()} << 32 | entropy()) | 1;  // never 0
  ECSS_ASSIGN_OR_RETURN(store->stream_, CreateOwnedStream(backend, "expert store"));
  ECSS_RETURN_IF_ERROR(store->Allocate());
  // Every check passed, the directories still locked: the store replaced goes now.
  if (options.replace_existing && !options.dirs.empty()) {
    ECSS_RETURN_IF_ERROR(RemoveFiles(options));
  }
  // From here on files exist: remove them when creation fails.
  auto made = [&] {
    for (ExpertState state : kStates) ECSS_RETURN_IF_ERROR(store->InitRegion(state));
    ECSS_RETURN_IF_ERROR(store->OpenFiles(/*create=*/true));
    if (options.dirs.empty()) return Status::Ok();  // nothing on disk
    store->WarnIfSpaceShort();
    return store->WriteManifest(/*closed=*/false);
  }();
  if (!made.ok()) {
    for (Files& files : store->files_) CloseFiles(files);
    if (!options.dirs.empty()) RemoveFiles(options).IgnoreError();  // made's error is the one
    return made;
  }
  store->closed_ = false;
  return store;
}

// Whether a store made as `made` says (its manifest) opens with `options`: the same model and
// initial values, each state where it can go, nothing lost by a close that never came.
Status ExpertStore::CheckMadeFor(const ExpertStoreOptions& made, const ExpertStoreOptions& options,
                                 bool closed) {
  const std::string& dir = options.dirs[0];
  const ExpertStoreLayout& want = options.layout;
  auto differs = [&](std::string_view field, auto stored, auto expected) {
    return FailedPreconditionError(StrCat("expert store in '", dir,
                                          "' was made for another model: ", field, " ", stored,
                                          " there, ", expected, " here"));
  };
  auto counts = [](const std::vector<uint32_t>& per_layer) {
    std::string list = StrCat(per_layer.size(), " layers (");
    for (size_t l = 0; l < per_layer.size(); ++l) list += StrCat(l ? " " : "", per_layer[l]);
    return list + " experts)";
  };
  const ExpertStoreLayout& have = made.layout;
  if (have.experts_per_layer != want.experts_per_layer) {
    return differs("experts_per_layer", counts(have.experts_per_layer),
                   counts(want.experts_per_layer));
  }
  if (have.params_per_expert != want.params_per_expert) {
    return differs("params_per_expert", have.params_per_expert, want.params_per_expert);
  }
  if (have.weights_dtype != want.weights_dtype) {
    return differs("weights_dtype", DTypeName(have.weights_dtype), DTypeName(want.weights_dtype));
  }
  if (have.moments != want.moments) return differs("moments", have.moments, want.moments);
  const std::string initial_id = InitialId(options);
  if (made.initial_id != initial_id) {
    return FailedPreconditionError(
        StrCat("expert store in '", dir, "' was made with other initial values (\"",
               made.initial_id, "\" there, \"", initial_id,
               "\" here): its experts not written yet would read as something else"));
  }
  std::string lost;  // memory states of a store not closed
  for (ExpertState state : kStates) {
    const Tier tier = made.placement[Index(state)], now = options.placement[Index(state)];
    if (tier == Tier::kNone && now != Tier::kNone) {
      return FailedPreconditionError(
          StrCat("expert store in '", dir, "' was made without the ", ExpertStateName(state),
                 " state; it cannot be placed on ", TierName(now), " now"));
    }
    if (HasFile(options, state) && !HasFile(made, state)) {
      return FailedPreconditionError(
          StrCat("expert store in '", dir, "' kept its ", ExpertStateName(state), " state in ",
                 TierName(tier), " memory only (not durable); it has no file to place on ",
                 TierName(now), " now"));
    }
    if (!closed && HasFile(made, state) && tier != Tier::kNvme) {
      lost += StrCat(lost.empty() ? "" : ", ", ExpertStateName(state), " (", TierName(tier), ")");
    }
  }
  if (!lost.empty()) {
    return DataLossError(StrCat("expert store in '", dir,
                                "' was not closed; these states lived in memory and their "
                                "latest values are lost: ",
                                lost));
  }
  return Status::Ok();
}

// The manifest's sharing (expert, source pairs), checked; then, with the files open, which
// experts still read their source's nvme states.
Status ExpertStore::AdoptSharing(const std::vector<std::pair<uint32_t, uint32_t>>& shared,
                                 const std::string& path) {
  const uint32_t n = index_.size();
  for (const auto& [expert, source] : shared) {
    if (expert >= n || source >= n || expert == source || source_[expert] != expert) {
      return DataLossError(StrCat("expert store manifest '", path, "': shared ", expert, ":",
                                  source, " names no pair of its ", n,
                                  " experts, or one named twice"));
    }
    source_[expert] = source;
  }
  for (const auto& [expert, source] : shared) {
    if (source_[source] != source) {
      return DataLossError(StrCat("expert store manifest '", path, "': expert ", source,
                                  " is a source and shares another's storage"));
    }
  }
  ECSS_RETURN_IF_ERROR(OpenFiles(/*create=*/false));
  for (ExpertState state : kStates) {
    if (!HasState(state) || placement(state) != Tier::kNvme) continue;
    Files& files = files_[Index(state)];
    for (const auto& [expert, source] : shared) {
      ECSS_ASSIGN_OR_RETURN(const bool written, files.readers[0].file->Written(expert));
      if (!written) files.unwritten_dependents[source].push_back(expert);
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Open(Backend& backend,
                                                         const ExpertStoreOptions& options) {
  ECSS_RETURN_IF_ERROR(CheckOptions(backend, options));
  if (options.dirs.empty())
    return InvalidArgumentError("opening an expert store needs its directory");
  ECSS_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<FileLock>> locks, LockDirectories(options));
  const std::string path = ManifestPath(options);
  ECSS_ASSIGN_OR_RETURN(Manifest m, ReadManifest(options));
  if (m.dirs != options.dirs.size()) {
    return FailedPreconditionError(StrCat("expert store in '", options.dirs[0],
                                          "' was made for another model: directories ", m.dirs,
                                          " there, ", options.dirs.size(), " here"));
  }
  ExpertStoreOptions made = options;  // as the manifest says it was made
  made.layout = m.layout;
  made.placement = m.placement;
  made.durable_memory_states = m.durable_memory_states;
  made.max_file_bytes = m.max_file_bytes;
  made.initial_id = m.initial_id;
  ECSS_RETURN_IF_ERROR(CheckMadeFor(made, options, m.closed));
  const std::string initial_id = InitialId(options);
  ExpertStoreOptions reopened = options;
  reopened.max_file_bytes = m.max_file_bytes;  // the files are split as they were made
  reopened.initial_id = initial_id;
  std::unique_ptr<ExpertStore> store(new ExpertStore(backend, reopened));
  store->locks_ = std::move(locks);
  store->store_id_ = m.store_id;
  store->generation_ = m.generation;
  store->previous_generation_ = m.previous_generation;
  ECSS_ASSIGN_OR_RETURN(store->stream_, CreateOwnedStream(backend, "expert store"));
  auto opened = [&] {
    ECSS_RETURN_IF_ERROR(store->Allocate());
    ECSS_RETURN_IF_ERROR(store->AdoptSharing(m.shared, path));
    for (ExpertState state : kStates) {
      // A state without a file (not durable) starts at its initial value (a shared expert's:
      // its source's).
      if (store->HasFile(state)) {
        ECSS_RETURN_IF_ERROR(store->LoadTier(state));
        continue;
      }
      ECSS_RETURN_IF_ERROR(store->InitRegion(state));
      for (const auto& [expert, source] : m.shared) {
        ECSS_RETURN_IF_ERROR(store->CopyRegion(state, source, expert));
      }
    }
    // The manifest as it was (closed or not, its placement), but for the generations: an Open
    // cut short changes nothing else.
    return store->NextGeneration(
        [&] {
          Manifest before = m;
          before.generation = store->generation_;
          before.previous_generation = store->previous_generation_;
          return WriteFileAtomically(path, FormatManifest(before))
              .Annotate("writing the expert store manifest");
        },
        /*closed=*/false);
  }();
  if (!opened.ok()) return opened;  // the files are as they were: nothing to flush
  store->closed_ = false;
  return store;
}

Status ExpertStore::Remove(const ExpertStoreOptions& options) {
  if (options.dirs.empty()) return Status::Ok();
  ECSS_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<FileLock>> locks, LockDirectories(options));
  ECSS_RETURN_IF_ERROR(CheckNoOtherManifest(options));
  return RemoveFiles(options);
}

// REQUIRES: options.dirs locked, not empty.
Status ExpertStore::RemoveFiles(const ExpertStoreOptions& options) {
  std::error_code error;
  std::filesystem::remove(ManifestPath(options), error);  // first: the rest is no store then
  ECSS_RETURN_IF_ERROR(SyncDirectory(options.dirs[0]));
  for (ExpertState state : kStates) {
    if (!HasFile(options, state)) continue;
    for (const std::string& path : ExpertStateFile::Paths(FileOptions(options, state))) {
      std::filesystem::remove(path, error);
    }
  }
  return Status::Ok();
}

ExpertStore::~ExpertStore() {
  if (closed_) return;
  Status closed = Close();
  if (!closed.ok()) ECSS_LOG(Error) << "closing the expert store: " << closed;
}

std::string ExpertStore::Name(ExpertState state, ExpertId id) const {
  return StrCat("layer ", id.layer, " expert ", id.expert, " ", ExpertStateName(state));
}

Status ExpertStore::Check(ExpertState state, ExpertId id) const {
  if (closed_) return FailedPreconditionError("the expert store is closed");
  if (static_cast<size_t>(state) >= kExpertStates || !HasState(state)) {
    return InvalidArgumentError(StrCat("this expert store has no state ", static_cast<int>(state),
                                       " (", ExpertStateName(state), ")"));
  }
  if (!index_.Contains(id)) {
    return InvalidArgumentError(StrCat("expert store: no layer ", id.layer, " expert ", id.expert,
                                       " (", index_.layers(), " layers; that one has ",
                                       index_.experts_in_layer(id.layer), " experts)"));
  }
  return Status::Ok();
}

void* ExpertStore::MemoryOf(ExpertState state, uint32_t flat) const {
  const Region& region = regions_[Index(state)];
  return static_cast<char*>(region.memory.data()) + flat * region.stride;
}

// One expert's state to its file, through its writer. Shared experts (Share) first: before a
// source's write, the experts that still read this state of it get their own copy of what they
// read; before a shared expert's own first write, its source's version goes into its first
// slot, so that its two slots hold what a crash between an update's writes must find. Both run
// with every writer and every reading handle of the state locked (no read of a dependent falls
// between its look at its own slot and the source's write), and are made durable before the
// write they precede.
Status ExpertStore::StoreToFile(ExpertState state, uint32_t flat, const void* block,
                                uint64_t version, bool supersede, const uint32_t* checksum) {
  Files& files = files_[Index(state)];
  const void* arrays[1] = {block};
  {
    std::lock_guard<std::mutex> lock(files.writers[flat % kWriters].mutex);
    if (!LendsStorage(files, flat) && !ReadsSource(files, flat)) {
      return StoreThroughWriter(files, flat, arrays, Elements(state), version, supersede, checksum);
    }
  }
  const auto no_write = LockAll(files.writers);
  return StoreLocked(state, flat, block, version, supersede, checksum);
}

bool ExpertStore::LendsStorage(const Files& files, uint32_t flat) {
  return files.unwritten_dependents.contains(flat);
}

bool ExpertStore::ReadsSource(const Files& files, uint32_t flat) const {
  if (source_[flat] == flat) return false;
  auto it = files.unwritten_dependents.find(source_[flat]);
  return it != files.unwritten_dependents.end() &&
         std::find(it->second.begin(), it->second.end(), flat) != it->second.end();
}

Status ExpertStore::StoreThroughWriter(Files& files, uint32_t flat, const void* const* arrays,
                                       uint64_t elements, uint64_t version, bool supersede,
                                       const uint32_t* checksum) {
  ExpertStateFile& writer = *files.writers[flat % kWriters].file;
  const uint64_t fresh_before = writer.fresh_written_bytes();
  Status stored = writer.Store(flat, arrays, elements, version, supersede, checksum);
  files.fresh_written.fetch_add(writer.fresh_written_bytes() - fresh_before,
                                std::memory_order_relaxed);
  return stored;
}

Status ExpertStore::SyncWriters(Files& files) {
  for (Handle& writer : files.writers) ECSS_RETURN_IF_ERROR(writer.file->Sync());
  return Status::Ok();
}

Status ExpertStore::StoreLocked(ExpertState state, uint32_t flat, const void* block,
                                uint64_t version, bool supersede, const uint32_t* checksum) {
  Files& files = files_[Index(state)];
  const void* arrays[1] = {block};
  const bool source = LendsStorage(files, flat);
  const bool shared = ReadsSource(files, flat);
  if (!source && !shared)
    return StoreThroughWriter(files, flat, arrays, Elements(state), version, supersede, checksum);

  const auto no_read = LockAll(files.readers);
  ExpertStateFile& reader = *files.readers[0].file;
  const std::string what = Name(state, index_.Id(flat));
  std::unique_ptr<void, decltype(&std::free)> copy(std::aligned_alloc(4096, BlockBytes(state)),
                                                   &std::free);
  if (copy == nullptr) {
    return ResourceExhaustedError(StrCat("writing ", what, ": no memory for a block"));
  }
  const void* copied[1] = {copy.get()};
  uint64_t current = 0;
  ECSS_RETURN_IF_ERROR(
      LoadLocked(state, reader, shared ? source_[flat] : flat, copy.get(), &current));
  if (source) {
    std::vector<uint32_t>& waiting = files.unwritten_dependents.at(flat);
    while (!waiting.empty()) {
      Status given = StoreThroughWriter(files, waiting.back(), copied, Elements(state), current);
      if (!given.ok()) {
        return given.Annotate(StrCat("giving ", Name(state, index_.Id(waiting.back())),
                                     " its own copy before ", what, " is written"));
      }
      waiting.pop_back();
    }
    files.unwritten_dependents.erase(flat);
  }
  if (shared) {
    ECSS_RETURN_IF_ERROR(StoreThroughWriter(files, flat, copied, Elements(state), current)
                             .Annotate(StrCat("giving ", what, " its own copy")));
    std::vector<uint32_t>& of_source = files.unwritten_dependents.at(source_[flat]);
    std::erase(of_source, flat);
    if (of_source.empty()) files.unwritten_dependents.erase(source_[flat]);
  }
  ECSS_RETURN_IF_ERROR(SyncWriters(files));
  return StoreThroughWriter(files, flat, arrays, Elements(state), version, supersede, checksum);
}

Status ExpertStore::LoadFromFile(ExpertState state, uint32_t flat, void* block, uint64_t* version,
                                 const uint64_t* want, uint32_t* checksum) {
  auto [reader, lock] = AnyReader(state);
  return LoadLocked(state, *reader, flat, block, version, want, checksum);
}

std::pair<ExpertStateFile*, std::unique_lock<std::mutex>> ExpertStore::AnyReader(
    ExpertState state) {
  Files& files = files_[Index(state)];
  for (Handle& reader : files.readers) {
    std::unique_lock<std::mutex> lock(reader.mutex, std::try_to_lock);
    if (lock.owns_lock()) return {reader.file.get(), std::move(lock)};
  }
  Handle& reader =
      files.readers[files.next_reader.fetch_add(1, std::memory_order_relaxed) % kReaders];
  return {reader.file.get(), std::unique_lock<std::mutex>(reader.mutex)};
}

template <size_t N>
std::array<std::unique_lock<std::mutex>, N> ExpertStore::LockAll(std::array<Handle, N>& handles) {
  std::array<std::unique_lock<std::mutex>, N> locks;
  for (size_t i = 0; i < N; ++i) locks[i] = std::unique_lock<std::mutex>(handles[i].mutex);
  return locks;
}

void ExpertStore::CloseFiles(Files& files) {
  for (Handle& reader : files.readers) reader.file.reset();
  for (Handle& writer : files.writers) writer.file.reset();
}

Status ExpertStore::LoadLocked(ExpertState state, ExpertStateFile& reader, uint32_t flat,
                               void* block, uint64_t* version, const uint64_t* want,
                               uint32_t* checksum) {
  bool unwritten = false;
  void* arrays[1] = {block};
  ECSS_RETURN_IF_ERROR(
      reader.Load(flat, arrays, Elements(state), version, want, &unwritten, checksum));
  if (!unwritten) return Status::Ok();
  // Unwritten: what its source holds (a shared expert), else its initial value, version 0
  // (the block's padding as a load leaves it: zeros).
  if (source_[flat] != flat) {
    return LoadLocked(state, reader, source_[flat], block, version, want, checksum);
  }
  if (want != nullptr && *want != 0) {
    return DataLossError(StrCat(Name(state, index_.Id(flat)), ": no copy of version ", *want,
                                " (it was never written)"));
  }
  Initial(state, index_.Id(flat), block);
  std::memset(static_cast<char*>(block) + StateBytes(state), 0,
              BlockBytes(state) - StateBytes(state));
  if (checksum != nullptr) *checksum = Crc32c(block, StateBytes(state));
  *version = 0;
  return Status::Ok();
}

StatusOr<uint64_t> ExpertStore::Version(ExpertState state, ExpertId id, bool* written) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  uint32_t flat = index_.Flat(id);
  if (placement(state) != Tier::kNvme) {
    const Region& region = regions_[Index(state)];
    if (written != nullptr) *written = region.written[flat] != 0 || region.versions[flat] != 0;
    return region.versions[flat];
  }
  auto [reader, lock] = AnyReader(state);
  while (true) {  // an unwritten shared expert reads its source's
    StatusOr<std::optional<uint64_t>> count = reader->NewestCount(flat);
    if (!count.ok()) return count.status().Annotate(StrCat("reading ", Name(state, id)));
    if (written != nullptr) *written = count->has_value();
    if (count->has_value()) return **count;
    if (source_[flat] == flat) return uint64_t{0};
    flat = source_[flat];
  }
}

Status ExpertStore::LoadTier(ExpertState state) {
  if (placement(state) == Tier::kNvme) return Status::Ok();
  Region& region = regions_[Index(state)];
  for (uint32_t flat = 0; flat < index_.size(); ++flat) {
    const bool device = placement(state) == Tier::kDevice;
    void* block = device ? staging_.data() : MemoryOf(state, flat);
    Status loaded = LoadFromFile(state, flat, block, &region.versions[flat]);
    if (!loaded.ok()) return loaded.Annotate(Name(state, index_.Id(flat)));
    // Written when its file, or (unwritten and shared) its source's, holds a copy: what it
    // was loaded from.
    for (uint32_t at = flat;; at = source_[at]) {
      StatusOr<bool> stored = files_[Index(state)].readers[0].file->Written(at);
      if (!stored.ok()) return stored.status().Annotate(Name(state, index_.Id(at)));
      region.written[flat] = *stored ? 1 : 0;
      if (*stored || source_[at] == at) break;
    }
    if (device) {
      ECSS_RETURN_IF_ERROR(backend_.CopyAsync(stream_.get(), MemoryOf(state, flat), block,
                                              StateBytes(state), CopyKind::kHostToDevice));
      ECSS_RETURN_IF_ERROR(backend_.SynchronizeStream(stream_.get()));
    }
  }
  return Status::Ok();
}

Status ExpertStore::Write(ExpertState state, ExpertId id, const void* src, uint64_t version) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  const uint32_t flat = index_.Flat(id);
  const uint64_t bytes = StateBytes(state);
  Status written;
  switch (placement(state)) {
    case Tier::kDevice: {
      std::lock_guard<std::mutex> lock(staging_mutex_);
      written = backend_.CopyAsync(stream_.get(), MemoryOf(state, flat), src, bytes,
                                   CopyKind::kHostToDevice);
      if (written.ok()) written = backend_.SynchronizeStream(stream_.get());
      break;
    }
    case Tier::kPinned:
    case Tier::kHost:
      std::memcpy(MemoryOf(state, flat), src, bytes);
      break;
    case Tier::kNvme: {
      std::lock_guard<std::mutex> lock(staging_mutex_);
      std::memcpy(staging_.data(), src, bytes);
      std::memset(static_cast<char*>(staging_.data()) + bytes, 0, BlockBytes(state) - bytes);
      written = StoreToFile(state, flat, staging_.data(), version);
      break;
    }
    case Tier::kNone:  // refused by Check
      break;
  }
  if (written.ok() && placement(state) != Tier::kNvme) {
    regions_[Index(state)].versions[flat] = version;
    regions_[Index(state)].written[flat] = 1;
  }
  return written.Annotate(StrCat("writing ", Name(state, id)));
}

Status ExpertStore::SetResidentVersion(ExpertState state, ExpertId id, uint64_t version) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  if (placement(state) == Tier::kNvme) {
    return FailedPreconditionError(
        StrCat(Name(state, id), " lives on NVMe: its writes carry their versions"));
  }
  const uint32_t flat = index_.Flat(id);
  uint64_t& current = regions_[Index(state)].versions[flat];
  if (source_[flat] != flat || version < current) {
    return FailedPreconditionError(StrCat(
        Name(state, id), ": version ", version, " in place of ", current,
        source_[flat] != flat ? " (it shares another expert's storage)" : " (versions only grow)"));
  }
  current = version;
  return Status::Ok();
}

Status ExpertStore::Read(ExpertState state, ExpertId id, void* dst) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  const uint32_t flat = index_.Flat(id);
  const uint64_t bytes = StateBytes(state);
  Status read;
  switch (placement(state)) {
    case Tier::kDevice: {
      std::lock_guard<std::mutex> lock(staging_mutex_);
      read = backend_.CopyAsync(stream_.get(), dst, MemoryOf(state, flat), bytes,
                                CopyKind::kDeviceToHost);
      if (read.ok()) read = backend_.SynchronizeStream(stream_.get());
      break;
    }
    case Tier::kPinned:
    case Tier::kHost:
      std::memcpy(dst, MemoryOf(state, flat), bytes);
      break;
    case Tier::kNvme: {
      std::lock_guard<std::mutex> lock(staging_mutex_);
      uint64_t version = 0;
      read = LoadFromFile(state, flat, staging_.data(), &version);
      if (read.ok()) std::memcpy(dst, staging_.data(), bytes);
      break;
    }
    case Tier::kNone:  // refused by Check
      break;
  }
  return read.Annotate(StrCat("reading ", Name(state, id)));
}

Status ExpertStore::ReadBlock(ExpertState state, ExpertId id, void* block, uint64_t* version) {
  return BlockIo(/*write=*/false, state, id, block, version);
}

Status ExpertStore::WriteBlock(ExpertState state, ExpertId id, const void* block,
                               uint64_t version) {
  return BlockIo(/*write=*/true, state, id, const_cast<void*>(block), &version);
}

// An nvme state straight between the caller's aligned block and the file; others as Read and
// Write. `version`: written (write), or read (when not null).
Status ExpertStore::BlockIo(bool write, ExpertState state, ExpertId id, void* block,
                            uint64_t* version, bool supersede, uint32_t* checksum) {
  if (reinterpret_cast<uintptr_t>(block) % 4096 != 0) {
    return InvalidArgumentError("ExpertStore: block reads and writes need 4 KiB-aligned blocks");
  }
  if (placement(state) != Tier::kNvme) {
    if (write) return Write(state, id, block, *version);
    ECSS_RETURN_IF_ERROR(Read(state, id, block));
    if (checksum != nullptr) *checksum = Crc32c(block, StateBytes(state));
    std::shared_lock<std::shared_mutex> open(lifecycle_);
    if (version != nullptr) *version = regions_[Index(state)].versions[index_.Flat(id)];
    return Status::Ok();
  }
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  const uint32_t flat = index_.Flat(id);
  uint64_t read_version = 0;
  Status done = write ? StoreToFile(state, flat, block, *version, supersede, checksum)
                      : LoadFromFile(state, flat, block, version ? version : &read_version, nullptr,
                                     checksum);
  return done.Annotate(StrCat(write ? "writing " : "reading ", Name(state, id)));
}

namespace {

// Runs io(i) for every i < n, i > 0 on a thread each and 0 on the calling thread; the first
// error by index.
Status RunConcurrently(size_t n, const std::function<Status(size_t)>& io) {
  std::vector<Status> done(n);
  std::vector<std::thread> threads;
  for (size_t i = 1; i < n; ++i) threads.emplace_back([&, i] { done[i] = io(i); });
  if (n > 0) done[0] = io(0);
  for (std::thread& thread : threads) thread.join();
  for (Status& status : done) ECSS_RETURN_IF_ERROR(status);
  return Status::Ok();
}

}  // namespace

Status ExpertStore::WriteStates(ExpertId id, const std::vector<ExpertState>& states,
                                const void* const* blocks, uint64_t version,
                                const uint32_t* checksums) {
  return RunConcurrently(states.size(), [&](size_t i) {
    uint64_t v = version;
    uint32_t checksum = checksums != nullptr ? checksums[i] : 0;
    return BlockIo(/*write=*/true, states[i], id, const_cast<void*>(blocks[i]), &v,
                   /*supersede=*/true, checksums != nullptr ? &checksum : nullptr);
  });
}

Status ExpertStore::ReadStates(ExpertId id, const std::vector<ExpertState>& states,
                               void* const* blocks, uint64_t* version, uint32_t* checksums) {
  std::vector<uint64_t> versions(states.size());
  ECSS_RETURN_IF_ERROR(RunConcurrently(states.size(), [&](size_t i) {
    return BlockIo(/*write=*/false, states[i], id, blocks[i], &versions[i], false,
                   checksums != nullptr ? &checksums[i] : nullptr);
  }));
  const uint64_t oldest = states.empty() ? 0 : *std::min_element(versions.begin(), versions.end());
  for (size_t i = 0; i < states.size(); ++i) {
    if (versions[i] == oldest) continue;
    // Written ahead of the others by an update that did not finish: its previous version.
    Status older = placement(states[i]) != Tier::kNvme
                       ? DataLossError(StrCat("it is in ", TierName(placement(states[i])),
                                              " memory, which keeps one version"))
                       : Status::Ok();
    if (older.ok()) {
      std::shared_lock<std::shared_mutex> open(lifecycle_);
      ECSS_RETURN_IF_ERROR(Check(states[i], id));
      uint64_t read = 0;
      older = LoadFromFile(states[i], index_.Flat(id), blocks[i], &read, &oldest,
                           checksums != nullptr ? &checksums[i] : nullptr);
    }
    if (!older.ok()) {
      return older.Annotate(StrCat("reading ", Name(states[i], id), " at version ", oldest,
                                   " (it holds ", versions[i], "), as the expert's other states"));
    }
  }
  *version = oldest;
  return Status::Ok();
}

Status ExpertStore::ReadStatesAt(ExpertId id, const std::vector<ExpertState>& states,
                                 void* const* blocks, uint64_t version) {
  return RunConcurrently(states.size(), [&](size_t i) -> Status {
    const ExpertState state = states[i];
    if (placement(state) != Tier::kNvme) {
      uint64_t held = 0;
      ECSS_RETURN_IF_ERROR(ReadBlock(state, id, blocks[i], &held));
      if (held == version) return Status::Ok();
      return DataLossError(StrCat("reading ", Name(state, id), " at version ", version,
                                  ": it is in ", TierName(placement(state)), " memory, at version ",
                                  held, " (memory keeps one version)"));
    }
    if (reinterpret_cast<uintptr_t>(blocks[i]) % 4096 != 0) {
      return InvalidArgumentError("ExpertStore: block reads and writes need 4 KiB-aligned blocks");
    }
    std::shared_lock<std::shared_mutex> open(lifecycle_);
    ECSS_RETURN_IF_ERROR(Check(state, id));
    const uint32_t flat = index_.Flat(id);
    uint64_t read = 0;
    Status loaded = LoadFromFile(state, flat, blocks[i], &read, &version);
    if (loaded.code() == StatusCode::kDataLoss) {
      // The other slot's header read while it was being written may look torn: read again
      // with no write of this state under way (damage stays damage).
      const auto no_write = LockAll(files_[Index(state)].writers);
      loaded = LoadFromFile(state, flat, blocks[i], &read, &version);
    }
    return loaded.Annotate(StrCat("reading ", Name(state, id), " at version ", version));
  });
}

ExpertStore::IoBytes ExpertStore::io_bytes() const {
  IoBytes bytes;
  for (const Files& files : files_) {
    bytes.fresh_written += files.fresh_written.load(std::memory_order_relaxed);
    auto add = [&](const IoEngine* engine) {
      if (engine == nullptr) return;
      bytes.read += engine->bytes_read();
      bytes.written += engine->bytes_written();
    };
    for (const Handle& writer : files.writers) add(writer.io.get());
    for (const Handle& reader : files.readers) add(reader.io.get());
  }
  return bytes;
}

// REQUIRES: lifecycle_ held exclusively, or the store not yet handed out.
Status ExpertStore::CopyRegion(ExpertState state, uint32_t from, uint32_t to) {
  if (RegionBytes(options_, state) == 0) return Status::Ok();
  Region& region = regions_[Index(state)];
  if (placement(state) == Tier::kDevice) {
    ECSS_RETURN_IF_ERROR(backend_.CopyAsync(stream_.get(), MemoryOf(state, to),
                                            MemoryOf(state, from), StateBytes(state),
                                            CopyKind::kDeviceToDevice));
    ECSS_RETURN_IF_ERROR(backend_.SynchronizeStream(stream_.get()));
  } else {
    std::memcpy(MemoryOf(state, to), MemoryOf(state, from), StateBytes(state));
  }
  region.versions[to] = region.versions[from];
  region.written[to] = region.written[from];
  return Status::Ok();
}

Status ExpertStore::Share(ExpertId id, ExpertId source) { return Share({{id, source}}); }

Status ExpertStore::Share(const std::vector<std::pair<ExpertId, ExpertId>>& pairs) {
  std::unique_lock<std::shared_mutex> lock(lifecycle_);
  if (closed_) return FailedPreconditionError("the expert store is closed");
  // Without nvme states there is no storage to share: the memory copies are the experts' own
  // (their owner updates them in place, and records their versions: SetResidentVersion).
  const bool on_nvme = std::any_of(std::begin(kStates), std::end(kStates), [&](ExpertState state) {
    return HasState(state) && placement(state) == Tier::kNvme;
  });
  // Each pair checked against the sharing the pairs before it make; nothing is shared unless
  // every pair may be.
  std::vector<uint32_t> sources = source_;
  std::vector<uint32_t> is_source(index_.size(), 0);  // experts others read
  for (uint32_t flat = 0; flat < sources.size(); ++flat) {
    if (sources[flat] != flat) ++is_source[sources[flat]];
  }
  for (const auto& [id, source] : pairs) {
    for (ExpertId e : {id, source}) {
      if (!index_.Contains(e)) {
        return InvalidArgumentError(
            StrCat("expert store: no layer ", e.layer, " expert ", e.expert, " to share"));
      }
    }
    const uint32_t flat = index_.Flat(id);
    const uint32_t from = index_.Flat(source);
    const std::string what = StrCat("layer ", id.layer, " expert ", id.expert);
    if (from == flat) return InvalidArgumentError(StrCat(what, " cannot share its own storage"));
    if (sources[flat] != flat) {
      return FailedPreconditionError(StrCat(what, " already shares another expert's storage"));
    }
    if (sources[from] != from) {
      return FailedPreconditionError(StrCat("layer ", source.layer, " expert ", source.expert,
                                            " shares another expert's storage: share that one's"));
    }
    if (is_source[flat] > 0) {
      return FailedPreconditionError(StrCat(what, " is another expert's source"));
    }
    for (ExpertState state : kStates) {
      if (!HasState(state) || placement(state) != Tier::kNvme) continue;
      auto [reader, reading] = AnyReader(state);
      ECSS_ASSIGN_OR_RETURN(const bool written, reader->Written(flat));
      if (written) {
        return FailedPreconditionError(StrCat(what, " already wrote its ", ExpertStateName(state),
                                              ": it has its own storage"));
      }
    }
    sources[flat] = from;
    ++is_source[from];
  }
  if (!on_nvme) {
    for (const auto& [id, source] : pairs) {
      for (ExpertState state : kStates) {
        if (HasState(state)) {
          ECSS_RETURN_IF_ERROR(CopyRegion(state, index_.Flat(source), index_.Flat(id)));
        }
      }
    }
    return Status::Ok();
  }
  std::swap(source_, sources);
  Status recorded = options_.dirs.empty() ? Status::Ok() : WriteManifest(/*closed=*/false);
  if (!recorded.ok()) {
    std::swap(source_, sources);
    return recorded;
  }
  for (const auto& [id, source] : pairs) {
    const uint32_t flat = index_.Flat(id);
    const uint32_t from = index_.Flat(source);
    for (ExpertState state : kStates) {
      if (!HasState(state)) continue;
      if (placement(state) == Tier::kNvme) {
        files_[Index(state)].unwritten_dependents[from].push_back(flat);
      } else {
        ECSS_RETURN_IF_ERROR(CopyRegion(state, from, flat));
      }
    }
  }
  return Status::Ok();
}

bool ExpertStore::ReadsSourceStorage(ExpertId id, ExpertState state) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  if (closed_ || !index_.Contains(id) || !HasState(state) || placement(state) != Tier::kNvme) {
    return false;
  }
  const uint32_t flat = index_.Flat(id);
  Files& files = files_[Index(state)];
  std::lock_guard<std::mutex> write(files.writers[flat % kWriters].mutex);
  return ReadsSource(files, flat);
}

ExpertId ExpertStore::SourceOf(ExpertId id) const {
  return index_.Contains(id) ? index_.Id(source_[index_.Flat(id)]) : id;
}

StatusOr<void*> ExpertStore::Resident(ExpertState state, ExpertId id) {
  std::shared_lock<std::shared_mutex> open(lifecycle_);
  ECSS_RETURN_IF_ERROR(Check(state, id));
  if (placement(state) == Tier::kNvme) {
    return FailedPreconditionError(
        StrCat(Name(state, id), " lives on NVMe: it has no resident copy"));
  }
  return MemoryOf(state, index_.Flat(id));
}

// REQUIRES: lifecycle_ held exclusively (no access in progress).
Status ExpertStore::FlushLocked() {
  for (ExpertState state : kStates) {
    if (!HasFile(state)) continue;
    const Tier tier = placement(state);
    const Region& region = regions_[Index(state)];
    for (uint32_t flat = 0; flat < index_.size() && tier != Tier::kNvme; ++flat) {
      // Never written: its file reads as its initial value already.
      if (region.written[flat] == 0 && region.versions[flat] == 0) continue;
      const void* block = MemoryOf(state, flat);
      if (tier == Tier::kDevice) {
        ECSS_RETURN_IF_ERROR(backend_.CopyAsync(stream_.get(), staging_.data(), block,
                                                StateBytes(state), CopyKind::kDeviceToHost));
        ECSS_RETURN_IF_ERROR(backend_.SynchronizeStream(stream_.get()));
        block = staging_.data();
      }
      Status stored = StoreToFile(state, flat, block, region.versions[flat]);
      if (!stored.ok()) return stored.Annotate(StrCat("flushing ", Name(state, index_.Id(flat))));
    }
    ECSS_RETURN_IF_ERROR(SyncWriters(files_[Index(state)]));
  }
  return Status::Ok();
}

Status ExpertStore::Flush() {
  std::unique_lock<std::shared_mutex> lock(lifecycle_);
  if (closed_) return FailedPreconditionError("the expert store is closed");
  return FlushLocked();
}

Status ExpertStore::Close() {
  std::unique_lock<std::shared_mutex> lock(lifecycle_);
  if (closed_) return FailedPreconditionError("the expert store is closed");
  ECSS_RETURN_IF_ERROR(FlushLocked());
  if (!options_.dirs.empty()) {  // a copy of a file taken while open is now a generation behind
    ECSS_RETURN_IF_ERROR(NextGeneration([&] { return WriteManifest(/*closed=*/false); },
                                        /*closed=*/true));
  }
  closed_ = true;
  for (Files& files : files_) CloseFiles(files);
  for (Region& region : regions_) region.memory.Reset();
  staging_.Reset();
  locks_.clear();  // another owner may open the directories now
  return Status::Ok();
}

}  // namespace ecss
