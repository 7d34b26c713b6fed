// AVX2 (+F16C) path for the CPU quantize loop: the same arithmetic as float_to_fp8_bits_sat in fp8_format.h,
// eight lanes at a time, 32 results packed into one store. GCC's auto-vectoriser handles the scalar form but
// spills badly at a vectorisation factor of 32 (uint8 outputs); written out, the loop runs about twice as fast.
// Functions carry target attributes and are only called after a runtime CPU check, so the library still loads
// and runs on x86-64 machines without AVX2.
#pragma once

#include "deepseek_ext/cpu.h"

#ifdef DSX_HAVE_AVX2

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

#include "deepseek_ext/fp8_format.h"


namespace deepseek_ext {
namespace fp8 {
namespace avx2 {

DSX_AVX2_INLINE __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
DSX_AVX2_INLINE __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
DSX_AVX2_INLINE __m256 load8(const c10::BFloat16* x) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Eight float32 lanes -> eight FP8 codes, one per 32-bit lane.
template <Format F>
DSX_AVX2_INLINE __m256i encode8(__m256 v) {
  using T = FormatTraits<F>;
  constexpr int kShift = 23 - T::kMantBits;
  constexpr int kMagic = (151 - T::kBias - T::kMantBits) << 23;
  constexpr int kRebias = static_cast<int>((static_cast<uint32_t>(T::kBias - 127) << 23) + ((1u << (kShift - 1)) - 1));
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  const __m256i abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F800000));
  // Magnitudes are non-negative int32, so a signed min saturates (NaN lanes are fixed below).
  const __m256i mag = _mm256_min_epi32(abs, _mm256_set1_epi32(static_cast<int>(float_bits(T::kMax))));
  const __m256i magic = _mm256_set1_epi32(kMagic);
  const __m256i sub = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(mag), _mm256_castsi256_ps(magic))), magic);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mag, kShift), _mm256_set1_epi32(1));
  const __m256i nrm =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(kRebias)), odd), kShift);
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32((128 - T::kBias) << 23), mag);
  const __m256i out = _mm256_blendv_epi8(nrm, sub, is_sub);  // at most 0x7E here
  // NaN lanes become 0x7F (out | 0x7F == 0x7F), then every lane gets its sign.
  return _mm256_or_si256(_mm256_or_si256(out, _mm256_and_si256(nan, _mm256_set1_epi32(0x7F))), sign);
}

// q[i] = float_to_fp8_bits_sat<F>(x[i] / scale) for i < n rounded down to a multiple of 32; returns that count.
template <typename T, Format F>
DSX_AVX2_FN int64_t quantize_span(const T* x, uint8_t* q, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = encode8<F>(_mm256_div_ps(load8(x + i), s));
    const __m256i b = encode8<F>(_mm256_div_ps(load8(x + i + 8), s));
    const __m256i c = encode8<F>(_mm256_div_ps(load8(x + i + 16), s));
    const __m256i d = encode8<F>(_mm256_div_ps(load8(x + i + 24), s));
    // Lane-wise packs interleave the 128-bit halves; one permute restores element order.
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  return i;
}

}  // namespace avx2
}  // namespace fp8
}  // namespace deepseek_ext

#endif
