// ExpertStore: every expert's states, each on the tier the configuration places it on.
//
// An expert has four states (DESIGN.md section 6): compute weights (bf16 or fp32), fp32
// master weights, fp32 optimizer moments (`moments` arrays of the expert's size, AdamW: 2)
// and an fp32 gradient accumulator. Each state is placed on one tier for all experts:
//   device  one region of the backend's device memory, within device_budget_bytes;
//   pinned  one region of a pinned host pool, within pinned_budget_bytes;
//   host    one region of pageable host memory, within host_budget_bytes;
//   nvme    an ExpertStateFile (offload/state_file.h) striped over `dirs`.
// Every state also has its file in `dirs` (DIR/ecss-store-<state>-<i>[-part<N>].bin, split at
// max_file_bytes), with two shadow
// slots per expert and a CRC-32C per block verified on every read: for an nvme state it is the
// state's home; for a memory state it is where Flush and Close put it, and where Open takes it
// from. So a store can be closed and reopened as a whole, with the same or another placement,
// and a failed or torn write never destroys the previous version. With
// durable_memory_states = false, memory states have no file instead: they are never flushed,
// a reopened store starts them at their initial values, and a store without nvme states
// needs no directory
// (the session's choice: its compute weights follow from the master weights).
//
// The manifest (DIR0/ecss-store.manifest, replaced atomically, its directory synced) names the
// format version, the store's random id and generation, the model's layout, the initial values
// (initial_id), the file split and whether the store was closed; every state file's header
// carries the id and generation too, and each Open and Close moves both to the next generation.
// Open refuses, before writing anything: a directory without a store (NotFound), another format
// version or model (FailedPrecondition naming both values), a damaged manifest (DataLoss: a wrong
// checksum, a missing, unknown, repeated or malformed line, text after the checksum), a state file
// of another store, of an earlier generation (an older copy put back) or under another file's name
// (DataLoss naming the file), and a store that was not closed while some of its states lived only
// in memory (DataLoss naming them; nvme states never need it). One owner at a time: Create and Open
// lock each directory (DIR/ecss-store.lock, FileLock) until Close, so a second store object on any
// of them, in this process or another, fails with FailedPrecondition naming the holder's pid; a
// crashed owner's lock is gone with it. Create also refuses a directory that holds another store's
// state files or manifest (AlreadyExists naming it: a store striped over the same directories in
// another order). Close moves to the next generation too, so a copy of a
// file taken while the store was open is refused at the next Open; a copy taken since the last
// Open, put back after a crash, is not detected. Create refuses a directory that already holds a
// store (AlreadyExists) and budgets that cannot hold the placement (ResourceExhausted naming the
// bytes one expert and all experts need), before touching the disk. Missing or read-only
// directories are NotFound / PermissionDenied. Create and Open take constant time and disk space
// for nvme states, whatever the model's size: their files are sparse (offload/state_file.h).
//
// Unwritten experts: until its first write, an expert's state reads as its initial value,
// which `initial` computes (zeros without one); nothing of it is on disk. Memory states start
// from it at Create. A full disk is reported by the write that cannot be stored
// (ResourceExhausted naming the layer, expert and state), and the version before it, initial
// or written, stays readable; Create only warns (in the log) when the directories' free space
// is below DiskBytes.
//
// Shared experts (Share): an expert may read another's values, as they were at Share, without
// a copy of its own until it writes (M6's Pseudo-to-Real sharing: a deep model's layers start
// as one shallow model's, and each copy becomes its own at its first update, with no writes
// up front). Its nvme states read the source's storage until the expert writes them, or until
// the source is about to write them: the expert then gets its own copy first (copy on write,
// so a crash in between leaves both as they were). Its memory states are copied at Share. The
// manifest records who shares whose storage.
//
// Versions: every write of an expert's state carries a version (the optimizer's update count),
// kept in the state file's header (memory tiers: beside the memory, written at Flush). An
// update writes several states one after another, so a crash between them leaves the first
// ones a version ahead; ReadStates reads states as of one version, from the shadow slot that
// still holds it.
//
// Errors of a read or write name the layer, the expert and the state. The store stays usable
// after one. Thread-safe, and the locks are per state and handle: a read of one state never
// waits for a write of another or for a read of another state (the weight stager reads
// weights while the optimizer pipeline reads and writes masters and moments), nor two reads
// of one state for each other (the pipeline's loads at once), nor two writes of experts of
// different parity (its stores at once), because every nvme state has two writing handles
// (expert e always through the (e % 2)th) and two reading ones, each with its own IoEngine.
// A shared expert's first write, and its source's, take every handle of the state. What goes
// through the one staging block (Read and Write of an nvme state, device states) takes turns.
// A read of an expert's state that overlaps two writes of that state may see DataLoss: the
// caller orders accesses to one expert (the engine's fences do). Flush and Close wait for
// every access in progress.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "offload/expert_index.h"
#include "offload/io/io_engine.h"
#include "offload/state_file.h"
#include "runtime/base/dtype.h"
#include "runtime/base/file_util.h"
#include "runtime/base/tier.h"
#include "runtime/device/backend.h"
#include "runtime/device/host_allocator.h"
#include "runtime/device/pinned_pool.h"

