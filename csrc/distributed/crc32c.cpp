#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
#define DSX_HAVE_SSE42_CRC 1
#endif

namespace deepseek_ext {
namespace distributed {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

const std::array<uint32_t, 256>& table() {
  static const auto t = [] {
    std::array<uint32_t, 256> out{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      out[i] = c;
    }
    return out;
  }();
  return t;
}

uint32_t crc_portable(const uint8_t* p, size_t n, uint32_t crc) {
  const auto& t = table();
  for (size_t i = 0; i < n; ++i) crc = (crc >> 8) ^ t[(crc ^ p[i]) & 0xFFu];
  return crc;
}

#ifdef DSX_HAVE_SSE42_CRC
__attribute__((target("sse4.2"))) uint32_t crc_sse42(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return c32;
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#ifdef DSX_HAVE_SSE42_CRC
  static const bool hw = __builtin_cpu_supports("sse4.2");
  if (hw) return ~crc_sse42(p, n, crc);
#endif
  return ~crc_portable(p, n, crc);
}

}  // namespace distributed
}  // namespace deepseek_ext
