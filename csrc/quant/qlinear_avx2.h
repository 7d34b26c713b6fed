// AVX2 kernels of the weight-only quantized linear layer (formats in deepseek_ext/quant.h): codes converted to
// float in registers. Called only after a runtime CPU check.
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
