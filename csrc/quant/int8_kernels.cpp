// The integer kernels of quantized_linear / quantized_conv2d, once per instruction set: each set defines its
// primitives (struct Ops) and includes int8_kernels.inc inside `#pragma GCC target` (see that file for the contract).
#include "int8_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "deepseek_ext/cpu.h"
#include "deepseek_ext/quant.h"
#include "deepseek_ext/simd.h"

#ifdef DSX_X86
#include <immintrin.h>
#endif

namespace deepseek_ext {
namespace quant {

// Portable code (no target attributes; SSE2 on x86-64, NEON on ARM): the GEMM and convolution kernels for the
// scalar level. 16-byte vectors; dot widens bytes to int32 and sums lanes in fours.
namespace portable {
struct Ops {
  using V = simd::Vec<int32_t, 16>;
  using B16 = simd::Vec<uint8_t, 16>;
  using S16 = simd::Vec<int8_t, 16>;
  using W = simd::Vec<int32_t, 64>;
  static constexpr int kBytes = 16, kNV = 4, kMR = 4, kMR4 = 3;
  static inline V zero() { return V{}; }
  static inline V load(const void* p) { return simd::load<V>(p); }
  static inline void store(void* p, V v) { simd::store(p, v); }
  static inline V bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return V{} + v;
  }
  static inline V dot(V acc, V u, V w) {
    B16 ub;
    S16 wb;
    std::memcpy(&ub, &u, sizeof(ub));
    std::memcpy(&wb, &w, sizeof(wb));
    const W prod = simd::widen4<int32_t>(ub) * simd::widen4<int32_t>(wb);
    return acc + __builtin_shufflevector(prod, prod, 0, 4, 8, 12) + __builtin_shufflevector(prod, prod, 1, 5, 9, 13) +
           __builtin_shufflevector(prod, prod, 2, 6, 10, 14) + __builtin_shufflevector(prod, prod, 3, 7, 11, 15);
  }
  static inline int32_t hsum(V v) { return v[0] + v[1] + v[2] + v[3]; }
  static inline V bytes(int b) { return V{} + static_cast<int32_t>(0x01010101u * static_cast<uint32_t>(b)); }
  static inline V band(V a, V b) { return a & b; }
  static inline V shr4(V v) { return V(simd::Vec<uint32_t, 16>(v) >> 4); }
  static inline V codes4(const uint8_t*) { return V{}; }  // the stored-layout GEMV is not used at this level
  static inline V load_bytes4(const uint8_t* p, int n) {
    simd::Vec<uint8_t, 4> b{};
    std::memcpy(&b, p, static_cast<size_t>(n));
    return simd::widen4<int32_t>(b);
  }
  static inline void store_bytes4(uint8_t* p, V v, int n) {
    const auto b = simd::narrow4<uint8_t>(v);
    std::memcpy(p, &b, static_cast<size_t>(n));
  }
  using F = simd::Vec<float, kBytes>;
  static inline F clamp(F v, F lo, F hi) {
    v = v > lo ? v : lo;
    return v < hi ? v : hi;
  }
  static inline void epilogue(const int32_t* d, const float* s, const int32_t* z, const int32_t* ws, int32_t xs,
                              float* acc) {
    for (int i = 0; i < 4; ++i) acc[i] = std::fmaf(s[i], static_cast<float>(d[i] - (z[i] * xs + 64 * ws[i])), acc[i]);
  }
};
#include "int8_kernels.inc"
}  // namespace portable

#ifdef DSX_X86
// ---- The integer kernels, once per instruction set (see qlinear_kernels.inc for the primitives' contract). ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2")
namespace vnni512 {
struct Ops {
  using V = __m512i;
  static constexpr int kBytes = 64, kNV = 4, kMR = 6, kMR4 = 4;
  static inline V zero() { return _mm512_setzero_si512(); }
  static inline V load(const void* p) { return _mm512_loadu_si512(p); }
  static inline void store(void* p, V v) { _mm512_storeu_si512(p, v); }
  static inline V bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm512_set1_epi32(v);
  }
  static inline V dot(V acc, V u, V w) { return _mm512_dpbusd_epi32(acc, u, w); }
  static inline int32_t hsum(V v) { return _mm512_reduce_add_epi32(v); }
  static inline V bytes(int b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  static inline V band(V a, V b) { return _mm512_and_si512(a, b); }
  static inline V shr4(V v) { return _mm512_srli_epi16(v, 4); }
  static inline V codes4(const uint8_t* p) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // 128-bit lanes lo0 lo1 hi0 hi1
    return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));              // lo0 hi0 lo1 hi1: codes in order
  }
  static inline V load_bytes4(const uint8_t* p, int n) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p));
  }
  static inline void store_bytes4(uint8_t* p, V v, int n) {
    if (n == 16) {  // a narrowing store to memory is several micro-ops on some cores; a register one is one
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
    } else {
      _mm512_mask_cvtepi32_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), v);
    }
  }
  using F = simd::Vec<float, kBytes>;
  static inline F clamp(F v, F lo, F hi) { return (F)_mm512_min_ps(_mm512_max_ps((__m512)v, (__m512)lo), (__m512)hi); }
  static inline void epilogue(const int32_t* d, const float* s, const int32_t* z, const int32_t* ws, int32_t xs,
                              float* acc) {
    const __m512i corr = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_loadu_si512(z), _mm512_set1_epi32(xs)),
                                          _mm512_slli_epi32(_mm512_loadu_si512(ws), 6));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(d), corr));
    _mm512_storeu_ps(acc, _mm512_fmadd_ps(_mm512_loadu_ps(s), f, _mm512_loadu_ps(acc)));
  }
};
#include "int8_kernels.inc"
}  // namespace vnni512

