#include <torch/library.h>
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

std::vector<int64_t> packed_shape(int64_t n, int64_t kp, int64_t bits) {
  return {(n + kPackN - 1) / kPackN, bits == 8 ? kp / 4 : kp / 8, kPackN, 4};
}

static void check_codes(const char* op, const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features,
                        int64_t kp) {
  check_dtype(op, "codes", codes, {bits == 8 ? at::kChar : at::kByte});
  const int64_t expect_cols = bits == 8 ? kp : kp / 2;
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(1) == expect_cols, op, ": expected codes of shape [",
                    codes.dim() >= 1 ? codes.size(0) : 0, ", ", expect_cols, "] for ", bits,
                    "-bit weights with in_features=", in_features, " and group_size=", group_size, ", but got ",
                    codes.sizes());
}

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
  check_dtype(op, "scales", scales, {at::kFloat});
  check_dtype(op, "zeros", zeros, {at::kInt});
  TORCH_CHECK_VALUE(scales.dim() == 2, op, ": expected scales of shape [out_features, groups], but got ",
                    scales.sizes());
  QLinearPlan p{x.size(0), scales.size(0), in_features, padded_k(in_features, group_size), 0, 0, bits, act_bits,
                codes.dim() == 4};
  p.group = effective_group(p.kp, group_size);
  p.groups = p.kp / p.group;
  if (p.packed) {
    check_dtype(op, "codes", codes, {bits == 8 ? at::kChar : at::kByte});
    const std::vector<int64_t> want = packed_shape(p.n, p.kp, bits);
    TORCH_CHECK_VALUE(codes.sizes() == at::IntArrayRef(want), op, ": expected packed codes of shape ", want,
                      " (pack_quantized_weight for ", p.n, " outputs, in_features=", in_features, ", group_size=",
                      group_size, "), but got ", codes.sizes());
  } else {
    check_codes(op, codes, bits, group_size, in_features, p.kp);
    TORCH_CHECK_VALUE(codes.size(0) == p.n, op, ": codes have ", codes.size(0), " rows but scales ", p.n);
  }
  TORCH_CHECK_VALUE(scales.size(1) == p.groups && zeros.sizes() == scales.sizes(), op,
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
    if (check_values_of(*act_scale)) {  // a device scale only in debug mode (checks.h): reading it synchronises
      const float s = act_scale->item<float>();
      TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0f, op, ": expected a finite, positive act_scale, but got ", s);
    }
  }
  if (code_sums.has_value()) {
    check_dtype(op, "code_sums", *code_sums, {at::kInt});
    TORCH_CHECK_VALUE(code_sums->sizes() == scales.sizes(), op, ": expected code_sums of shape ", scales.sizes(),
                      ", but got ", code_sums->sizes());
  }
  return p;
}

// The packed layout of quant.h, from and to the stored layout, with ATen ops (any device; traced by torch.compile).
at::Tensor pack_quantized_weight(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features) {
  constexpr const char* op = "pack_quantized_weight";
  check_bits_group(op, bits, group_size);
  TORCH_CHECK_VALUE(in_features > 0, op, ": expected in_features to be positive, but got ", in_features);
  const int64_t kp = padded_k(in_features, group_size);
  check_codes(op, codes, bits, group_size, in_features, kp);
  const int64_t n = codes.size(0), blocks = (n + kPackN - 1) / kPackN, steps = bits == 8 ? kp / 4 : kp / 8;
  at::Tensor c = codes;
  if (bits == 4) {  // runs of 16 bytes = 32 codes (low nibbles first) -> bytes of (code 8q + t, code 8q + 4 + t)
    const at::Tensor b = codes.view({n, kp / 32, 16});
    const at::Tensor all = at::stack({b.bitwise_and(0x0F), b.bitwise_right_shift(4)}, 2).reshape({n, steps, 2, 4});
    c = all.select(2, 0).bitwise_or(all.select(2, 1).bitwise_left_shift(4));
  }
  c = at::constant_pad_nd(c.reshape({n, steps, 4}), {0, 0, 0, 0, 0, blocks * kPackN - n});
  return c.view({blocks, kPackN, steps, 4}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor unpack_quantized_weight(const at::Tensor& packed, int64_t bits, int64_t group_size, int64_t in_features,
                                   int64_t out_features) {
  constexpr const char* op = "unpack_quantized_weight";
  check_bits_group(op, bits, group_size);
  TORCH_CHECK_VALUE(in_features > 0 && out_features >= 0, op,
                    ": expected positive in_features and non-negative out_features, but got ", in_features, " and ",
                    out_features);
  const int64_t kp = padded_k(in_features, group_size), n = out_features;
  check_dtype(op, "packed", packed, {bits == 8 ? at::kChar : at::kByte});
  const std::vector<int64_t> want = packed_shape(n, kp, bits);
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(want), op, ": expected packed of shape ", want, ", but got ",
                    packed.sizes());
  const int64_t steps = want[1];
  at::Tensor c = packed.permute({0, 2, 1, 3}).reshape({want[0] * kPackN, steps, 4}).narrow(0, 0, n);
  if (bits == 8) return c.reshape({n, kp}).contiguous();
  const at::Tensor all = at::stack({c.bitwise_and(0x0F), c.bitwise_right_shift(4)}, 2).reshape({n, kp / 32, 2, 16});
  return all.select(2, 0).bitwise_or(all.select(2, 1).bitwise_left_shift(4)).reshape({n, kp / 2}).contiguous();
}

}  // namespace quant
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CompositeImplicitAutograd, m) {
  m.impl("pack_quantized_weight", &deepseek_ext::quant::pack_quantized_weight);
  m.impl("unpack_quantized_weight", &deepseek_ext::quant::unpack_quantized_weight);
}
