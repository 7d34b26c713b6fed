#include "deepseek_ext/checks.h"

namespace deepseek_ext {

std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string out;
  size_t i = 0;
  for (auto d : dtypes) {
    if (i > 0) out += (i + 1 == dtypes.size()) ? " or " : ", ";
    out += c10::toString(d);
    ++i;
  }
  return out;
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, op, ": expected ", arg, " to have dtype ", dtype_list(allowed), ", but got ",
                   t.scalar_type());
}

void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": expected ", arg, " to be a ", dim, "-D tensor, but got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
}

void check_same_device(const char* op, const char* arg_a, const at::Tensor& a, const char* arg_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", arg_a, " and ", arg_b,
              " to be on the same device, but got ", a.device(), " and ", b.device());
}

}  // namespace deepseek_ext
