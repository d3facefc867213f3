#include "tools/extract/safetensors.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/file_util.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

// The format's header limit (its specification: 100 MB), so a damaged length is not a huge
// allocation.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

Status FileError(std::string_view what, const std::string& path) {
  return ErrnoError(errno, what, " '", path, "'");
}

uint64_t ElementBytes(std::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL") return 1;
  return 0;
}

}  // namespace

StatusOr<uint64_t> SafetensorsTensorBytes(const SafetensorsTensor& t) {
  uint64_t bytes = ElementBytes(t.dtype);
  if (bytes == 0) {
    return InvalidArgumentError(
        StrCat("tensor '", t.name, "' dtype '", t.dtype, "' is not one of the format's"));
  }
  for (uint64_t d : t.shape) {
    if (__builtin_mul_overflow(bytes, d, &bytes)) {
      return InvalidArgumentError(StrCat("tensor '", t.name, "': its shape overflows"));
    }
  }
  return bytes;
}

std::string SafetensorsWriter::partial() const { return StrCat(path_, ".partial-", ::getpid()); }

StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<SafetensorsTensor> tensors,
    const std::map<std::string, std::string>& metadata, bool overwrite) {
  nlohmann::json header = nlohmann::json::object();
  std::set<std::string> names;
  uint64_t offset = 0;
  for (SafetensorsTensor& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second) {
      return InvalidArgumentError(
          StrCat("safetensors: tensor name '", t.name, "' is empty, reserved or repeated"));
    }
    ECSS_ASSIGN_OR_RETURN(const uint64_t bytes, SafetensorsTensorBytes(t));
    t.begin = offset;
    if (__builtin_add_overflow(offset, bytes, &t.end)) {
      return InvalidArgumentError("safetensors: the tensors' sizes overflow");
    }
    offset = t.end;
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  // Only a regular file is ever replaced (never a directory or a device node).
  std::error_code error;
  const std::filesystem::path where = std::filesystem::path(path).parent_path();
  RemoveUnlockedLeftovers(where.empty() ? "." : where.string(),
                          StrCat(std::filesystem::path(path).filename().string(), ".partial-"), "");
  const std::filesystem::file_status status = std::filesystem::symlink_status(path, error);
  if (std::filesystem::exists(status)) {
    if (!std::filesystem::is_regular_file(status)) {
      return AlreadyExistsError(StrCat("'", path, "' exists and is not a regular file"));
    }
    if (!overwrite) return AlreadyExistsError(StrCat("'", path, "' exists (--force replaces it)"));
  }
  std::unique_ptr<SafetensorsWriter> writer(
      new SafetensorsWriter(path, nullptr, 8 + json.size(), offset, overwrite));
  // A new file (never through a link left at that name), locked while this writer lives so
  // that no other run takes it for a crashed one's.
  const std::string partial = writer->partial();
  ::unlink(partial.c_str());  // this pid's own leftover, if a crashed run had it
  const int fd =
      ::open(partial.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return FileError("cannot create", partial);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0 || (writer->file_ = ::fdopen(fd, "wb")) == nullptr) {
    const Status failed = FileError("cannot lock or open", partial);
    ::close(fd);
    ::unlink(partial.c_str());
    return failed;
  }
  std::FILE* file = writer->file_;
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(json.size() >> (8 * i));
  if (std::fwrite(length, 1, 8, file) != 8 ||
      std::fwrite(json.data(), 1, json.size(), file) != json.size()) {
    return FileError("cannot write", partial);
  }
  return writer;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_ == nullptr) return;
  std::fclose(file_);
  std::remove(partial().c_str());
}

Status SafetensorsWriter::Append(const void* data, uint64_t bytes) {
  if (file_ == nullptr) return FailedPreconditionError("safetensors: the file is finished");
  if (bytes > data_bytes_ - written_) {
    return FailedPreconditionError(StrCat("safetensors: ", written_ + bytes,
                                          " bytes of tensor data, ", data_bytes_, " declared"));
  }
  if (std::fwrite(data, 1, bytes, file_) != bytes) return FileError("cannot write", partial());
  written_ += bytes;
  return Status::Ok();
}

Status SafetensorsWriter::Finish(const std::function<Status(const std::string&)>& check) {
  if (file_ == nullptr) return FailedPreconditionError("safetensors: the file is finished");
  if (written_ != data_bytes_) {
    return FailedPreconditionError(StrCat(
        "safetensors: ", written_, " bytes of tensor data written, ", data_bytes_, " declared"));
  }
  if (std::fflush(file_) != 0) return FileError("cannot write", partial());
  if (::fdatasync(fileno(file_)) != 0) return FileError("cannot sync", partial());
  // Checked and named while still open, so its lock keeps other runs' cleanup off it.
  Status done = check ? check(partial()) : Status::Ok();
  if (done.ok()) done = Place();
  const int closed = std::fclose(file_);
  file_ = nullptr;
  if (done.ok() && closed != 0) done = FileError("cannot close", path_);
  if (!done.ok()) {
    std::remove(partial().c_str());
    return done;
  }
  const std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  return SyncDirectory(dir.empty() ? "." : dir.string());
}

