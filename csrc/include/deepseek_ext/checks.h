// Argument checks shared by every op. Messages always name the op and the argument, say what was expected
// and what was given, so a user can fix the call from the message alone.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

namespace deepseek_ext {

// "torch.float32", as a PyTorch user writes it.
std::string dtype_name(at::ScalarType t);

// "torch.float32, torch.float16 or torch.bfloat16"
std::string dtype_list(std::initializer_list<at::ScalarType> dtypes);

void check_dtype(const char* op, const char* arg, const at::Tensor& t, std::initializer_list<at::ScalarType> allowed);

void check_same_device(const char* op, const char* arg_a, const at::Tensor& a, const char* arg_b, const at::Tensor& b);

// Checks that read a tensor's values (finite scales, cu_seqlens offsets, a positive static scale) run for CPU tensors
// always, and for device tensors only in debug mode (environment DEEPSEEK_EXT_DEBUG_CHECKS=1): reading device memory
// synchronises the host with the GPU on every call and breaks CUDA graph capture. Metadata checks (dtype, shape,
// device) always run.
bool debug_checks();
inline bool check_values_of(const at::Tensor& t) { return t.device().is_cpu() || debug_checks(); }

}  // namespace deepseek_ext
