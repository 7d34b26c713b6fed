// CUDA kernel of unscale_check_norm_: one launch per gradient dtype over a table of (tensor, chunk) work items, so
// hundreds of parameters cost one kernel, not one each. Each block unscales its chunk in place, sets found_inf on
// any inf/NaN and adds its sum of squares (in double) to a single accumulator.
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

// work[3 * i .. 3 * i + 2] = (data pointer, begin, end) of work item i.
template <typename T>
__global__ void unscale_kernel(const int64_t* __restrict__ work, const float* __restrict__ inv_scale,
                               float* __restrict__ found_inf, double* __restrict__ sumsq) {
  __shared__ double partial[kThreads / 32];
  T* g = reinterpret_cast<T*>(work[3 * blockIdx.x]);
  const int64_t begin = work[3 * blockIdx.x + 1];
  const int64_t end = work[3 * blockIdx.x + 2];
  const float inv = *inv_scale;
  float acc = 0.0f;
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = static_cast<float>(g[i]);
    bad |= !isfinite(v);
    const float u = v * inv;
    g[i] = static_cast<T>(u);
    acc += u * u;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  double d = acc;
  for (int off = 16; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = d;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    atomicAdd(sumsq, total);
  }
}

}  // namespace

at::Tensor unscale_check_norm_cuda(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  const c10::cuda::CUDAGuard guard(inv_scale.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sumsq = at::zeros({}, inv_scale.options().dtype(at::kDouble));
  std::vector<at::Tensor> dense(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) dense[t] = grads[t].is_contiguous() ? grads[t] : grads[t].contiguous();

  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    std::vector<int64_t> work;
    for (const at::Tensor& g : dense) {
      if (g.scalar_type() != dtype) continue;
      for (int64_t b = 0; b < g.numel(); b += kChunk) {
        work.insert(work.end(), {reinterpret_cast<int64_t>(g.data_ptr()), b, std::min(b + kChunk, g.numel())});
      }
    }
    const int64_t items = static_cast<int64_t>(work.size() / 3);
    if (items == 0) continue;
    TORCH_CHECK(items < (int64_t{1} << 31), "unscale_check_norm_: too many gradient chunks (", items, ")");
    // The work table travels host -> device on the current stream (pinned staging makes the copy asynchronous).
    at::Tensor host = at::from_blob(work.data(), {static_cast<int64_t>(work.size())}, at::kLong).pin_memory();
    at::Tensor table = host.to(inv_scale.device(), /*non_blocking=*/true);
    DSX_DISPATCH_FLOAT_HALF_BF16(dtype, "unscale_check_norm_cuda", [&] {
      unscale_kernel<scalar_t><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(
          table.const_data_ptr<int64_t>(), inv_scale.const_data_ptr<float>(), found_inf.data_ptr<float>(),
          sumsq.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  for (size_t t = 0; t < grads.size(); ++t) {
    if (!dense[t].is_same(grads[t])) grads[t].copy_(dense[t]);
  }
  return sumsq.sqrt().to(at::kFloat);
}

}  // namespace amp
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("unscale_check_norm_", &deepseek_ext::amp::unscale_check_norm_cuda);
}
