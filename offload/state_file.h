// ExpertStateFile: the NVMe home of experts' state arrays (fp32 master weights and optimizer
// moments, which the CPU optimizer streams through staging slots; bf16 or fp32 compute
// weights; gradients). Experts are striped over one or more directories (expert e lives in
// directory e % dirs, like several drives), each in a fixed-size slot of its file:
//   [4 KiB header: magic, version, expert, elements, arrays, update count, sequence, CRC-32C
//    of each array, CRC of the header] [array 0, padded to 4 KiB] [array 1] ...
// A directory's experts are split over files of at most max_file_bytes (whole slots), so that
// no file approaches a file system's limit (ext4: 16 TiB). Every file starts with a 4 KiB file
// header (magic, format version, the files' name and the file's index among them, the store's
// id and generation, CRC-32C), which Open checks: a file of another store, an older copy of a
// file (its generation is behind), files swapped or renamed, and a damaged file header are
// DataLoss naming the file.
// Files are sparse: Create only sets their sizes (constant time and space for any model), and
// disk blocks are allocated as stores reach them, so a full disk is the failed store's error
// (ResourceExhausted naming the expert), and the version before it stays readable. A slot
// never stored (its header all zeros, as a sparse file reads) is "unwritten": Load says so,
// and the caller supplies the expert's initial value.
// Every load verifies both checksums: a mismatch is DataLoss naming the expert, the array and
// the file, and the data is never handed out as good. A store writes the arrays, then the
// header: a store cut short leaves a slot whose checksums do not match (detected, not used).
// With `shadow`, every expert has two slots and a store goes to the one not holding the newest
// version, so a failed or torn store leaves the previous version readable (twice the space).
// A slot header is one 4 KiB write whose fields fit in its first 512-byte sector (the rest is
// zeros, before and after), and drives write at least a sector atomically, so a crash leaves
// it old or new, never torn: a slot header that is neither all zeros nor intact is damage,
// and Load reports it (DataLoss) rather than falling back to the other copy, which would
// silently go back one version.
// Array buffers must be 4 KiB aligned and hold the array's bytes rounded up to 4 KiB (the
// staging slots are laid out that way). Blocking; one thread at a time (it drives the engine).
// A file may have several writing handles and several reading ones (an object each, the
// first from Create or Open, the others from its AnotherHandle), as the expert store keeps
// them. A writing handle knows which shadow slot is newest only for the experts stored
// through it, so each expert must always be stored through the same writing handle (another
// one would overwrite the newest copy). Loads decide from the headers they read, never from
// what a handle remembers; but the handles of one file share a guess of each expert's newest
// copy (where the last store through any of them went), and a load reads that copy's arrays
// in the same round trip as the headers: one round trip when the guess is right, a second
// for the right copy when it is not.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "offload/io/io_engine.h"
#include "runtime/base/status.h"

namespace ecss {

struct StateFileOptions {
  std::vector<std::string> dirs;  // one or more directories; expert e goes to dirs[e % dirs]
  uint32_t arrays = 3;            // state arrays per expert (AdamW: master, m, v)
  uint64_t max_expert_elements = 0;
  uint32_t experts = 0;        // expert ids are [0, experts)
  uint32_t element_bytes = 4;  // 4 (fp32) or 2 (bf16)
  // Files are DIR/NAME-<dir index>.bin, and DIR/NAME-<dir index>-part<N>.bin past the first
  // max_file_bytes of a directory.
  std::string name = "ecss-states";
  bool shadow = false;                   // two slots per expert (see above)
  std::vector<std::string> array_names;  // for errors; default "array <i>"
  // The largest file; a directory's experts go to as many files as that takes (0:
  // kDefaultMaxFileBytes). At least a file header and one expert's slots (InvalidArgument
  // otherwise). Files made with one value must be opened with the same.
  uint64_t max_file_bytes = 0;
  // What ties the files to one store and its history (see above): Create writes both into
  // every file header, and Open refuses files of another store_id or of a generation outside
  // [previous_generation, generation] (previous_generation 0: generation only). A store moves
  // to a new generation each time it opens (SetGeneration), so a file copied back from an
  // earlier run is refused; the range covers files that a SetGeneration cut short by a crash
  // did not reach.
  uint64_t store_id = 0;
  uint64_t generation = 1;
  uint64_t previous_generation = 0;
};

inline constexpr uint64_t kDefaultMaxFileBytes = uint64_t{1} << 40;  // 1 TiB

// Bytes `bytes` of state occupy on disk and in a staging slot (rounded up to 4 KiB).
inline uint64_t StateBlockBytes(uint64_t bytes) { return (bytes + 4095) / 4096 * 4096; }
// The same for an array of `elements` fp32 values.
inline uint64_t StateArrayBytes(uint64_t elements) { return StateBlockBytes(elements * 4); }

class ExpertStateFile {
 public:
  // Creates (truncating) the files of every directory, sparse: every expert unwritten.
  // NotFound / PermissionDenied name a missing or read-only directory.
  static StatusOr<std::unique_ptr<ExpertStateFile>> Create(IoEngine* engine,
                                                           const StateFileOptions& options);
  // Opens files made by Create with the same options (FailedPrecondition when they were made
  // for another layout).
  static StatusOr<std::unique_ptr<ExpertStateFile>> Open(IoEngine* engine,
                                                         const StateFileOptions& options);
  ~ExpertStateFile();
  // Another handle on these files, driven by `engine` (a handle is used by one thread at a
  // time): it opens the files again in that engine, without checking them again (this
  // handle's Create or Open did), and shares this handle's guesses of newest copies (see
  // above). What this handle knows of its own stores is not passed on. It reads only what
  // never changes of this handle, which may be in use meanwhile.
  StatusOr<std::unique_ptr<ExpertStateFile>> AnotherHandle(IoEngine* engine) const;

