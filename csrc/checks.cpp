#include "deepseek_ext/checks.h"

#include <cstdlib>
#include <cstring>

namespace deepseek_ext {

std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string out;
  size_t i = 0;
  for (auto d : dtypes) {
    if (i > 0) out += (i + 1 == dtypes.size()) ? " or " : ", ";
    out += dtype_name(d);
    ++i;
  }
  return out;
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, op, ": expected ", arg, " to have dtype ", dtype_list(allowed), ", but got ",
                   dtype_name(t.scalar_type()));
}

void check_same_device(const char* op, const char* arg_a, const at::Tensor& a, const char* arg_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", arg_a, " and ", arg_b,
              " to be on the same device, but got ", a.device(), " and ", b.device());
}

bool debug_checks() {
  const char* v = std::getenv("DEEPSEEK_EXT_DEBUG_CHECKS");  // read per call: tests and users may toggle it
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace deepseek_ext
