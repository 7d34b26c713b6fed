// CPU kernels of the DP-SGD ops. Both read the per-sample gradients exactly once; accumulation is in float (double
// for double inputs), vectorised with `omp simd` for each instruction-set level (simd::dispatch) and split over
// threads by sample and column blocks.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/privacy.h"
#include "deepseek_ext/simd.h"

namespace deepseek_ext {
namespace privacy {
namespace {

constexpr int64_t kChunk = 1 << 14;


template <typename T>
DSX_INLINE at::opmath_type<T> sum_squares(const T* x, int64_t len) {
  using A = at::opmath_type<T>;
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < len; ++j) {
    const A v = static_cast<A>(x[j]);
    s += v * v;
  }
  return s;
}

template <typename T>
DSX_INLINE void add_scaled(at::opmath_type<T>* acc, const T* x, at::opmath_type<T> factor, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += factor * static_cast<at::opmath_type<T>>(x[j]);
}

}  // namespace

at::Tensor per_sample_sq_norms_cpu(const at::Tensor& grads) {
  check_per_sample_sq_norms(grads);
  const int64_t n = grads.size(0);
  const at::Tensor g = grads.contiguous();
  const int64_t d = n ? g.numel() / n : 0;
  const at::ScalarType out_type = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({n}, grads.options().dtype(out_type));
  if (n == 0 || d == 0) return out;
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "per_sample_sq_norms_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> partial(static_cast<size_t>(n * chunks));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t i = w / chunks, c0 = (w % chunks) * kChunk, c1 = std::min(d, c0 + kChunk);
        partial[w] = simd::dispatch([&](auto) DSX_LAMBDA_INLINE { return sum_squares(gp + i * d + c0, c1 - c0); });
      }
    });
    A* op = out.data_ptr<A>();
    for (int64_t i = 0; i < n; ++i) {
      A s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
      op[i] = s;
    }
  });
  return out;
}

at::Tensor clip_sum_noise_cpu(const at::Tensor& grads, const at::Tensor& factors, const std::optional<at::Tensor>& noise,
                              double scale) {
  check_clip_sum_noise(grads, factors, noise);
  const int64_t n = grads.size(0);
  const at::Tensor g = grads.contiguous();
  const at::Tensor f = factors.contiguous();
  at::Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  const int64_t d = out.numel();
  if (d == 0) return out;
  const at::Tensor z = noise.has_value() ? noise->contiguous().to(at::kFloat) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_sum_noise_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const float* fp = f.const_data_ptr<float>();
    const float* zp = z.defined() ? z.const_data_ptr<float>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    // Column blocks small enough for the accumulator to stay in L1 while every sample's slice streams past once.
    constexpr int64_t kCols = 2048;
    at::parallel_for(0, (d + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      simd::dispatch([&](auto) DSX_LAMBDA_INLINE {
        A acc[kCols];
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * kCols, len = std::min(kCols, d - c0);
          for (int64_t j = 0; j < len; ++j) acc[j] = zp ? static_cast<A>(zp[c0 + j]) : A(0);
          for (int64_t i = 0; i < n; ++i) add_scaled(acc, gp + i * d + c0, static_cast<A>(fp[i]), len);
          const A s = static_cast<A>(scale);
          for (int64_t j = 0; j < len; ++j) op[c0 + j] = static_cast<scalar_t>(acc[j] * s);
        }
      });
    });
  });
  return out;
}

}  // namespace privacy
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("per_sample_sq_norms", &deepseek_ext::privacy::per_sample_sq_norms_cpu);
  m.impl("clip_sum_noise", &deepseek_ext::privacy::clip_sum_noise_cpu);
}
