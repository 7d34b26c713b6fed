// CUDA path of the integer quantization ops (formats in deepseek_ext/quant.h).
//   quantize_weight: per-group ranges, codes and 4-bit packing with ATen ops on the device.
//   quantized_linear: weights decoded to the activation dtype by one kernel (4-bit codes unpacked in registers),
//   then cuBLAS; with act_bits = 8 and shapes cuBLASLt's int8 GEMM takes (M > 16, K and N multiples of 8, per-channel
//   symmetric weights), activations are quantised per row and multiplied on int8 tensor cores (at::_int_mm), with
//   the scales applied afterwards. Activation codes are 7-bit ([-63, 63]) as on the CPU, so results agree.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "deepseek_ext/quant.h"

namespace deepseek_ext {
namespace quant {
namespace {

constexpr int kThreads = 256;

// w[n, k] = scale[n, g] * (code[n, k] - zero[n, g]) for k < in_features.
template <int Bits, typename T>
__global__ void decode_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                              const int32_t* __restrict__ zeros, int64_t n, int64_t k, int64_t row_bytes,
                              int64_t groups, int64_t group, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k, c = i - r * k;
    int32_t code;
    if (Bits == 8) {
      code = static_cast<int8_t>(codes[r * row_bytes + c]);
    } else {
      const uint8_t b = codes[r * row_bytes + 16 * (c / 32) + (c % 32) % 16];
      code = (c % 32) < 16 ? (b & 0x0F) : (b >> 4);
    }
    const int64_t g = r * groups + c / group;
    out[i] = static_cast<T>(scales[g] * static_cast<float>(code - zeros[g]));
  }
}

at::Tensor decode(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, const QLinearPlan& p,
                  at::ScalarType dtype) {
  at::Tensor out = at::empty({p.n, p.k}, codes.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65535);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "quant_decode_cuda", [&] {
    const auto* cp = reinterpret_cast<const uint8_t*>(codes.const_data_ptr());
    if (p.bits == 8) {
      decode_kernel<8, scalar_t><<<blocks, kThreads, 0, stream>>>(cp, scales.const_data_ptr<float>(),
                                                                 zeros.const_data_ptr<int32_t>(), p.n, p.k,
                                                                 codes.size(1), p.groups, p.group,
                                                                 out.data_ptr<scalar_t>());
    } else {
      decode_kernel<4, scalar_t><<<blocks, kThreads, 0, stream>>>(cp, scales.const_data_ptr<float>(),
                                                                 zeros.const_data_ptr<int32_t>(), p.n, p.k,
                                                                 codes.size(1), p.groups, p.group,
                                                                 out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_weight_cuda(const at::Tensor& w, int64_t bits,
                                                                    int64_t group_size, bool symmetric) {
  check_quantize_weight(w, bits, group_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1), kp = padded_k(k, group_size), group = effective_group(kp, group_size);
  const int64_t groups = kp / group;
  // Padded positions get NaN so they take no part in the ranges, then the zero-point code.
  at::Tensor wp = at::full({n, kp}, NAN, w.options().dtype(at::kFloat));
  wp.narrow(1, 0, k).copy_(w);
  const at::Tensor g = wp.view({n, groups, group});
  const at::Tensor mn = at::nan_to_num(g, 0.0).amin(-1).clamp_max(0.0);
  const at::Tensor mx = at::nan_to_num(g, 0.0).amax(-1).clamp_min(0.0);
  const double qmax = bits == 8 ? 127.0 : 7.0;
  const int64_t lo_code = bits == 8 ? -127 : 0, hi_code = bits == 8 ? 127 : 15;
  at::Tensor scales, zeros, lo, hi;
  if (symmetric) {
    scales = at::maximum(-mn, mx).clamp_min(1e-12) / qmax;
    zeros = at::full({n, groups}, bits == 8 ? 0 : 8, w.options().dtype(at::kInt));
    lo = zeros - static_cast<int64_t>(qmax);
    hi = zeros + static_cast<int64_t>(qmax);
  } else {
    scales = (mx - mn).clamp_min(1e-12) / static_cast<double>(hi_code - lo_code);
    zeros = at::round(lo_code - mn / scales).clamp(lo_code, hi_code).to(at::kInt);
    lo = at::full_like(zeros, lo_code);
    hi = at::full_like(zeros, hi_code);
  }
  at::Tensor q = at::round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1);
  q = at::where(at::isnan(g), zeros.unsqueeze(-1).to(at::kFloat), q);
  q = at::maximum(at::minimum(q, hi.unsqueeze(-1).to(at::kFloat)), lo.unsqueeze(-1).to(at::kFloat)).view({n, kp});
  at::Tensor codes;
  if (bits == 8) {
    codes = q.to(at::kChar);
  } else {
    const at::Tensor c = q.to(at::kByte).view({n, kp / 32, 2, 16});
    codes = (c.select(2, 0) | c.select(2, 1).mul(16)).reshape({n, kp / 2});  // high nibble: code * 16
  }
  return {codes.contiguous(), scales.contiguous(), zeros.contiguous()};
}

at::Tensor quantized_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features,
                                 int64_t act_bits, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& act_scale,
                                 const std::optional<at::Tensor>& code_sums) {
  const QLinearPlan p = check_quantized_linear(x, codes, scales, zeros, bits, group_size, in_features, act_bits, bias,
                                               act_scale, code_sums);
  TORCH_CHECK_VALUE(!p.packed, "quantized_linear: codes in pack_quantized_weight's layout are for CPU kernels; on CUDA "
                               "pass the codes of quantize_weight (unpack_quantized_weight converts)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const bool int8_gemm = act_bits == 8 && bits == 8 && p.groups == 1 && p.m > 16 && p.k % 8 == 0 && p.n % 8 == 0 &&
                         (zeros == 0).all().item<bool>();
  if (int8_gemm) {
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor sx = act_scale.has_value() ? act_scale->to(at::kFloat).reshape({1, 1}).expand({p.m, 1})
                                                : xf.abs().amax(1, true).clamp_min(1e-12) / 63.0;
    const at::Tensor xq = at::round(xf / sx).clamp(-63, 63).to(at::kChar);
    const at::Tensor wq = codes.narrow(1, 0, p.k).t();  // (K, N), column-major as cuBLASLt wants
    out = at::_int_mm(xq, wq).to(at::kFloat) * sx * scales.view({1, p.n});
  } else {
    at::Tensor xin = x;
    if (act_bits == 8) {  // activations through their int8 codes, as on the CPU
      const at::Tensor xf = x.to(at::kFloat);
      const at::Tensor sx = act_scale.has_value() ? act_scale->to(at::kFloat).reshape({1, 1})
                                                  : xf.abs().amax(1, true).clamp_min(1e-12) / 63.0;
      xin = at::round(xf / sx).clamp(-63, 63) * sx;
    }
    const at::ScalarType dt = xin.scalar_type() == at::kFloat ? at::kFloat : xin.scalar_type();
    out = at::mm(xin.to(dt), decode(codes, scales, zeros, p, dt).t()).to(at::kFloat);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace quant
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("quantize_weight", &deepseek_ext::quant::quantize_weight_cuda);
  m.impl("quantized_linear", &deepseek_ext::quant::quantized_linear_cuda);
}
