// Argument validation and tiling for the FP8 quantization ops (shared by the CPU and CUDA kernels).
#include "deepseek_ext/checks.h"
#include "deepseek_ext/fp8_quant.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

Granularity parse_granularity(const char* op, c10::string_view g) {
  if (g == "tensor") return Granularity::kTensor;
  if (g == "row") return Granularity::kRow;
  if (g == "block") return Granularity::kBlock;
  if (g == "group") return Granularity::kGroup;
  TORCH_CHECK_VALUE(false, op, ": expected granularity to be 'tensor', 'row', 'group' or 'block', but got '",
                    std::string(g), "'");
}

// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1 (which overflows for block sizes near 2^63).
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

const char* granularity_name(Granularity g) {
  switch (g) {
    case Granularity::kTensor: return "tensor";
    case Granularity::kRow: return "row";
    case Granularity::kGroup: return "group";
    default: return "block";
  }
}

QuantLayout make_layout(const char* op, const char* arg, const at::Tensor& x, Granularity g, int64_t block_size) {
  QuantLayout l{};
  l.granularity = g;
  if (g == Granularity::kTensor) {
    l.rows = 1;
    l.cols = x.numel();
    l.tile_rows = 1;
    l.tile_cols = std::max<int64_t>(l.cols, 1);
    l.tiles_r = 1;
    l.tiles_c = 1;
    return l;
  }
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": granularity='", granularity_name(g),
                    "' expects ", arg, " to be a 2-D tensor, but got a ", x.dim(), "-D tensor of shape ",
                    x.sizes(), " (use granularity='tensor', or reshape to 2-D first)");
  l.rows = x.size(0);
  l.cols = x.size(1);
  if (g == Granularity::kRow) {
    l.tile_rows = 1;
    l.tile_cols = std::max<int64_t>(l.cols, 1);
    l.tiles_r = l.rows;
    l.tiles_c = 1;
  } else {
    TORCH_CHECK_VALUE(block_size > 0, op, ": expected block_size to be a positive integer, but got ", block_size);
    l.tiles_r = g == Granularity::kGroup ? l.rows : ceil_div(l.rows, block_size);
    l.tiles_c = ceil_div(l.cols, block_size);
    // A tile never needs to be larger than the tensor: clamping keeps the kernels' tile arithmetic (r0 + tile_rows,
    // tiles * tile_cols) far from overflow for any block_size, and the tiling is unchanged.
    l.tile_rows = g == Granularity::kGroup ? 1 : std::min(block_size, std::max<int64_t>(l.rows, 1));
    l.tile_cols = std::min(block_size, std::max<int64_t>(l.cols, 1));
  }
  l.scale_shape = {l.tiles_r, l.tiles_c};
  return l;
}

}  // namespace

Format fp8_format(const char* op, const char* arg, at::ScalarType dtype) {
  if (dtype == at::kFloat8_e4m3fn) return Format::kE4M3FN;
  if (dtype == at::kFloat8_e5m2) return Format::kE5M2;
  TORCH_CHECK_TYPE(false, op, ": expected ", arg, " to be torch.float8_e4m3fn or torch.float8_e5m2, but got ",
                   dtype_name(dtype));
}

at::ScalarType quantize_dtype_or_default(std::optional<at::ScalarType> dtype) {
  return dtype.value_or(at::kFloat8_e4m3fn);
}

at::ScalarType dequantize_dtype_or_default(std::optional<at::ScalarType> out_dtype) {
  return out_dtype.value_or(at::kFloat);
}

QuantLayout check_quantize_fp8(const at::Tensor& x, at::ScalarType dtype, c10::string_view granularity,
                               int64_t block_size) {
  constexpr const char* op = "quantize_fp8";
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  fp8_format(op, "dtype", dtype);
  return make_layout(op, "x", x, parse_granularity(op, granularity), block_size);
}

