#include <cmath>

#include "deepseek_ext/checks.h"
#include "deepseek_ext/quant.h"

namespace deepseek_ext {
namespace quant {

int64_t padded_k(int64_t k, int64_t group_size) {
  const int64_t unit = group_size > 0 ? group_size : kKAlign;
  return std::max<int64_t>(unit, (k / unit + (k % unit != 0)) * unit);  // no k + unit - 1: it could overflow
}

int64_t effective_group(int64_t kp, int64_t group_size) { return group_size > 0 ? group_size : kp; }

static void check_bits_group(const char* op, int64_t bits, int64_t group_size) {
  // Largest group_size accepted: far above any useful group, and it keeps the padded sizes far from overflow.
  constexpr int64_t kMaxGroupSize = 1 << 16;
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": expected bits to be 8 or 4, but got ", bits);
  TORCH_CHECK_VALUE(group_size == 0 || (group_size > 0 && group_size % kKAlign == 0 && group_size <= kMaxGroupSize),
                    op, ": expected group_size to be 0 (per channel) or a positive multiple of 32 (32, 64, 128, ...) ",
                    "up to ", kMaxGroupSize, ", but got ", group_size);
}

void check_quantize_weight(const at::Tensor& w, int64_t bits, int64_t group_size) {
  constexpr const char* op = "quantize_weight";
  check_dtype(op, "w", w, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": expected w to be 2-D (out_features, in_features), but got shape ",
                    w.sizes());
  check_bits_group(op, bits, group_size);
}

QLinearPlan check_quantized_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features,
                                   int64_t act_bits, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& act_scale,
                                   const std::optional<at::Tensor>& code_sums) {
  constexpr const char* op = "quantized_linear";
  check_bits_group(op, bits, group_size);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": expected x to be 2-D (batch, in_features), but got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) == in_features, op, ": x has ", x.size(1), " features but the layer takes ",
                    in_features);
  TORCH_CHECK_VALUE(act_bits == 8 || act_bits == 16 || act_bits == 0, op,
                    ": expected act_bits to be 8, or 16 / 0 for weight-only, but got ", act_bits);
  QLinearPlan p{x.size(0), codes.size(0), in_features, padded_k(in_features, group_size), 0, 0, bits, act_bits};
  p.group = effective_group(p.kp, group_size);
  p.groups = p.kp / p.group;
  check_dtype(op, "codes", codes, {bits == 8 ? at::kChar : at::kByte});
  const int64_t expect_cols = bits == 8 ? p.kp : p.kp / 2;
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(1) == expect_cols, op, ": expected codes of shape [",
                    codes.size(0), ", ", expect_cols, "] for ", bits, "-bit weights with in_features=", in_features,
                    " and group_size=", group_size, ", but got ", codes.sizes());
  check_dtype(op, "scales", scales, {at::kFloat});
  check_dtype(op, "zeros", zeros, {at::kInt});
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef({p.n, p.groups}) && zeros.sizes() == scales.sizes(), op,
                    ": expected scales and zeros of shape [", p.n, ", ", p.groups, "], but got ", scales.sizes(),
                    " and ", zeros.sizes());
  for (const at::Tensor* t : {&codes, &scales, &zeros}) check_same_device(op, "x", x, "weights", *t);
  if (bias.has_value()) {
    check_dtype(op, "bias", *bias, {at::kFloat, at::kHalf, at::kBFloat16});
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.n, op, ": expected bias of shape [", p.n, "], but got ",
                      bias->sizes());
    check_same_device(op, "x", x, "bias", *bias);
  }
  if (act_scale.has_value()) {
    TORCH_CHECK_VALUE(act_bits == 8, op, ": act_scale (static activation quantization) only applies with act_bits=8");
    check_dtype(op, "act_scale", *act_scale, {at::kFloat});
    TORCH_CHECK_VALUE(act_scale->numel() == 1, op, ": expected a one-element act_scale (per-tensor static scale), ",
                      "but got shape ", act_scale->sizes());
    const float s = act_scale->item<float>();
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0f, op, ": expected a finite, positive act_scale, but got ", s);
  }
  if (code_sums.has_value()) {
    check_dtype(op, "code_sums", *code_sums, {at::kInt});
    TORCH_CHECK_VALUE(code_sums->sizes() == scales.sizes(), op, ": expected code_sums of shape ", scales.sizes(),
                      ", but got ", code_sums->sizes());
  }
  return p;
}

}  // namespace quant
}  // namespace deepseek_ext
