// Host-side rules of the mixed-precision ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace deepseek_ext {
namespace amp {

// Validates unscale_check_norm_'s arguments: floating gradients on one device, found_inf and inv_scale float32
// one-element tensors on that device.
void check_unscale_args(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale);

}  // namespace amp
}  // namespace deepseek_ext
