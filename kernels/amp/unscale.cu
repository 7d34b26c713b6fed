// CUDA kernel of unscale_check_norm_. Gradients are cut into chunks of 64K values; a launch covers up to kMaxTensors
// tensors and kMaxBlocks chunks, its table passed by value as a kernel argument (PyTorch's multi_tensor_apply
// pattern: no host-to-device copy, so the op is safe to capture in a CUDA graph). Each block unscales its chunk in
// place, raises found_inf when a *stored* value is inf or NaN (the CPU's rule: a finite gradient that overflows its
// dtype once unscaled counts too) and writes the sum of squares of the stored values to its own slot; one last block
// adds the slots in a fixed order, so the norm does not depend on scheduling.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "deepseek_ext/amp.h"
#include "deepseek_ext/dispatch.h"

namespace deepseek_ext {
namespace amp {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;
constexpr int kMaxTensors = 48, kMaxBlocks = 320;  // ~3.2 KB of kernel arguments, under the 4 KB limit

struct Table {
  void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint8_t tensor[kMaxBlocks];  // block -> tensor slot
  int32_t chunk[kMaxBlocks];   // block -> chunk of that tensor
  int64_t first_slot;          // index of this launch's first block in the partial sums
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    unscale_kernel(Table t, const float* __restrict__ inv_scale, float* __restrict__ found_inf,
                   double* __restrict__ partial) {
  __shared__ double warp_sums[kThreads / 32];
  T* g = static_cast<T*>(t.data[t.tensor[blockIdx.x]]);
  const int64_t n = t.numel[t.tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(t.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, n);
  const float inv = *inv_scale;
  float acc = 0.0f;
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const T stored = static_cast<T>(static_cast<float>(g[i]) * inv);
    g[i] = stored;
    const float u = static_cast<float>(stored);
    bad |= !isfinite(u);
    acc += u * u;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  double d = acc;
  for (int off = 16; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = d;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partial[t.first_slot + blockIdx.x] = total;
  }
}

// norm = sqrt(sum of the slots), each thread summing a strided subset and the block combining them in a fixed tree.
__global__ void norm_kernel(const double* __restrict__ partial, int64_t slots, float* __restrict__ norm) {
  __shared__ double sums[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += blockDim.x) s += partial[i];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *norm = static_cast<float>(sqrt(sums[0]));
}

}  // namespace

at::Tensor unscale_check_norm_cuda(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  const c10::cuda::CUDAGuard guard(inv_scale.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> dense(grads.size());
  int64_t slots = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    dense[t] = grads[t].is_contiguous() ? grads[t] : grads[t].contiguous();
    const int64_t chunks = (dense[t].numel() + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks < (int64_t{1} << 31), "unscale_check_norm_: grads[", t, "] is too large (", dense[t].numel(),
                " elements)");
    slots += chunks;
  }
  at::Tensor partial = at::empty({std::max<int64_t>(slots, 1)}, inv_scale.options().dtype(at::kDouble));
  at::Tensor norm = at::empty({}, inv_scale.options());
  const float* inv = inv_scale.const_data_ptr<float>();
  float* found = found_inf.data_ptr<float>();
  double* part = partial.data_ptr<double>();

  int64_t slot = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    Table table{};
    int tensors = 0, blocks = 0;
    auto flush = [&] {
      if (blocks == 0) return;
      table.first_slot = slot;
      DSX_DISPATCH_FLOAT_HALF_BF16(dtype, "unscale_check_norm_cuda", [&] {
        unscale_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(table, inv, found, part);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      slot += blocks;
      tensors = blocks = 0;
    };
    for (const at::Tensor& g : dense) {
      if (g.scalar_type() != dtype || g.numel() == 0) continue;
      const int64_t chunks = (g.numel() + kChunk - 1) / kChunk;
      for (int64_t c = 0; c < chunks; ++c) {
        if (blocks == kMaxBlocks || (c == 0 && tensors == kMaxTensors)) flush();
        if (c == 0 || blocks == 0) {  // (re)enter the tensor in this launch's table
          table.data[tensors] = g.data_ptr();
          table.numel[tensors] = g.numel();
          ++tensors;
        }
        table.tensor[blocks] = static_cast<uint8_t>(tensors - 1);
        table.chunk[blocks] = static_cast<int32_t>(c);
        ++blocks;
      }
    }
    flush();
  }
  norm_kernel<<<1, kThreads, 0, stream>>>(part, slot, norm.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (size_t t = 0; t < grads.size(); ++t) {
    if (!dense[t].is_same(grads[t])) grads[t].copy_(dense[t]);
  }
  return norm;
}

}  // namespace amp
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("unscale_check_norm_", &deepseek_ext::amp::unscale_check_norm_cuda);
}