namespace ecss {

enum class ExpertState : uint8_t { kWeights, kMaster, kMoments, kGradient };
inline constexpr int kExpertStates = 4;
std::string_view ExpertStateName(ExpertState state);  // "weights", "master", ...

// Each state's Tier (runtime/base/tier.h); kNone: the store does not keep that state (its owner
// keeps it elsewhere, as the session does with gradients).

// What identifies a model's experts; a store opens only for the layout it was made for.
struct ExpertStoreLayout {
  std::vector<uint32_t> experts_per_layer;  // one entry per layer (layers may differ)
  uint64_t params_per_expert = 0;
  DType weights_dtype = DType::kBF16;  // bf16 or f32
  uint32_t moments = 2;                // fp32 moment arrays per expert (0: no moments state)
};

struct ExpertStoreOptions {
  ExpertStoreLayout layout;
  // Tier of each state, indexed by ExpertState.
  std::array<Tier, kExpertStates> placement = {Tier::kPinned, Tier::kPinned, Tier::kPinned,
                                               Tier::kPinned};
  // One or more existing directories (striped, like drives); may be empty when no state
  // needs a file (none on nvme, and memory states not durable).
  std::vector<std::string> dirs;
  uint64_t device_budget_bytes = 0;  // device-tier states; at most the backend's memory
  // Pinned-tier states plus the staging block (StagingBytes), plus what users of
  // pinned_pool() carve out (the weight stager's slots). 0 = exactly the store's own.
  uint64_t pinned_budget_bytes = 0;
  uint64_t host_budget_bytes = 0;  // host-tier states; 0 = exactly what they need
  bool lock_pinned_pages = true;   // PinnedPoolOptions::lock_pages of the pinned tier's pool
  // Memory states have a file, written by Flush and Close and read by Open (see above).
  bool durable_memory_states = true;
  IoEngineFactory io_engines;  // empty: CreateIoEngine's default
  // Fills `dst` with `bytes` (StateBytes(state)): expert `id`'s `state` before its first
  // write. Called from any thread that reads an unwritten expert (so it must be thread-safe),
  // and for every expert of the memory states at Create and Open. Empty: zeros.
  std::function<void(ExpertState state, ExpertId id, void* dst, uint64_t bytes)> initial;
  // What `initial` computes, in words (its generator, seed and scales): the manifest records
  // it, and Open refuses a store made with other initial values (its unwritten experts would
  // read as something else). Required with `initial`; "zeros" without.
  std::string initial_id;
  // The largest state file (StateFileOptions::max_file_bytes; 0: kDefaultMaxFileBytes).
  // Create records it in the manifest, and Open uses the recorded value.
  uint64_t max_file_bytes = 0;
  // Create replaces a store already in `dirs` (its manifest in dirs[0] and the state files
  // these options name) instead of refusing it: removed once every check passed and the
  // memory is allocated, under the directories' locks. A store striped over them in another
  // order is still refused.
  bool replace_existing = false;
};

class ExpertStore {
 public:
  static StatusOr<std::unique_ptr<ExpertStore>> Create(Backend& backend,
                                                       const ExpertStoreOptions& options);
  // Opens the store in options.dirs; options.layout must be the one it was made with;
  // options.placement may differ (states move tiers at open). A store of another format
  // version is refused naming it, and so are the NVMe state files sessions wrote before the
  // store held optimizer states (ecss-states-*.bin): they are not migrated.
  static StatusOr<std::unique_ptr<ExpertStore>> Open(Backend& backend,
                                                     const ExpertStoreOptions& options);
  // Removes the store in options.dirs (its manifest and the files this store's options name),
  // as a user would: for one a failed start made, or one a session replaces.
  // FailedPrecondition naming the holder while another owner has it open; AlreadyExists when
  // another of the directories holds a store's manifest (one striped in another order:
  // remove that one by its own options).
  static Status Remove(const ExpertStoreOptions& options);
  // Closes the store if Close was not called (logging an error Close returns).
  ~ExpertStore();

