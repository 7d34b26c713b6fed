// FP8 <-> float32 on simd.h vectors of any width: one source for every instruction-set level (instantiated inside a
// DSX_TARGET_* wrapper or simd::dispatch), the same arithmetic as the scalar functions of fp8_format.h, which the
// tests pin bit for bit against PyTorch.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "deepseek_ext/fp8_format.h"
#include "deepseek_ext/simd.h"

namespace deepseek_ext {
namespace fp8 {
namespace vec {

template <typename V, typename U>
DSX_INLINE V bit_cast(U u) {
  static_assert(sizeof(V) == sizeof(U));
  V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// The float values of kLanes<float, VB> FP8 codes at s. Integer bit moves for normal numbers; subnormals as
// mantissa * 2^-(bias + mantissa bits - 1), which is exact and independent of the denormals-are-zero mode.
template <Format F, int VB>
DSX_INLINE simd::Vec<float, VB> decode(const uint8_t* s) {
  using T = FormatTraits<F>;
  using VU = simd::Vec<uint32_t, VB>;
  using VF = simd::Vec<float, VB>;
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  using VB8 = simd::Vec<uint8_t, L>;
  const VU b = simd::widen4<uint32_t>(simd::load<VB8>(s));
  constexpr int kExpBits = 7 - T::kMantBits;
  constexpr uint32_t kExpMask = (1u << kExpBits) - 1, kMantMask = (1u << T::kMantBits) - 1;
  const VU sign = (b & 0x80u) << 24;
  const VU e = (b >> T::kMantBits) & kExpMask, m = b & kMantMask;
  VU normal = ((e + (127u - T::kBias)) << 23) | (m << (23 - T::kMantBits));
  if constexpr (F == Format::kE5M2) {
    normal = e == kExpMask ? (VU{} + (0xFFu << 23)) | (m << 21) : normal;  // infinities and NaNs
  } else {
    normal = (b & 0x7Fu) == 0x7Fu ? VU{} + 0x7FC00000u : normal;  // e4m3fn's only NaN
  }
  constexpr float kSubUnit = 1.0f / static_cast<float>(1u << (T::kBias + T::kMantBits - 1));
  const VF sub = __builtin_convertvector(m, VF) * kSubUnit;
  const VU mag = e == 0u ? bit_cast<VU>(sub) : normal;
  return bit_cast<VF>(mag | sign);
}

// Codes of float lanes, saturating (finite overflow and infinities to +-max, NaN to NaN), round to nearest even:
// the vector form of float_to_fp8_bits_sat. Returns one code per 32-bit lane.
template <Format F, int VB>
DSX_INLINE simd::Vec<uint32_t, VB> encode(simd::Vec<float, VB> v) {
  using T = FormatTraits<F>;
  using VU = simd::Vec<uint32_t, VB>;
  using VF = simd::Vec<float, VB>;
  constexpr int kShift = 23 - T::kMantBits;
  constexpr uint32_t kMagic = static_cast<uint32_t>(151 - T::kBias - T::kMantBits) << 23;
  constexpr uint32_t kRebias = (static_cast<uint32_t>(T::kBias - 127) << 23) + ((1u << (kShift - 1)) - 1);
  const VU bits = bit_cast<VU>(v);
  const VU sign = (bits >> 24) & 0x80u;
  const VU abs = bits & 0x7FFFFFFFu;
  const VU nan = abs > 0x7F800000u;
  constexpr uint32_t kMaxBits = std::bit_cast<uint32_t>(T::kMax);
  const VU mag = abs < kMaxBits ? abs : VU{} + kMaxBits;
  const VU sub = bit_cast<VU>(bit_cast<VF>(mag) + bit_cast<VF>(VU{} + kMagic)) - kMagic;
  const VU odd = (mag >> kShift) & 1u;
  const VU nrm = (mag + kRebias + odd) >> kShift;
  const VU out = mag < (static_cast<uint32_t>(128 - T::kBias) << 23) ? sub : nrm;  // at most 0x7E here
  return (out | (nan & 0x7Fu)) | sign;
}

// kLanes<float, VB> values of x as float lanes (float, c10::Half or c10::BFloat16 storage).
template <typename T, int VB>
DSX_INLINE simd::Vec<float, VB> load_float(const T* x) {
  using VF = simd::Vec<float, VB>;
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  if constexpr (std::is_same_v<T, float>) {
    return simd::load<VF>(x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    using VU = simd::Vec<uint32_t, VB>;
    return bit_cast<VF>(__builtin_convertvector(simd::load<simd::Vec<uint16_t, 2 * L>>(x), VU) << 16);
  } else {
    return __builtin_convertvector(simd::load<simd::Vec<_Float16, 2 * L>>(x), VF);
  }
}

// Float lanes stored as T (round to nearest even, as c10's conversions).
template <typename T, int VB>
DSX_INLINE void store_as(T* out, simd::Vec<float, VB> v) {
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  if constexpr (std::is_same_v<T, float>) {
    simd::store(out, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    simd::store(out, __builtin_convertvector(simd::bf16_bits<VB>(v), simd::Vec<uint16_t, 2 * L>));
  } else {
    simd::store(out, __builtin_convertvector(v, simd::Vec<_Float16, 2 * L>));
  }
}

}  // namespace vec
}  // namespace fp8
}  // namespace deepseek_ext
