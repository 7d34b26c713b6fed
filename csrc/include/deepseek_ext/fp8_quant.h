// Host-side rules shared by the CPU and CUDA quantize_fp8 / dequantize_fp8 kernels: argument validation and
// the tiling every kernel follows.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "deepseek_ext/fp8_format.h"

namespace deepseek_ext {
namespace fp8 {

enum class Granularity : int { kTensor = 0, kRow = 1, kBlock = 2, kGroup = 3 };

// The input viewed as rows x cols and cut into tiles of tile_rows x tile_cols, one float32 scale per tile.
// Scales are stored row-major with shape `scale_shape`:
//   tensor: ()                      one tile holding everything (rows = 1, cols = numel)
//   row:    (rows, 1)               tiles of 1 x cols, the layout torch._scaled_mm takes for row-wise scales
//   block:  (ceil(rows/b), ceil(cols/b))   tiles of b x b; edge tiles are partial
//   group:  (rows, ceil(cols/b))           tiles of 1 x b (DeepSeek-V3's activation groups)
struct QuantLayout {
  Granularity granularity;
  int64_t rows;
  int64_t cols;
  int64_t tile_rows;
  int64_t tile_cols;
  int64_t tiles_r;
  int64_t tiles_c;
  std::vector<int64_t> scale_shape;
};

Format fp8_format(const char* op, const char* arg, at::ScalarType dtype);

// Validates x, dtype, granularity and block_size for quantize_fp8 and returns the layout and output format.
QuantLayout check_quantize_fp8(const at::Tensor& x, at::ScalarType dtype, c10::string_view granularity,
                               int64_t block_size);

// Validates the arguments of dequantize_fp8 (scale shape included) and returns the layout.
QuantLayout check_dequantize_fp8(const at::Tensor& x, const at::Tensor& scale, c10::string_view granularity,
                                 int64_t block_size, at::ScalarType out_dtype);

// fp8_matmul: out (M, N) = (a * scale_a) @ (b * scale_b) + bias, with one of three scaling modes told apart by the
// scale shapes: tensor (one scale each), row (scale_a (M, 1), scale_b (1, N)), block (scale_a (M, ceil(K/bs)) for
// 1 x bs groups of a, scale_b (ceil(K/bs), ceil(N/bs)) for bs x bs blocks of b).
enum class MatmulScaling : int { kTensor = 0, kRow = 1, kBlock = 2 };

struct MatmulPlan {
  MatmulScaling scaling;
  int64_t m, n, k, block;
  at::ScalarType out_dtype;
};

MatmulPlan check_fp8_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                            const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, int64_t block_size);

at::ScalarType quantize_dtype_or_default(std::optional<at::ScalarType> dtype);
at::ScalarType dequantize_dtype_or_default(std::optional<at::ScalarType> out_dtype);

// Calls fn with the compile-time Format matching `format`.
template <typename Fn>
decltype(auto) dispatch_format(Format format, Fn&& fn) {
  if (format == Format::kE4M3FN) {
    return fn(std::integral_constant<Format, Format::kE4M3FN>{});
  }
  return fn(std::integral_constant<Format, Format::kE5M2>{});
}

}  // namespace fp8
}  // namespace deepseek_ext
