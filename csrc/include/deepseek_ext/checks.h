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

}  // namespace deepseek_ext
