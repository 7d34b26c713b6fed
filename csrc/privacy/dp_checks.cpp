#include <cmath>
#include <limits>

#include "deepseek_ext/checks.h"
#include "deepseek_ext/privacy.h"

namespace deepseek_ext {
namespace privacy {

void check_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
                    ": expected seed to be a one-element int64 CPU tensor, but got a tensor of ", seed.numel(),
                    " element(s) of dtype ", dtype_name(seed.scalar_type()), " on ", seed.device());
}

void check_offset(const char* op, int64_t offset, int64_t values) {
  // offset + values <= 2^63 (the positions used are offset .. offset + values - 1), without overflow
  TORCH_CHECK_VALUE(offset >= 0 && (values == 0 || offset <= std::numeric_limits<int64_t>::max() - values + 1), op,
                    ": expected offset >= 0 with offset + the number of noise values (", values,
                    ") at most 2^63, but got offset ", offset);
}

void check_per_sample_sq_norms(const at::Tensor& grads) {
  constexpr const char* op = "per_sample_sq_norms";
  check_dtype(op, "grads", grads, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_VALUE(grads.dim() >= 1, op, ": expected grads with a leading per-sample dimension, but got a 0-D tensor");
}

GeneratedNoise check_clip_sum_noise(const at::Tensor& grads, const at::Tensor& factors,
                                    const std::optional<at::Tensor>& noise, double noise_std,
                                    const std::optional<at::Tensor>& seed, int64_t offset) {
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
  TORCH_CHECK_VALUE(std::isfinite(noise_std) && noise_std >= 0.0, op,
                    ": expected noise_std to be finite and >= 0, but got ", noise_std);
  GeneratedNoise gen;
  if (noise_std == 0.0) return gen;
  TORCH_CHECK_VALUE(!noise.has_value(), op,
                    ": expected either noise (a tensor) or noise_std > 0 (noise generated from seed), but got both");
  TORCH_CHECK_VALUE(seed.has_value(), op, ": noise_std > 0 needs seed, a one-element int64 CPU tensor, but got None");
  check_seed(op, *seed);
  check_offset(op, offset, c10::multiply_integers(grads.sizes().slice(1)));
  gen.std = noise_std;
  gen.seed = static_cast<uint64_t>(seed->item<int64_t>());
  gen.offset = static_cast<uint64_t>(offset);
  return gen;
}

GeneratedNoise check_gaussian_noise_(const at::Tensor& self, double std, const at::Tensor& seed, int64_t offset,
                                     double scale) {
  constexpr const char* op = "gaussian_noise_";
  check_dtype(op, "self", self, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(std::isfinite(std) && std >= 0.0, op, ": expected std to be finite and >= 0, but got ", std);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected scale to be finite, but got ", scale);
  check_seed(op, seed);
  check_offset(op, offset, self.numel());
  GeneratedNoise gen;
  gen.std = std;
  gen.seed = static_cast<uint64_t>(seed.item<int64_t>());
  gen.offset = static_cast<uint64_t>(offset);
  return gen;
}

}  // namespace privacy
}  // namespace deepseek_ext
