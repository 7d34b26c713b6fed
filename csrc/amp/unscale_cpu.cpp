// CPU kernel of unscale_check_norm_: gradients cut into chunks, chunks spread over threads; each chunk is read and
// written once, producing its non-finite flag and its sum of squares as it goes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "deepseek_ext/amp.h"
#include "deepseek_ext/cpu.h"
#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/simd.h"

namespace deepseek_ext {
namespace amp {
namespace {

constexpr int64_t kChunk = 1 << 16;

struct ChunkResult {
  double sumsq = 0.0;
  bool nonfinite = false;
};

// g[i] *= inv in float; returns the sum of squares of the results and whether any result is inf or NaN. One
// vectorised loop per 2048-element block (`omp simd` allows the reassociated float sums), folded into a double;
// compiled for each instruction-set level (simd::dispatch).
template <typename T>
DSX_INLINE ChunkResult unscale_span(T* g, int64_t n, float inv) {
  constexpr int64_t kBlock = 2048;
  ChunkResult r;
  float nan_probe = 0.0f;  // sum of u * 0: stays 0 unless some u is inf or NaN
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    T* x = g + b;
    float block = 0.0f, probe = 0.0f;
#pragma omp simd reduction(+ : block, probe)
    for (int64_t i = 0; i < len; ++i) {
      const T stored = static_cast<T>(static_cast<float>(x[i]) * inv);
      x[i] = stored;
      const float u = static_cast<float>(stored);
      block += u * u;
      probe += u * 0.0f;
    }
    r.sumsq += block;
    nan_probe += probe;
  }
  r.nonfinite = nan_probe != 0.0f;  // NaN compares unequal to 0
  return r;
}

}  // namespace

at::Tensor unscale_check_norm_cpu(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  const float inv = inv_scale.item<float>();

  // Work list: (tensor, begin, end) chunks. Non-contiguous gradients are processed through a contiguous copy.
  std::vector<at::Tensor> dense(grads.size());
  struct Chunk {
    int64_t tensor, begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < grads.size(); ++t) {
    dense[t] = grads[t].is_contiguous() ? grads[t] : grads[t].contiguous();
    for (int64_t b = 0; b < dense[t].numel(); b += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(b + kChunk, dense[t].numel())});
    }
  }
  std::vector<ChunkResult> results(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      at::Tensor& g = dense[ch.tensor];
      DSX_DISPATCH_FLOAT_HALF_BF16(g.scalar_type(), "unscale_check_norm_cpu", [&] {
        scalar_t* p = g.data_ptr<scalar_t>() + ch.begin;
        results[c] = simd::dispatch([&](auto) DSX_LAMBDA_INLINE { return unscale_span(p, ch.end - ch.begin, inv); });
      });
    }
  });
  for (size_t t = 0; t < grads.size(); ++t) {
    if (!dense[t].is_same(grads[t])) grads[t].copy_(dense[t]);
  }
  double sumsq = 0.0;
  bool nonfinite = false;
  for (const ChunkResult& r : results) {
    sumsq += r.sumsq;
    nonfinite |= r.nonfinite;
  }
  if (nonfinite) found_inf.fill_(1.0f);
  return at::full({}, static_cast<float>(std::sqrt(sumsq)), inv_scale.options());
}

}  // namespace amp
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("unscale_check_norm_", &deepseek_ext::amp::unscale_check_norm_cpu);
}
