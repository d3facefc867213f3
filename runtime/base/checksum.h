// CRC-32C (Castagnoli): the checksum of every persisted ECSS structure (routing tables, state
// blocks, checkpoints). Uses the SSE4.2 crc32 instruction when the CPU has it (chosen once at
// run time), else a table; both give the same value. Thread-safe; never blocks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ecss {

// Extends `crc` (the value returned for the data before, or 0 to start) over `data`.
uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc = 0);

}  // namespace ecss
