// The in-memory engine: files are byte vectors keyed by path, shared by every memory engine in
// the process (so that a "closed and reopened" store finds its data). Requests complete at
// submit time; Poll hands the completions out.
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "offload/io/completion_queue.h"
#include "offload/io/io_engines.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

struct MemoryFile {
  std::mutex mutex;
  std::vector<uint8_t> bytes;
};

std::mutex g_files_mutex;
std::map<std::string, std::shared_ptr<MemoryFile>>& Files() {
  static std::map<std::string, std::shared_ptr<MemoryFile>> files;
  return files;
}

class MemoryEngine final : public IoEngine {
 public:
  explicit MemoryEngine(uint32_t queue_depth) : queue_depth_(queue_depth) {}

  std::string_view name() const override { return "memory"; }
  std::string FilePath(IoFileId file) const override {
    return file < open_.size() ? open_[file].path : "";
  }
  size_t alignment() const override { return 1; }
  uint32_t queue_depth() const override { return queue_depth_; }

  StatusOr<IoFileId> Open(const std::string& path, OpenMode mode) override {
    std::lock_guard<std::mutex> lock(g_files_mutex);
    auto& files = Files();
    auto it = files.find(path);
    if (mode == OpenMode::kCreate) {
      auto file = std::make_shared<MemoryFile>();
      files[path] = file;
      return Add(path, file, true);
    }
    if (it == files.end()) return NotFoundError(StrCat("memory: no file '", path, "'"));
    return Add(path, it->second, mode == OpenMode::kReadWrite);
  }

  Status Close(IoFileId file) override {
    ECSS_RETURN_IF_ERROR(CheckFile(file));
    open_[file].file.reset();
    return Status::Ok();
  }

  StatusOr<uint64_t> FileSize(IoFileId file) override {
    ECSS_RETURN_IF_ERROR(CheckFile(file));
    std::lock_guard<std::mutex> lock(open_[file].file->mutex);
    return open_[file].file->bytes.size();
  }

  Status Allocate(IoFileId file, uint64_t bytes) override {
    ECSS_RETURN_IF_ERROR(CheckFile(file));
    std::lock_guard<std::mutex> lock(open_[file].file->mutex);
    if (open_[file].file->bytes.size() < bytes) open_[file].file->bytes.resize(bytes, 0);
    return Status::Ok();
  }

  Status Resize(IoFileId file, uint64_t bytes) override {
    ECSS_RETURN_IF_ERROR(CheckFile(file));
    std::lock_guard<std::mutex> lock(open_[file].file->mutex);
    open_[file].file->bytes.resize(bytes, 0);
    return Status::Ok();
  }

  Status Sync(IoFileId file) override { return CheckFile(file); }

 protected:
  Status CheckFile(IoFileId file) const override {
    if (file >= open_.size() || !open_[file].file) {
      return InvalidArgumentError(StrCat("memory: file id ", file, " is not open"));
    }
    return Status::Ok();
  }

  Status DoSubmit(const IoRequest& r) override {
    OpenFile& open = open_[r.file];
    IoCompletion completion{r.user_data, Status::Ok(), 0};
    std::lock_guard<std::mutex> lock(open.file->mutex);
    std::vector<uint8_t>& bytes = open.file->bytes;
    if (r.op == IoOp::kWrite) {
      if (!open.writable) {
        completion.status =
            PermissionDeniedError(StrCat("memory: '", open.path, "' is open read-only"));
      } else {
        if (bytes.size() < r.offset + r.bytes) bytes.resize(r.offset + r.bytes, 0);
        std::memcpy(bytes.data() + r.offset, r.buffer, r.bytes);
        completion.bytes = r.bytes;
      }
    } else {
      const uint64_t available = r.offset < bytes.size() ? bytes.size() - r.offset : 0;
      completion.bytes = static_cast<size_t>(std::min<uint64_t>(available, r.bytes));
      if (completion.bytes > 0) std::memcpy(r.buffer, bytes.data() + r.offset, completion.bytes);
      if (completion.bytes < r.bytes) {
        completion.status = OutOfRangeError(StrCat("memory: read of ", r.bytes, " bytes at offset ",
                                                   r.offset, " of '", open.path,
                                                   "' reaches its end (", bytes.size(), " bytes)"));
      }
    }
    done_.Push(std::move(completion));
    return Status::Ok();
  }

  size_t DoPoll(IoCompletion* out, size_t max, std::chrono::microseconds wait) override {
    return done_.Pop(out, max, wait);
  }

  Status DoCancel(uint64_t user_data) override {
    return NotFoundError(StrCat("memory: request ", user_data, " already completed"));
  }

 private:
  struct OpenFile {
    std::string path;
    std::shared_ptr<MemoryFile> file;
    bool writable;
  };
  IoFileId Add(const std::string& path, std::shared_ptr<MemoryFile> file, bool writable) {
    open_.push_back(OpenFile{path, std::move(file), writable});
    return static_cast<IoFileId>(open_.size() - 1);
  }

  const uint32_t queue_depth_;
  std::vector<OpenFile> open_;
  io_internal::CompletionQueue done_;
};

}  // namespace

std::unique_ptr<IoEngine> CreateMemoryIoEngine(uint32_t queue_depth) {
  return std::make_unique<MemoryEngine>(queue_depth);
}

}  // namespace ecss