  // Writes durably every state held in memory (each written expert into its file's shadow
  // slot; one never written reads as its initial value from its file already), then fdatasync
  // of every file.
  Status Flush();
  // Flush, then the manifest records a clean close. Nothing else may be called afterwards.
  Status Close();

  // One expert's state from / to host memory (any alignment): StateBytes(state) bytes.
  Status Write(ExpertState state, ExpertId id, const void* src, uint64_t version = 0);
  Status Read(ExpertState state, ExpertId id, void* dst);
  // As Read / Write from a 4 KiB-aligned host block of BlockBytes(state): an nvme state goes
  // straight between it and the file, without the staging copy (the weight stager's and the
  // optimizer pipeline's path). ReadBlock gives the version read when asked.
  Status ReadBlock(ExpertState state, ExpertId id, void* block, uint64_t* version = nullptr);
  Status WriteBlock(ExpertState state, ExpertId id, const void* block, uint64_t version = 0);
  // Reads `states` of expert `id` into `blocks` (one each, as ReadBlock) as of one version,
  // the newest that all of them hold: an nvme state written ahead of the others by an update
  // cut short is read from the shadow slot that keeps the older version. DataLoss naming the
  // versions when there is none. With `checksums`, the blocks are not checked here:
  // checksums[i] is the CRC-32C blocks[i]'s StateBytes must have (an nvme state's as its header
  // records it; a memory state's, or an unwritten one's initial value, computed), and the
  // caller checks the block against it before using it (the optimizer's update does, in the
  // pass that brings the block into cache for it).
  Status ReadStates(ExpertId id, const std::vector<ExpertState>& states, void* const* blocks,
                    uint64_t* version, uint32_t* checksums = nullptr);
  // Reads `states` of expert `id` into `blocks` as of `version` (at least 1): an nvme state
  // from the shadow slot that holds it, while the other may be being written (what a
  // checkpoint taken during training reads); a memory state only at the version the store
  // records for it (an owner's change in place through Resident is not seen: see
  // SetResidentVersion). DataLoss naming the state and both versions when none holds it.
  Status ReadStatesAt(ExpertId id, const std::vector<ExpertState>& states, void* const* blocks,
                      uint64_t version);
  // The version Read of `state` would give (its newest), without reading the state: for an
  // nvme state its headers only. With `written`, whether the state was ever written: version
  // 0 is the initial value unless written (a state written at version 0 holds what its
  // writer chose, e.g. a new domain's experts grown from a dense FFN's weights, with no
  // update yet).
  StatusOr<uint64_t> Version(ExpertState state, ExpertId id, bool* written = nullptr);
  // Writes `states` of expert `id` from `blocks` (as WriteBlock) as `version`. ReadStates and
  // WriteStates move their states at once (each state has its own handles: the first on the
  // calling thread, the others on a thread each), so an update's I/O keeps several requests
  // in flight as one file's would. A crash may leave any of them written: ReadStates finds
  // the version all hold, and the next WriteStates of that version replaces what was written
  // ahead, not the version before it (ExpertStateFile::Store's supersede), so a second crash
  // finds it too. (Write and WriteBlock keep the newest copy instead: a failed rewrite of the
  // same version leaves it readable.) With `checksums`, checksums[i] is the CRC-32C of
  // blocks[i]'s StateBytes as the caller computed them (an update, as it wrote the block): an
  // nvme state's store writes it into its header instead of reading the block again. A wrong
  // one makes the state read back as damaged (DataLoss), never as other data.
  Status WriteStates(ExpertId id, const std::vector<ExpertState>& states, const void* const* blocks,
                     uint64_t version, const uint32_t* checksums = nullptr);
  // Expert `id` holds what `source` holds now, without a copy on NVMe (see above). The
  // source's states must be at one version (share after its last update finished: a
  // session's Synchronize); the versions continue from the source's.
  // FailedPrecondition when `id` already has an nvme state of its own, shares already or is
  // some expert's source, or `source` shares another's; InvalidArgument for an unknown expert
  // or id == source. The manifest is rewritten before it returns. A store without nvme states
  // has no storage to share: its memory states are copied and nothing is recorded.
  Status Share(ExpertId id, ExpertId source);
  // Each (id, source) pair as Share(id, source) would, in order, with one manifest write for
  // them all (a deep model grown from a shallow one shares thousands); nothing is shared when
  // a pair is refused (Share's errors, naming it).
  Status Share(const std::vector<std::pair<ExpertId, ExpertId>>& pairs);
  // Whether `id` still reads its source's storage of nvme state `state` (it has no copy of its
  // own yet): a checkpoint then stores the two once.
  bool ReadsSourceStorage(ExpertId id, ExpertState state);
  // The expert whose storage `id` reads until it writes its own (itself when none). Not
  // concurrently with Share.
  ExpertId SourceOf(ExpertId id) const;
  // The expert's copy in device or pinned memory (FailedPrecondition for an nvme state). It
  // stays valid until Close; the caller orders its accesses against Write.
  StatusOr<void*> Resident(ExpertState state, ExpertId id);
  // The version of a resident state its owner changed in place through Resident's pointer
  // (the host optimizer's updates): what Version, Flush and the checkpoints then see. At
  // version 0 a state stays what it was: unwritten (its initial value) unless written.
  // FailedPrecondition for an nvme state (its writes carry their versions), a version below
  // the state's, or an expert that shares another's storage. REQUIRES: nothing else reads or
  // writes that state of that expert meanwhile.
  Status SetResidentVersion(ExpertState state, ExpertId id, uint64_t version);

