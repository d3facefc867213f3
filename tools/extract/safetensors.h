// safetensors files (the format of Hugging Face's safetensors library, which PyTorch and
// Hugging Face tooling read): an 8-byte little-endian header length N, N bytes of JSON
//   {"NAME": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}
// (padded with spaces to a multiple of 8 bytes), then the tensors' raw little-endian bytes,
// each at [begin, end) of that data, contiguous and in the order written, covering it all.
//
// SafetensorsWriter streams: the tensors are declared first (so the header is known), then
// each one's bytes are appended in that order, so a file larger than memory is written with
// one tensor's worth (or less) at a time. It writes a partial file and renames it over PATH once
// every byte is written, synced and (optionally) checked: PATH is never half-written, and a
// failed or abandoned write removes the partial file (PATH.partial-PID: two writers of one
// PATH never share one; a process killed mid-write leaves its own behind).
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/status.h"

namespace ecss {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;  // "F32", "BF16", "I32", "I64", ... (the format's names)
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;  // in the data section
};

// The bytes a tensor's data takes: InvalidArgument for a dtype that is not one of the
// format's, or a shape whose size overflows 64 bits.
StatusOr<uint64_t> SafetensorsTensorBytes(const SafetensorsTensor& tensor);

class SafetensorsWriter {
 public:
  // Declares every tensor, in file order, and opens the partial file. AlreadyExists when PATH
  // exists and not `overwrite`, or is anything but a regular file (a directory, a device), or
  // (without `overwrite`) when it appeared meanwhile: Finish never replaces it then.
  // InvalidArgument for an empty, repeated or "__metadata__" name or an unknown dtype.
  static StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<SafetensorsTensor> tensors,
      const std::map<std::string, std::string>& metadata, bool overwrite);
  ~SafetensorsWriter();  // without Finish: removes the partial file
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The next bytes of the tensors, in order (a tensor may come in several pieces).
  // FailedPrecondition past the declared data; the write's error names the file.
  Status Append(const void* data, uint64_t bytes);
  // Checks that every declared byte came, syncs, runs `check` on the synced partial file
  // (its path; a failure removes it and is returned), and renames it into place.
  Status Finish(const std::function<Status(const std::string& partial)>& check = {});
  uint64_t file_bytes() const { return header_bytes_ + data_bytes_; }

 private:
  SafetensorsWriter(std::string path, std::FILE* file, uint64_t header_bytes, uint64_t data_bytes,
                    bool overwrite)
      : path_(std::move(path)),
        file_(file),
        header_bytes_(header_bytes),
        data_bytes_(data_bytes),
        overwrite_(overwrite) {}
  std::string partial() const;
  Status Place();

  const std::string path_;
  std::FILE* file_;
  const uint64_t header_bytes_;  // the length field and the JSON
  const uint64_t data_bytes_;
  const bool overwrite_;
  uint64_t written_ = 0;  // of the data
};

// A safetensors file's header, checked as the format requires (a header length within the
// file, JSON of the shape above, known dtypes, offsets that match each shape and cover the
// data exactly without overlap): DataLoss naming the file and what is wrong.
struct SafetensorsHeader {
  std::vector<SafetensorsTensor> tensors;  // by begin offset
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // file offset of the data section
};
StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path);

}  // namespace ecss
