// CUDA path of the integer quantization ops (formats in deepseek_ext/quant.h). Both follow the CPU's definitions
// operation for operation, so results are bit-identical to the CPU kernels:
//   quantize_weight: one warp per (row, group): float min / max, a true float division for the scale, codes
//   rint(w / scale) + zero clamped to the code range. (Non-finite weights are refused in debug mode only; without the
//   check a NaN quotient takes the int64 "indefinite" value x86 gives it, INT64_MIN.)
//   quantized_linear, act_bits = 8: activations to 7-bit codes per row (or the static scale), then exact int32 dot
//   products per group and the epilogue y = sx * sum_g fmaf(sw_g, float(d_g), acc) in ascending group order (quant.h).
//   Per-channel int8 weights with M > 16 take the int8 tensor cores (at::_int_mm) for the dot products and the same
//   epilogue; everything else a dp4a tile kernel. Rows with inf / NaN inputs are recomputed in float, as on the CPU.
//   Weight-only (act_bits 16 / 0): weights decoded to float32 in slabs of output rows and multiplied in float32 (as the
//   CPU), for every activation dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "deepseek_ext/checks.h"
#include "deepseek_ext/quant.h"

namespace deepseek_ext {
namespace quant {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  TORCH_CHECK(b < (int64_t{1} << 31), "quantized_linear: too much work for one launch (", b, " blocks)");
  return static_cast<unsigned>(std::max<int64_t>(b, 1));
}

// The int64 value x86's cvttss2si gives a float (what the CPU kernels' static_cast<int64_t> compiles to): NaN and
// out-of-range values become INT64_MIN; the sum with the zero point wraps as it does there.
__device__ __forceinline__ int64_t code_of(float q, int64_t zero) {
  const int64_t t = (isnan(q) || fabsf(q) >= 9.2233720368547758e18f) ? INT64_MIN : static_cast<int64_t>(q);
  return static_cast<int64_t>(static_cast<uint64_t>(t) + static_cast<uint64_t>(zero));
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One warp per (row, group).
template <typename T>
__global__ void quantize_weight_kernel(const T* __restrict__ w, int64_t n, int64_t k, int64_t groups, int64_t group,
                                       int bits, bool symmetric, uint8_t* __restrict__ codes, int64_t row_bytes,
                                       float* __restrict__ scales, int32_t* __restrict__ zeros) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= n * groups) return;
  const int64_t r = item / groups, g = item % groups;
  const int64_t k0 = g * group, k1 = min(k, k0 + group);
  const T* row = w + r * k;
  float mn = 0.f, mx = 0.f;  // fminf / fmaxf skip NaN as std::min / std::max do on the CPU (NaN on the right)
  for (int64_t i = k0 + lane; i < k1; i += kWarp) {
    const float v = static_cast<float>(row[i]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  const float qmax_sym = bits == 8 ? 127.f : 7.f;
  const int64_t lo_code = bits == 8 ? -127 : 0, hi_code = bits == 8 ? 127 : 15;
  float scale;
  int64_t zero;
  if (symmetric) {
    scale = __fdiv_rn(fmaxf(fmaxf(-mn, mx), 1e-12f), qmax_sym);
    zero = bits == 8 ? 0 : 8;
  } else {
    scale = __fdiv_rn(fmaxf(mx - mn, 1e-12f), static_cast<float>(hi_code - lo_code));
    zero = clamp64(code_of(rintf(static_cast<float>(lo_code) - __fdiv_rn(mn, scale)), 0), lo_code, hi_code);
  }
  if (lane == 0) {
    scales[item] = scale;
    zeros[item] = static_cast<int32_t>(zero);
  }
  const int64_t lo = symmetric ? zero - static_cast<int64_t>(qmax_sym) : lo_code;
  const int64_t hi = symmetric ? zero + static_cast<int64_t>(qmax_sym) : hi_code;
  auto code_at = [&](int64_t i) -> int64_t {
    return i < k1 ? clamp64(code_of(rintf(__fdiv_rn(static_cast<float>(row[i]), scale)), zero), lo, hi) : zero;
  };
  uint8_t* out = codes + r * row_bytes;
  if (bits == 8) {
    for (int64_t i = k0 + lane; i < k0 + group; i += kWarp) out[i] = static_cast<uint8_t>(static_cast<int8_t>(code_at(i)));
  } else {  // byte 16 * run + j: code 32 * run + j (low nibble) and 32 * run + 16 + j (high nibble)
    for (int64_t b = lane; b < group / 2; b += kWarp) {
      const int64_t i = k0 + 32 * (b / 16) + b % 16;
      out[(k0 + 32 * (b / 16)) / 2 + b % 16] = static_cast<uint8_t>(code_at(i) | (code_at(i + 16) << 4));
    }
  }
}

// Activations -> 7-bit codes (M, Kp) zero-padded, per-row scale, per-group code sums, non-finite row flags: the CPU's
// quantize_activations, one block per row.
template <typename T>
__global__ void quantize_activations_kernel(const T* __restrict__ x, int64_t m, int64_t k, int64_t kp, int64_t group,
                                            int64_t groups, const float* __restrict__ static_scale,
                                            int8_t* __restrict__ q, float* __restrict__ sx, int32_t* __restrict__ sums,
                                            uint8_t* __restrict__ nonfinite) {
  __shared__ float s_max[kThreads / kWarp];
  __shared__ int s_bad[kThreads / kWarp];
  __shared__ float s_scale;
  const int64_t row = blockIdx.x;
  if (row >= m) return;
  const T* xr = x + row * k;
  float mx = 0.f;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = static_cast<float>(xr[i]);
    mx = fmaxf(mx, fabsf(v));  // NaN skipped, inf kept: the CPU's `av > mx ? av : mx`
    bad |= !isfinite(v);
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (lane == 0) {
    s_max[warp] = mx;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f;
    int any = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) {
      a = fmaxf(a, s_max[w]);
      any |= s_bad[w];
    }
    s_scale = static_scale != nullptr ? *static_scale : __fdiv_rn(fmaxf(a, 1e-12f), 63.f);
    sx[row] = s_scale;
    nonfinite[row] = static_cast<uint8_t>(any != 0);
  }
  __syncthreads();
  const float sc = s_scale;
  int8_t* qr = q + row * kp;
  for (int64_t i = threadIdx.x; i < kp; i += blockDim.x) {
    int8_t c = 0;
    if (i < k) {
      const float r = rintf(__fdiv_rn(static_cast<float>(xr[i]), sc));
      const float lo = r > -63.f ? r : -63.f;  // NaN -> -63, as on the CPU (such rows are recomputed in float)
      c = static_cast<int8_t>(lo < 63.f ? lo : 63.f);
    }
    qr[i] = c;
  }
  __syncthreads();
  // Per-group sums of the codes, one warp per group.
  for (int64_t g = warp; g < groups; g += blockDim.x / kWarp) {
    int s = 0;
    for (int64_t i = g * group + lane; i < (g + 1) * group; i += kWarp) s += qr[i];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) sums[row * groups + g] = s;
  }
}

