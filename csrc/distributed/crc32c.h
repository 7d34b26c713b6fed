// CRC32C (Castagnoli) for checkpoint checksums: SSE4.2's crc32 instruction eight bytes at a time where the CPU has
// it (checked at run time), a slicing table otherwise. Plain C++ (no torch), tested with GoogleTest.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepseek_ext {
namespace distributed {

// Continues a CRC: crc32c(data, n, 0) for a fresh one; crc32c(b, nb, crc32c(a, na, 0)) == crc32c(a + b).
uint32_t crc32c(const void* data, size_t n, uint32_t crc);

}  // namespace distributed
}  // namespace deepseek_ext
