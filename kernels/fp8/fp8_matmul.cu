// CUDA path of fp8_matmul. Per-tensor and per-row scaling go to cuBLASLt through at::_scaled_mm (FP8 tensor cores on
// sm_89/sm_90, scaling in the epilogue) when the shapes and the GPU allow it; everything else (1x128 / 128x128
// block scaling, sizes that are not multiples of 16, older GPUs) dequantises with the scales and multiplies in
// float32 — correct everywhere, not fast.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "deepseek_ext/fp8_quant.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

bool scaled_mm_applies(const MatmulPlan& p, const at::Tensor& a, const at::Tensor& b) {
  if (p.scaling == MatmulScaling::kBlock) return false;
  if (p.m % 16 != 0 || p.n % 16 != 0 || p.k % 16 != 0) return false;
  if (a.scalar_type() == at::kFloat8_e5m2 && b.scalar_type() == at::kFloat8_e5m2) return false;
  int device = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const int sm = major * 10 + minor;
  if (sm < 89) return false;
  // Row-wise scales need Hopper and a bfloat16 result in cuBLASLt.
  return p.scaling == MatmulScaling::kTensor || (sm >= 90 && p.out_dtype == at::kBFloat16);
}

at::Tensor dequantize_scaled(const at::Tensor& x, const at::Tensor& scale, int64_t row_block, int64_t col_block) {
  at::Tensor s = scale;
  if (row_block > 1) s = s.repeat_interleave(row_block, 0).narrow(0, 0, x.size(0));
  if (col_block > 1) s = s.repeat_interleave(col_block, 1).narrow(1, 0, x.size(1));
  return x.to(at::kFloat) * s;
}

}  // namespace

at::Tensor fp8_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                           const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> out_dtype, int64_t block_size) {
  const MatmulPlan p = check_fp8_matmul(a, b, scale_a, scale_b, bias, out_dtype, block_size);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out;
  if (scaled_mm_applies(p, a, b)) {
    const at::Tensor b_col = b.t().contiguous().t();  // cuBLASLt wants b column-major
    const at::Tensor sa = p.scaling == MatmulScaling::kTensor ? scale_a.reshape({}) : scale_a.contiguous();
    const at::Tensor sb = p.scaling == MatmulScaling::kTensor ? scale_b.reshape({}) : scale_b.contiguous();
    out = at::_scaled_mm(a.contiguous(), b_col, sa, sb, std::nullopt, std::nullopt, p.out_dtype, false);
  } else {
    const bool block = p.scaling == MatmulScaling::kBlock;
    const at::Tensor ad = dequantize_scaled(a, scale_a.reshape(p.scaling == MatmulScaling::kTensor ? at::IntArrayRef{}
                                                                                               : scale_a.sizes()),
                                            1, block ? p.block : 1);
    const at::Tensor bd = dequantize_scaled(b, scale_b, block ? p.block : 1, block ? p.block : 1);
    out = at::mm(ad, bd).to(p.out_dtype);
  }
  if (bias.has_value()) out.add_(bias->to(p.out_dtype));
  return out;
}

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("fp8_matmul", &deepseek_ext::fp8::fp8_matmul_cuda);
}