// The weight codes of one 32-code chunk of row n as 8 words of 4 signed bytes each, in code order.
template <int Bits>
__device__ __forceinline__ void load_chunk(const uint8_t* __restrict__ codes, int64_t row_bytes, int64_t n,
                                           int64_t chunk, int w, int32_t* dst) {
  if (Bits == 8) {
    dst[0] = reinterpret_cast<const int32_t*>(codes + n * row_bytes + chunk * 32)[w];
  } else {  // 16 bytes: low nibbles are codes 0..15, high nibbles 16..31; nibbles 0..15 fit a signed byte as is
    const int32_t b = reinterpret_cast<const int32_t*>(codes + n * row_bytes + chunk * 16)[w];
    dst[0] = b & 0x0F0F0F0F;
    dst[4] = (b >> 4) & 0x0F0F0F0F;
  }
}

// out[m, n] = sx[m] * sum_g fmaf(sw[n, g], float(dot_g(x_m, c_n) - z[n, g] * xsum[m, g]), acc), g ascending.
// Tiles of 16 rows x 64 columns, 32 codes (one word per 4) at a time through shared memory, __dp4a products.
constexpr int kTm = 16, kTn = 64;

template <int Bits>
__global__ void __launch_bounds__(kThreads)
    int_dot_kernel(const int8_t* __restrict__ xq, const float* __restrict__ sx, const int32_t* __restrict__ xsum,
                   const uint8_t* __restrict__ codes, int64_t row_bytes, const float* __restrict__ sw,
                   const int32_t* __restrict__ zw, int64_t m, int64_t n, int64_t kp, int64_t group, int64_t groups,
                   float* __restrict__ out) {
  __shared__ int32_t xs[kTm][8];
  __shared__ int32_t ws[kTn][9];  // +1: columns of one word land on different banks
  const int64_t tiles_n = (n + kTn - 1) / kTn;
  const int64_t m0 = (blockIdx.x / tiles_n) * kTm, n0 = (blockIdx.x % tiles_n) * kTn;
  const int tn = threadIdx.x % kTn, tm = (threadIdx.x / kTn) * 4;  // 4 rows x 1 column per thread
  const int64_t col = n0 + tn;
  int32_t dot[4] = {0, 0, 0, 0};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int64_t chunks = kp / 32, per_group = group / 32;
  for (int64_t c = 0; c < chunks; ++c) {
    __syncthreads();
    if (threadIdx.x < kTm * 8) {
      const int r = threadIdx.x / 8, w = threadIdx.x % 8;
      xs[r][w] = m0 + r < m ? reinterpret_cast<const int32_t*>(xq + (m0 + r) * kp + c * 32)[w] : 0;
    }
    for (int i = threadIdx.x; i < kTn * (Bits == 8 ? 8 : 4); i += blockDim.x) {
      const int r = Bits == 8 ? i / 8 : i / 4, w = Bits == 8 ? i % 8 : i % 4;
      int32_t v[5] = {0, 0, 0, 0, 0};
      if (n0 + r < n) load_chunk<Bits>(codes, row_bytes, n0 + r, c, w, v);
      ws[r][w] = v[0];
      if (Bits == 4) ws[r][w + 4] = v[4];
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      const int32_t wv = ws[tn][w];
#pragma unroll
      for (int r = 0; r < 4; ++r) dot[r] = __dp4a(xs[tm + r][w], wv, dot[r]);
    }
    if ((c + 1) % per_group == 0 && col < n) {  // the group is complete: fold it into the float epilogue
      const int64_t g = c / per_group;
      const float s = sw[col * groups + g];
      const int32_t z = zw[col * groups + g];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t row = m0 + tm + r;
        const int32_t d = row < m ? dot[r] - z * xsum[row * groups + g] : 0;
        acc[r] = fmaf(s, static_cast<float>(d), acc[r]);
        dot[r] = 0;
      }
    }
  }
  if (col >= n) return;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = m0 + tm + r;
    if (row < m) out[row * n + col] = acc[r] * sx[row];
  }
}