  uint64_t StateBytes(ExpertState state) const;
  // What one expert's `state` takes in a store of this layout (0: a state without data, such
  // as moments for an optimizer that keeps none).
  static uint64_t StateBytes(const ExpertStoreLayout& layout, ExpertState state);
  // What a store with these options allocates (the memory plan's figures): the region of a
  // memory state (0 for nvme or none) and the staging block (0 when nothing needs it).
  static uint64_t RegionBytes(const ExpertStoreOptions& options, ExpertState state);
  static uint64_t StagingBytes(const ExpertStoreOptions& options);
  // The bytes a store with these options keeps on disk once every expert is written: the
  // files of its NVMe states and of its durable memory states, with their shadow slots.
  static uint64_t DiskBytes(const ExpertStoreOptions& options);
  uint64_t BlockBytes(ExpertState state) const { return StateBlockBytes(StateBytes(state)); }
  Tier placement(ExpertState state) const { return options_.placement[Index(state)]; }
  const ExpertStoreLayout& layout() const { return options_.layout; }
  // What the unwritten experts read as (ExpertStoreOptions::initial_id; "zeros" without).
  const std::string& initial_id() const { return options_.initial_id; }
  // The store's random id, drawn at Create and kept in its manifest: within one store an
  // expert's version names one value (a restored store is another store).
  uint64_t store_id() const { return store_id_; }
  const ExpertIndex& index() const { return index_; }  // the layout's experts
  // The pool the pinned tier lives in; what is left of its budget is for the caller.
  // REQUIRES: a pinned budget (pinned_memory() is not null).
  PinnedHostPool& pinned_pool() { return *pinned_; }
  const PinnedHostPool* pinned_memory() const { return pinned_.get(); }
  // The host tier's allocator (null without host states).
  const Allocator* host_memory() const { return host_.get(); }
  Backend& backend() { return backend_; }
  // The bytes the store's files read and wrote since it was made or opened, as its IoEngines
  // submitted them (headers and 4 KiB padding included). Thread-safe.
  struct IoBytes {
    uint64_t read = 0, written = 0;
    // Of `written`, what went into slots never stored before (ExpertStateFile::
    // fresh_written_bytes: the file system allocates as it writes).
    uint64_t fresh_written = 0;
    // What moved since `start` (an earlier reading).
    IoBytes Since(const IoBytes& start) const {
      return {read - start.read, written - start.written, fresh_written - start.fresh_written};
    }
  };
  IoBytes io_bytes() const;

