// CUDA path of fp8_matmul: cuBLASLt FP8 GEMMs through at::_scaled_mm, whose scaling modes are picked from the scale
// shapes and strides we hand it:
//   per tensor (sm_89+), per row / column (OUTER_VEC_32F, sm_90+), and DeepSeek-V3's 1x128 activation groups with
//   128x128 weight blocks (cuBLASLt's VEC128_32F / BLK128x128_32F modes, CUDA 12.9+, sm_90 only).
// No shape rule beyond cuBLASLt's own: M is free (decode, M = 1, included); K and N are padded to multiples of 16
// with zeros when they are not. b is read as is when it is column-major (an (N, K) weight passed as w.t()).
// The bias is added in float32 before the output is rounded (the CPU's rule): in cuBLASLt's epilogue when it has the
// output's dtype, otherwise to a float32 result that is then rounded.
// Everything else (block_size != 128, e5m2 x e5m2, GPUs without FP8 tensor cores, a mode the installed torch or
// cuBLASLt rejects at run time — then with a one-time warning) multiplies slabs of K dequantised to float32, so the
// temporaries stay at about 64 MB whatever the size (never full-size dequantised operands).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>

#include "deepseek_ext/fp8_quant.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int compute_capability(const at::Tensor& t) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()));
  return major * 10 + minor;
}

// A row-major (rows, cols) copy of t zero-padded to (rows_p, cols_p); t itself when no padding is needed.
at::Tensor padded_rows(const at::Tensor& t, int64_t rows_p, int64_t cols_p, double fill = 0.0) {
  if (t.size(0) == rows_p && t.size(1) == cols_p && t.is_contiguous()) return t;
  at::Tensor out = at::empty({rows_p, cols_p}, t.options());
  if (rows_p != t.size(0) || cols_p != t.size(1)) out.fill_(fill);
  out.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// 128x128 block scales (nb, kb) row-major, with the row stride the installed torch accepts (kb, or kb rounded up to
// a multiple of 4 in newer releases; the same thing when kb % 4 == 0).
at::Tensor block_scales(const at::Tensor& s_nk, bool pad4) {
  const int64_t nb = s_nk.size(0), kb = s_nk.size(1);
  if (!pad4 || kb % 4 == 0) return s_nk.contiguous();
  at::Tensor buf = at::ones({nb, round_up(kb, 4)}, s_nk.options());
  buf.narrow(1, 0, kb).copy_(s_nk);
  return buf.narrow(1, 0, kb);
}

std::atomic<int> g_block_layout{-1};  // the 128x128 scale row stride this torch takes: -1 not known, 0 plain, 1 padded
// Per (scaling mode, M % 16 == 0): torch._scaled_mm rejected such a call once; later ones go to the fallback.
std::atomic<bool> g_rejected[3][2] = {};

// (a * sa) @ (b * sb) [+ bias] through at::_scaled_mm; throws what _scaled_mm throws. cuBLASLt's FP8 GEMM takes a
// row-major a and a column-major b ("TN"): a b that is not column-major (an (N, K) weight passed as w.t() is) is
// copied once per call.
at::Tensor scaled_mm(const MatmulPlan& p, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                     const at::Tensor& scale_b, const std::optional<at::Tensor>& bias, bool pad4) {
  const int64_t M = p.m, N = p.n, K = p.k, Kp = round_up(K, 16), Np = round_up(N, 16);
  const bool block = p.scaling == MatmulScaling::kBlock;
  const int64_t Mp = block ? round_up(M, 4) : M;  // 1x128 scales are read with a 16-byte aligned column stride
  const int64_t kb = block ? (K + 127) / 128 : 1;
  const bool epilogue_bias = bias.has_value() && bias->scalar_type() == p.out_dtype &&
                             (p.out_dtype == at::kBFloat16 || p.out_dtype == at::kHalf);
  const at::ScalarType mm_dtype = bias.has_value() && !epilogue_bias ? at::kFloat : p.out_dtype;
  const at::Tensor a2 = padded_rows(a, Mp, Kp);
  const at::Tensor b2 = (Kp == K && Np == N && b.t().is_contiguous()) ? b : padded_rows(b.t(), Np, Kp).t();
  at::Tensor sa, sb;
  if (p.scaling == MatmulScaling::kTensor) {
    sa = scale_a.reshape({});
    sb = scale_b.reshape({});
  } else if (p.scaling == MatmulScaling::kRow) {
    sa = padded_rows(scale_a, Mp, 1, 1.0);
    sb = padded_rows(scale_b, 1, Np, 1.0);
  } else {  // a: 1x128 groups, (Mp, kb) outer-dim-major; b: 128x128 blocks, checked as b^T's (nb, kb) row-major
    sa = padded_rows(scale_a, Mp, kb, 1.0).t().contiguous().t();
    sb = block_scales(scale_b.t(), pad4).t();
  }
  std::optional<at::Tensor> bias2;
  if (epilogue_bias) bias2 = Np == N ? bias->contiguous() : padded_rows(bias->reshape({1, N}), 1, Np).reshape({Np});
  at::Tensor out = at::_scaled_mm(a2, b2, sa, sb, bias2, std::nullopt, mm_dtype, false);
  if (Mp != M || Np != N) out = out.narrow(0, 0, M).narrow(1, 0, N);
  if (bias.has_value() && !epilogue_bias) {
    out = out.add(bias->to(at::kFloat)).to(p.out_dtype);  // out was float32: the sum is rounded once
  }
  return out.contiguous();
}

// Slabs of K dequantised to float32 and multiplied (per-tensor / per-row scales applied to the float32 result).
at::Tensor dequantized_mm(const MatmulPlan& p, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                          const at::Tensor& scale_b, const std::optional<at::Tensor>& bias) {
  const int64_t M = p.m, N = p.n, K = p.k;
  const bool block = p.scaling == MatmulScaling::kBlock;
  const int64_t bs = p.block;
  at::Tensor out = at::zeros({M, N}, a.options().dtype(at::kFloat));
  const int64_t unit = block ? bs : 256;
  const int64_t budget = int64_t{16} << 20;  // float32 elements of temporaries per slab (64 MB)
  const int64_t kc = std::max(unit, budget / std::max<int64_t>(M + 2 * N, 1) / unit * unit);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t len = std::min(kc, K - k0);
    at::Tensor ak = a.narrow(1, k0, len).to(at::kFloat);
    at::Tensor bk = b.narrow(0, k0, len).to(at::kFloat);
    if (block) {
      const int64_t g0 = k0 / bs, gn = (len + bs - 1) / bs;
      ak.mul_(scale_a.narrow(1, g0, gn).repeat_interleave(bs, 1).narrow(1, 0, len));
      bk.mul_(scale_b.narrow(0, g0, gn).repeat_interleave(bs, 0).narrow(0, 0, len).repeat_interleave(bs, 1).narrow(1, 0, N));
    }
    out.addmm_(ak, bk);
  }
  if (p.scaling == MatmulScaling::kTensor) {
    out.mul_(scale_a.reshape({})).mul_(scale_b.reshape({}));
  } else if (p.scaling == MatmulScaling::kRow) {
    out.mul_(scale_a).mul_(scale_b);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(p.out_dtype);
}

}  // namespace