// Per-channel epilogue after at::_int_mm: out = fmaf(sw, float(dots - z * xsum), 0) * sx (the same expression).
__global__ void per_channel_epilogue_kernel(const int32_t* __restrict__ dots, const float* __restrict__ sx,
                                            const int32_t* __restrict__ xsum, const float* __restrict__ sw,
                                            const int32_t* __restrict__ zw, int64_t m, int64_t n,
                                            float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    const int32_t d = dots[i] - zw[c] * xsum[r];
    out[i] = fmaf(sw[c], static_cast<float>(d), 0.f) * sx[r];
  }
}

__device__ __forceinline__ int32_t stored_code(const uint8_t* row, int64_t k, int bits) {
  if (bits == 8) return static_cast<int8_t>(row[k]);
  const uint8_t b = row[16 * (k / 32) + (k % 32) % 16];
  return (k % 32) < 16 ? (b & 0x0F) : (b >> 4);
}

// Rows with inf / NaN inputs: y = x . dequantised W in float (the CPU's nonfinite_rows), so they propagate as in
// nn.Linear. Every other row returns at once.
template <typename T>
__global__ void nonfinite_rows_kernel(const T* __restrict__ x, const uint8_t* __restrict__ flags,
                                      const uint8_t* __restrict__ codes, int64_t row_bytes,
                                      const float* __restrict__ sw, const int32_t* __restrict__ zw, int64_t m,
                                      int64_t n, int64_t k, int64_t group, int64_t groups, int bits,
                                      float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    if (!flags[r]) continue;
    float acc = 0.f;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t g = c * groups + kk / group;
      const float wv = sw[g] * static_cast<float>(stored_code(codes + c * row_bytes, kk, bits) - zw[g]);
      acc += static_cast<float>(x[r * k + kk]) * wv;
    }
    out[i] = acc;
  }
}

