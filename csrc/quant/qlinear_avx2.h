// AVX2 inner kernels of the quantized linear layer (formats in deepseek_ext/quant.h). Called only after a runtime
// CPU check; the scalar code in qlinear_cpu.cpp computes the same integers.
#pragma once

#include "deepseek_ext/cpu.h"

#ifdef DSX_HAVE_AVX2

#include <immintrin.h>

#include <cstdint>


namespace deepseek_ext {
namespace quant {
namespace avx2 {

// 32 weight codes of chunk `c` of a row, as signed bytes.
template <int Bits>
DSX_AVX2_INLINE __m256i load_codes(const uint8_t* row, int64_t c) {
  if (Bits == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c));
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
  return _mm256_set_m128i(hi, lo);
}

DSX_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// For R activation rows of unsigned 7-bit codes (x + 64 in [1, 127], Kp each) and 4 weight rows: per group,
// dots[(r * 4 + c) * groups + g] = sum_{k in g} (x[r][k] + 64) * code[c][k] (the caller subtracts 64 * code sums).
// u8 x s8 pairs summed by vpmaddubsw stay below 2^15 (2 * 127 * 127), so nothing saturates.
template <int Bits, int R>
DSX_AVX2_FN void dot_tile_u7(const uint8_t* const* x, const uint8_t* const* w, int64_t groups, int64_t chunks_per_group,
                             int32_t* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_si256();
    for (int64_t ch = g * chunks_per_group; ch < (g + 1) * chunks_per_group; ++ch) {
      __m256i xs[R];
      for (int r = 0; r < R; ++r) xs[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + 32 * ch));
      for (int c = 0; c < 4; ++c) {
        const __m256i wc = load_codes<Bits>(w[c], ch);
        for (int r = 0; r < R; ++r) {
          acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(xs[r], wc), ones));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) dots[(r * 4 + c) * groups + g] = hsum_epi32(acc[r][c]);
  }
}

// Largest |x| of a row.
DSX_AVX2_FN inline float row_amax(const float* x, int64_t k) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = 0.0f;
  for (float v : lanes) out = out > v ? out : v;
  for (; i < k; ++i) out = out > __builtin_fabsf(x[i]) ? out : __builtin_fabsf(x[i]);
  return out;
}

// q[i] = clamp(nearbyint(x[i] / s), -63, 63) and u[i] = q[i] + 64 for i < k rounded down to 8; returns the count.
// A true division and round-to-nearest-even, as the scalar code.
DSX_AVX2_FN inline int64_t quantize_row7(const float* x, int64_t k, float s, int8_t* q, uint8_t* u) {
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-63.0f), hi = _mm256_set1_ps(63.0f);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i c = _mm256_cvtps_epi32(v);
    const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    const __m128i c8 = _mm_packs_epi16(c16, c16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), c8);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(u + i), _mm_add_epi8(c8, _mm_set1_epi8(64)));
  }
  return i;
}

// A row of 4-bit codes unpacked to one byte per code (kp codes).
DSX_AVX2_FN inline void unpack4(const uint8_t* row, int64_t kp, uint8_t* out) {
  for (int64_t c = 0; c < kp / 32; ++c) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * c), load_codes<4>(row, c));
  }
}

// One weight row decoded to float: out[k] = scale[g] * (code[k] - zero[g]) for k < kp.
template <int Bits>
DSX_AVX2_FN void decode_row(const uint8_t* w, int64_t groups, int64_t chunks_per_group, const float* scale,
                            const int32_t* zero, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scale[g]);
    const __m256 z = _mm256_set1_ps(static_cast<float>(zero[g]));
    for (int64_t ch = g * chunks_per_group; ch < (g + 1) * chunks_per_group; ++ch) {
      const __m256i codes = load_codes<Bits>(w, ch);
      const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int q = 0; q < 4; ++q) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[q]));
        _mm256_storeu_ps(out + 32 * ch + 8 * q, _mm256_mul_ps(_mm256_sub_ps(f, z), s));
      }
    }
  }
}

// Weight-only GEMV for one weight row: per group, sum_{k in g} x[k] * code[k] in float (x padded with zeros).
template <int Bits>
DSX_AVX2_FN void float_dots(const float* x, const uint8_t* w, int64_t groups, int64_t chunks_per_group, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t ch = g * chunks_per_group; ch < (g + 1) * chunks_per_group; ++ch) {
      const __m256i codes = load_codes<Bits>(w, ch);
      const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
      const float* xc = x + 32 * ch;
      // Bits == 8: codes are signed; 4: unsigned 0..15 (sign-extending is the same for those).
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(xc), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 8), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                            acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 16), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 24), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                            acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[g] = _mm_cvtss_f32(s);
  }
}

}  // namespace avx2
}  // namespace quant
}  // namespace deepseek_ext

#endif
