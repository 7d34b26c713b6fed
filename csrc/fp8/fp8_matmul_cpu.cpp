// CPU kernel of fp8_matmul: a tiled GEMM that dequantises FP8 tiles on the fly. The output is cut into
// (Mb x Nb) tiles spread over threads; each task decodes its rows of a and its panel of b into small float32
// buffers (scales applied while decoding in block mode), multiplies them with the BLAS sgemm behind at::mm, and
// applies per-tensor / per-row scales and the bias in the epilogue. No full-size dequantised copy of either
// operand exists at any time: per thread, at most Mb x K + K x Nb floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/fp8_quant.h"
#include "fp8_decode_avx2.h"
#include "fp8_lut.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

constexpr int64_t kTileN = 512;

// d[0:n] = decode(s[0:n]) * scale, vectorised where the CPU allows.
void decode_span(const uint8_t* s, float* d, int64_t n, float scale, Format f, const float* lut) {
  int64_t i = 0;
#ifdef DSX_HAVE_AVX2
  if (cpu_has_avx2()) {
    i = f == Format::kE4M3FN ? avx2::decode_span<Format::kE4M3FN>(s, d, n, scale)
                             : avx2::decode_span<Format::kE5M2>(s, d, n, scale);
  }
#endif
  for (; i < n; ++i) d[i] = lut[s[i]] * scale;
}

// dst (rows x cols, row-major) = decode(src rows of stride ld), each run of `group` columns multiplied by
// scale_of(row, run) (group = cols when there is a single scale per row).
template <typename ScaleFn>
void decode_tile(const uint8_t* src, int64_t ld, int64_t rows, int64_t cols, int64_t group, Format f, float* dst,
                 ScaleFn scale_of) {
  const float* lut = decode_table(f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += group) {
      decode_span(src + r * ld + c0, dst + r * cols + c0, std::min(group, cols - c0), scale_of(r, c0), f, lut);
    }
  }
}

}  // namespace

at::Tensor fp8_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                          const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                          std::optional<at::ScalarType> out_dtype, int64_t block_size) {
  const MatmulPlan p = check_fp8_matmul(a, b, scale_a, scale_b, bias, out_dtype, block_size);
  at::Tensor out = at::empty({p.m, p.n}, a.options().dtype(p.out_dtype));
  if (p.m == 0 || p.n == 0) return out;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();  // row-major (M, K) and (K, N)
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto* ap = reinterpret_cast<const uint8_t*>(ac.const_data_ptr());
  const auto* bp = reinterpret_cast<const uint8_t*>(bc.const_data_ptr());
  const float* sap = sa.const_data_ptr<float>();
  const float* sbp = sb.const_data_ptr<float>();
  const float* biasp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const Format fa = fp8_format("fp8_matmul", "a", a.scalar_type());
  const Format fb = fp8_format("fp8_matmul", "b", b.scalar_type());
  const int64_t m = p.m, n = p.n, k = p.k, bs = p.block, kb = (k + bs - 1) / bs, nb = (n + bs - 1) / bs;
  const bool block = p.scaling == MatmulScaling::kBlock;

  // Row tiles large enough to keep sgemm efficient, small enough to give every thread work.
  const int64_t tile_m = std::min<int64_t>(m, 256);
  const int64_t tiles_m = (m + tile_m - 1) / tile_m, tiles_n = (n + kTileN - 1) / kTileN;
  DSX_DISPATCH_FLOAT_HALF_BF16(p.out_dtype, "fp8_matmul_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
      // Decode buffers live per thread across calls: fresh multi-MB allocations would cost a page fault per 4 KB.
      thread_local std::vector<float> a_store, b_store;
      a_store.resize(static_cast<size_t>(tile_m * k));
      b_store.resize(static_cast<size_t>(k * kTileN));
      at::Tensor cbuf;
      int64_t cached_tm = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t tm = t / tiles_n, tn = t % tiles_n;
        const int64_t m0 = tm * tile_m, mh = std::min(tile_m, m - m0);
        const int64_t n0 = tn * kTileN, nw = std::min(kTileN, n - n0);
        const at::Tensor abuf = at::from_blob(a_store.data(), {mh, k}, at::kFloat);
        const at::Tensor bbuf = at::from_blob(b_store.data(), {k, nw}, at::kFloat);
        if (tm != cached_tm) {  // consecutive tasks of a thread usually share a row tile: decode it once
          if (block) {
            decode_tile(ap + m0 * k, k, mh, k, bs, fa, abuf.data_ptr<float>(),
                        [&](int64_t r, int64_t c) { return sap[(m0 + r) * kb + c / bs]; });
          } else {
            decode_tile(ap + m0 * k, k, mh, k, k, fa, abuf.data_ptr<float>(), [](int64_t, int64_t) { return 1.0f; });
          }
          cached_tm = tm;
        }
        if (block) {  // runs of bs columns share a scale (tiles start at multiples of 512, so of bs when bs | 512)
          const int64_t run = kTileN % bs == 0 ? bs : 1;
          decode_tile(bp + n0, n, k, nw, run, fb, bbuf.data_ptr<float>(),
                      [&](int64_t r, int64_t c) { return sbp[(r / bs) * nb + (n0 + c) / bs]; });
        } else {
          decode_tile(bp + n0, n, k, nw, nw, fb, bbuf.data_ptr<float>(), [](int64_t, int64_t) { return 1.0f; });
        }
        cbuf = at::mm(abuf, bbuf);  // float32 accumulation in the BLAS
        const float* c = cbuf.const_data_ptr<float>();
        for (int64_t r = 0; r < mh; ++r) {
          const float row_scale = p.scaling == MatmulScaling::kTensor ? sap[0] * sbp[0]
                                  : p.scaling == MatmulScaling::kRow  ? sap[m0 + r]
                                                                      : 1.0f;
          scalar_t* dst = op + (m0 + r) * n + n0;
          for (int64_t j = 0; j < nw; ++j) {
            float v = c[r * nw + j] * row_scale;
            if (p.scaling == MatmulScaling::kRow) v *= sbp[n0 + j];
            if (biasp) v += biasp[n0 + j];
            dst[j] = static_cast<scalar_t>(v);
          }
        }
      }
      constexpr size_t kKeep = size_t{16} << 20;  // keep up to 64 MB of decode buffers per thread between calls
      if (a_store.size() + b_store.size() > kKeep) {
        std::vector<float>().swap(a_store);
        std::vector<float>().swap(b_store);
      }
    });
  });
  return out;
}

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("fp8_matmul", &deepseek_ext::fp8::fp8_matmul_cpu);
}
