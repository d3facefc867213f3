#include "runtime/base/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
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

}  // namespace

Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  const std::string temporary = StrCat(path, ".tmp.", ::getpid());
  Fd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return ErrnoError(errno, StrCat("cannot create '", temporary, "'"));
  size_t written = 0;
  while (written < contents.size()) {
    ssize_t n = ::write(fd.get(), contents.data() + written, contents.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status error = ErrnoError(errno, StrCat("cannot write '", temporary, "'"));
      ::unlink(temporary.c_str());
      return error;
    }
    written += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0 || ::close(fd.release()) != 0) {
    Status error = ErrnoError(errno, StrCat("cannot flush '", temporary, "'"));
    ::unlink(temporary.c_str());
    return error;
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    Status error = ErrnoError(errno, StrCat("cannot rename '", temporary, "' to '", path, "'"));
    ::unlink(temporary.c_str());
    return error;
  }
  return Status::Ok();
}

StatusOr<std::string> ReadFileToString(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return ErrnoError(errno, StrCat("cannot open '", path, "'"));
  std::string contents;
  char chunk[65536];
  while (true) {
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, StrCat("cannot read '", path, "'"));
    }
    if (n == 0) break;
    contents.append(chunk, static_cast<size_t>(n));
  }
  return contents;
}

}  // namespace ecss
