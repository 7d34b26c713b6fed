// The integer kernels of the quantized layers, once per instruction set (int8_kernels.cpp includes
// int8_kernels.inc per set), reached through a table of function pointers so the drivers (qlinear_cpu.cpp,
// qconv_cpu.cpp) stay plain C++. Activation codes are unsigned bytes <= 127 (quant.h); every kernel returns exact
// integer dot products.
#pragma once

#include <cstdint>

namespace deepseek_ext {
namespace quant {

// A 4-bit or 8-bit code of a row in quantize_weight's stored layout (quant.h).
inline int64_t code_at(const uint8_t* row, int64_t k, int64_t bits) {
  if (bits == 8) return static_cast<int8_t>(row[k]);
  const int64_t chunk = k / 32, j = k % 32;
  const uint8_t b = row[16 * chunk + (j % 16)];
  return j < 16 ? (b & 0x0F) : (b >> 4);
}

inline void set_code(uint8_t* row, int64_t k, int64_t bits, int64_t code) {
  if (bits == 8) {
    row[k] = static_cast<uint8_t>(static_cast<int8_t>(code));
    return;
  }
  const int64_t chunk = k / 32, j = k % 32;
  uint8_t& b = row[16 * chunk + (j % 16)];
  b = j < 16 ? static_cast<uint8_t>((b & 0xF0) | code) : static_cast<uint8_t>((b & 0x0F) | (code << 4));
}

// Row pointers per tap in conv_rows: rows[t * kConvRowStride + r].
constexpr int kConvRowStride = 8;

// Requantisation of a tile of int32 dot products to the next layer's codes (quantized_conv2d's epilogue):
//   y = float(dot - x_zero * wsum[c] - w_zero[c] * xsum[r]) * scale[c] + bias[c]
//       (+ res_scale * (res[r][c] - res_zero)), then max(y, 0) when relu;
//   codes: clamp(round(y * inv_out) + out_zero, 0, 127) (round to nearest even); or y itself as float.
struct Requant {
  const float* scale;    // per column: input scale * weight scale
  const float* bias;     // per column (zeros when the layer has none)
  const int32_t* wsum;   // per column: sum of the weight codes
  const int32_t* wzero;  // per column: weight zero point
  int32_t x_zero;
  const int32_t* xsum;   // per row: sum of the activation codes the row met (only read when some wzero != 0)
  const uint8_t* const* res;  // per row: the residual's codes for columns [c0, c0 + 64), or null
  float res_scale;
  int32_t res_zero;
  bool relu;
  float inv_out;
  int32_t out_zero;
};

// One instruction set's integer kernels.
struct IntKernels {
  const char* name;
  int64_t mr8, mr4, chunk;
  // GEMV on the stored layout: dots[(r * 4 + c) * groups + g] for rows x[0..rows) and weight rows w[0..4).
  void (*dot_rows)(int bits, int rows, const uint8_t* const* x, const uint8_t* const* w, int64_t groups, int64_t group,
                   int32_t* dots);
  // GEMM on a packed block (64 columns) for k in [k0, k1): out[r][c], rows of x ldx bytes apart.
  void (*gemm_rows)(int bits, int rows, const uint8_t* x, int64_t ldx, const uint8_t* wp, int64_t k0, int64_t k1,
                    int32_t* out);
  // A packed 4-bit block rewritten in the 8-bit layout.
  void (*widen_block)(const uint8_t* wp, int64_t kp, uint8_t* out);
  // acc[r][c] = fma(scale[c], float(dots - zero[c] * xsum[r] - 64 * wsum[c]), acc) for a tile (quantized_linear).
  void (*accumulate_group)(int rows, const int32_t* dots, const float* scale, const int32_t* zero, const int32_t* wsum,
                           const int32_t* xsum, int64_t xsum_stride, float* acc);
  // Implicit GEMM of a convolution on a packed block: out[r][c] = sum over taps t of sum over k < cin of
  // rows[t * kConvRowStride + r][k] * code[c][t * cin + k] (cin a multiple of 8).
  void (*conv_rows)(int bits, int rows, const uint8_t* const* rows_by_tap, int64_t taps, int64_t cin,
                    const uint8_t* wp, int32_t* out);
  // The requantising epilogue of `rows` x 64 columns (cols valid): codes (out_codes[r] + column) or floats.
  void (*requant)(int rows, int64_t cols, const int32_t* dots, const Requant& q, uint8_t* const* out_codes,
                  float* const* out_float);
};

// The GEMM kernels for this CPU and the current cap, or null (scalar code).
const IntKernels* int8_gemm_kernels();
// The GEMV kernels for a group size (their vectors must divide it), or null (scalar code).
const IntKernels* int8_gemv_kernels(int64_t group);

}  // namespace quant
}  // namespace deepseek_ext
