// The Gaussian noise stream of deepseek_ext/gaussian.h on simd.h vectors of any width: Philox's rounds and the
// Box-Muller arithmetic run on vectors of consecutive counters, one source for every instruction-set level (call
// gaussian_fill inside simd::dispatch). A tile's 16 blocks are one vector (512-bit), two (256-bit) or four (128-bit).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "deepseek_ext/gaussian.h"
#include "deepseek_ext/simd.h"

namespace deepseek_ext {
namespace privacy {

// a / b and sqrt(x) for Box-Muller. On 512-bit lanes, the 14-bit estimates vrcp14ps / vrsqrt14ps refined by one
// Newton step (relative error near 2^-27, inside the stream's few-ulp tolerance) instead of vdivps / vsqrtps, whose
// latency stalled every tile; narrower levels divide and take roots exactly.
template <int Bytes>
DSX_INLINE simd::Vec<float, Bytes> lane_div(simd::Vec<float, Bytes> a, simd::Vec<float, Bytes> b) {
  return a / b;
}
template <int Bytes>
DSX_INLINE simd::Vec<float, Bytes> lane_sqrt(simd::Vec<float, Bytes> x) {
  return simd::sqrt(x);
}
#ifdef DSX_X86
template <>
DSX_TARGET_AVX512 inline simd::Vec<float, 64> lane_div<64>(simd::Vec<float, 64> a, simd::Vec<float, 64> b) {
  using F = simd::Vec<float, 64>;
  const F r = (F)_mm512_rcp14_ps((__m512)b);
  const F e = 1.0f - b * r;  // the estimate's relative error, below 2^-14
  return a * (r + r * e);
}
template <>
DSX_TARGET_AVX512 inline simd::Vec<float, 64> lane_sqrt<64>(simd::Vec<float, 64> x) {
  using F = simd::Vec<float, 64>;
  const F y = (F)_mm512_rsqrt14_ps((__m512)x);  // x > 0 here: -2 ln u with u < 1
  const F s = x * y;
  return s * (1.5f - 0.5f * s * y);  // x y (3 - x y^2) / 2: one Newton step on 1 / sqrt(x)
}
#endif

template <int Bytes>
struct SimdLanes {
  using U = simd::Vec<uint32_t, Bytes>;
  using I = simd::Vec<int32_t, Bytes>;
  using F = simd::Vec<float, Bytes>;
  using U64 = simd::Vec<uint64_t, Bytes>;
  static constexpr int kWidth = Bytes / 4;

  // hi:lo = m * c in every lane: the even lanes' products from one pmuludq, the odd lanes' from another.
  static DSX_INLINE void mulhilo(uint32_t m, U c, U* hi, U* lo) {
    const U64 c64 = rng::bit_cast<U64>(c);
    const U64 mm = U64{} + m;
    const U64 even = simd::mul_even_u32(c64, mm);
    const U64 odd = simd::mul_even_u32(c64 >> 32, mm);
    *hi = rng::bit_cast<U>((even >> 32) | (odd & 0xFFFFFFFF00000000ull));
    *lo = c * m;
  }
  static DSX_INLINE F to_float(I x) { return __builtin_convertvector(x, F); }
  static DSX_INLINE F sqrt(F x) { return lane_sqrt<Bytes>(x); }
  static DSX_INLINE F div(F a, F b) { return lane_div<Bytes>(a, b); }
};

// std times the 64 normals of tile `tile` of stream `seed`, at out[0..64).
template <int Bytes>
DSX_INLINE void gaussian_tile(uint64_t seed, uint64_t tile, float std, float* out) {
  using L = SimdLanes<Bytes>;
  constexpr int W = L::kWidth;
  typename L::U lane;
  for (int l = 0; l < W; ++l) lane[l] = static_cast<uint32_t>(l);
  const uint64_t block = tile * rng::kGaussianTileBlocks;  // a tile's 16 counters share their high word
  const typename L::U hi = typename L::U{} + static_cast<uint32_t>(block >> 32);
#pragma GCC unroll 4
  for (int s = 0; s < rng::kGaussianTileBlocks / W; ++s) {
    typename L::F z[4];
    rng::gaussian_block<L>(seed, lane + (static_cast<uint32_t>(block) + s * W), hi, z);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) simd::store(out + rng::gaussian_position(s * W, k), z[k] * std);
  }
}

// out[p] = std * normal(offset + p) of stream `seed`, for p in [0, len): whole tiles straight into out, the partial
// tiles at either end through a buffer.
template <int Bytes>
DSX_INLINE void gaussian_fill(float* out, int64_t len, uint64_t seed, uint64_t offset, float std) {
  constexpr int64_t T = rng::kGaussianTile;
  uint64_t q = offset;
  const uint64_t end = offset + static_cast<uint64_t>(len);
  while (q < end) {
    const uint64_t tile = q / T, start = tile * T;
    if (q == start && end - q >= static_cast<uint64_t>(T)) {
      for (; end - q >= static_cast<uint64_t>(T); q += T) gaussian_tile<Bytes>(seed, q / T, std, out + (q - offset));
    } else {
      float buf[T];
      gaussian_tile<Bytes>(seed, tile, std, buf);
      const uint64_t stop = std::min<uint64_t>(end, start + T);
      std::memcpy(out + (q - offset), buf + (q - start), (stop - q) * sizeof(float));
      q = stop;
    }
  }
}

}  // namespace privacy
}  // namespace deepseek_ext
