// csrc/include/deepseek_ext/fp8_format.h against c10's own FP8 types (what `tensor.to(float8)` uses) and
// against hand-checked bit patterns.
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "deepseek_ext/fp8_format.h"

using deepseek_ext::fp8::bits_float;
using deepseek_ext::fp8::float_bits;
using deepseek_ext::fp8::float_to_fp8_bits_sat;
using deepseek_ext::fp8::fp8_bits_to_float;
using deepseek_ext::fp8::Format;
using deepseek_ext::fp8::scale_from_amax;

namespace {

uint8_t c10_e4m3fn(float f) { return c10::Float8_e4m3fn(f).x; }
uint8_t c10_e5m2(float f) { return c10::Float8_e5m2(f).x; }

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Inputs that probe every rounding decision: all 2^16 values with a zero low half (every exponent, sign, NaN
// and inf), a stride through all 2^32 patterns, and each FP8 value's neighbourhood and midpoints +-1 ulp.
template <Format F>
std::vector<float> probe_inputs() {
  std::vector<float> in;
  for (uint32_t hi = 0; hi < (1u << 16); ++hi) in.push_back(bits_float(hi << 16));
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 9973) in.push_back(bits_float(static_cast<uint32_t>(b)));
  for (int v = 0; v < 255; ++v) {
    const float lo = fp8_bits_to_float<F>(static_cast<uint8_t>(v));
    const float hi = fp8_bits_to_float<F>(static_cast<uint8_t>(v + 1));
    if (!std::isfinite(lo) || !std::isfinite(hi)) continue;
    const float mid = lo + (hi - lo) / 2;  // exact: FP8 values have few mantissa bits
    for (float f : {lo, mid, hi}) {
      for (int d = -2; d <= 2; ++d) in.push_back(bits_float(float_bits(f) + d));
    }
  }
  return in;
}

// In range (and for NaN) the saturating encoder is PyTorch's cast; beyond it, it gives +-max.
template <Format F, typename C10Cast>
void check_against_c10(C10Cast c10_cast) {
  const float max = deepseek_ext::fp8::FormatTraits<F>::kMax;
  int64_t in_range = 0;
  for (float f : probe_inputs<F>()) {
    const uint8_t ours = float_to_fp8_bits_sat<F>(f);
    if (std::isnan(f) || std::fabs(f) <= max) {
      ASSERT_EQ(ours, c10_cast(f)) << "input bits 0x" << std::hex << float_bits(f);
      ++in_range;
    } else {
      ASSERT_EQ(ours, c10_cast(std::copysign(max, f))) << "input bits 0x" << std::hex << float_bits(f);
    }
  }
  EXPECT_GT(in_range, 100000);
}

TEST(Fp8Format, EncodeE4M3FNMatchesC10) { check_against_c10<Format::kE4M3FN>(c10_e4m3fn); }

TEST(Fp8Format, EncodeE5M2MatchesC10) { check_against_c10<Format::kE5M2>(c10_e5m2); }

TEST(Fp8Format, DecodeMatchesC10ForAllCodes) {
  for (int v = 0; v < 256; ++v) {
    const auto b = static_cast<uint8_t>(v);
    const float ours4 = fp8_bits_to_float<Format::kE4M3FN>(b);
    const float theirs4 = static_cast<float>(c10::Float8_e4m3fn(b, c10::Float8_e4m3fn::from_bits()));
    const float ours5 = fp8_bits_to_float<Format::kE5M2>(b);
    const float theirs5 = static_cast<float>(c10::Float8_e5m2(b, c10::Float8_e5m2::from_bits()));
    EXPECT_EQ(std::isnan(ours4), std::isnan(theirs4)) << v;
    if (!std::isnan(theirs4)) EXPECT_EQ(float_bits(ours4), float_bits(theirs4)) << v;
    EXPECT_EQ(std::isnan(ours5), std::isnan(theirs5)) << v;
    if (!std::isnan(theirs5)) EXPECT_EQ(float_bits(ours5), float_bits(theirs5)) << v;
  }
}

TEST(Fp8Format, KnownE4M3FNPatterns) {
  constexpr auto F = Format::kE4M3FN;
  EXPECT_EQ(float_to_fp8_bits_sat<F>(0.0f), 0x00);
  EXPECT_EQ(float_to_fp8_bits_sat<F>(-0.0f), 0x80);
  EXPECT_EQ(float_to_fp8_bits_sat<F>(1.0f), 0x38);
  EXPECT_EQ(float_to_fp8_bits_sat<F>(448.0f), 0x7E);                // largest finite
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(1.0f, -9)), 0x01);   // smallest subnormal
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(1.0f, -10)), 0x00);  // half of it: tie to even (zero)
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(3.0f, -10)), 0x02);  // 1.5 steps: tie to even (2)
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(1.0f, -6)), 0x08);   // smallest normal
  EXPECT_EQ(float_to_fp8_bits_sat<F>(1.0625f), 0x38);                // tie between 1 and 1.125: even (1)
  EXPECT_EQ(float_to_fp8_bits_sat<F>(1.1875f), 0x3A);                // tie between 1.125 and 1.25: even (1.25)
  EXPECT_EQ(float_to_fp8_bits_sat<F>(-kNaN), 0xFF);                  // NaN keeps its sign
  EXPECT_EQ(float_to_fp8_bits_sat<F>(kNaN), 0x7F);
}

TEST(Fp8Format, KnownE5M2Patterns) {
  constexpr auto F = Format::kE5M2;
  EXPECT_EQ(float_to_fp8_bits_sat<F>(1.0f), 0x3C);
  EXPECT_EQ(float_to_fp8_bits_sat<F>(57344.0f), 0x7B);               // largest finite
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(1.0f, -16)), 0x01);  // smallest subnormal
  EXPECT_EQ(float_to_fp8_bits_sat<F>(std::ldexp(1.0f, -14)), 0x04);  // smallest normal
  EXPECT_EQ(float_to_fp8_bits_sat<F>(kNaN), 0x7F);
}

TEST(Fp8Format, SaturatesFiniteOverflowAndInfinityButKeepsNaN) {
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE4M3FN>(1e30f), 0x7E);
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE4M3FN>(470.0f), 0x7E);
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE4M3FN>(-kInf), 0xFE);
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE5M2>(kInf), 0x7B);
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE5M2>(61440.0f), 0x7B);  // would round up to inf without the clamp
  EXPECT_EQ(float_to_fp8_bits_sat<Format::kE5M2>(-60000.0f), 0xFB);
  EXPECT_TRUE(std::isnan(fp8_bits_to_float<Format::kE5M2>(float_to_fp8_bits_sat<Format::kE5M2>(-kNaN))));
}

TEST(Fp8Format, ScaleFromAmaxHasAFloor) {
  EXPECT_EQ(scale_from_amax<Format::kE4M3FN>(448.0f), 1.0f);
  EXPECT_EQ(scale_from_amax<Format::kE5M2>(57344.0f * 2), 2.0f);
  EXPECT_EQ(scale_from_amax<Format::kE4M3FN>(0.0f), 1e-12f / 448.0f);
  EXPECT_GT(scale_from_amax<Format::kE4M3FN>(0.0f), 0.0f);
}

}  // namespace
