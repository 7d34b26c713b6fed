// Dtype dispatch helpers shared by CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda body with scalar_t = float, c10::Half or c10::BFloat16 (the floating dtypes of activations).
#define DSX_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
