#include "runtime/base/file_util.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

// What follows a path in the names of WriteFileAtomically's temporary files for it.
constexpr char kTemporaryMark[] = ".tmp.";

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// WriteFileAtomically's temporary file for `path`: PATH.tmp.PID, beside it.
std::string TemporaryOf(const std::string& path) {
  return StrCat(path, kTemporaryMark, ::getpid());
}
// The directory `path` is in ("." for a bare name).
std::string DirectoryOf(const std::string& path) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

// This process's temporary file for `path`, `temporary`, created and locked for as long as the
// Fd lives (a -1 Fd and errno on failure), after the ones that killed writers of `path` left are
// removed (RemoveUnlockedLeftovers: a live writer's is locked, a killed one's lock died with it).
// A new file, never one through a link left at its name: made under a name the removal passes
// over (PATH.tmp.new-PID) and renamed to `temporary` once locked, so that another writer of the
// same path never takes it for a killed one's. A process killed between the two leaves that
// empty file, which the next writer with its pid replaces.
Fd CreateTemporary(const std::string& path, const std::string& temporary) {
  RemoveUnlockedLeftovers(DirectoryOf(path), TemporaryPrefixOf(path), "");
  const std::string fresh = StrCat(path, kTemporaryMark, "new-", ::getpid());
  ::unlink(fresh.c_str());
  Fd fd(::open(fresh.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (fd.get() < 0) return fd;
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0 ||
      ::rename(fresh.c_str(), temporary.c_str()) != 0) {
    const int error = errno;
    ::close(fd.release());
    ::unlink(fresh.c_str());
    errno = error;
    return Fd(-1);
  }
  return fd;
}

}  // namespace

std::string TemporaryPrefixOf(const std::string& path) {
  return StrCat(std::filesystem::path(path).filename().string(), kTemporaryMark);
}

Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  const std::string temporary = TemporaryOf(path);
  Fd fd = CreateTemporary(path, temporary);
  if (fd.get() < 0) return ErrnoError(errno, "cannot create '", temporary, "'");
  size_t written = 0;
  while (written < contents.size()) {
    ssize_t n = ::write(fd.get(), contents.data() + written, contents.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status error = ErrnoError(errno, "cannot write '", temporary, "'");
      ::unlink(temporary.c_str());
      return error;
    }
    written += static_cast<size_t>(n);
  }
  // Renamed while still open, so still locked: no other writer's cleanup takes it. Closed
  // after (by the Fd): once fsync returned, close loses nothing on a local file system.
  if (::fsync(fd.get()) != 0) {
    Status error = ErrnoError(errno, "cannot flush '", temporary, "'");
    ::unlink(temporary.c_str());
    return error;
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    Status error = ErrnoError(errno, "cannot rename '", temporary, "' to '", path, "'");
    ::unlink(temporary.c_str());
    return error;
  }
  return SyncDirectory(DirectoryOf(path));
}

Status CheckFileWritable(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return InvalidArgumentError(StrCat("'", path, "' is a directory"));
  }
  const std::string temporary = TemporaryOf(path);
  const Fd fd = CreateTemporary(path, temporary);
  if (fd.get() < 0) return ErrnoError(errno, "cannot create a file beside '", path, "'");
  ::unlink(temporary.c_str());
  return Status::Ok();
}

namespace {

// Whether `path` can be locked exclusively now (nobody holds it); false if it cannot be opened.
bool Unlocked(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  return fd.get() >= 0 && ::flock(fd.get(), LOCK_EX | LOCK_NB) == 0;
}

// Removes the file at `path` if nobody holds it: under its lock, and only while the path still
// names the file locked (a writer may have renamed its own over it since it was opened).
void RemoveIfUnlocked(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  struct stat held {
  }, named{};
  if (fd.get() >= 0 && ::flock(fd.get(), LOCK_EX | LOCK_NB) == 0 && ::fstat(fd.get(), &held) == 0 &&
      ::lstat(path.c_str(), &named) == 0 && held.st_dev == named.st_dev &&
      held.st_ino == named.st_ino) {
    ::unlink(path.c_str());
  }
}

}  // namespace

void RemoveUnlockedLeftovers(const std::string& dir, std::string_view prefix,
                             std::string_view lock_name) {
  std::error_code error;
  for (auto it = std::filesystem::directory_iterator(dir, error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
        name.find_first_not_of("0123456789", prefix.size()) != std::string::npos) {
      continue;
    }
    std::error_code ignored;
    const std::filesystem::file_status status = it->symlink_status(ignored);
    bool stale = false;
    if (std::filesystem::is_regular_file(status)) {
      RemoveIfUnlocked(it->path().string());
    } else if (!lock_name.empty() && std::filesystem::is_directory(status)) {
      const std::filesystem::path lock = it->path() / std::string(lock_name);
      stale = !std::filesystem::exists(lock, ignored) || Unlocked(lock.string());
    }
    if (stale) std::filesystem::remove_all(it->path(), ignored);
  }
}

bool IsWithin(const std::string& path, const std::string& dir) {
  std::error_code error;
  const std::filesystem::path p = std::filesystem::weakly_canonical(path, error);
  if (error) return true;
  const std::filesystem::path d = std::filesystem::weakly_canonical(dir, error);
  if (error) return true;
  const std::filesystem::path relative = p.lexically_relative(d);
  return !relative.empty() && *relative.begin() != "..";
}

