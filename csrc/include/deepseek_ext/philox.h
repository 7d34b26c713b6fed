// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based RNG.
// The output is a pure function of (key, counter), so streams are reproducible, can be split (by rank, by
// purpose) through the counter, and can be regenerated later instead of stored. Host and device.
#pragma once

#include <cstdint>

#include "deepseek_ext/host_device.h"

namespace deepseek_ext {
namespace rng {

struct Philox4x32Out {
  uint32_t v[4];
};

DSX_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// One 32-bit word per counter position, as both backends use it; the CPU's vectorised noise generator
// (deepseek_ext/gaussian_simd.h) runs the same rounds on vectors of counters with its own Words.
struct ScalarWords {
  using U = uint32_t;
  DSX_HOST_DEVICE static void mulhilo(uint32_t m, U c, U* hi, U* lo) { mulhilo32(m, c, hi, lo); }
};

// Ten rounds of Philox4x32 on counter (c0..c3) with key (k0, k1), in place. Words::U is a 32-bit word or a vector
// of them (lanes are independent counters under one key); Words::mulhilo(m, c, &hi, &lo) splits m * c.
template <typename Words>
DSX_HOST_DEVICE_INLINE void philox4x32_10_rounds(typename Words::U& c0, typename Words::U& c1, typename Words::U& c2,
                                          typename Words::U& c3, uint32_t k0, uint32_t k1) {
  using U = typename Words::U;
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    U hi0, lo0, hi1, lo1;
    Words::mulhilo(kM0, c0, &hi0, &lo0);
    Words::mulhilo(kM1, c2, &hi1, &lo1);
    const U n0 = hi1 ^ c1 ^ k0;
    const U n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

// Ten rounds of Philox4x32 on counter (c0..c3) with key (k0, k1).
DSX_HOST_DEVICE Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                       uint32_t k1) {
  philox4x32_10_rounds<ScalarWords>(c0, c1, c2, c3, k0, k1);
  return {{c0, c1, c2, c3}};
}

// Convenience: 64-bit seed as the key, a 64-bit position and a 64-bit stream id as the counter.
DSX_HOST_DEVICE Philox4x32Out philox(uint64_t seed, uint64_t stream, uint64_t position) {
  return philox4x32_10(static_cast<uint32_t>(position), static_cast<uint32_t>(position >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform integer in [0, n) from 64 random bits (multiply-shift; bias below n / 2^64).
DSX_HOST_DEVICE uint64_t uniform_below(uint64_t bits, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * n) >> 64);
}

}  // namespace rng
}  // namespace deepseek_ext
