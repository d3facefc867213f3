// Checkpoints of an expert store: every state of every expert copied into a directory of its
// own, crash-consistently, streamed through an IoEngine (a checkpoint larger than memory
// works), and read back into a new store with any placement.
//
// A run keeps its checkpoints under one root, each in ROOT/<name>/:
//   experts.bin          the blocks of the experts this checkpoint copied (4 KiB-aligned)
//   blobs.bin            the caller's named blobs (its dense weights, RNG, data position)
//   checkpoint.manifest  written last (atomically, its directory synced): format, sequence,
//                        the store's layout and initial values, the states saved, each blob's
//                        place and CRC-32C, and one line per expert: "initial" (never
//                        written: it stays unwritten when restored), or its version and where
//                        its blocks are (a checkpoint's name, an offset, a CRC-32C per state).
// A directory without a manifest is a save cut short (never read, removed by the next save)
// or a deleted checkpoint whose data newer ones still refer to.
//
// Incremental: RRE updates only the routed experts, so between two checkpoints most experts
// keep their version. A save copies only experts whose version differs from the newest
// checkpoint's record and refers to the data that checkpoint points at for the rest (Meta's
// Check-N-Run does this for embedding rows). Versions are compared only within one store
// (ExpertStore::store_id, in the manifest): a store restored from a checkpoint, or another
// run's, may reach a version with other values, so its first save copies everything. A save
// also copies everything when asked (`full`), when there is no earlier checkpoint, or when the
// new one would refer to the data of more than `max_chain` other checkpoints, so that a chain
// never grows without bound. Deleting a
// checkpoint keeps the data newer ones refer to (reference counts are the manifests' lines),
// so deleting an old checkpoint never breaks a newer one.
//
// Shared experts (ExpertStore::Share, M6's Pseudo-to-Real): an expert that still reads the
// storage of one saved before it is recorded with that one's blocks (stored once), and a
// restore makes every expert whose record names blocks an earlier one restored share that
// one's storage (no write; each gets its own copy at its first update, as the store does).
//
// Crash consistency: the data and blobs are written and fdatasync'ed, then the manifest is
// renamed into place and the directory synced; a crash at any point leaves every earlier
// checkpoint loadable, and the new one either complete or absent.
//
// Versions: an expert never written is recorded as initial (nothing stored: it reads as its
// initial value); one written at version 0 (no update yet: e.g. grown from a dense FFN's
// weights) is stored with its blocks, as every other written expert, in a manifest of format
// 2 (1 otherwise: a build that reads only format 1 refuses such a checkpoint by its format).
// The optimizer's update counts are the versions.
//
// Errors name what is wrong: a damaged or truncated file is DataLoss naming the file and the
// layer, expert and state (or blob); another model's checkpoint is FailedPrecondition naming
// the difference; an unknown name is NotFound listing those that exist.
//
// One writer per root: Save and Delete hold ROOT/checkpoints.lock (FileLock), so a second
// process saving or deleting there fails naming the holder. List, Latest and Restore only
// read. Every call blocks but CheckpointSave's copy (which holds the lock until it ends);
// distinct roots are independent.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "offload/expert_store.h"
#include "offload/io/io_engine.h"
#include "runtime/base/status.h"

namespace ecss {

// A named byte string the caller keeps with a checkpoint (names: no whitespace).
struct CheckpointBlob {
  std::string name;
  std::string bytes;
};
// The blob named `name` in `blobs`, or null.
const CheckpointBlob* FindBlob(const std::vector<CheckpointBlob>& blobs, std::string_view name);

struct CheckpointOptions {
  std::vector<CheckpointBlob> blobs;
  // The states saved (each one the store keeps; InvalidArgument otherwise); empty: every state
  // the store keeps. A session saves master weights and moments and derives the rest.
  std::vector<ExpertState> states;
  bool full = false;  // copy every written expert, even those an earlier one holds
  // A checkpoint refers to the data of at most this many others (0: every save is full).
  uint32_t max_chain = 8;
  IoEngineFactory io_engines;  // empty: CreateIoEngine's default
  // Host memory for the experts in flight (read from the store while earlier ones are
  // written): what a save takes whatever the model's size; at least one expert's blocks.
  uint64_t buffer_bytes = uint64_t{64} << 20;
};

struct CheckpointStats {
  bool full = false;
  uint64_t sequence = 0;
  uint64_t experts_copied = 0;      // written into this checkpoint's experts.bin
  uint64_t experts_referenced = 0;  // held by earlier checkpoints' data
  uint64_t experts_initial = 0;     // never written: nothing to save
  uint64_t experts_shared = 0;      // reading an earlier expert's storage: saved as that one
  // Copied ahead of an update that changed their memory states while the save ran
  // (CheckpointSave::Preserve): held in memory until written.
  uint64_t experts_preserved = 0;
  uint64_t bytes_written = 0;  // experts.bin, blobs.bin and the manifest
  uint64_t full_bytes = 0;     // what a full checkpoint of the same experts writes
};

// Saves every expert of `store` (as of one version per expert: call it when no update is in
// flight) into ROOT/<name>. AlreadyExists when that checkpoint exists; InvalidArgument for a
// name that is not one plain directory name. Removes saves cut short first. The same as
// CheckpointSave::Begin, then Wait.
StatusOr<CheckpointStats> SaveCheckpoint(ExpertStore& store, const std::string& root,
                                         const std::string& name, const CheckpointOptions& options);

// A save in two parts, so that it can overlap training. Begin, called when no update is in
// flight, takes the root's lock and fixes the version of every expert the checkpoint holds
// (their headers only: no state is read); the experts are then copied, and the checkpoint made
// durable, while the store goes on being updated: on a thread of the save's own after Start,
// or inside Wait. The checkpoint holds exactly the versions Begin saw, if, until Wait returns:
//  - each expert is written at most once more: an nvme state keeps the version before in its
//    other shadow slot, which the save reads (ExpertStore::ReadStatesAt);
//  - an expert whose memory states are about to change in place is handed to Preserve first
//    (memory keeps one version, and nothing tells an in-place change from the version saved).
// The copy goes in the order a step's updates reach experts (the last layer first). Preserve
// keeps an expert's blocks (read on the calling thread) within buffer_bytes more; beyond it,
// the copy takes that expert next and Preserve waits for it. So a save takes at most twice
// buffer_bytes of memory, whatever the model's size. The store must outlive the save. Begin's
// errors are SaveCheckpoint's up to the copy; the copy's come from Wait (nothing of the save
// is then a checkpoint; earlier ones are intact). Start and Wait from one thread; Preserve
// from any.
class CheckpointSave {
 public:
  static StatusOr<std::unique_ptr<CheckpointSave>> Begin(ExpertStore& store,
                                                         const std::string& root,
                                                         const std::string& name,
                                                         CheckpointOptions options);
  // Waits for a copy Start began; a save never run is abandoned (its directory removed).
  ~CheckpointSave();
  CheckpointSave(const CheckpointSave&) = delete;
  CheckpointSave& operator=(const CheckpointSave&) = delete;