  // Writes `elements` values of each array, then the header. arrays[i] is 4 KiB aligned.
  // With shadow, a store goes to the copy not holding the newest version (a failed store
  // leaves the newest readable). With `supersede` (an update's store, which follows the
  // version the expert's states all hold), a newest copy already at update_count or later was
  // written ahead of the other states by an update cut short: it is retracted (its header
  // zeroed) and replaced instead, so the copy before it, which the other states match, is
  // kept, and a crash while it is replaced leaves the expert readable as of that version.
  // With `checksums`, checksums[i] is the CRC-32C of arrays[i]'s `elements` values as the
  // caller computed them: the header takes them, and the arrays are not read to checksum them.
  Status Store(uint32_t expert, const void* const* arrays, uint64_t elements, uint64_t update_count,
               bool supersede = false, const uint32_t* checksums = nullptr);
  // Reads and verifies (with shadow: the newest version). A damaged slot header, of either
  // copy, is DataLoss naming the file, the expert and the offset. elements must be what was
  // stored (DataLoss naming both otherwise). With `want`, the version whose update count is
  // *want instead (shadow: the previous one may still be there; DataLoss naming the count when
  // no intact copy holds it). The expert reads as unwritten when no copy qualifies and one was
  // never stored: none ever was, or (shadow) the only one stored is not *want. With
  // `unwritten`, Load then sets it and returns OK (the count left alone: the caller knows what
  // an unwritten expert holds, at `want` too); without, that is NotFound, or DataLoss when
  // *want is not 0 (the initial version). The arrays hold the expert only when Load returns
  // OK and the expert was written; otherwise what they hold is unspecified. With `checksums`,
  // the arrays are not checked here: checksums[a] is the CRC-32C the header records for array
  // a, and the caller must check the array against it before using it (the optimizer's update
  // does, in the pass that brings the expert into cache for it).
  Status Load(uint32_t expert, void* const* arrays, uint64_t elements, uint64_t* update_count,
              const uint64_t* want = nullptr, bool* unwritten = nullptr,
              uint32_t* checksums = nullptr);
  // Whether a copy of the expert was ever stored (its headers only): one is intact, or
  // damaged (Load then reports the damage).
  StatusOr<bool> Written(uint32_t expert);
  // The update count Load would return (its headers only): nullopt when unwritten; DataLoss as
  // Load for a damaged header.
  StatusOr<std::optional<uint64_t>> NewestCount(uint32_t expert);

  // This handle, opened on files that another one just made with Create, knows every slot
  // unwritten, as the creating handle does: its first store of an expert reads no headers, and
  // counts what it writes as fresh. REQUIRES: nothing stored since Create.
  void KnowFilesAreNew();
  // Makes completed stores durable (fdatasync of every file).
  Status Sync();
  // Rewrites every file header with `generation` (the store id stays), then Sync.
  Status SetGeneration(uint64_t generation);

