#include "runtime/base/checksum.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "runtime/base/checksum_paths.h"

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

// a(x)·b(x) mod P(x), with polynomials in the reflected order CRC-32C registers use (the top
// bit is x^0).
constexpr uint32_t MultiplyModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 0x80000000u; bit != 0; bit >>= 1) {
    if ((a & bit) != 0) product ^= b;
    b = (b & 1u) != 0 ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

// x^(8·2^k) mod P(x) for k = 0..63, at compile time: x^8, squared again and again.
constexpr std::array<uint32_t, 64> kZeroBytePowers = [] {
  std::array<uint32_t, 64> powers{};
  powers[0] = 0x00800000u;  // x^8
  for (size_t k = 1; k < powers.size(); ++k) powers[k] = MultiplyModP(powers[k - 1], powers[k - 1]);
  return powers;
}();

// x^(8·bytes) mod P(x): what appending `bytes` zero bytes multiplies a register by. One
// product per set bit of `bytes` (the squarings are the table's): a chunk of a power of two
// bytes, as the optimizer's checksums join, costs one.
uint32_t ShiftOperator(uint64_t bytes) {
  uint32_t result = 0x80000000u;  // 1
  for (size_t k = 0; bytes != 0; ++k, bytes >>= 1) {
    if ((bytes & 1u) != 0) result = MultiplyModP(kZeroBytePowers[k], result);
  }
  return result;
}

#if defined(__x86_64__)
constexpr size_t kLanesFromBytes = 64 * 1024;  // buffers from here on run three lanes
constexpr size_t kFoldFromBytes = 256;         // the fold below this: crc32 (see Crc32cFold)

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

// Note [Folding with carry-less multiplication]
// A register's CRC of message M is M(x)·x^32 mod P(x), M's first bit the highest power; a
// 16-byte block B followed by F bits contributes B(x)·x^F, and only its residue mod P matters.
// Loaded little-endian, B's first 8 bytes are a 64-bit integer L and its next 8 one H, bit i
// of L the coefficient of x^(127-i) in B and bit i of H that of x^(63-i): B = L·x^64 + H. So B·x^F
// ≡ L·(x^(F+64) mod P) + H·(x^F mod P), two products of 64 by 32 bits that fit in 128 (PCLMULQDQ;
// VPCLMULQDQ does four blocks at once), and adding (xor) them into the block F bits later moves B
// there without changing the CRC. In this bit order a carry-less product comes out one place
// shifted (it is x times the product), so the constants are x^(F+63) and x^(F-1), each the 32-bit
// residue in the top half of a 64-bit operand. The register's starting value is folded in as the
// first 32 bits of the message (c·x^|M| is c at the front), and the last block left, the whole
// message's stand-in, goes through two crc32 instructions from zero. Four 64-byte accumulators fold
// 256 bytes a step (F = 2048), then into one (F = 512), whose four blocks join the last (F = 384,
// 256, 128); what is left past whole blocks goes through crc32 as usual.
#define ECSS_FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

// x^bits mod P(x) as a carry-less operand: the register value in the top 32 bits.
uint64_t PowerOperand(uint64_t bits) {
  return uint64_t{MultiplyModP(ShiftOperator(bits / 8), 0x80000000u >> (bits % 8))} << 32;
}

// The operands that move a 16-byte block `distance` bits on: x^(F+63) for its first half,
// x^(F-1) for its second (Note [Folding with carry-less multiplication]); to_last moves the
// four 16-byte blocks of the last 64 bytes each its own distance to the last one's place
// (which stays).
struct FoldConstants {
  uint64_t by_2048[2], by_512[2], by_128[2], to_last[8];
  FoldConstants() {
    auto pair = [](uint64_t distance, uint64_t* out) {
      out[0] = PowerOperand(distance + 63);
      out[1] = PowerOperand(distance - 1);
    };
    pair(2048, by_2048);
    pair(512, by_512);
    pair(128, by_128);
    pair(384, to_last);
    pair(256, to_last + 2);
    pair(128, to_last + 4);
    to_last[6] = to_last[7] = 0;
  }
};

ECSS_FOLD_TARGET inline __m512i Fold(__m512i blocks, __m512i constants) {
  return _mm512_xor_si512(_mm512_clmulepi64_epi128(blocks, constants, 0x00),
                          _mm512_clmulepi64_epi128(blocks, constants, 0x11));
}

// A block's pair of operands, for each of a 512-bit register's four 16-byte blocks.
ECSS_FOLD_TARGET inline __m512i EveryBlock(const uint64_t* pair) {
  const auto first = static_cast<long long>(pair[0]), second = static_cast<long long>(pair[1]);
  return _mm512_set4_epi64(second, first, second, first);
}

// REQUIRES: bytes >= kFoldFromBytes. The register in and out, as Crc32cHardware.
ECSS_FOLD_TARGET uint32_t Crc32cFold(const uint8_t* data, size_t bytes, uint32_t crc) {
  static const FoldConstants constants;
  const __m512i by_2048 = EveryBlock(constants.by_2048);
  const __m512i by_512 = EveryBlock(constants.by_512);
  __m512i x0 = _mm512_loadu_si512(data);
  __m512i x1 = _mm512_loadu_si512(data + 64);
  __m512i x2 = _mm512_loadu_si512(data + 128);
  __m512i x3 = _mm512_loadu_si512(data + 192);
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  data += 256;
  bytes -= 256;
  for (; bytes >= 256; bytes -= 256, data += 256) {
    x0 = _mm512_xor_si512(Fold(x0, by_2048), _mm512_loadu_si512(data));
    x1 = _mm512_xor_si512(Fold(x1, by_2048), _mm512_loadu_si512(data + 64));
    x2 = _mm512_xor_si512(Fold(x2, by_2048), _mm512_loadu_si512(data + 128));
    x3 = _mm512_xor_si512(Fold(x3, by_2048), _mm512_loadu_si512(data + 192));
  }
  x1 = _mm512_xor_si512(x1, Fold(x0, by_512));
  x2 = _mm512_xor_si512(x2, Fold(x1, by_512));
  x3 = _mm512_xor_si512(x3, Fold(x2, by_512));
  for (; bytes >= 64; bytes -= 64, data += 64) {
    x3 = _mm512_xor_si512(Fold(x3, by_512), _mm512_loadu_si512(data));
  }
  // Blocks 0-2 moved to block 3's place (block 3's product is zero), and block 3 itself.
  alignas(64) __m128i blocks[2][4];
  _mm512_store_si512(blocks[0], Fold(x3, _mm512_loadu_si512(constants.to_last)));
  _mm512_store_si512(blocks[1], x3);
  __m128i last = _mm_xor_si128(_mm_xor_si128(blocks[0][0], blocks[0][1]),
                               _mm_xor_si128(blocks[0][2], blocks[1][3]));
  const __m128i by_128 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(constants.by_128));
  for (; bytes >= 16; bytes -= 16, data += 16) {
    const __m128i moved_on = _mm_xor_si128(_mm_clmulepi64_si128(last, by_128, 0x00),
                                           _mm_clmulepi64_si128(last, by_128, 0x11));
    last = _mm_xor_si128(moved_on, _mm_loadu_si128(reinterpret_cast<const __m128i*>(data)));
  }
  uint64_t register64 = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(last)));
  register64 = _mm_crc32_u64(register64, static_cast<uint64_t>(_mm_extract_epi64(last, 1)));
  return Crc32cHardware(data, bytes, static_cast<uint32_t>(register64));
}
#undef ECSS_FOLD_TARGET

