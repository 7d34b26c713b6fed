// CUDA kernels of the DP-SGD ops. per_sample_sq_norms: a 2-D grid of (column chunk, sample) blocks, each reducing
// its slice and adding it to the sample's total. clip_sum_noise: one thread per gradient element, walking the
// samples; consecutive threads read consecutive addresses of each sample's row.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "deepseek_ext/privacy.h"

namespace deepseek_ext {
namespace privacy {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 14;


template <typename T>
__global__ void sq_norm_kernel(const T* __restrict__ g, int64_t d, at::opmath_type<T>* __restrict__ out) {
  using A = at::opmath_type<T>;
  __shared__ A partial[kThreads / 32];
  const int64_t i = blockIdx.y;
  const int64_t c0 = blockIdx.x * kChunk;
  const int64_t c1 = min(d, c0 + kChunk);
  A s = 0;
  for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x) {
    const A v = static_cast<A>(g[i * d + j]);
    s += v * v;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    atomicAdd(out + i, total);
  }
}

template <typename T>
__global__ void clip_sum_kernel(const T* __restrict__ g, const float* __restrict__ f, const float* __restrict__ z,
                                int64_t n, int64_t d, float scale, T* __restrict__ out) {
  using A = at::opmath_type<T>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A acc = z ? static_cast<A>(z[j]) : A(0);
    for (int64_t i = 0; i < n; ++i) acc += static_cast<A>(f[i]) * static_cast<A>(g[i * d + j]);
    out[j] = static_cast<T>(acc * static_cast<A>(scale));
  }
}

}  // namespace

at::Tensor per_sample_sq_norms_cuda(const at::Tensor& grads) {
  check_per_sample_sq_norms(grads);
  const c10::cuda::CUDAGuard guard(grads.device());
  const int64_t n = grads.size(0);
  const at::Tensor g = grads.contiguous();
  const int64_t d = n ? g.numel() / n : 0;
  at::Tensor out =
      at::zeros({n}, grads.options().dtype(grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (n == 0 || d == 0) return out;
  TORCH_CHECK(n < 65536, "per_sample_sq_norms: at most 65535 samples per call on CUDA, got ", n);
  const dim3 grid(static_cast<unsigned>((d + kChunk - 1) / kChunk), static_cast<unsigned>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "per_sample_sq_norms_cuda", [&] {
    sq_norm_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), d, out.data_ptr<at::opmath_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor clip_sum_noise_cuda(const at::Tensor& grads, const at::Tensor& factors,
                               const std::optional<at::Tensor>& noise, double scale) {
  check_clip_sum_noise(grads, factors, noise);
  const c10::cuda::CUDAGuard guard(grads.device());
  const at::Tensor g = grads.contiguous();
  const at::Tensor f = factors.contiguous();
  at::Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  const int64_t d = out.numel();
  if (d == 0) return out;
  const at::Tensor z = noise.has_value() ? noise->contiguous().to(at::kFloat) : at::Tensor();
  const int64_t blocks = std::min<int64_t>((d + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_sum_noise_cuda", [&] {
    clip_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), f.const_data_ptr<float>(), z.defined() ? z.const_data_ptr<float>() : nullptr,
        grads.size(0), d, static_cast<float>(scale), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace privacy
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("per_sample_sq_norms", &deepseek_ext::privacy::per_sample_sq_norms_cuda);
  m.impl("clip_sum_noise", &deepseek_ext::privacy::clip_sum_noise_cuda);
}
