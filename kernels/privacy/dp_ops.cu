// CUDA kernels of the DP-SGD ops. per_sample_sq_norms: one block per (sample, column chunk of 16K values) on a 1-D
// grid (any number of samples), each writing its partial sum to its own slot; the chunks of a sample are then added
// in order (the CPU's chunking and order), so results do not depend on scheduling. clip_sum_noise: one thread per
// gradient element, walking the samples; consecutive threads read consecutive addresses of each sample's row; the
// scale is applied in the accumulation type (float64 for float64 gradients), as on the CPU. With generated noise, one
// thread per Philox block instead: it computes the block's four normals (deepseek_ext/gaussian.h, the CPU's stream)
// and accumulates the four gradient elements they belong to, so the noise never exists as a tensor; gaussian_noise_
// writes the same normals into a tensor.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>

#include "deepseek_ext/gaussian.h"
#include "deepseek_ext/privacy.h"

namespace deepseek_ext {
namespace privacy {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 14;


template <typename T>
__global__ void sq_norm_kernel(const T* __restrict__ g, int64_t d, int64_t chunks,
                               at::opmath_type<T>* __restrict__ partial) {
  using A = at::opmath_type<T>;
  __shared__ A warp_sums[kThreads / 32];
  const int64_t w = blockIdx.x, i = w / chunks;
  const int64_t c0 = (w % chunks) * kChunk;
  const int64_t c1 = min(d, c0 + kChunk);
  A s = 0;
  for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x) {
    const A v = static_cast<A>(g[i * d + j]);
    s += v * v;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int k = 0; k < kThreads / 32; ++k) total += warp_sums[k];
    partial[w] = total;
  }
}

template <typename A>
__global__ void sum_chunks_kernel(const A* __restrict__ partial, int64_t n, int64_t chunks, A* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
    out[i] = s;
  }
}

template <typename T>
__global__ void clip_sum_kernel(const T* __restrict__ g, const float* __restrict__ f,
                                const at::opmath_type<T>* __restrict__ z,
                                int64_t n, int64_t d, double scale, T* __restrict__ out) {
  using A = at::opmath_type<T>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A acc = z ? z[j] : A(0);
    for (int64_t i = 0; i < n; ++i) acc += static_cast<A>(f[i]) * static_cast<A>(g[i * d + j]);
    out[j] = static_cast<T>(acc * static_cast<A>(scale));
  }
}

// Philox block `block`'s normals (positions 16 apart within a 64-position tile) that fall in [offset, offset + d):
// fn(j, std * z) for each output element j = position - offset, std applied in the accumulation type A as on the
// CPU (in float32 for float32 accumulation).
template <typename A, typename Fn>
__device__ __forceinline__ void for_each_noise(uint64_t block, uint64_t seed, uint64_t offset, int64_t d, double std,
                                               Fn&& fn) {
  const uint64_t tile_start = block / rng::kGaussianTileBlocks * rng::kGaussianTile;
  const int64_t i = static_cast<int64_t>(block % rng::kGaussianTileBlocks);
  float z[4];
  rng::gaussian_block<rng::ScalarLanes>(seed, static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), z);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t position = tile_start + static_cast<uint64_t>(rng::gaussian_position(i, k));
    if (position < offset || position - offset >= static_cast<uint64_t>(d)) continue;
    fn(static_cast<int64_t>(position - offset), std::is_same_v<A, float>
                                                    ? static_cast<A>(static_cast<float>(std) * z[k])
                                                    : static_cast<A>(std) * static_cast<A>(z[k]));
  }
}

// Element j of the output takes the normal at stream position offset + j; thread w handles Philox block
// first_block + w.
template <typename T>
__global__ void clip_sum_gaussian_kernel(const T* __restrict__ g, const float* __restrict__ f, int64_t n, int64_t d,
                                         double scale, uint64_t seed, uint64_t offset, double noise_std,
                                         uint64_t first_block, int64_t blocks, T* __restrict__ out) {
  using A = at::opmath_type<T>;
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < blocks;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for_each_noise<A>(first_block + static_cast<uint64_t>(w), seed, offset, d, noise_std, [&](int64_t j, A acc) {
      for (int64_t s = 0; s < n; ++s) acc += static_cast<A>(f[s]) * static_cast<A>(g[s * d + j]);
      out[j] = static_cast<T>(acc * static_cast<A>(scale));
    });
  }
}