// The partial file takes its name: replacing a regular file there with overwrite; else only
// while the name is free (another writer that finished meanwhile keeps its file).
Status SafetensorsWriter::Place() {
  const std::string from = partial();
  if (overwrite_) {
    return std::rename(from.c_str(), path_.c_str()) == 0 ? Status::Ok()
                                                         : FileError("cannot rename into", path_);
  }
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, path_.c_str(), RENAME_NOREPLACE) == 0) {
    return Status::Ok();
  }
  if (errno != EINVAL && errno != ENOSYS) {
    return errno == EEXIST ? AlreadyExistsError(StrCat("'", path_, "' appeared meanwhile"))
                           : FileError("cannot rename into", path_);
  }
  // A file system without RENAME_NOREPLACE: a hard link to the name, then the partial name goes.
  if (::link(from.c_str(), path_.c_str()) != 0) {
    return errno == EEXIST ? AlreadyExistsError(StrCat("'", path_, "' appeared meanwhile"))
                           : FileError("cannot link into", path_);
  }
  ::unlink(from.c_str());
  return Status::Ok();
}

StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path) {
  auto damaged = [&](std::string_view what) {
    return DataLossError(StrCat("safetensors file '", path, "': ", what));
  };
  // Only a regular file: opening a FIFO would wait for a writer, a device never ends.
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (error) return ErrnoError(error.value(), StrCat("cannot open '", path, "'"));
  if (!std::filesystem::is_regular_file(status)) {
    return InvalidArgumentError(StrCat("'", path, "' is not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return FileError("cannot open", path);
  const uint64_t size = std::filesystem::file_size(path, error);
  uint8_t length_bytes[8];
  if (error || !in.read(reinterpret_cast<char*>(length_bytes), 8)) {
    return damaged("shorter than its header length");
  }
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t{length_bytes[i]} << (8 * i);
  if (length > size - 8 || length > kMaxHeaderBytes) {
    return damaged(StrCat("header length ", length, " beyond the file's ", size, " bytes"));
  }
  std::string json(length, '\0');
  if (!in.read(json.data(), static_cast<std::streamsize>(length))) return damaged("short header");
  // A key twice in one object would be read as its last value: refused, as JSON leaves open.
  std::vector<std::set<std::string>> keys;  // of each object being parsed
  bool repeated = false;
  nlohmann::json::parser_callback_t unique_keys = [&](int, nlohmann::json::parse_event_t event,
                                                      nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::object_start) keys.emplace_back();
    if (event == nlohmann::json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    if (event == nlohmann::json::parse_event_t::key && !keys.empty() &&
        !keys.back().insert(parsed.get<std::string>()).second) {
      repeated = true;
    }
    return true;
  };
  nlohmann::json header = nlohmann::json::parse(json, unique_keys, /*allow_exceptions=*/false);
  if (repeated) return damaged("a key appears twice in one object of the header");
  if (!header.is_object()) return damaged("the header is not a JSON object");
  SafetensorsHeader out;
  out.data_start = 8 + length;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return damaged("__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) return damaged(StrCat("metadata '", key, "' is not a string"));
        out.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    SafetensorsTensor t;
    t.name = name;
    const auto dtype = entry.find("dtype");
    const auto shape = entry.find("shape");
    const auto offsets = entry.find("data_offsets");
    if (!entry.is_object() || dtype == entry.end() || !dtype->is_string() || shape == entry.end() ||
        !shape->is_array() || offsets == entry.end() || !offsets->is_array() ||
        offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
        !(*offsets)[1].is_number_unsigned()) {
      return damaged(StrCat("tensor '", name, "' lacks a dtype, shape or data_offsets"));
    }
    t.dtype = dtype->get<std::string>();
    for (const auto& d : *shape) {
      if (!d.is_number_unsigned()) return damaged(StrCat("tensor '", name, "' shape"));
      t.shape.push_back(d.get<uint64_t>());
    }
    StatusOr<uint64_t> tensor_bytes = SafetensorsTensorBytes(t);
    if (!tensor_bytes.ok()) return damaged(tensor_bytes.status().message());
    const uint64_t bytes = *tensor_bytes;
    t.begin = (*offsets)[0].get<uint64_t>();
    t.end = (*offsets)[1].get<uint64_t>();
    if (t.end < t.begin || t.end - t.begin != bytes) {
      return damaged(StrCat("tensor '", name, "' offsets [", t.begin, ", ", t.end,
                            ") do not hold its shape's ", bytes, " bytes"));
    }
    out.tensors.push_back(std::move(t));
  }
  std::sort(out.tensors.begin(), out.tensors.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;  // empty ones first
            });
  uint64_t at = 0;
  for (const SafetensorsTensor& t : out.tensors) {
    if (t.begin != at) return damaged(StrCat("tensor '", t.name, "' leaves a gap or overlaps"));
    at = t.end;
  }
  if (at != size - out.data_start) {
    return damaged(
        StrCat("the tensors hold ", at, " bytes, the data section has ", size - out.data_start));
  }
  return out;
}

}  // namespace ecss
