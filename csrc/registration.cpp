// Every operator schema of the deepseek_ext library, in one place. Kernels register themselves per backend at the
// bottom of their own files: TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) in csrc/, (..., CUDA, m) in kernels/.
// Fake (meta) kernels and autograd formulas are registered from Python, in deepseek_ext/ops/.
#include <torch/library.h>

TORCH_LIBRARY(deepseek_ext, m) {
  // FP8 quantisation (deepseek_ext/ops/fp8.py documents the semantics).
  m.def("quantize_fp8(Tensor x, ScalarType? dtype=None, str granularity=\"tensor\", int block_size=128)"
        " -> (Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor x, Tensor scale, str granularity=\"tensor\", int block_size=128,"
        " ScalarType? out_dtype=None) -> Tensor");
  // (a * scale_a) @ (b * scale_b) + bias with float32 accumulation; scaling mode from the scale shapes.
  m.def("fp8_matmul(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias=None,"
        " ScalarType? out_dtype=None, int block_size=128) -> Tensor");

  // Integer quantization (deepseek_ext/ops/quant.py): weight packing and the quantized linear layer.
  m.def("quantize_weight(Tensor w, int bits, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)");
  // codes: as quantize_weight returns them, or (CPU) rearranged by pack_quantized_weight for the integer GEMM.
  m.def("quantized_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int bits, int group_size,"
        " int in_features, int act_bits, Tensor? bias=None, Tensor? act_scale=None, Tensor? code_sums=None) -> Tensor");
  // The codes rearranged for the CPU's integer GEMM and back (csrc/include/deepseek_ext/quant.h has the layout);
  // composite ATen ops, the same on every device.
  m.def("pack_quantized_weight(Tensor codes, int bits, int group_size, int in_features) -> Tensor");
  m.def("unpack_quantized_weight(Tensor packed, int bits, int group_size, int in_features, int out_features)"
        " -> Tensor");
  // The static int8 path (deepseek_ext/quant/graph.py): activations as 7-bit unsigned codes with a per-tensor scale
  // and zero point, channels last, channels padded to a multiple of 8 (csrc/include/deepseek_ext/quant.h).
  m.def("quantize_activation(Tensor x, float scale, int zero_point) -> Tensor");
  m.def("dequantize_activation(Tensor codes, float scale, int zero_point, int channels) -> Tensor");
  m.def("quantized_conv2d(Tensor x, Tensor packed, Tensor w_scale, Tensor w_sum, Tensor w_zero, Tensor? bias,"
        " int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int groups, int out_channels, int bits,"
        " float in_scale, int in_zero, float out_scale, int out_zero, bool relu=False, Tensor? residual=None,"
        " float res_scale=1.0, int res_zero=0, bool output_float=False) -> Tensor");
  m.def("quantized_depthwise_conv2d(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int[2] kernel,"
        " int[2] stride, int[2] padding, int[2] dilation, int channels, float in_scale, int in_zero, float out_scale,"
        " int out_zero, bool relu=False, bool output_float=False) -> Tensor");
  m.def("quantized_im2col(Tensor x, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int channels,"
        " int zero) -> Tensor");
  m.def("quantized_max_pool2d(Tensor x, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation,"
        " bool ceil_mode=False) -> Tensor");
  m.def("quantized_adaptive_avg_pool2d(Tensor x, int[2] output_size, float in_scale, int in_zero, float out_scale,"
        " int out_zero) -> Tensor");
  m.def("quantized_add(Tensor a, float a_scale, int a_zero, Tensor b, float b_scale, int b_zero, float out_scale,"
        " int out_zero, bool relu=False) -> Tensor");

  // Mixed precision (deepseek_ext/ops/amp.py): one pass over every gradient that unscales it in place, flags
  // non-finite values (found_inf, as torch._amp_foreach_non_finite_check_and_unscale_) and returns the L2 norm
  // of the unscaled gradients.
  m.def("unscale_check_norm_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale) -> Tensor");

  // Differential privacy (deepseek_ext/ops/privacy.py): per-sample gradient norms, and the DP-SGD reduction
  // (sum_i factors[i] * grads[i] + noise) * scale in one read of the per-sample gradients. The noise is a tensor, or
  // noise_std times Gaussian noise generated in the same pass from the Philox stream `seed` (a one-element int64 CPU
  // tensor) at positions offset + j (csrc/include/deepseek_ext/gaussian.h); gaussian_noise is that stream alone, and
  // gaussian_noise_ writes it into an existing tensor: self = (self if accumulate else 0) + std * z, times scale.
  m.def("per_sample_sq_norms(Tensor grads) -> Tensor");
  m.def("clip_sum_noise(Tensor grads, Tensor factors, Tensor? noise=None, float scale=1.0, float noise_std=0.0,"
        " Tensor? seed=None, int offset=0) -> Tensor");
  m.def("gaussian_noise(int[] size, float std, Tensor seed, int offset=0, *, ScalarType? dtype=None,"
        " Device? device=None) -> Tensor");
  m.def("gaussian_noise_(Tensor(a!) self, float std, Tensor seed, int offset=0, *, float scale=1.0,"
        " bool accumulate=False) -> ()");

  // Fused attention (deepseek_ext/ops/attention.py): flash-style forward returning the output and the per-row
  // log-sum-exp (float32) the recomputing backward reads. Dropout draws from Philox keyed by `seed` (a one-element
  // int64 CPU tensor), so the backward regenerates the mask. csrc/include/deepseek_ext/attention.h has the layout.
  m.def("fused_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0,"
        " bool is_causal=False, float scale=1.0, Tensor? seed=None) -> (Tensor, Tensor)");
  m.def("fused_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, float scale=1.0, Tensor? seed=None)"
        " -> (Tensor, Tensor, Tensor)");
  // Packed variable-length sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens_* (batch + 1,) int32/int64;
  // causal masking bottom-right aligned; max_seqlen_* < 0 means "compute from cu_seqlens".
  m.def("fused_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q=-1, int max_seqlen_k=-1, bool is_causal=False, float scale=1.0) -> (Tensor, Tensor)");
  m.def("fused_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q=-1, int max_seqlen_k=-1,"
        " bool is_causal=False, float scale=1.0) -> (Tensor, Tensor, Tensor)");
}
