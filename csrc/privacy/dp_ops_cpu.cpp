// CPU kernels of the DP-SGD ops. Both read the per-sample gradients exactly once; accumulation is in float (double
// for double inputs), vectorised with `omp simd` for each instruction-set level (simd::dispatch) and split over
// threads by sample and column blocks. Generated noise comes from gaussian_simd.h, block by block into the
// accumulator, so it never exists as a tensor; gaussian_noise_ writes the stream alone into a tensor (gaussian_noise
// into a new one).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "deepseek_ext/checks.h"
#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/privacy.h"
#include "deepseek_ext/simd.h"
#include "gaussian_simd.h"

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

// acc[j] = the generated noise at column c + j (len <= kCols): std applied in float32 for float32 accumulation, in
// float64 for float64, so clip_sum_noise and gaussian_noise_ round alike.
template <int Bytes, typename A, int64_t kCols>
DSX_INLINE void noise_block(A* acc, int64_t len, const GeneratedNoise& gen, int64_t c) {
  const uint64_t at = gen.offset + static_cast<uint64_t>(c);
  if constexpr (std::is_same_v<A, float>) {
    gaussian_fill<Bytes>(acc, len, gen.seed, at, static_cast<float>(gen.std));
  } else {
    float unit[kCols];
    gaussian_fill<Bytes>(unit, len, gen.seed, at, 1.0f);
    for (int64_t j = 0; j < len; ++j) acc[j] = static_cast<A>(gen.std) * static_cast<A>(unit[j]);
  }
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
                              double scale, double noise_std, const std::optional<at::Tensor>& seed, int64_t offset) {
  const GeneratedNoise gen = check_clip_sum_noise(grads, factors, noise, noise_std, seed, offset);
  const int64_t n = grads.size(0);
  const at::Tensor g = grads.contiguous();
  const at::Tensor f = factors.contiguous();
  at::Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  const int64_t d = out.numel();
  if (d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_sum_noise_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor z = noise.has_value() ? noise->contiguous().to(c10::CppTypeToScalarType<A>::value) : at::Tensor();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const float* fp = f.const_data_ptr<float>();
    const A* zp = z.defined() ? z.const_data_ptr<A>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    // Column blocks small enough for the accumulator to stay in L1 while every sample's slice streams past once.
    // Generated noise starts the accumulator: position offset + j of the stream depends on j alone, so the values do
    // not depend on how the blocks are split over threads.
    constexpr int64_t kCols = 2048;
    at::parallel_for(0, (d + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
        constexpr int Bytes = decltype(vb)::value;
        A acc[kCols];
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * kCols, len = std::min(kCols, d - c0);
          if (zp) {
            for (int64_t j = 0; j < len; ++j) acc[j] = zp[c0 + j];
          } else if (gen.on()) {
            noise_block<Bytes, A, kCols>(acc, len, gen, c0);
          } else {
            for (int64_t j = 0; j < len; ++j) acc[j] = A(0);
          }
          for (int64_t i = 0; i < n; ++i) add_scaled(acc, gp + i * d + c0, static_cast<A>(fp[i]), len);
          const A s = static_cast<A>(scale);
          for (int64_t j = 0; j < len; ++j) op[c0 + j] = static_cast<scalar_t>(acc[j] * s);
        }
      });
    });
  });
  return out;
}

// self = ((self if accumulate else 0) + std * z) * scale with z the normals at positions offset + j: contiguous
// tensors in place, thread by thread over column blocks (values depend on positions alone, not on the split); a
// float32 fill without scale goes straight into self, everything else through an L1 block of float32 normals.
void gaussian_noise_cpu_(const at::Tensor& self, double std, const at::Tensor& seed, int64_t offset, double scale,
                         bool accumulate) {
  const GeneratedNoise gen = check_gaussian_noise_(self, std, seed, offset, scale);
  const int64_t d = self.numel();
  if (d == 0) return;
  if (!self.is_contiguous()) {
    at::Tensor t = accumulate ? self.contiguous() : at::empty_like(self, at::MemoryFormat::Contiguous);
    gaussian_noise_cpu_(t, std, seed, offset, scale, accumulate);
    self.copy_(t);
    return;
  }
  if (!gen.on()) {
    if (!accumulate) {
      self.zero_();
    } else if (scale != 1.0) {
      self.mul_(scale);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "gaussian_noise_cpu_", [&] {
    using A = at::opmath_type<scalar_t>;
    scalar_t* op = self.data_ptr<scalar_t>();
    const A s = static_cast<A>(scale);
    constexpr int64_t kCols = 2048;
    at::parallel_for(0, (d + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
        constexpr int Bytes = decltype(vb)::value;
        const int64_t first = begin * kCols, last = std::min(d, end * kCols);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (!accumulate && scale == 1.0) {
            gaussian_fill<Bytes>(op + first, last - first, gen.seed, gen.offset + first, static_cast<float>(gen.std));
            return;
          }
        }
        // The noise as clip_sum_noise's accumulator starts, then added in a separate loop: the same roundings
        // (no contraction into one fma).
        A acc[kCols];
        for (int64_t c0 = first; c0 < last; c0 += kCols) {
          const int64_t len = std::min(kCols, last - c0);
          noise_block<Bytes, A, kCols>(acc, len, gen, c0);
          scalar_t* o = op + c0;
          if (accumulate) {
            for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<A>(o[j]);
          }
          for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>(acc[j] * s);
        }
      });
    });
  });
}

// The noise stream alone: gaussian_noise_ into a new tensor.
at::Tensor gaussian_noise(at::IntArrayRef size, double std, const at::Tensor& seed, int64_t offset,
                          std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
  constexpr const char* op = "gaussian_noise";
  for (const int64_t s : size) {
    TORCH_CHECK_VALUE(s >= 0, op, ": expected size with non-negative entries, but got ", size);
  }
  const at::ScalarType type = dtype.value_or(c10::get_default_dtype_as_scalartype());
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op,
                   ": expected dtype to be torch.float32, torch.float64, torch.float16 or torch.bfloat16, but got ",
                   dtype_name(type));
  TORCH_CHECK_VALUE(std::isfinite(std) && std >= 0.0, op, ": expected std to be finite and >= 0, but got ", std);
  check_seed(op, seed);
  check_offset(op, offset, c10::multiply_integers(size));
  const at::TensorOptions options = at::TensorOptions().dtype(type).device(device.value_or(at::kCPU));
  if (std == 0.0) return at::zeros(size, options);
  static const auto fill = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("deepseek_ext::gaussian_noise_", "")
                               .typed<void(const at::Tensor&, double, const at::Tensor&, int64_t, double, bool)>();
  at::Tensor out = at::empty(size, options);
  fill.call(out, std, seed, offset, 1.0, false);
  return out;
}

}  // namespace privacy
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("per_sample_sq_norms", &deepseek_ext::privacy::per_sample_sq_norms_cpu);
  m.impl("clip_sum_noise", &deepseek_ext::privacy::clip_sum_noise_cpu);
  m.impl("gaussian_noise_", &deepseek_ext::privacy::gaussian_noise_cpu_);
}

TORCH_LIBRARY_IMPL(deepseek_ext, CompositeImplicitAutograd, m) {
  m.impl("gaussian_noise", &deepseek_ext::privacy::gaussian_noise);
}