// w[n, k] = scale[n, g] * (code[n, k] - zero[n, g]) in float32, for rows n0 .. n0 + rows and k < in_features.
__global__ void decode_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                              const int32_t* __restrict__ zeros, int64_t n0, int64_t rows, int64_t k,
                              int64_t row_bytes, int64_t groups, int64_t group, int bits, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = n0 + i / k, c = i % k;
    const int64_t g = r * groups + c / group;
    out[i] = scales[g] * static_cast<float>(stored_code(codes + r * row_bytes, c, bits) - zeros[g]);
  }
}

int grid_stride_blocks(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8)));
}

// Contiguous, with a 16-byte aligned start (a contiguous view can start anywhere in its storage).
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_weight_cuda(const at::Tensor& w, int64_t bits,
                                                                    int64_t group_size, bool symmetric) {
  check_quantize_weight(w, bits, group_size);
  // Non-finite weights are an error, as on the CPU, but reading the values synchronises: checked in debug mode only
  // (checks.h). Without the check such a weight gets the codes the CPU gave before it refused them.
  if (debug_checks()) {
    TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(),
                      "quantize_weight: w has non-finite values (inf or nan); integer codes cannot represent them");
  }
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1), kp = padded_k(k, group_size), group = effective_group(kp, group_size);
  const int64_t groups = kp / group;
  at::Tensor codes = at::empty({n, bits == 8 ? kp : kp / 2}, w.options().dtype(bits == 8 ? at::kChar : at::kByte));
  at::Tensor scales = at::empty({n, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, groups}, w.options().dtype(at::kInt));
  if (n == 0) return {codes, scales, zeros};
  const at::Tensor wc = w.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_weight_cuda", [&] {
    quantize_weight_kernel<scalar_t><<<blocks_for(n * groups, kThreads / kWarp), kThreads, 0, stream>>>(
        wc.const_data_ptr<scalar_t>(), n, k, groups, group, static_cast<int>(bits), symmetric,
        reinterpret_cast<uint8_t*>(codes.data_ptr()), codes.size(1), scales.data_ptr<float>(),
        zeros.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, scales, zeros};
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Every operand dense and aligned: expanded or strided codes, scales and zeros are read through copies.
  const at::Tensor xc = x.contiguous(), cc = dense_aligned(codes), sc = scales.contiguous(), zc = zeros.contiguous();
  const auto* cp = reinterpret_cast<const uint8_t*>(cc.const_data_ptr());
  const int64_t row_bytes = cc.size(1);
  at::Tensor out = at::empty({p.m, p.n}, x.options().dtype(at::kFloat));
  if (p.m > 0 && p.n > 0) {
    if (p.act_bits == 8) {
      at::Tensor static_scale;
      // The checks have made sure a static scale is float32 with one element (and, for a CPU scale or in debug mode,
      // finite and positive).
      if (act_scale.has_value()) static_scale = act_scale->to(x.device()).reshape({1}).contiguous();
      at::Tensor xq = at::empty({p.m, p.kp}, x.options().dtype(at::kChar));
      at::Tensor sx = at::empty({p.m}, x.options().dtype(at::kFloat));
      at::Tensor xsum = at::empty({p.m, p.groups}, x.options().dtype(at::kInt));
      at::Tensor bad = at::empty({p.m}, x.options().dtype(at::kByte));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantized_linear_act_cuda", [&] {
        quantize_activations_kernel<scalar_t><<<blocks_for(p.m, 1), kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), p.m, p.k, p.kp, p.group, p.groups,
            static_scale.defined() ? static_scale.const_data_ptr<float>() : nullptr, xq.data_ptr<int8_t>(),
            sx.data_ptr<float>(), xsum.data_ptr<int32_t>(), bad.data_ptr<uint8_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      // cuBLASLt's int8 GEMM (at::_int_mm) needs M > 16 and K, N multiples of 8 (Kp is a multiple of 32).
      if (bits == 8 && p.groups == 1 && p.m > 16 && p.n % 8 == 0) {
        const at::Tensor dots = at::_int_mm(xq, cc.t());  // (M, N) int32, exact
        per_channel_epilogue_kernel<<<grid_stride_blocks(p.m * p.n), kThreads, 0, stream>>>(
            dots.const_data_ptr<int32_t>(), sx.const_data_ptr<float>(), xsum.const_data_ptr<int32_t>(),
            sc.const_data_ptr<float>(), zc.const_data_ptr<int32_t>(), p.m, p.n, out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t tiles = ((p.m + kTm - 1) / kTm) * ((p.n + kTn - 1) / kTn);
        auto launch = [&](auto kernel) {
          kernel<<<blocks_for(tiles, 1), kThreads, 0, stream>>>(
              xq.const_data_ptr<int8_t>(), sx.const_data_ptr<float>(), xsum.const_data_ptr<int32_t>(), cp, row_bytes,
              sc.const_data_ptr<float>(), zc.const_data_ptr<int32_t>(), p.m, p.n, p.kp, p.group, p.groups,
              out.data_ptr<float>());
        };
        if (bits == 8) launch(int_dot_kernel<8>); else launch(int_dot_kernel<4>);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantized_linear_nonfinite_cuda", [&] {
        nonfinite_rows_kernel<scalar_t><<<grid_stride_blocks(p.m * p.n), kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), bad.const_data_ptr<uint8_t>(), cp, row_bytes, sc.const_data_ptr<float>(),
            zc.const_data_ptr<int32_t>(), p.m, p.n, p.k, p.group, p.groups, static_cast<int>(bits),
            out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      // Weight-only: float32 weights, float32 products (TF32 only where the caller enabled it for float32 matmuls),
      // in slabs of output rows so the decoded copy stays bounded (64 MB), written through out^T's rows.
      const at::Tensor xf = xc.to(at::kFloat);
      at::Tensor out_t = at::empty({p.n, p.m}, out.options());
      const int64_t slab = std::max<int64_t>(1, std::min<int64_t>(p.n, (int64_t{16} << 20) / std::max<int64_t>(p.k, 1)));
      at::Tensor wbuf = at::empty({slab, p.k}, out.options());
      for (int64_t n0 = 0; n0 < p.n; n0 += slab) {
        const int64_t rows = std::min(slab, p.n - n0);
        decode_kernel<<<grid_stride_blocks(rows * p.k), kThreads, 0, stream>>>(
            cp, sc.const_data_ptr<float>(), zc.const_data_ptr<int32_t>(), n0, rows, p.k, row_bytes, p.groups, p.group,
            static_cast<int>(bits), wbuf.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::Tensor dst = out_t.narrow(0, n0, rows);
        at::mm_out(dst, wbuf.narrow(0, 0, rows), xf.t());
      }
      out.copy_(out_t.t());
    }
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
