// Gaussian noise from Philox4x32-10: the stream layout and the Box-Muller arithmetic both backends follow (the CPU
// on vectors of any width, csrc/privacy/gaussian_simd.h; CUDA one Philox block per thread, kernels/privacy/dp_ops.cu).
// The plain-PyTorch specification is deepseek_ext/reference/privacy.py.
//
// The stream (seed, offset) is an endless sequence of standard normals; value p of a call is the normal at
// position q = offset + p, so any slice of the stream can be generated alone (by any thread, any rank, any device).
// Positions come in tiles of 64. Tile t holds 16 Philox blocks: block i has the 64-bit counter 16 t + i (words
// c0 c1) in stream kGaussianStream (words c2 c3) under the 64-bit seed as key, and its words (x0, x1, x2, x3) give
//   position 64 t +      i: r0 cos(a0)      position 64 t + 16 + i: r0 sin(a0)
//   position 64 t + 32 + i: r1 cos(a1)      position 64 t + 48 + i: r1 sin(a1)
// with r = sqrt(-2 ln u), u = (floor(x_even / 2) + 1/2) / 2^31 in (0, 1), and a = 2 pi x_odd / 2^32 (Box-Muller).
// Sixteen blocks a tile let a vector of 4, 8 or 16 lanes store whole rows of a tile without shuffles; and every
// |value| is below sqrt(64 ln 2) = 6.66 (a standard normal exceeds it with probability 3e-11).
//
// The arithmetic is float32: ln by the exponent and atanh series of the mantissa, sin/cos by Taylor polynomials on
// [-pi/4, pi/4] after an exact integer reduction of the angle to a quadrant; every step is within a few float32
// ulps of the exact value, and backends or instruction sets may differ in those last bits (FMA contraction;
// AVX-512 divides and takes the root by refined estimates).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "deepseek_ext/host_device.h"
#include "deepseek_ext/philox.h"

namespace deepseek_ext {
namespace rng {

constexpr uint64_t kGaussianStream = 0x6761757373ull;  // "gauss": keeps noise apart from other users of a seed
constexpr int64_t kGaussianTile = 64;                  // positions per tile
constexpr int64_t kGaussianTileBlocks = 16;            // Philox blocks per tile

template <typename To, typename From>
DSX_HOST_DEVICE_INLINE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To t;
  std::memcpy(&t, &x, sizeof(To));
  return t;
}

// One lane per value: the CUDA kernel and the host. Lanes types provide U / I / F (uint32, int32 and float lanes),
// mulhilo (for philox4x32_10_rounds), to_float(I), sqrt(F) and div(F, F).
struct ScalarLanes : ScalarWords {
  using I = int32_t;
  using F = float;
  DSX_HOST_DEVICE static F to_float(I x) { return static_cast<float>(x); }
  DSX_HOST_DEVICE static F sqrt(F x) { return sqrtf(x); }
  DSX_HOST_DEVICE static F div(F a, F b) { return a / b; }
};

// The normal pair (r cos a, r sin a) of the words (xu, xa) (see above).
template <typename L>
DSX_HOST_DEVICE_INLINE void box_muller(typename L::U xu, typename L::U xa, typename L::F* zc, typename L::F* zs) {
  using U = typename L::U;
  using I = typename L::I;
  using F = typename L::F;
  // -2 ln u: u = m 2^e with m in [sqrt(1/2), sqrt(2)), found by integer arithmetic on the bits (u is normal);
  // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: five terms of the series leave < 1e-9.
  const F u = L::to_float(bit_cast<I>(xu >> 1)) * 4.656612873077392578125e-10f + 2.3283064365386962890625e-10f;
  const U ub = bit_cast<U>(u);
  const I e = bit_cast<I>(ub - 0x3F3504F3u) >> 23;  // 0x3F3504F3: the bits of sqrt(1/2)
  const F m = bit_cast<F>(ub - (bit_cast<U>(e) << 23));
  const F s = L::div(m - 1.0f, m + 1.0f);
  const F s2 = s * s;
  F p = s2 * (1.0f / 9.0f) + (1.0f / 7.0f);
  p = p * s2 + (1.0f / 5.0f);
  p = p * s2 + (1.0f / 3.0f);
  p = p * s2 + 1.0f;
  const F r = L::sqrt(L::to_float(e) * -1.38629436111989061883f - 4.0f * s * p);  // -2 (e ln 2 + 2 s p)
  // a = 2 pi xa / 2^32 = q pi / 2 + b: q the nearest quadrant, b = pi f / 2^31 with f in [-2^29, 2^29) exactly.
  const U q = (xa + 0x20000000u) >> 30;
  const F b = L::to_float(bit_cast<I>(xa - (q << 30))) * 1.46291807926715968052e-9f;  // pi / 2^31
  const F b2 = b * b;
  F sn = b2 * (1.0f / 362880.0f) - (1.0f / 5040.0f);
  sn = sn * b2 + (1.0f / 120.0f);
  sn = sn * b2 - (1.0f / 6.0f);
  sn = (sn * b2 + 1.0f) * b;
  F cs = b2 * (-1.0f / 3628800.0f) + (1.0f / 40320.0f);
  cs = cs * b2 - (1.0f / 720.0f);
  cs = cs * b2 + (1.0f / 24.0f);
  cs = cs * b2 - 0.5f;
  cs = cs * b2 + 1.0f;
  // Rotate by q quarter turns: odd q swaps sin and cos; cos is negative for q in {1, 2}, sin for q in {2, 3}.
  const U swap = U{} - (q & 1u);
  const U cb = bit_cast<U>(cs), sb = bit_cast<U>(sn);
  const U cos_bits = ((cb & ~swap) | (sb & swap)) ^ (((q + 1u) & 2u) << 30);
  const U sin_bits = ((sb & ~swap) | (cb & swap)) ^ ((q & 2u) << 30);
  *zc = r * bit_cast<F>(cos_bits);
  *zs = r * bit_cast<F>(sin_bits);
}

// The four normals of Philox block `block` (counter 16 t + i: positions 64 t + i + 16 k, k = 0..3) of stream
// `seed`, for lanes of consecutive blocks: c0 holds each lane's low counter word, c1 the (common) high word.
template <typename L>
DSX_HOST_DEVICE_INLINE void gaussian_block(uint64_t seed, typename L::U c0, typename L::U c1, typename L::F z[4]) {
  typename L::U c2 = typename L::U{} + static_cast<uint32_t>(kGaussianStream);
  typename L::U c3 = typename L::U{} + static_cast<uint32_t>(kGaussianStream >> 32);
  philox4x32_10_rounds<L>(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller<L>(c0, c1, &z[0], &z[1]);
  box_muller<L>(c2, c3, &z[2], &z[3]);
}

// Position (from the tile's start) of normal k of block i of a tile.
DSX_HOST_DEVICE int64_t gaussian_position(int64_t i, int k) { return i + kGaussianTileBlocks * k; }

}  // namespace rng
}  // namespace deepseek_ext