  uint64_t slot_bytes() const { return slot_bytes_; }  // one version of one expert
  // Bytes that stores wrote into slots never stored before (a sparse file's holes, where the
  // file system allocates blocks as it writes: slower than overwriting on ext4), as far as
  // this handle knows: every slot of files it created, and with shadow slots an expert's
  // slots once a store read their headers; a slot whose header is zero (a store cut short
  // before it, a retracted one) counts again. As Store, one thread at a time (ExpertStore keeps
  // the total other threads read).
  uint64_t fresh_written_bytes() const { return fresh_written_bytes_; }
  // Bytes on disk once every expert is stored (with shadow: both copies), all directories
  // together, file headers included (for sizing); Create itself writes only the headers.
  static uint64_t DiskBytes(const StateFileOptions& options);
  // The files Create makes for `options`, every directory's, in order.
  static std::vector<std::string> Paths(const StateFileOptions& options);
  const StateFileOptions& options() const { return options_; }

 private:
  // `guesses`: those of the files' other handles (null: the first handle's, made here).
  ExpertStateFile(IoEngine* engine, const StateFileOptions& options,
                  std::shared_ptr<std::vector<std::atomic<uint8_t>>> guesses = nullptr);
  struct Header;
  struct FileHeader;
  // Writes file i's header with the options' store id and `generation` (not synced).
  Status WriteFileHeader(size_t i, uint64_t generation);
  // Reads and checks file i's header (see StateFileOptions::store_id).
  Status CheckFileHeader(size_t i);
  // What a copy's header says: a valid version, never stored, or damaged.
  enum class CopyState : uint8_t { kValid, kUnwritten, kDamaged };
  // Where one expert's slots are: its file (index into files_) and its first copy's offset.
  struct Place {
    size_t file = 0;
    uint64_t offset = 0;
  };
  Status CheckExpert(uint32_t expert, uint64_t elements) const;
  Place PlaceOf(uint32_t expert) const;
  uint64_t OffsetOf(uint32_t expert, uint32_t copy) const {
    return PlaceOf(expert).offset + copy * slot_bytes_;
  }
  IoFileId FileOf(uint32_t expert) const { return files_[PlaceOf(expert).file]; }
  const std::string& PathOf(uint32_t expert) const { return paths_[PlaceOf(expert).file]; }
  uint32_t copies() const { return options_.shadow ? 2 : 1; }
  uint64_t ArrayOffset(uint32_t a) const;
  // Requests reading the header of every copy of an expert into header_ (copy c at c * 4 KiB).
  std::vector<IoRequest> HeaderRequests(uint32_t expert) const;
  // What those headers say, once read: headers[copy], with what it is (state[copy]) and why it
  // is not valid (why[copy]).
  void ParseHeaders(uint32_t expert, Header* headers, CopyState* state, std::string* why) const;
  // Both in one round trip.
  Status ReadHeaders(uint32_t expert, Header* headers, CopyState* state, std::string* why);
  // What an expert's headers (ParseHeaders') say a load should read: the newest intact copy
  // (of update count *want, when given), if any; whether some copy was never stored, and why
  // the first that does not qualify does not. DataLoss naming the expert for a damaged header.
  struct Choice {
    bool found = false;
    uint32_t copy = 0;
    bool unwritten = false;
    std::string why;
  };
  StatusOr<Choice> Choose(uint32_t expert, const Header* seen, const CopyState* state,
                          const std::string* reason, const uint64_t* want) const;

  IoEngine* engine_;
  StateFileOptions options_;
  uint64_t slot_bytes_;
  uint32_t experts_per_file_;       // of one directory
  std::vector<size_t> first_file_;  // per directory: the index of its first file in files_
  // Every directory's files in order; a directory's experts fill its files one after another.
  std::vector<std::string> paths_;
  std::vector<IoFileId> files_;
  std::vector<uint64_t> file_bytes_;  // each file's size
  void* header_ = nullptr;            // an aligned 4 KiB header buffer per copy
  // shadow: per expert, the newest version's sequence number and copy as this handle last
  // wrote or saw it (UINT64_MAX: not known yet).
  std::vector<uint64_t> newest_sequence_;
  std::vector<uint8_t> newest_copy_;
  std::vector<uint64_t> newest_count_;  // its update count
  // Shared by every handle of these files (AnotherHandle): per expert, the copy its newest
  // store through any of them went to, or that a load found newest (kCopyUnknown: none yet).
  // Only ever a guess (see the file comment).
  static constexpr uint8_t kCopyUnknown = 0xff;
  std::shared_ptr<std::vector<std::atomic<uint8_t>>> newest_copy_guess_;
  // Per expert, bit c: copy c's slot was stored (its header ever written), as this handle
  // knows; kSlotsUnknown until it created the files or read the expert's headers.
  static constexpr uint8_t kSlotsUnknown = 0xff;
  std::vector<uint8_t> slots_stored_;
  uint64_t fresh_written_bytes_ = 0;
};

}  // namespace ecss