bool HasSse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}

bool HasClmulFold() {
  static const bool has = HasSse42() && __builtin_cpu_supports("pclmul") &&
                          __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
  return has;
}
#endif

}  // namespace

namespace checksum_internal {

std::string_view Crc32cPathName(Crc32cPath path) {
  switch (path) {
    case Crc32cPath::kTable:
      return "table";
    case Crc32cPath::kCrc32:
      return "crc32";
    case Crc32cPath::kCrc32Lanes:
      return "crc32-lanes";
    case Crc32cPath::kClmulFold:
      return "clmul-fold";
  }
  return "?";
}

bool Crc32cPathRuns(Crc32cPath path) {
#if defined(__x86_64__)
  switch (path) {
    case Crc32cPath::kTable:
      return true;
    case Crc32cPath::kCrc32:
    case Crc32cPath::kCrc32Lanes:
      return HasSse42();
    case Crc32cPath::kClmulFold:
      return HasClmulFold();
  }
  return false;
#else
  return path == Crc32cPath::kTable;
#endif
}

uint32_t Crc32cWith(Crc32cPath path, const void* data, size_t bytes, uint32_t crc) {
  const auto* bytes_in = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  switch (path) {
    case Crc32cPath::kTable:
      break;
    case Crc32cPath::kCrc32:
      return ~Crc32cHardware(bytes_in, bytes, crc);
    case Crc32cPath::kCrc32Lanes:
      return ~Crc32cHardwareLanes(bytes_in, bytes, crc);
    case Crc32cPath::kClmulFold:  // a buffer too short to fold takes one crc32 chain
      return ~(bytes >= kFoldFromBytes ? Crc32cFold(bytes_in, bytes, crc)
                                       : Crc32cHardware(bytes_in, bytes, crc));
  }
#endif
  return ~Crc32cTable(bytes_in, bytes, crc);
}

}  // namespace checksum_internal

uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc) {
  using checksum_internal::Crc32cPath;
  Crc32cPath path = Crc32cPath::kTable;
#if defined(__x86_64__)
  if (HasClmulFold()) {
    path = Crc32cPath::kClmulFold;
  } else if (HasSse42()) {
    path = bytes >= kLanesFromBytes ? Crc32cPath::kCrc32Lanes : Crc32cPath::kCrc32;
  }
#endif
  return checksum_internal::Crc32cWith(path, data, bytes, crc);
}

// Appending B to A continues A's register through B's bytes; the CRC is linear in the
// register, and the inversions before and after cancel, so B's CRC from a zero start differs
// from the joined one by A's CRC shifted over B's length.
uint32_t Crc32cCombine(uint32_t first, uint32_t second, uint64_t second_bytes) {
  return MultiplyModP(ShiftOperator(second_bytes), first) ^ second;
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