// gaussian_noise_: thread w computes Philox block first_block + w and updates the (up to four) elements of out its
// normals belong to: out[j] = ((out[j] if accumulate else 0) + std * z) * scale.
template <typename T>
__global__ void gaussian_noise_kernel(T* __restrict__ out, int64_t d, uint64_t seed, uint64_t offset, double std,
                                      double scale, bool accumulate, uint64_t first_block, int64_t blocks) {
  using A = at::opmath_type<T>;
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < blocks;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for_each_noise<A>(first_block + static_cast<uint64_t>(w), seed, offset, d, std, [&](int64_t j, A v) {
      if (accumulate) v += static_cast<A>(out[j]);
      out[j] = static_cast<T>(v * static_cast<A>(scale));
    });
  }
}

// The Philox blocks covering stream positions [offset, offset + d), d > 0: (first block, count).
std::pair<uint64_t, int64_t> covering_blocks(uint64_t offset, int64_t d) {
  const uint64_t first = offset / rng::kGaussianTile * rng::kGaussianTileBlocks;
  const uint64_t last = (offset + static_cast<uint64_t>(d) - 1) / rng::kGaussianTile * rng::kGaussianTileBlocks +
                        rng::kGaussianTileBlocks;
  return {first, static_cast<int64_t>(last - first)};
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
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  TORCH_CHECK(n * chunks < (int64_t{1} << 31), "per_sample_sq_norms: too many (sample, chunk) pairs for one launch (",
              n * chunks, ")");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "per_sample_sq_norms_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({n * chunks}, out.options());
    sq_norm_kernel<scalar_t><<<static_cast<unsigned>(n * chunks), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), d, chunks, partial.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
    sum_chunks_kernel<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial.const_data_ptr<A>(), n,
                                                                                chunks, out.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor clip_sum_noise_cuda(const at::Tensor& grads, const at::Tensor& factors,
                               const std::optional<at::Tensor>& noise, double scale, double noise_std,
                               const std::optional<at::Tensor>& seed, int64_t offset) {
  const GeneratedNoise gen = check_clip_sum_noise(grads, factors, noise, noise_std, seed, offset);
  const c10::cuda::CUDAGuard guard(grads.device());
  const at::Tensor g = grads.contiguous();
  const at::Tensor f = factors.contiguous();
  at::Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  const int64_t d = out.numel();
  if (d == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (gen.on()) {
    const auto [first, blocks] = covering_blocks(gen.offset, d);
    const int64_t grid = std::min<int64_t>((blocks + kThreads - 1) / kThreads, 65535);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_sum_noise_cuda", [&] {
      clip_sum_gaussian_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), f.const_data_ptr<float>(), grads.size(0), d, scale, gen.seed, gen.offset,
          gen.std, first, blocks, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  const int64_t blocks = std::min<int64_t>((d + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_sum_noise_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor z = noise.has_value() ? noise->contiguous().to(c10::CppTypeToScalarType<A>::value) : at::Tensor();
    clip_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), f.const_data_ptr<float>(), z.defined() ? z.const_data_ptr<A>() : nullptr,
        grads.size(0), d, scale, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void gaussian_noise_cuda_(const at::Tensor& self, double std, const at::Tensor& seed, int64_t offset, double scale,
                          bool accumulate) {
  const GeneratedNoise gen = check_gaussian_noise_(self, std, seed, offset, scale);
  const int64_t d = self.numel();
  if (d == 0) return;
  const c10::cuda::CUDAGuard guard(self.device());
  if (!self.is_contiguous()) {
    at::Tensor t = accumulate ? self.contiguous() : at::empty_like(self, at::MemoryFormat::Contiguous);
    gaussian_noise_cuda_(t, std, seed, offset, scale, accumulate);
    self.copy_(t);
    return;
  }
  const auto [first, blocks] = covering_blocks(gen.offset, d);
  const int64_t grid = std::min<int64_t>((blocks + kThreads - 1) / kThreads, 65535);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "gaussian_noise_cuda_", [&] {
    gaussian_noise_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        self.data_ptr<scalar_t>(), d, gen.seed, gen.offset, gen.std, scale, accumulate, first, blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace privacy
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("per_sample_sq_norms", &deepseek_ext::privacy::per_sample_sq_norms_cuda);
  m.impl("clip_sum_noise", &deepseek_ext::privacy::clip_sum_noise_cuda);
  m.impl("gaussian_noise_", &deepseek_ext::privacy::gaussian_noise_cuda_);
}
