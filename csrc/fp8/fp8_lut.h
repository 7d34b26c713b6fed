// 256-entry FP8 -> float32 decode tables for the CPU kernels (a gather is cheaper than decoding bits on the CPU).
#pragma once

#include <array>

#include "deepseek_ext/fp8_format.h"

namespace deepseek_ext {
namespace fp8 {

template <Format F>
const float* decode_table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int v = 0; v < 256; ++v) t[v] = fp8_bits_to_float<F>(static_cast<uint8_t>(v));
    return t;
  }();
  return table.data();
}

inline const float* decode_table(Format f) {
  return f == Format::kE4M3FN ? decode_table<Format::kE4M3FN>() : decode_table<Format::kE5M2>();
}

}  // namespace fp8
}  // namespace deepseek_ext
