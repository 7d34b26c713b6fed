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

// The requantising epilogue of quantized_conv2d. Per column c of the 64-column block (the per-column arrays start
// at the block) and row r of the tile, with the accumulator started at acc0[c] instead of 0:
//   d = acc0[c] + dot (- wzero[c] * xsum[r] when wzero is set)
//   y = float(d) * mul[c] + add[c] (+ res_mul * res[r][c])
//   codes: clamp(y, lo, hi) rounded to the nearest integer (ties to even); floats: y (max(y, 0) when relu).
// The driver folds the zero points, scales, bias and 1 / out_scale into acc0, mul, add and res_mul, and the ReLU and
// the code range into lo / hi, so that the epilogue is a handful of vector operations per 16 outputs.
struct Requant {
  const int32_t* acc0;   // per column: -(input zero point * sum of the column's weight codes)
  const int32_t* wzero;  // per column weight zero point, or null when the weights are centred (zero points 0)
  const float* mul;      // per column
  const float* add;      // per column (codes: including the output zero point)
  float res_mul;
  float lo, hi;          // codes: the range of y (relu: out_zero, else 0; 127)
  bool relu;             // float outputs
  int64_t cols;          // valid columns of the block
  int64_t col0;          // the block's first column in an output (and residual) row
};

// The rows of one tile: per row, the input pixel each kernel tap lands on and where the results go.
struct TileRows {
  const uint8_t* const* taps;   // taps[t * kConvRowStride + r]
  const int32_t* xsum;          // per row: sum of the codes the row meets minus their zero points (with wzero)
  const uint8_t* const* res;    // per row: the row of residual codes, or null
  uint8_t* const* out_codes;    // per row: the row of output codes, or null
  float* const* out_float;      // per row: the row of float outputs, or null
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
  // A packed 4-bit block rewritten in the 8-bit layout; with `zero` (64 column zero points), the codes centred:
  // code - zero[c] (signed bytes), so that the 8-bit kernels need no zero-point correction.
  void (*widen_block)(const uint8_t* wp, int64_t kp, uint8_t* out, const uint8_t* zero);
  // acc[r][c] = fma(scale[c], float(dots - zero[c] * xsum[r] - 64 * wsum[c]), acc) for a tile (quantized_linear).
  void (*accumulate_group)(int rows, const int32_t* dots, const float* scale, const int32_t* zero, const int32_t* wsum,
                           const int32_t* xsum, int64_t xsum_stride, float* acc);
  // Implicit GEMM of a convolution on a packed 8-bit block, requantised: dot[r][c] = sum over taps t of sum over
  // k < cin of rows.taps[t * kConvRowStride + r][k] * code[c][t * cin + k] (cin a multiple of 8), then q's epilogue.
  void (*conv_rows)(int rows, int64_t taps, int64_t cin, const uint8_t* wp, const TileRows& rows_of_tile,
                    const Requant& q);
};

// The GEMM kernels for this CPU and the current cap, or null (scalar code).
const IntKernels* int8_gemm_kernels();
// The GEMV kernels for a group size (their vectors must divide it), or null (scalar code).
const IntKernels* int8_gemv_kernels(int64_t group);

}  // namespace quant
}  // namespace deepseek_ext