 private:
  struct Region {  // one memory-tier state of every expert
    Buffer memory;
    uint64_t stride = 0;
    std::vector<uint64_t> versions;  // per expert, written to the file at Flush
    // Per expert: 1 once written (Write, or loaded from its file), else it holds its initial
    // value (which Flush does not store). Bytes, not bits: writers of distinct experts.
    std::vector<uint8_t> written;
  };
  // A handle of an nvme state's files (its own IoEngine), and the lock of its use.
  struct Handle {
    std::unique_ptr<IoEngine> io;
    std::unique_ptr<ExpertStateFile> file;
    std::mutex mutex;
  };
  // Reading handles per nvme state: two loads of one state (the optimizer pipeline's, or a
  // checkpoint's read beside them) run at once, keeping the drive's queue deeper. Every nvme
  // state gets them, the weights too, which one stager reads at a time: an idle handle costs
  // an io_uring ring and a file descriptor per file.
  static constexpr size_t kReaders = 2;
  // Writing handles per nvme state, so that two stores of one state (the pipeline's) run at
  // once. Expert e is always written through writers[e % kWriters]: what a writing handle
  // knows of its experts' slots (which copy is newest) stays true.
  static constexpr size_t kWriters = 2;
  // An nvme state's handles of its files: kWriters writing, kReaders reading, so that reads
  // and writes do not take turns, nor two reads, nor two writes of different handles.
  struct Files {
    std::array<Handle, kWriters> writers;  // [0] creates the files and moves their generation
    std::array<Handle, kReaders> readers;
    std::atomic<size_t> next_reader{0};  // whose turn it is when every reader is busy
    // Per source expert: the shared experts that still read its storage of this state (they
    // get their own copy before its next write). Read under any writer's mutex, changed
    // under every one's (LockAll(writers)), or with lifecycle_ held exclusively (Share, Open).
    std::unordered_map<uint32_t, std::vector<uint32_t>> unwritten_dependents;
    // The writers' fresh_written_bytes, summed here as they store (io_bytes reads it while
    // Close replaces the writers).
    std::atomic<uint64_t> fresh_written{0};
  };
  ExpertStore(Backend& backend, const ExpertStoreOptions& options)
      : backend_(backend), options_(options), index_(options.layout.experts_per_layer) {}
  static size_t Index(ExpertState state) { return static_cast<size_t>(state); }
  static Status CheckOptions(Backend& backend, const ExpertStoreOptions& options);
  static Status CheckNoOtherManifest(const ExpertStoreOptions& options);
  static Status RemoveFiles(const ExpertStoreOptions& options);
  static Status CheckMadeFor(const ExpertStoreOptions& made, const ExpertStoreOptions& options,
                             bool closed);
  static StateFileOptions FileOptions(const ExpertStoreOptions& options, ExpertState state);
  // Bytes of one element of the state's file arrays: the weights' dtype, else fp32.
  uint32_t ElementBytes(ExpertState state) const {
    return state == ExpertState::kWeights
               ? static_cast<uint32_t>(DTypeSize(options_.layout.weights_dtype))
               : 4;
  }
  uint64_t Elements(ExpertState state) const { return StateBytes(state) / ElementBytes(state); }
  bool HasState(ExpertState state) const { return HasState(options_, state); }
  static bool HasState(const ExpertStoreOptions& options, ExpertState state);
  // Whether the state has a file: on nvme, or a durable memory state.
  static bool HasFile(const ExpertStoreOptions& options, ExpertState state);
  bool HasFile(ExpertState state) const { return HasFile(options_, state); }
  // One of the state's reading handles, locked: a free one, else the next in turn.
  std::pair<ExpertStateFile*, std::unique_lock<std::mutex>> AnyReader(ExpertState state);
  // Every handle of `handles` locked, in order (writers before readers).
  template <size_t N>
  static std::array<std::unique_lock<std::mutex>, N> LockAll(std::array<Handle, N>& handles);
  // Whether `flat`'s storage of the state is still read by experts that share it, or `flat`
  // still reads its source's. REQUIRES: one of the state's writers held, or lifecycle_ held
  // exclusively.
  static bool LendsStorage(const Files& files, uint32_t flat);
  bool ReadsSource(const Files& files, uint32_t flat) const;
  // A store through the expert's writer, its fresh bytes counted. REQUIRES: that writer held.
  // `checksum`: the block's CRC-32C as its caller computed it (WriteStates'), or null.
  static Status StoreThroughWriter(Files& files, uint32_t flat, const void* const* arrays,
                                   uint64_t elements, uint64_t version, bool supersede = false,
                                   const uint32_t* checksum = nullptr);
  // Makes every writer's completed stores durable. REQUIRES: every writer held, or lifecycle_
  // held exclusively.
  static Status SyncWriters(Files& files);
  static void CloseFiles(Files& files);
  static uint64_t Stride(const ExpertStoreOptions& options, ExpertState state);
  Status Allocate();
  // Every expert of a memory state's region from `initial`.
  Status InitRegion(ExpertState state);
  // Expert `from`'s memory copy of `state` (and its version) into expert `to`'s.
  Status CopyRegion(ExpertState state, uint32_t from, uint32_t to);
  // `id`'s initial `state` into `dst` (StateBytes of it).
  void Initial(ExpertState state, ExpertId id, void* dst) const;
  // Logs a warning when the directories have less free space than DiskBytes.
  void WarnIfSpaceShort() const;
  Status OpenFiles(bool create);
  // Open: the manifest's shared pairs, checked, and the files opened.
  Status AdoptSharing(const std::vector<std::pair<uint32_t, uint32_t>>& shared,
                      const std::string& path);
  Status WriteManifest(bool closed);
  // Moves the manifest and every file to the next generation (StateFileOptions::generation).
  Status NextGeneration(const std::function<Status()>& accept_both, bool closed);
  Status Check(ExpertState state, ExpertId id) const;
  std::string Name(ExpertState state, ExpertId id) const;
  void* MemoryOf(ExpertState state, uint32_t flat) const;
  // One expert's state between its file and a block (`want`: that version).
  // `supersede`: ExpertStateFile::Store's (WriteStates: an update's states).
  Status StoreToFile(ExpertState state, uint32_t flat, const void* block, uint64_t version,
                     bool supersede = false, const uint32_t* checksum = nullptr);
  // A store that first moves shared storage (see StoreToFile). REQUIRES: every writer of the
  // state held.
  Status StoreLocked(ExpertState state, uint32_t flat, const void* block, uint64_t version,
                     bool supersede, const uint32_t* checksum);
  // `checksum`: set to the CRC-32C the block must have, the block not checked (ReadStates').
  Status LoadFromFile(ExpertState state, uint32_t flat, void* block, uint64_t* version,
                      const uint64_t* want = nullptr, uint32_t* checksum = nullptr);
  // REQUIRES: `reader` (one of the state's) held.
  Status LoadLocked(ExpertState state, ExpertStateFile& reader, uint32_t flat, void* block,
                    uint64_t* version, const uint64_t* want = nullptr,
                    uint32_t* checksum = nullptr);
  // REQUIRES: the store not yet handed out (Open): it reads through readers[0] unlocked.
  Status LoadTier(ExpertState state);
  // `checksum`: a write's, as StoreThroughWriter's; a read's, as LoadFromFile's (a memory
  // state's is computed).
  Status BlockIo(bool write, ExpertState state, ExpertId id, void* block, uint64_t* version,
                 bool supersede = false, uint32_t* checksum = nullptr);
  Status FlushLocked();

