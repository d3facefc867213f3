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
constexpr size_t kLanesFromBytes = 64 * 1024;  // buffers from here on run three lanes

// a(x)·b(x) mod P(x), with polynomials in the reflected order CRC-32C registers use (the top
// bit is x^0).
uint32_t MultiplyModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 0x80000000u; bit != 0; bit >>= 1) {
    if ((a & bit) != 0) product ^= b;
    b = (b & 1u) != 0 ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

// x^(8·bytes) mod P(x): what appending `bytes` zero bytes multiplies a register by.
uint32_t ShiftOperator(uint64_t bytes) {
  uint32_t result = 0x80000000u;  // 1
  uint32_t power = 0x00800000u;   // x^8, then squared: x^(8·2^k)
  for (; bytes != 0; bytes >>= 1) {
    if ((bytes & 1u) != 0) result = MultiplyModP(power, result);
    power = MultiplyModP(power, power);
  }
  return result;
}

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

// Three lanes of one buffer in one loop: the crc32 instruction's latency is three times its
// issue rate, so one dependency chain leaves two thirds of the unit idle. The lanes' CRCs are
// joined by multiplying with ShiftOperator(lane): a fixed cost worth paying on large buffers.
__attribute__((target("sse4.2"))) uint32_t Crc32cHardwareLanes(const uint8_t* data, size_t bytes,
                                                               uint32_t crc) {
  const size_t lane = (bytes / 3) & ~size_t{7};
  const uint8_t* a = data;
  const uint8_t* b = data + lane;
  const uint8_t* c = data + 2 * lane;
  uint64_t ra = crc, rb = ~uint32_t{0}, rc = ~uint32_t{0};
  for (size_t i = 0; i < lane; i += 8) {
    uint64_t wa, wb, wc;
    std::memcpy(&wa, a + i, 8);
    std::memcpy(&wb, b + i, 8);
    std::memcpy(&wc, c + i, 8);
    ra = _mm_crc32_u64(ra, wa);
    rb = _mm_crc32_u64(rb, wb);
    rc = _mm_crc32_u64(rc, wc);
  }
  // Registers hold inverted CRCs (the caller inverts on the way in and out).
  const uint32_t op = ShiftOperator(lane);
  uint32_t joined = MultiplyModP(op, ~static_cast<uint32_t>(ra)) ^ ~static_cast<uint32_t>(rb);
  joined = MultiplyModP(op, joined) ^ ~static_cast<uint32_t>(rc);
  return Crc32cHardware(data + 3 * lane, bytes - 3 * lane, ~joined);
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
  if (HasSse42()) {
    return ~(bytes >= kLanesFromBytes ? Crc32cHardwareLanes(bytes_in, bytes, crc)
                                      : Crc32cHardware(bytes_in, bytes, crc));
  }
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
