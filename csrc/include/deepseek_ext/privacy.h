// Host-side rules of the differential-privacy ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace deepseek_ext {
namespace privacy {

// grads: (N, ...) floating per-sample tensor.
void check_per_sample_sq_norms(const at::Tensor& grads);

// grads (N, ...), factors (N,) float32, noise (optional) shaped grads.shape[1:], same device.
void check_clip_sum_noise(const at::Tensor& grads, const at::Tensor& factors, const std::optional<at::Tensor>& noise);

}  // namespace privacy
}  // namespace deepseek_ext
