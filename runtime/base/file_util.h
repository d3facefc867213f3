// Small file helpers shared by everything that writes results (traces, bench reports) and by
// the stores that own a directory.
// WriteFileAtomically never leaves a half-written file under `path`: it writes a temporary file
// beside it (PATH.tmp.PID, locked while it is written), fsyncs it, renames it over `path` and
// fsyncs the directory, so that once it returns the new contents survive a crash or power loss.
// A writer killed mid-way leaves its temporary file; the next WriteFileAtomically or
// CheckFileWritable of the same path removes it (RemoveUnlockedLeftovers). Blocking; thread-safe
// for distinct paths.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "runtime/base/status.h"

namespace ecss {

Status WriteFileAtomically(const std::string& path, std::string_view contents);
// That WriteFileAtomically(path, ...) could make its file now: `path` is not a directory and
// its temporary file can be created (and is removed again). For a caller about to spend
// minutes before it writes (a benchmark's or a calibration's output): the error, with the
// status code WriteFileAtomically would return, comes before the work.
Status CheckFileWritable(const std::string& path);
// The start of the names of WriteFileAtomically's temporary files for `path`, beside it (its
// file name and ".tmp."): how a directory's owner tells them from files that are not its own.
std::string TemporaryPrefixOf(const std::string& path);
StatusOr<std::string> ReadFileToString(const std::string& path);
// fsync of a directory: makes the creation, rename or removal of its entries durable.
Status SyncDirectory(const std::string& dir);
// That `dir` is a directory, for an owner about to read it. Errors name `what` and the path:
// NotFound "does not exist" or "is not a directory" (a file there), and a failed stat other
// than ENOENT (EACCES on a parent, ENOTDIR for a path through a file, ELOOP) with its errno.
Status CheckDirectory(const std::string& dir, std::string_view what);
// The same, and that this process may make files in it (write and search permission), for an
// owner about to write there: PermissionDenied with the errno (EACCES, EROFS) otherwise.
Status CheckWritableDirectory(const std::string& dir, std::string_view what);

// Removes what crashed writers left in `dir`: entries named PREFIX + digits (a writer names
// its temporary file or directory so, PREFIX + getpid()) that no live writer holds. A writer
// holds a file by an exclusive flock on it, a directory by one on its `lock_name` file
// (FileLock); an entry whose lock can be taken now (the kernel drops a dead process's locks),
// or a directory without that file, is removed. With `lock_name` empty, files only: a
// directory of that name is never a writer's. Liveness by lock, not by pid, so it holds
// across pid namespaces and for a pid reused. Best effort: what cannot be removed stays.
void RemoveUnlockedLeftovers(const std::string& dir, std::string_view prefix,
                             std::string_view lock_name);

// Whether `path` is `dir` or lies under it, with symlinks and ".." resolved as far as the
// paths exist (true when they cannot be resolved: callers refuse then).
bool IsWithin(const std::string& path, const std::string& dir);

// An exclusive lock on a file (flock), held from Acquire until the object is destroyed: how a
// store says that it owns its directory. The file holds the owner's pid, so that a second
// owner's error names it, and is removed on release. The kernel drops the lock when its
// process dies (kill -9 included), so a file left behind by a crash never blocks anyone. A
// second Acquire of one path fails in the same process too (each Acquire is its own owner).
// Local file systems only: flock is not reliable over every network file system.
class FileLock {
 public:
  // FailedPrecondition naming `what`, the path and the holder's pid when another owner holds
  // it; the errno's code when the file cannot be made.
  static StatusOr<std::unique_ptr<FileLock>> Acquire(const std::string& path,
                                                     std::string_view what);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  FileLock(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_;
};

// A directory of the process's own, `parent/PREFIX<pid><6 random digits>`, removed with
// everything in it when the object goes: where a benchmark or a calibration keeps a scratch
// expert store. While it lives it holds a FileLock on its kLockName file, and Create first
// removes what killed processes left under the same prefix (RemoveUnlockedLeftovers), so that
// a run killed mid-way (a store can be tens of GB) costs the next run nothing and never a live
// run's directory: it is made under a name the cleanup passes over (PREFIX + "new-...") and
// renamed once locked. A process killed between the two leaves that empty directory behind.
// Create and the destructor block (the destructor removes the whole tree: seconds for tens of
// GB); what the destructor cannot remove stays, for the next Create under the prefix.
class ScratchDir {
 public:
  static constexpr std::string_view kLockName = "scratch.lock";
  static StatusOr<ScratchDir> Create(const std::string& parent, std::string_view prefix);
  // What Create removes first (for a caller that sizes the free space before it creates).
  static void RemoveLeftovers(const std::string& parent, std::string_view prefix);
  ScratchDir(ScratchDir&& other) noexcept
      : path_(std::exchange(other.path_, {})), lock_(std::move(other.lock_)) {}
  ScratchDir& operator=(ScratchDir&&) = delete;
  ~ScratchDir();
  const std::string& path() const { return path_; }

 private:
  ScratchDir(std::string path, std::unique_ptr<FileLock> lock)
      : path_(std::move(path)), lock_(std::move(lock)) {}
  std::string path_;  // empty once moved from
  // Released after the tree is removed. Its path is the one before the rename, so its own
  // release leaves the file alone (FileLock checks the path still names its file).
  std::unique_ptr<FileLock> lock_;
};

}  // namespace ecss
