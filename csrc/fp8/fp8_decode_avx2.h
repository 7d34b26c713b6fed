// AVX2 + F16C decoding of FP8 to float32 for the CPU GEMM: no table gathers. Both FP8 formats are a prefix of
// IEEE half precision once shifted into place: e5m2 is exactly the high byte of a float16; e4m3fn, shifted left by
// 7, is a float16 with the exponent bias of 15 instead of 7, i.e. the value divided by 2^8 (subnormals included).
// F16C converts eight halves to floats in one instruction. Called only after a runtime CPU check.
#pragma once

#include "deepseek_ext/cpu.h"

#ifdef DSX_HAVE_AVX2

#include <immintrin.h>

#include <cstdint>

#include "deepseek_ext/fp8_format.h"

namespace deepseek_ext {
namespace fp8 {
namespace avx2 {

// d[i] = decode(s[i]) * scale for i < n rounded down to a multiple of 8; returns that count.
template <Format F>
DSX_AVX2_FN int64_t decode_span(const uint8_t* s, float* d, int64_t n, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
    __m256 f;
    if (F == Format::kE5M2) {
      f = _mm256_cvtph_ps(_mm_slli_epi16(w, 8));
    } else {
      const __m128i mag = _mm_and_si128(w, _mm_set1_epi16(0x7F));
      const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
      f = _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, _mm_slli_epi16(mag, 7))), _mm256_set1_ps(256.0f));
      // 0x7F / 0xFF are e4m3fn's NaN; as halves they would read 1.875 * 2^8.
      const __m256i nan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)));
      f = _mm256_blendv_ps(f, _mm256_set1_ps(__builtin_nanf("")), _mm256_castsi256_ps(nan));
    }
    _mm256_storeu_ps(d + i, _mm256_mul_ps(f, vscale));
  }
  return i;
}

}  // namespace avx2
}  // namespace fp8
}  // namespace deepseek_ext

#endif