namespace vnni256 {  // AVX512-VNNI on 256-bit vectors: the GEMV when the group is not a multiple of 64
struct Ops {
  using V = __m256i;
  static constexpr int kBytes = 32, kNV = 2, kMR = 4, kMR4 = 3;
  static inline V zero() { return _mm256_setzero_si256(); }
  static inline V load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store(void* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline V bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm256_set1_epi32(v);
  }
  static inline V dot(V acc, V u, V w) { return _mm256_dpbusd_epi32(acc, u, w); }
  static inline V bytes(int b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  static inline V band(V a, V b) { return _mm256_and_si256(a, b); }
  static inline V shr4(V v) { return _mm256_srli_epi16(v, 4); }
  static inline int32_t hsum(V v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
  static inline V codes4(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    return _mm256_set_m128i(hi, lo);
  }
  static inline V load_bytes4(const uint8_t* p, int n) {
    return _mm256_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p));
  }
  static inline void store_bytes4(uint8_t* p, V v, int n) {
    _mm256_mask_cvtepi32_storeu_epi8(p, static_cast<__mmask8>((1u << n) - 1), v);
  }
  using F = simd::Vec<float, kBytes>;
  static inline F clamp(F v, F lo, F hi) { return (F)_mm256_min_ps(_mm256_max_ps((__m256)v, (__m256)lo), (__m256)hi); }
  static inline void epilogue(const int32_t* d, const float* s, const int32_t* z, const int32_t* ws, int32_t xs,
                              float* acc) {
    const __m256i corr = _mm256_add_epi32(_mm256_mullo_epi32(load(z), _mm256_set1_epi32(xs)), _mm256_slli_epi32(load(ws), 6));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(load(d), corr));
    _mm256_storeu_ps(acc, _mm256_fmadd_ps(_mm256_loadu_ps(s), f, _mm256_loadu_ps(acc)));
  }
};
#include "int8_kernels.inc"
}  // namespace vnni256
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
namespace bw512 {  // AVX-512 without VNNI (Skylake-X, Cascade Lake without it): vpmaddubsw + vpmaddwd
struct Ops {
  using V = __m512i;
  static constexpr int kBytes = 64, kNV = 4, kMR = 4, kMR4 = 3;
  static inline V zero() { return _mm512_setzero_si512(); }
  static inline V load(const void* p) { return _mm512_loadu_si512(p); }
  static inline void store(void* p, V v) { _mm512_storeu_si512(p, v); }
  static inline V bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm512_set1_epi32(v);
  }
  static inline V dot(V acc, V u, V w) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, w), _mm512_set1_epi16(1)));
  }
  static inline int32_t hsum(V v) { return _mm512_reduce_add_epi32(v); }
  static inline V bytes(int b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  static inline V band(V a, V b) { return _mm512_and_si512(a, b); }
  static inline V shr4(V v) { return _mm512_srli_epi16(v, 4); }
  static inline V codes4(const uint8_t* p) { return vnni512::Ops::codes4(p); }
  static inline V load_bytes4(const uint8_t* p, int n) { return vnni512::Ops::load_bytes4(p, n); }
  static inline void store_bytes4(uint8_t* p, V v, int n) { vnni512::Ops::store_bytes4(p, v, n); }
  using F = simd::Vec<float, kBytes>;
  static inline F clamp(F v, F lo, F hi) { return vnni512::Ops::clamp(v, lo, hi); }
  static inline void epilogue(const int32_t* d, const float* s, const int32_t* z, const int32_t* ws, int32_t xs,
                              float* acc) {
    vnni512::Ops::epilogue(d, s, z, ws, xs, acc);
  }
};
#include "int8_kernels.inc"
}  // namespace bw512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace avx2k {
struct Ops {
  using V = __m256i;
  static constexpr int kBytes = 32, kNV = 2, kMR = 4, kMR4 = 3;
  static inline V zero() { return _mm256_setzero_si256(); }
  static inline V load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store(void* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline V bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm256_set1_epi32(v);
  }
  static inline V dot(V acc, V u, V w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), _mm256_set1_epi16(1)));
  }
  static inline V bytes(int b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  static inline V band(V a, V b) { return _mm256_and_si256(a, b); }
  static inline V shr4(V v) { return _mm256_srli_epi16(v, 4); }
  static inline int32_t hsum(V v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
  static inline V codes4(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    return _mm256_set_m128i(hi, lo);
  }
  static inline V load_bytes4(const uint8_t* p, int n) {
    int64_t b = 0;
    if (n == 8) {
      std::memcpy(&b, p, 8);
    } else {
      std::memcpy(&b, p, static_cast<size_t>(n));
    }
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b));
  }
  static inline void store_bytes4(uint8_t* p, V v, int n) {  // byte 0 of each lane: bytes 0-3 and 16-19, joined
    const __m256i b = _mm256_shuffle_epi8(v, _mm256_set1_epi32(0x0C080400));
    const int64_t lo = _mm256_extract_epi32(b, 0), hi = _mm256_extract_epi32(b, 4);
    const int64_t both = (lo & 0xFFFFFFFF) | (hi << 32);
    if (n == 8) {
      std::memcpy(p, &both, 8);
    } else {
      std::memcpy(p, &both, static_cast<size_t>(n));
    }
  }
  using F = simd::Vec<float, kBytes>;
  static inline F clamp(F v, F lo, F hi) { return (F)_mm256_min_ps(_mm256_max_ps((__m256)v, (__m256)lo), (__m256)hi); }
  static inline void epilogue(const int32_t* d, const float* s, const int32_t* z, const int32_t* ws, int32_t xs,
                              float* acc) {
    const __m256i corr = _mm256_add_epi32(_mm256_mullo_epi32(load(z), _mm256_set1_epi32(xs)), _mm256_slli_epi32(load(ws), 6));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(load(d), corr));
    _mm256_storeu_ps(acc, _mm256_fmadd_ps(_mm256_loadu_ps(s), f, _mm256_loadu_ps(acc)));
  }
};
#include "int8_kernels.inc"
}  // namespace avx2k
#pragma GCC pop_options
#endif  // DSX_X86

