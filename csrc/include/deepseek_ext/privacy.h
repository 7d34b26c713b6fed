// Host-side rules of the differential-privacy ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace deepseek_ext {
namespace privacy {

// grads: (N, ...) floating per-sample tensor.
void check_per_sample_sq_norms(const at::Tensor& grads);

// A Philox seed: a one-element int64 CPU tensor (read on the host; its value is the key of the stream).
void check_seed(const char* op, const at::Tensor& seed);

// A stream offset for `values` noise values: positions offset .. offset + values - 1 must be int64.
void check_offset(const char* op, int64_t offset, int64_t values);

// Noise generated inside clip_sum_noise: std times the normals at positions offset + j of the Philox stream `seed`
// (deepseek_ext/gaussian.h); off when std is 0.
struct GeneratedNoise {
  double std = 0.0;
  uint64_t seed = 0;
  uint64_t offset = 0;
  bool on() const { return std > 0.0; }
};

// grads (N, ...), factors (N,) float32, noise (optional) shaped grads.shape[1:], same device; or instead of noise,
// noise_std > 0 with seed (a one-element int64 CPU tensor) and offset >= 0. Returns the generated noise's parameters.
GeneratedNoise check_clip_sum_noise(const at::Tensor& grads, const at::Tensor& factors,
                                    const std::optional<at::Tensor>& noise, double noise_std,
                                    const std::optional<at::Tensor>& seed, int64_t offset);

// gaussian_noise_: self a float32/float64/float16/bfloat16 tensor, std and scale finite (std >= 0), seed and offset
// as above for self.numel() values. Returns the noise's parameters (off when std is 0).
GeneratedNoise check_gaussian_noise_(const at::Tensor& self, double std, const at::Tensor& seed, int64_t offset,
                                     double scale);

}  // namespace privacy
}  // namespace deepseek_ext