Status SyncDirectory(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) return ErrnoError(errno, "cannot open directory '", dir, "'");
  // EINVAL: a file system that cannot sync directories (its entries are as durable as it makes
  // them); not an error of the write that asked.
  if (::fsync(fd.get()) != 0 && errno != EINVAL) {
    return ErrnoError(errno, "cannot sync directory '", dir, "'");
  }
  return Status::Ok();
}

Status CheckDirectory(const std::string& dir, std::string_view what) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(dir, error);
  if (error && error != std::errc::no_such_file_or_directory) {
    return ErrnoError(error.value(), StrCat(what, " '", dir, "'"));
  }
  if (!std::filesystem::is_directory(status)) {
    return NotFoundError(
        StrCat(what, " '", dir, "' ",
               std::filesystem::exists(status) ? "is not a directory" : "does not exist"));
  }
  return Status::Ok();
}

Status CheckWritableDirectory(const std::string& dir, std::string_view what) {
  ECSS_RETURN_IF_ERROR(CheckDirectory(dir, what));
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return ErrnoError(errno, what, " '", dir, "' is not writable");
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<FileLock>> FileLock::Acquire(const std::string& path,
                                                      std::string_view what) {
  while (true) {
    Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    if (fd.get() < 0) return ErrnoError(errno, "cannot open lock file '", path, "'");
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK) {
        return ErrnoError(errno, "cannot lock '", path, "'");
      }
      // The holder writes its pid right after locking: empty means it has not yet.
      StatusOr<std::string> holder = ReadFileToString(path);
      std::string pid = holder.ok() ? *holder : "";
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      return FailedPreconditionError(StrCat(what, " is in use by process ",
                                            pid.empty() ? "(pid not written yet)" : pid,
                                            " (it holds '", path, "'); one owner at a time"));
    }
    // A releasing owner removes the file after we opened it: our lock is then on a file
    // nobody else will see, so take the one now at the path.
    struct stat held {
    }, named{};
    if (::fstat(fd.get(), &held) != 0 || ::stat(path.c_str(), &named) != 0 ||
        held.st_dev != named.st_dev || held.st_ino != named.st_ino) {
      continue;
    }
    const std::string pid = StrCat(::getpid(), "\n");
    if (::ftruncate(fd.get(), 0) != 0 ||
        ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      return ErrnoError(errno, "cannot write lock file '", path, "'");
    }
    return std::unique_ptr<FileLock>(new FileLock(path, fd.release()));
  }
}

FileLock::~FileLock() {
  // Removed before the unlock, so that an Acquire that opened this file and locks it after us
  // sees it is gone and takes the one at the path; only while the path still names this file
  // (someone may have removed it, and another owner made a new one).
  struct stat held {
  }, named{};
  if (::fstat(fd_, &held) == 0 && ::stat(path_.c_str(), &named) == 0 &&
      held.st_dev == named.st_dev && held.st_ino == named.st_ino) {
    ::unlink(path_.c_str());
  }
  ::close(fd_);
}

void ScratchDir::RemoveLeftovers(const std::string& parent, std::string_view prefix) {
  RemoveUnlockedLeftovers(parent, prefix, kLockName);
}

StatusOr<ScratchDir> ScratchDir::Create(const std::string& parent, std::string_view prefix) {
  RemoveLeftovers(parent, prefix);
  std::string made = StrCat(parent, "/", prefix, "new-XXXXXX");
  if (::mkdtemp(made.data()) == nullptr) {
    return ErrnoError(errno, "cannot make a scratch directory in '", parent, "'");
  }
  auto removed = [&](Status error) {
    std::error_code ignored;
    std::filesystem::remove_all(made, ignored);
    return error;
  };
  StatusOr<std::unique_ptr<FileLock>> lock =
      FileLock::Acquire(StrCat(made, "/", kLockName), StrCat("scratch directory '", made, "'"));
  if (!lock.ok()) return removed(lock.status());
  // The pid keeps names apart within a pid namespace, the random digits across them (two
  // containers sharing a directory): a name taken is drawn again. A live directory holds its
  // lock file, so rename, which replaces only an empty directory, never takes its place.
  std::random_device draw;
  for (int attempt = 0; attempt < 16; ++attempt) {
    char digits[8];
    std::snprintf(digits, sizeof(digits), "%06u", static_cast<unsigned>(draw() % 1000000));
    std::string path = StrCat(parent, "/", prefix, ::getpid(), digits);
    if (::rename(made.c_str(), path.c_str()) == 0) {
      return ScratchDir(std::move(path), std::move(*lock));
    }
    const int error = errno;
    if (error != EEXIST && error != ENOTEMPTY) {
      return removed(ErrnoError(error, "cannot rename '", made, "' to '", path, "'"));
    }
  }
  return removed(AlreadyExistsError(StrCat("scratch directory in '", parent, "': 16 names under '",
                                           prefix, "' drawn, every one taken")));
}

ScratchDir::~ScratchDir() {
  if (path_.empty()) return;
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

StatusOr<std::string> ReadFileToString(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return ErrnoError(errno, "cannot open '", path, "'");
  std::string contents;
  char chunk[65536];
  while (true) {
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "cannot read '", path, "'");
    }
    if (n == 0) break;
    contents.append(chunk, static_cast<size_t>(n));
  }
  return contents;
}

}  // namespace ecss
