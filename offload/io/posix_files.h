// Internal to offload/io: the open files of the file-backed engines (posix, uring), and their
// common base. Opens with O_DIRECT when asked, falling back to buffered I/O where the
// filesystem refuses it (tmpfs), and answers size, allocation and sync. Not thread-safe: the
// engine's driving thread opens and closes; workers only read the fd of an open file.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "offload/io/io_engine.h"

namespace ecss::io_internal {

class PosixFiles {
 public:
  explicit PosixFiles(bool direct) : direct_(direct) {}
  ~PosixFiles();

  StatusOr<IoFileId> Open(const std::string& path, OpenMode mode);
  Status Close(IoFileId file);
  StatusOr<uint64_t> Size(IoFileId file) const;
  Status Allocate(IoFileId file, uint64_t bytes);
  Status Resize(IoFileId file, uint64_t bytes);
  Status Sync(IoFileId file);
  Status Check(IoFileId file, std::string_view engine) const;

  int fd(IoFileId file) const { return files_[file].fd; }
  const std::string& path(IoFileId file) const { return files_[file].path; }
  // Called with (id, fd) after open and (id, -1) before close (io_uring file registration).
  void set_listener(std::function<void(IoFileId, int)> listener) {
    listener_ = std::move(listener);
  }

 private:
  struct File {
    std::string path;
    int fd = -1;
  };
  const bool direct_;
  std::vector<File> files_;
  std::function<void(IoFileId, int)> listener_;
};

// The base of the file-backed engines: file operations go to the shared PosixFiles.
class FileBackedEngine : public IoEngine {
 public:
  StatusOr<IoFileId> Open(const std::string& path, OpenMode mode) override {
    return files_.Open(path, mode);
  }
  Status Close(IoFileId file) override { return files_.Close(file); }
  std::string FilePath(IoFileId file) const override {
    return files_.Check(file, name()).ok() ? files_.path(file) : "";
  }
  StatusOr<uint64_t> FileSize(IoFileId file) override { return files_.Size(file); }
  Status Allocate(IoFileId file, uint64_t bytes) override { return files_.Allocate(file, bytes); }
  Status Resize(IoFileId file, uint64_t bytes) override { return files_.Resize(file, bytes); }
  Status Sync(IoFileId file) override { return files_.Sync(file); }

 protected:
  explicit FileBackedEngine(bool direct) : files_(direct) {}
  Status CheckFile(IoFileId file) const override { return files_.Check(file, name()); }

  PosixFiles files_;
};

}  // namespace ecss::io_internal