namespace {

template <typename K>
constexpr IntKernels kernels_of(const char* name) {
  return {name,           K::kMR,           K::kMR4,          K::kChunk,      &K::dot_rows, &K::gemm_rows,
          &K::widen_block, &K::accumulate_group, &K::conv_rows};
}

constexpr IntKernels kPortable = kernels_of<portable::Kernels>("scalar");
#ifdef DSX_X86
constexpr IntKernels kVnni512 = kernels_of<vnni512::Kernels>("avx512_vnni");
constexpr IntKernels kVnni256 = kernels_of<vnni256::Kernels>("avx512_vnni (256-bit)");
constexpr IntKernels kBw512 = kernels_of<bw512::Kernels>("avx512");
constexpr IntKernels kAvx2 = kernels_of<avx2k::Kernels>("avx2");
#endif

}  // namespace

const IntKernels* int8_gemm_kernels() {
#ifdef DSX_X86
  if (cpu_has(CpuFeature::kAvx512Vnni)) return &kVnni512;
  if (cpu_isa() >= Isa::kAvx512) return &kBw512;
  if (cpu_isa() >= Isa::kAvx2) return &kAvx2;
#endif
  return &kPortable;
}

const IntKernels* int8_gemv_kernels(int64_t group) {
#ifdef DSX_X86
  const bool wide = group % 64 == 0;
  if (cpu_has(CpuFeature::kAvx512Vnni)) return wide ? &kVnni512 : &kVnni256;
  if (cpu_isa() >= Isa::kAvx512 && wide) return &kBw512;
  if (cpu_isa() >= Isa::kAvx2) return &kAvx2;
#else
  (void)group;
#endif
  return nullptr;
}

}  // namespace quant
}  // namespace deepseek_ext
