// Integer weight quantization: the packed format shared by the CPU and CUDA kernels, and argument validation.
//
// A weight (N, K) is cut into groups of `group` consecutive input features per output row (group = the padded K for
// per-channel scales). K is padded to Kp, a multiple of the group (and of 32); padding codes equal the group's zero
// point, so they contribute nothing. Per (row, group): a float32 scale and an int32 zero point z in code units:
//   w[n, k] ~= scale[n, g] * (code[n, k] - z[n, g])
//   8 bits: int8 codes in [-127, 127] (never -128), stored (N, Kp); symmetric: z = 0.
//   4 bits: unsigned codes 0..15 (symmetric: z = 8), two per byte, stored (N, Kp / 2): in every 16-byte run, byte
//           j holds code[32 i + j] in its low nibble and code[32 i + 16 + j] in its high nibble, so one 16-byte load
//           unpacks into 32 codes in order.
// Activations with act_bits = 8 are quantised symmetrically to 7-bit codes in [-63, 63] (the reduce_range fbgemm
// uses on AVX2), per row (dynamic) or per tensor (static, from calibration). The AVX2 kernel shifts them to unsigned
// [1, 127] for vpmaddubsw, whose u8 x s8 pair sums then cannot saturate, and undoes the shift with the per-group
// sums of the weight codes: pass them as code_sums (N, G) int32, computed once per weight, or the kernel computes
// them on every call.
// For the CPU's integer GEMM, pack_quantized_weight rearranges the codes once (quantized_linear takes them in either
// layout; with stored-layout codes the CPU kernel rearranges them per call from 4 rows on): blocks of kPackN = 64
// output columns, and per block steps of 4 bytes per column, the operand layout of the u8 x s8 multiply-add
// instructions (vpdpbusd / vpmaddubsw):
//   8 bits: int8 (ceil(N / 64), Kp / 4, 64, 4), byte t of step q of column c = code[64 b + c][4 q + t]
//   4 bits: uint8 (ceil(N / 64), Kp / 8, 64, 4), byte t = code[.][8 q + t] | code[.][8 q + 4 + t] << 4
// Columns past N are zero. The layout is the same for every instruction set.
// Static int8 activations (quantize_activation, quantized_conv2d, ...): unsigned 7-bit codes u in [0, 127] with a
// per-tensor scale s and zero point z, value = s * (u - z) (z = 0 after a ReLU, 64 for signed tensors), stored
// channels last (N, H, W, Cp) or (N, Cp) with Cp the channels rounded up to a multiple of 8 (padding codes = z).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace deepseek_ext {
namespace quant {

constexpr int64_t kKAlign = 32;
constexpr int64_t kPackN = 64;

// Shape of pack_quantized_weight's result for n output rows, padded k and bits.
std::vector<int64_t> packed_shape(int64_t n, int64_t kp, int64_t bits);

struct QLinearPlan {
  int64_t m, n, k, kp, group, groups, bits, act_bits;
  bool packed;  // codes in pack_quantized_weight's layout
};

int64_t padded_k(int64_t k, int64_t group_size);
int64_t effective_group(int64_t kp, int64_t group_size);

void check_quantize_weight(const at::Tensor& w, int64_t bits, int64_t group_size);
QLinearPlan check_quantized_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features,
                                   int64_t act_bits, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& act_scale,
                                   const std::optional<at::Tensor>& code_sums);
at::Tensor pack_quantized_weight(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features);
at::Tensor unpack_quantized_weight(const at::Tensor& packed, int64_t bits, int64_t group_size, int64_t in_features,
                                   int64_t out_features);

}  // namespace quant
}  // namespace deepseek_ext