  // The copy on a thread of its own (at most once; Wait does it where Start was not called).
  // ResourceExhausted when no thread can be made (the save is then still whole: Wait).
  Status Start();
  // Expert `id`'s memory states are about to change in place: keeps them if the save still
  // needs them. Returns at once for an expert the save does not copy, has copied, or after it
  // ended; a failure to keep them fails the save (Wait), never the caller.
  void Preserve(ExpertId id);
  // Waits for the copy and the manifest: the checkpoint is durable when this returns its
  // figures. Returns the same each time.
  StatusOr<CheckpointStats> Wait();

 private:
  struct Impl;
  explicit CheckpointSave(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The complete checkpoints under `root`, oldest first (by sequence). One whose manifest is
// damaged is left out, with a warning in the log naming it and why (so the newest may be an
// older one; restoring the damaged one by name is DataLoss), and no save or delete removes any
// data while one exists.
StatusOr<std::vector<std::string>> ListCheckpoints(const std::string& root);
// The newest complete checkpoint (NotFound when there is none).
StatusOr<std::string> LatestCheckpoint(const std::string& root);

// Writes every expert checkpoint ROOT/<name> holds into `store`, which must be made for the
// same layout and initial values, keep the states saved, and have every expert unwritten (a
// new store; its placement may differ); returns the blobs. Experts the checkpoint records as
// initial stay unwritten. Everything that can be checked up front is (the model, the blobs,
// that the store is new) before any write; each expert's blocks are verified before they are
// written, so damage found part way leaves the store with the experts before it restored:
// discard it.
StatusOr<std::vector<CheckpointBlob>> RestoreCheckpoint(const std::string& root,
                                                        const std::string& name, ExpertStore& store,
                                                        const IoEngineFactory& io_engines = {});

// A checkpoint's directory ROOT/NAME (a trailing separator or not; NAME alone is in the
// working directory, ROOT "") as {ROOT, NAME}, what the calls below take.
std::pair<std::string, std::string> SplitCheckpointPath(const std::string& path);

// One checkpoint read expert by expert, without a store (what ecss-extract reads): its layout,
// initial values, states and blobs, and each expert's saved states, verified against their
// CRC-32C. It holds one expert's blocks at a time, so a checkpoint larger than memory reads.
// Not thread-safe.
class CheckpointReader {
 public:
  // NotFound listing the checkpoints that exist; DataLoss for a damaged manifest or blob.
  static StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& root,
                                                          const std::string& name,
                                                          const IoEngineFactory& io_engines = {});
  // The same, of checkpoint ROOT/NAME given as one path (SplitCheckpointPath).
  static StatusOr<std::unique_ptr<CheckpointReader>> OpenPath(
      const std::string& checkpoint, const IoEngineFactory& io_engines = {});
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const std::string& where() const;  // ROOT/NAME
  const ExpertStoreLayout& layout() const;
  const ExpertIndex& index() const;  // the layout's experts: flat id <-> (layer, expert)
  const std::string& initial_id() const;
  const std::vector<ExpertState>& states() const;  // those saved, in blocks()' order
  const std::vector<CheckpointBlob>& blobs() const;
  // The expert's saved version (its update count).
  uint64_t version(uint32_t flat) const;
  // Whether its states are saved: false for an expert never written (nothing is saved: it is
  // its initial value, which only the model that made the store computes); true at version 0
  // too for one written without an update (ExpertStore::Version's `written`).
  bool written(uint32_t flat) const;
  // Reads expert `flat`'s saved states into blocks(), each verified: OutOfRange for an
  // unknown id, FailedPrecondition for an expert never written, DataLoss naming the file,
  // layer, expert and state for a missing, truncated or damaged block.
  Status Read(uint32_t flat);
  // After Read: one 4 KiB-aligned block per saved state (ExpertStore::StateBytes of the
  // layout's valid), until the next Read.
  void* const* blocks() const;

 private:
  struct Impl;
  explicit CheckpointReader(std::unique_ptr<Impl> impl);
  friend StatusOr<std::vector<CheckpointBlob>> RestoreCheckpoint(const std::string&,
                                                                 const std::string&, ExpertStore&,
                                                                 const IoEngineFactory&);
  std::unique_ptr<Impl> impl_;
};

// Removes checkpoint `name`: its manifest, then its data unless a newer checkpoint refers to
// it (then the data stays until the last one that does is deleted).
Status DeleteCheckpoint(const std::string& root, const std::string& name);

}  // namespace ecss
