#include "runtime/base/checksum.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <sstream>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ecss {

namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // reflected Castagnoli polynomial

std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) ? kPolynomial : 0u);
    table[i] = crc;
  }
  return table;
}

uint32_t Crc32cTable(const uint8_t* data, size_t bytes, uint32_t crc) {
  static const std::array<uint32_t, 256> table = MakeTable();
  for (size_t i = 0; i < bytes; ++i) crc = table[(crc ^ data[i]) & 0xffu] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(const uint8_t* data, size_t bytes,
                                                          uint32_t crc) {
  uint64_t crc64 = crc;
  while (bytes >= 8) {
    uint64_t word;
    std::memcpy(&word, data, sizeof(word));
    crc64 = _mm_crc32_u64(crc64, word);
    data += 8;
    bytes -= 8;
  }
  auto crc32 = static_cast<uint32_t>(crc64);
  while (bytes-- > 0) crc32 = _mm_crc32_u8(crc32, *data++);
  return crc32;
}

bool HasSse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#endif

}  // namespace

uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc) {
  const auto* bytes_in = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  if (HasSse42()) return ~Crc32cHardware(bytes_in, bytes, crc);
#endif
  return ~Crc32cTable(bytes_in, bytes, crc);
}

std::string SealText(std::string text) {
  char crc[16];
  std::snprintf(crc, sizeof(crc), "%08x", Crc32c(text.data(), text.size()));
  return text + "crc " + crc + "\n";
}

bool UnsealText(std::string_view sealed, std::string_view* text) {
  constexpr size_t kLine = 13;  // "crc " + 8 hex digits + "\n"
  if (sealed.size() < kLine + 1 || sealed.back() != '\n') return false;
  const size_t at = sealed.size() - kLine;
  if (sealed[at - 1] != '\n' || sealed.substr(at, 4) != "crc ") return false;
  char crc[16];
  std::snprintf(crc, sizeof(crc), "%08x", Crc32c(sealed.data(), at));
  if (sealed.substr(at + 4, 8) != crc) return false;
  *text = sealed.substr(0, at);
  return true;
}

bool SealedLines(std::string_view sealed, std::vector<SealedLine>* lines) {
  std::string_view text;
  if (!UnsealText(sealed, &text)) return false;
  std::istringstream in{std::string(text)};
  std::string line;
  std::getline(in, line);  // the magic
  while (std::getline(in, line)) {
    std::istringstream words(line);
    SealedLine split{line, {}};
    for (std::string word; words >> word;) split.fields.push_back(word);
    lines->push_back(std::move(split));
  }
  return true;
}

}  // namespace ecss
