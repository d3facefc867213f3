// CRC-32C (Castagnoli): the checksum of every persisted ECSS structure (routing tables, state
// blocks, checkpoints). What the CPU offers decides how (once per process), and each call's
// size (checksum_paths.h names the ways): with AVX-512 and VPCLMULQDQ enabled by the OS,
// carry-less multiplication folds buffers from 256 bytes on; else SSE4.2's crc32 instruction,
// in three interleaved lanes from 64 KiB on; else a table. All give the same value.
// Thread-safe; never blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ecss {

// Extends `crc` (the value returned for the data before, or 0 to start) over `data`.
uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc = 0);
// The CRC of A followed by B, from A's CRC (`first`), B's (`second`, started from 0) and B's
// length: so parts checksummed apart, on several threads, give their whole's.
uint32_t Crc32cCombine(uint32_t first, uint32_t second, uint64_t second_bytes);

// Text sealed with its checksum (the expert store's and checkpoints' manifests): `text` (ending
// in a newline), then a last line "crc <8 hex digits>" of every byte before it.
std::string SealText(std::string text);
// The text before the crc line; false when the last line is not "crc" and the text's checksum
// (a damaged or truncated file, or anything after the line).
bool UnsealText(std::string_view sealed, std::string_view* text);
// The lines of an unsealed text after its first (a file's magic), each split at whitespace
// (fields[0] is the key; none for a blank line); false as UnsealText.
struct SealedLine {
  std::string text;
  std::vector<std::string> fields;
};
bool SealedLines(std::string_view sealed, std::vector<SealedLine>* lines);

}  // namespace ecss