QuantLayout check_dequantize_fp8(const at::Tensor& x, const at::Tensor& scale, c10::string_view granularity,
                                 int64_t block_size, at::ScalarType out_dtype) {
  constexpr const char* op = "dequantize_fp8";
  check_dtype(op, "x", x, {at::kFloat8_e4m3fn, at::kFloat8_e5m2});
  check_dtype(op, "scale", scale, {at::kFloat});
  check_same_device(op, "x", x, "scale", scale);
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
                   ": expected out_dtype to be ", dtype_list({at::kFloat, at::kHalf, at::kBFloat16}), ", but got ",
                   dtype_name(out_dtype));
  QuantLayout l = make_layout(op, "x", x, parse_granularity(op, granularity), block_size);
  TORCH_CHECK_VALUE(scale.sizes() == at::IntArrayRef(l.scale_shape), op, ": expected scale of shape ",
                    at::IntArrayRef(l.scale_shape), " for x of shape ", x.sizes(), " with granularity='",
                    std::string(granularity), "'",
                    (l.granularity == Granularity::kBlock || l.granularity == Granularity::kGroup) ? " and block_size=" + std::to_string(block_size)
                                                         : std::string(),
                    ", but got ", scale.sizes());
  return l;
}

MatmulPlan check_fp8_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                            const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, int64_t block_size) {
  constexpr const char* op = "fp8_matmul";
  check_dtype(op, "a", a, {at::kFloat8_e4m3fn, at::kFloat8_e5m2});
  check_dtype(op, "b", b, {at::kFloat8_e4m3fn, at::kFloat8_e5m2});
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": expected 2-D a (M, K) and b (K, N), but got shapes ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), op, ": a is ", a.sizes(), " and b is ", b.sizes(),
                    ": the inner dimensions (K) must match");
  check_dtype(op, "scale_a", scale_a, {at::kFloat});
  check_dtype(op, "scale_b", scale_b, {at::kFloat});
  check_same_device(op, "a", a, "b", b);
  check_same_device(op, "a", a, "scale_a", scale_a);
  check_same_device(op, "a", a, "scale_b", scale_b);
  TORCH_CHECK_VALUE(block_size > 0, op, ": expected block_size to be a positive integer, but got ", block_size);
  // The block never needs to exceed max(K, N) (one group per row, one block per column strip), so it is clamped
  // there: the kernels' (k + block - 1) / block stays far from overflow for any block_size.
  const int64_t block = std::min(block_size, std::max<int64_t>({a.size(1), b.size(1), 1}));
  MatmulPlan p{MatmulScaling::kTensor, a.size(0), b.size(1), a.size(1), block, out_dtype.value_or(at::kBFloat16)};
  TORCH_CHECK_TYPE(p.out_dtype == at::kFloat || p.out_dtype == at::kHalf || p.out_dtype == at::kBFloat16, op,
                   ": expected out_dtype to be ", dtype_list({at::kFloat, at::kHalf, at::kBFloat16}), ", but got ",
                   dtype_name(p.out_dtype));
  const int64_t kb = ceil_div(p.k, block), nb = ceil_div(p.n, block);
  const auto sa = scale_a.sizes(), sb = scale_b.sizes();
  if (scale_a.numel() == 1 && scale_b.numel() == 1 && scale_a.dim() <= 2 && scale_b.dim() <= 2) {
    p.scaling = MatmulScaling::kTensor;
  } else if (sa == at::IntArrayRef({p.m, 1}) && sb == at::IntArrayRef({1, p.n})) {
    p.scaling = MatmulScaling::kRow;
  } else if (sa == at::IntArrayRef({p.m, kb}) && sb == at::IntArrayRef({kb, nb})) {
    p.scaling = MatmulScaling::kBlock;
  } else {
    TORCH_CHECK_VALUE(false, op, ": scale_a and scale_b of shapes ", sa, " and ", sb, " fit no scaling mode for a ",
                      a.sizes(), " and b ", b.sizes(), "; expected one element each (per tensor), [", p.m, ", 1] and [1, ", p.n,
                      "] (per row of a / column of b), or [", p.m, ", ", kb, "] and [", kb, ", ", nb,
                      "] (1x", block_size, " groups of a, ", block_size, "x", block_size, " blocks of b)");
  }
  if (check_values_of(scale_a) && check_values_of(scale_b)) {  // on CUDA only in debug mode (checks.h)
    TORCH_CHECK_VALUE(at::isfinite(scale_a).all().item<bool>() && at::isfinite(scale_b).all().item<bool>(), op,
                      ": scale_a and scale_b must be finite (got inf or NaN)");
  }
  if (bias.has_value()) {
    check_dtype(op, "bias", *bias, {at::kFloat, at::kHalf, at::kBFloat16});
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.n, op, ": expected bias of shape [", p.n,
                      "], but got ", bias->sizes());
    check_same_device(op, "a", a, "bias", *bias);
  }
  return p;
}

}  // namespace fp8
}  // namespace deepseek_ext
