#include "deepseek_ext/checks.h"
#include "deepseek_ext/privacy.h"

namespace deepseek_ext {
namespace privacy {

void check_per_sample_sq_norms(const at::Tensor& grads) {
  constexpr const char* op = "per_sample_sq_norms";
  check_dtype(op, "grads", grads, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_VALUE(grads.dim() >= 1, op, ": expected grads with a leading per-sample dimension, but got a 0-D tensor");
}

void check_clip_sum_noise(const at::Tensor& grads, const at::Tensor& factors, const std::optional<at::Tensor>& noise) {
  constexpr const char* op = "clip_sum_noise";
  check_dtype(op, "grads", grads, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_VALUE(grads.dim() >= 1, op, ": expected grads with a leading per-sample dimension, but got a 0-D tensor");
  check_dtype(op, "factors", factors, {at::kFloat});
  TORCH_CHECK_VALUE(factors.dim() == 1 && factors.size(0) == grads.size(0), op, ": expected factors of shape [",
                    grads.size(0), "] (one per sample), but got ", factors.sizes());
  check_same_device(op, "grads", grads, "factors", factors);
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == grads.sizes().slice(1), op, ": expected noise of shape ",
                      grads.sizes().slice(1), " (a gradient without the sample dimension), but got ", noise->sizes());
    check_dtype(op, "noise", *noise, {at::kFloat, at::kDouble});
    check_same_device(op, "grads", grads, "noise", *noise);
  }
}

}  // namespace privacy
}  // namespace deepseek_ext