  Backend& backend_;
  ExpertStoreOptions options_;
  const ExpertIndex index_;
  // Shared by every access, exclusive for Flush and Close. Lock order: lifecycle_, then
  // staging_mutex_, then a state's writers in index order, then its readers in index order.
  std::shared_mutex lifecycle_;
  // GUARDED_BY(lifecycle_). True until Create or Open succeeds: a store they give up on has
  // nothing to flush.
  bool closed_ = true;
  // The staging block and the copy stream (Read and Write of nvme states, device states).
  std::mutex staging_mutex_;
  std::unique_ptr<PinnedHostPool> pinned_;
  std::unique_ptr<HostAllocator> host_;
  Buffer staging_;  // one block of the largest state
  OwnedStream stream_;
  std::array<Region, kExpertStates> regions_;
  std::array<Files, kExpertStates> files_;
  // Per expert: the flat id whose storage it reads until written (itself: none). Written
  // under lifecycle_ held exclusively.
  std::vector<uint32_t> source_;
  // Each directory's lock, held from Create or Open until Close.
  std::vector<std::unique_ptr<FileLock>> locks_;
  // What ties the files to this store (StateFileOptions::store_id); set at Create and Open.
  uint64_t store_id_ = 0;
  uint64_t generation_ = 1;
  uint64_t previous_generation_ = 0;
};

}  // namespace ecss
