// Portable SIMD vectors (GCC/Clang vector extensions) whose width is a template parameter, so one kernel source
// serves every instruction-set level of cpu.h: instantiated inside a DSX_TARGET_AVX512 wrapper with 64-byte vectors
// it compiles to zmm code, inside a DSX_TARGET_AVX2 wrapper with 32-byte vectors to ymm code, and with 16-byte
// vectors to baseline SSE2 (or NEON) code.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "deepseek_ext/cpu.h"

namespace deepseek_ext {
namespace simd {

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
// Bytes / sizeof(T) lanes of T.
template <typename T, int Bytes>
using Vec = typename VecOf<T, Bytes>::type;

// Vector bytes used at each level.
template <Isa I>
constexpr int kBytes = I >= Isa::kAvx512 ? 64 : I == Isa::kAvx2 ? 32 : 16;

template <typename T, int Bytes>
constexpr int64_t kLanes = Bytes / sizeof(T);

template <typename V>
DSX_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
DSX_INLINE void store(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
DSX_INLINE V broadcast(decltype(V{}[0]) x) {
  return V{} + x;
}

template <typename T, int Bytes>
DSX_INLINE T reduce_add(Vec<T, Bytes> v) {
  T s = 0;
#pragma GCC unroll 16
  for (int i = 0; i < static_cast<int>(kLanes<T, Bytes>); ++i) s += v[i];
  return s;
}

template <typename T, int Bytes>
DSX_INLINE T reduce_max(Vec<T, Bytes> v, T init) {
  T s = init;
#pragma GCC unroll 16
  for (int i = 0; i < static_cast<int>(kLanes<T, Bytes>); ++i) s = s > v[i] ? s : v[i];
  return s;
}

template <typename V>
DSX_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// Byte lanes widened to 32-bit lanes, and back (truncating). In two steps through 16 bits: GCC 12 lowers a direct
// four-fold __builtin_convertvector element by element.
template <typename V>
using LaneOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename To, typename V>
DSX_INLINE auto widen4(V v) {
  using From = LaneOf<V>;
  static_assert(sizeof(From) == 1 && sizeof(To) == 4);
  using Mid = std::conditional_t<std::is_signed_v<From>, int16_t, uint16_t>;
  constexpr int N = static_cast<int>(sizeof(V));
  return __builtin_convertvector(__builtin_convertvector(v, Vec<Mid, 2 * N>), Vec<To, 4 * N>);
}

template <typename To, typename V>
DSX_INLINE auto narrow4(V v) {
  static_assert(sizeof(LaneOf<V>) == 4 && sizeof(To) == 1);
  using Mid = std::conditional_t<std::is_signed_v<To>, int16_t, uint16_t>;
  constexpr int Bytes = static_cast<int>(sizeof(V));
  return __builtin_convertvector(__builtin_convertvector(v, Vec<Mid, Bytes / 2>), Vec<To, Bytes / 4>);
}

namespace detail {
template <int Bytes, int... I>
DSX_INLINE Vec<uint32_t, Bytes> repeat_words(Vec<uint32_t, Bytes> w, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(w, w, (I / 4)...);
}
template <int Bytes, int... I>
DSX_INLINE Vec<uint32_t, Bytes> byte_shifts(std::integer_sequence<int, I...>) {
  return Vec<uint32_t, Bytes>{static_cast<uint32_t>(I % 4 * 8)...};
}
}  // namespace detail

// Bytes to 32-bit lanes without a converting widen (GCC 12 lowers widen4 piece by piece on 64-byte vectors): the
// Bytes / 4 bytes at p as 4-byte words, word i / 4 in lane i, so that shifting lane i right by byte_shifts()[i]
// brings byte i to its bottom. One load and one permute. Reads a whole vector at p when that stays before `end`,
// otherwise only the Bytes / 4 bytes it uses.
template <int Bytes>
DSX_INLINE Vec<uint32_t, Bytes> spread_words(const uint8_t* p, const uint8_t* end) {
  using VU = Vec<uint32_t, Bytes>;
  VU w{};
  if (end - p >= Bytes) {
    w = load<VU>(p);
  } else {
    std::memcpy(&w, p, Bytes / 4);
  }
  return detail::repeat_words<Bytes>(w, std::make_integer_sequence<int, Bytes / 4>{});
}

// {0, 8, 16, 24, 0, 8, ...}: the shift that brings byte i of spread_words' result to the bottom of lane i.
template <int Bytes>
DSX_INLINE Vec<uint32_t, Bytes> byte_shifts() {
  return detail::byte_shifts<Bytes>(std::make_integer_sequence<int, Bytes / 4>{});
}

// 2^t for float lanes, with arguments below -125 (and -inf) giving exactly 0. k = round(t) (to nearest even, by
// adding and subtracting 1.5 * 2^23, whose bits then also hold k), f = t - k in [-1/2, 1/2]; 2^f by a degree-6
// polynomial (relative error < 2e-7), 2^k added to the exponent bits.
template <int Bytes>
DSX_INLINE Vec<float, Bytes> exp2(Vec<float, Bytes> t) {
  using VF = Vec<float, Bytes>;
  using VI = Vec<int32_t, Bytes>;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const VI dead = t < -125.0f;
  t = dead ? VF{} - 125.0f : t;
  const VF shifted = t + kMagic;
  VI k;
  std::memcpy(&k, &shifted, sizeof(k));
  k -= 0x4B400000;  // the bits of kMagic: what remains is round(t)
  const VF f = t - (shifted - kMagic);
  VF p = f * 1.5403530393381606e-4f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  VI bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += k << 23;
  VF r;
  std::memcpy(&r, &bits, sizeof(r));
  return dead ? VF{} : r;
}

// float -> bfloat16 bits, round to nearest even (NaN stays NaN), as c10::BFloat16's conversion.
template <int Bytes>
DSX_INLINE Vec<uint32_t, Bytes> bf16_bits(Vec<float, Bytes> x) {
  using VU = Vec<uint32_t, Bytes>;
  VU u;
  std::memcpy(&u, &x, sizeof(u));
  const VU nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const VU rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return nan ? VU{} + 0x7FC0u : rounded;
}

// Runs body(std::integral_constant<int, Bytes>) compiled for the current level (cpu_isa()), with Bytes that
// level's vector width. The body must be a lambda marked DSX_LAMBDA_INLINE so it is inlined into, and compiled with
// the target of, one of the wrappers below; loops in it are vectorised for that level. Use it inside
// at::parallel_for's lambda, never around it.
#define DSX_LAMBDA_INLINE __attribute__((always_inline))

template <typename F>
decltype(auto) run_baseline(F&& body) {
  return body(std::integral_constant<int, kBytes<Isa::kScalar>>{});
}
#ifdef DSX_X86
template <typename F>
DSX_TARGET_AVX2 decltype(auto) run_avx2(F&& body) {
  return body(std::integral_constant<int, kBytes<Isa::kAvx2>>{});
}
template <typename F>
DSX_TARGET_AVX512 decltype(auto) run_avx512(F&& body) {
  return body(std::integral_constant<int, kBytes<Isa::kAvx512>>{});
}
#endif

template <typename F>
DSX_INLINE decltype(auto) dispatch(F&& body) {
#ifdef DSX_X86
  const Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512) return run_avx512(std::forward<F>(body));
  if (isa >= Isa::kAvx2) return run_avx2(std::forward<F>(body));
#endif
  return run_baseline(std::forward<F>(body));
}

}  // namespace simd
}  // namespace deepseek_ext
