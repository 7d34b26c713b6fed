// Bit-exact float32 <-> FP8 conversions shared by the CPU kernels (csrc/) and the CUDA kernels (kernels/).
//
// Encoding follows the OCP FP8 formats as PyTorch implements them:
//   e4m3fn: bias 7, 3 mantissa bits, no infinities, NaN = S.1111.111, max 448.
//   e5m2:   bias 15, 2 mantissa bits, IEEE-like infinities and NaNs, max 57344.
// Rounding is round-to-nearest-even, as PyTorch's own `.to(float8)`. The encoder saturates: finite overflow and
// +-inf become +-max, NaN stays NaN; that is `x.clamp(-max, max).to(float8)` in PyTorch, whatever a given PyTorch
// release does with out-of-range values in a bare `.to()` (e4m3fn overflow gave NaN before 2.13, 448 since).
//
// Every function here is branch-free on the value so that the CPU loops vectorise; the GoogleTest suite
// (tests/cpp/test_fp8_format.cpp) pins them against c10::Float8_e4m3fn / c10::Float8_e5m2.
#pragma once

#include <cstdint>
#include <cstring>

#include "deepseek_ext/host_device.h"

namespace deepseek_ext {
namespace fp8 {

enum class Format : int { kE4M3FN = 0, kE5M2 = 1 };

template <Format F>
struct FormatTraits;

template <>
struct FormatTraits<Format::kE4M3FN> {
  static constexpr int kMantBits = 3;
  static constexpr int kBias = 7;
  static constexpr float kMax = 448.0f;
};

template <>
struct FormatTraits<Format::kE5M2> {
  static constexpr int kMantBits = 2;
  static constexpr int kBias = 15;
  static constexpr float kMax = 57344.0f;
};

DSX_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DSX_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Exact IEEE addition in round-to-nearest; on the device it must not be fused or reassociated.
DSX_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// float32 -> FP8 bit pattern: clamp to [-max, max] (NaN passes through), then round to nearest even.
// Equal to `x.clamp(-max, max).to(float8)` in PyTorch. Branch-free integer work on the bits, so the CPU loops
// vectorise without floating-point selects.
template <Format F>
DSX_HOST_DEVICE uint8_t float_to_fp8_bits_sat(float f) {
  using T = FormatTraits<F>;
  constexpr int kShift = 23 - T::kMantBits;
  // Smallest normal 2^(1-bias); below it the value is encoded as a subnormal.
  constexpr uint32_t kMinNormalBits = static_cast<uint32_t>(128 - T::kBias) << 23;
  // A float whose ulp equals the format's subnormal step 2^(1-bias-mant): adding it lets the FPU round.
  constexpr uint32_t kDenormMagicBits = static_cast<uint32_t>(151 - T::kBias - T::kMantBits) << 23;
  // Re-bias the exponent and add the rounding increment (half an fp8 ulp minus one float ulp).
  constexpr uint32_t kRebias =
      (static_cast<uint32_t>(T::kBias - 127) << 23) + ((UINT32_C(1) << (kShift - 1)) - 1);
  constexpr uint32_t kInfBits = 0x7F800000u;
  const uint32_t max_bits = float_bits(T::kMax);

  const uint32_t bits = float_bits(f);
  const uint32_t sign = (bits >> 24) & 0x80u;
  uint32_t mag = bits & 0x7FFFFFFFu;
  const bool nan = mag > kInfBits;
  mag = (mag > max_bits) & !nan ? max_bits : mag;  // saturate finite overflow and inf

  const uint32_t sub = float_bits(add_rn(bits_float(mag), bits_float(kDenormMagicBits))) - kDenormMagicBits;
  const uint32_t nrm = (mag + kRebias + ((mag >> kShift) & 1u)) >> kShift;
  uint32_t out = mag < kMinNormalBits ? sub : nrm;
  out = nan ? 0x7Fu : out;  // the NaN code of both formats (e4m3fn's only one)
  return static_cast<uint8_t>(out | sign);
}

// FP8 bit pattern -> float32 (exact: every FP8 value is representable).
template <Format F>
DSX_HOST_DEVICE float fp8_bits_to_float(uint8_t v) {
  using T = FormatTraits<F>;
  constexpr int kExpBits = 7 - T::kMantBits;
  constexpr uint32_t kExpMask = (1u << kExpBits) - 1u;
  constexpr uint32_t kMantMask = (1u << T::kMantBits) - 1u;

  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exp = (v >> T::kMantBits) & kExpMask;
  const uint32_t mant = v & kMantMask;

  uint32_t mag;
  if (exp == 0) {
    // Subnormal: mant * 2^(1 - bias - mant_bits), exact in float32.
    const float sub = static_cast<float>(mant) *
                      bits_float(static_cast<uint32_t>(128 - T::kBias - T::kMantBits) << 23);
    mag = float_bits(sub);
  } else {
    mag = ((exp + 127u - T::kBias) << 23) | (mant << (23 - T::kMantBits));
  }
  if (F == Format::kE4M3FN) {
    if ((v & 0x7Fu) == 0x7Fu) mag = 0x7FC00000u;  // the only NaN encoding
  } else if (exp == kExpMask) {
    mag = mant == 0 ? 0x7F800000u : 0x7FC00000u;  // inf : NaN
  }
  return bits_float(sign | mag);
}

// Quantization scales are amax / max with amax floored at this value so an all-zero input does not divide by zero.
constexpr float kScaleAmaxFloor = 1e-12f;

template <Format F>
DSX_HOST_DEVICE float scale_from_amax(float amax) {
  return (amax > kScaleAmaxFloor ? amax : kScaleAmaxFloor) / FormatTraits<F>::kMax;
}

}  // namespace fp8
}  // namespace deepseek_ext
