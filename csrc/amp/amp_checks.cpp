#include <ATen/MemoryOverlap.h>

#include "deepseek_ext/amp.h"
#include "deepseek_ext/checks.h"

namespace deepseek_ext {
namespace amp {

void check_unscale_args(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale) {
  constexpr const char* op = "unscale_check_norm_";
  check_dtype(op, "found_inf", found_inf, {at::kFloat});
  check_dtype(op, "inv_scale", inv_scale, {at::kFloat});
  TORCH_CHECK_VALUE(found_inf.numel() == 1 && inv_scale.numel() == 1, op,
                    ": expected found_inf and inv_scale to have one element each, but got ", found_inf.numel(),
                    " and ", inv_scale.numel());
  check_same_device(op, "found_inf", found_inf, "inv_scale", inv_scale);
  // Every gradient is checked before any is touched: a bad one must not leave the others already unscaled.
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(grads[i].defined(), op, ": expected ", name, " to be a tensor, but got an undefined tensor");
    check_dtype(op, name.c_str(), grads[i], {at::kFloat, at::kHalf, at::kBFloat16});
    check_same_device(op, name.c_str(), grads[i], "inv_scale", inv_scale);
    // Written in place: an expanded (stride-0) or otherwise self-overlapping view would unscale an element once
    // per alias and cannot be written back.
    TORCH_CHECK_VALUE(at::has_internal_overlap(grads[i]) != at::MemOverlap::Yes, op, ": expected ", name,
                      " to be writable in place, but it is an expanded or self-overlapping view (strides ",
                      grads[i].strides(), " for shape ", grads[i].sizes(), "); pass a tensor with its own memory");
  }
}

}  // namespace amp
}  // namespace deepseek_ext
