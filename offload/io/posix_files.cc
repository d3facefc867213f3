#include "offload/io/posix_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss::io_internal {

PosixFiles::~PosixFiles() {
  for (File& file : files_) {
    if (file.fd >= 0) ::close(file.fd);
  }
}

StatusOr<IoFileId> PosixFiles::Open(const std::string& path, OpenMode mode) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kRead:
      flags |= O_RDONLY;
      break;
    case OpenMode::kReadWrite:
      flags |= O_RDWR;
      break;
    case OpenMode::kCreate:
      flags |= O_RDWR | O_CREAT | O_TRUNC;
      break;
  }
  int fd = ::open(path.c_str(), flags | (direct_ ? O_DIRECT : 0), 0644);
  if (fd < 0 && direct_ && errno == EINVAL) {
    ECSS_LOG(Warning) << "'" << path << "': the filesystem refuses O_DIRECT; using buffered I/O";
    fd = ::open(path.c_str(), flags, 0644);
  }
  if (fd < 0) return ErrnoError(errno, "cannot open '", path, "'");
  files_.push_back(File{path, fd});
  const auto id = static_cast<IoFileId>(files_.size() - 1);
  if (listener_) listener_(id, fd);
  return id;
}

Status PosixFiles::Check(IoFileId file, std::string_view engine) const {
  if (file >= files_.size() || files_[file].fd < 0) {
    return InvalidArgumentError(StrCat(engine, ": file id ", file, " is not open"));
  }
  return Status::Ok();
}

Status PosixFiles::Close(IoFileId file) {
  ECSS_RETURN_IF_ERROR(Check(file, "close"));
  if (listener_) listener_(file, -1);
  const int result = ::close(files_[file].fd);
  files_[file].fd = -1;
  if (result != 0) return ErrnoError(errno, "close of '", files_[file].path, "'");
  return Status::Ok();
}

StatusOr<uint64_t> PosixFiles::Size(IoFileId file) const {
  ECSS_RETURN_IF_ERROR(Check(file, "size"));
  struct stat st {};
  if (::fstat(files_[file].fd, &st) != 0)
    return ErrnoError(errno, "fstat of '", files_[file].path, "'");
  return static_cast<uint64_t>(st.st_size);
}

Status PosixFiles::Allocate(IoFileId file, uint64_t bytes) {
  ECSS_RETURN_IF_ERROR(Check(file, "allocate"));
  const int error = ::posix_fallocate(files_[file].fd, 0, static_cast<off_t>(bytes));
  if (error != 0)
    return ErrnoError(error,
                      StrCat("cannot reserve ", bytes, " bytes for '", files_[file].path, "'"));
  return Status::Ok();
}

Status PosixFiles::Resize(IoFileId file, uint64_t bytes) {
  ECSS_RETURN_IF_ERROR(Check(file, "resize"));
  if (::ftruncate(files_[file].fd, static_cast<off_t>(bytes)) != 0) {
    return ErrnoError(errno, "cannot size '", files_[file].path, "' to ", bytes, " bytes");
  }
  return Status::Ok();
}

Status PosixFiles::Sync(IoFileId file) {
  ECSS_RETURN_IF_ERROR(Check(file, "sync"));
  if (::fdatasync(files_[file].fd) != 0)
    return ErrnoError(errno, "fdatasync of '", files_[file].path, "'");
  return Status::Ok();
}

}  // namespace ecss::io_internal