at::Tensor fp8_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                           const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> out_dtype, int64_t block_size) {
  const MatmulPlan p = check_fp8_matmul(a, b, scale_a, scale_b, bias, out_dtype, block_size);
  const c10::cuda::CUDAGuard guard(a.device());
  if (p.m == 0 || p.n == 0 || p.k == 0) {
    at::Tensor out = at::zeros({p.m, p.n}, a.options().dtype(at::kFloat));
    if (bias.has_value()) out.add_(bias->to(at::kFloat));
    return out.to(p.out_dtype);
  }
  const int sm = compute_capability(a);
  const bool e5m2_pair = a.scalar_type() == at::kFloat8_e5m2 && b.scalar_type() == at::kFloat8_e5m2;
  bool tensor_cores = false;
  std::atomic<bool>& rejected = g_rejected[static_cast<int>(p.scaling)][p.m % 16 == 0];
  if (!e5m2_pair && !rejected.load(std::memory_order_relaxed)) {
    switch (p.scaling) {
      case MatmulScaling::kTensor: tensor_cores = sm >= 89; break;
      case MatmulScaling::kRow: tensor_cores = sm >= 90; break;
      case MatmulScaling::kBlock:
        // cuBLASLt's 1x128 / 128x128 modes exist on Hopper only (block_size as given: the checks clamp p.block to
        // max(K, N), which describes the same scales)
        tensor_cores = sm == 90 && block_size == 128;
        break;
    }
  }
  if (tensor_cores) {
    const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
    if (p.scaling != MatmulScaling::kBlock) {
      try {
        return scaled_mm(p, a, b, sa, sb, bias, false);
      } catch (const c10::Error& e) {
        rejected.store(true);
        TORCH_WARN("fp8_matmul: torch._scaled_mm rejected a ", p.scaling == MatmulScaling::kTensor ? "per-tensor" : "per-row",
                   " call with M = ", p.m, " (", e.what_without_backtrace(), "); such calls dequantise and multiply in "
                   "float32 from now on in this process");
      }
    } else {
      // The row stride torch wants for 128x128 scales is only in question when ceil(K / 128) % 4 != 0: try the
      // plain layout, then the padded one, and remember which one this torch takes.
      const bool ambiguous = ((p.k + 127) / 128) % 4 != 0;
      const int known = g_block_layout.load();
      for (int layout : {0, 1}) {
        if ((!ambiguous && layout == 1) || (ambiguous && known >= 0 && layout != known)) continue;
        try {
          at::Tensor out = scaled_mm(p, a, b, sa, sb, bias, layout == 1);
          if (ambiguous) g_block_layout.store(layout);
          return out;
        } catch (const c10::Error& e) {
          if (!ambiguous || layout == 1 || known >= 0) {
            rejected.store(true);
            TORCH_WARN("fp8_matmul: torch._scaled_mm rejected 1x128 / 128x128 block scaling with M = ", p.m, " (",
                       e.what_without_backtrace(), "); such calls dequantise slabs of K and multiply in float32 from "
                       "now on in this process");
          }
        }
      }
    }
  }
  return dequantized_mm(p, a, b, scale_a, scale_b, bias);
}

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("fp8_matmul", &deepseek_ext::fp8::fp8_matmul_cuda);
}
