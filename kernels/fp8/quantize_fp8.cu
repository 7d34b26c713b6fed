// CUDA kernels for quantize_fp8 / dequantize_fp8. Same semantics and the same conversion code
// (deepseek_ext/fp8_format.h) as the CPU kernels, so both produce identical bits.
//
// Per-tensor: one grid-stride pass for the amax (block reduction, one atomicMax per block), one pass that derives
// the scale and casts. Row / block: one thread block per tile, which reduces the tile's amax and then casts the
// tile while it is still in L2.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/fp8_format.h"
#include "deepseek_ext/fp8_quant.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

constexpr int kThreads = 256;

// Largest finite |v| of a thread's values; inf and NaN are skipped.
__device__ __forceinline__ float finite_abs(float v) {
  const float a = fabsf(v);
  return a <= FLT_MAX ? a : 0.0f;
}

// Block-wide max of non-negative floats; every thread gets the result.
__device__ float block_max(float v) {
  __shared__ float warp_max[kThreads / 32];
  __shared__ float result;
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_max[lane] : 0.0f;
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, int64_t n, unsigned int* __restrict__ amax_bits) {
  float m = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    m = fmaxf(m, finite_abs(static_cast<float>(x[i])));
  }
  m = block_max(m);
  // Non-negative floats order like their bit patterns, so an integer atomicMax is a float max.
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

// Each thread converts 4 consecutive values and stores them as one 32-bit word.
template <typename T, Format F>
__global__ void quantize_tensor_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, int64_t n,
                                       const unsigned int* __restrict__ amax_bits, float* __restrict__ scale_out) {
  const float scale = scale_from_amax<F>(__uint_as_float(*amax_bits));
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
  const int64_t groups = n / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += stride) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      word |= static_cast<uint32_t>(float_to_fp8_bits_sat<F>(static_cast<float>(x[4 * g + k]) / scale)) << (8 * k);
    }
    reinterpret_cast<uint32_t*>(q)[g] = word;
  }
  for (int64_t i = groups * 4 + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    q[i] = float_to_fp8_bits_sat<F>(static_cast<float>(x[i]) / scale);
  }
}

struct TileParams {
  int64_t rows, cols, tile_rows, tile_cols, tiles_c;
};

template <typename T, Format F>
__global__ void quantize_tile_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                                     TileParams p) {
  const int64_t tile = blockIdx.x;
  const int64_t r0 = (tile / p.tiles_c) * p.tile_rows;
  const int64_t c0 = (tile % p.tiles_c) * p.tile_cols;
  const int64_t h = min(p.tile_rows, p.rows - r0);
  const int64_t w = min(p.tile_cols, p.cols - c0);
  const int64_t count = h * w;

  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    m = fmaxf(m, finite_abs(static_cast<float>(x[(r0 + i / w) * p.cols + c0 + i % w])));
  }
  const float scale = scale_from_amax<F>(block_max(m));
  if (threadIdx.x == 0) scales[tile] = scale;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t off = (r0 + i / w) * p.cols + c0 + i % w;
    q[off] = float_to_fp8_bits_sat<F>(static_cast<float>(x[off]) / scale);
  }
}

template <typename O, Format F>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                                  O* __restrict__ out, int64_t n, TileParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols;
    const int64_t c = i - r * p.cols;
    const float s = scales[(r / p.tile_rows) * p.tiles_c + c / p.tile_cols];
    out[i] = static_cast<O>(fp8_bits_to_float<F>(q[i]) * s);
  }
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill the GPU, no more than the work needs.
int grid_for(int64_t work) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sms} * 8)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, std::optional<at::ScalarType> dtype,
                                                     c10::string_view granularity, int64_t block_size) {
  const at::ScalarType out_dtype = quantize_dtype_or_default(dtype);
  const QuantLayout l = check_quantize_fp8(x, out_dtype, granularity, block_size);
  const Format format = fp8_format("quantize_fp8", "dtype", out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor scale = at::empty(l.scale_shape, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    dispatch_format(format, [&](auto fmt) { scale.fill_(scale_from_amax<decltype(fmt)::value>(0.0f)); });
    return {q, scale};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  float* sp = scale.data_ptr<float>();
  DSX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_fp8_cuda", [&] {
    const auto* xp = xc.const_data_ptr<scalar_t>();
    dispatch_format(format, [&](auto fmt) {
      constexpr Format F = decltype(fmt)::value;
      if (l.granularity == Granularity::kTensor) {
        const int64_t n = x.numel();
        at::Tensor amax = at::zeros({1}, x.options().dtype(at::kInt));
        auto* ap = reinterpret_cast<unsigned int*>(amax.data_ptr<int>());
        amax_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(xp, n, ap);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        quantize_tensor_kernel<scalar_t, F><<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(xp, qp, n, ap, sp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const TileParams p{l.rows, l.cols, l.tile_rows, l.tile_cols, l.tiles_c};
        const int64_t tiles = l.tiles_r * l.tiles_c;
        TORCH_CHECK(tiles < (int64_t{1} << 31), "quantize_fp8: too many tiles (", tiles, ") for one launch");
        quantize_tile_kernel<scalar_t, F><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(xp, qp, sp, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {q, scale};
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& x, const at::Tensor& scale, c10::string_view granularity,
                               int64_t block_size, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dtype = dequantize_dtype_or_default(out_dtype);
  const QuantLayout l = check_dequantize_fp8(x, scale, granularity, block_size, dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scale.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const TileParams p{l.rows, l.cols, l.tile_rows, l.tile_cols, l.tiles_c};
  const auto* qp = reinterpret_cast<const uint8_t*>(xc.const_data_ptr());
  const Format format = fp8_format("dequantize_fp8", "x", x.scalar_type());
  DSX_DISPATCH_FLOAT_HALF_BF16(dtype, "dequantize_fp8_cuda", [&] {
    dispatch_format(format, [&](auto fmt) {
      dequantize_kernel<scalar_t, decltype(fmt)::value><<<grid_for(n), kThreads, 0, stream>>>(
          qp, sc.const_data_ptr<float>(), out.data_ptr<scalar_t>(), n, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("quantize_fp8", &deepseek_ext::fp8::quantize_fp8_cuda);
  m.impl("dequantize_fp8", &deepseek_ext::fp8::dequantize_fp8_cuda);
}
