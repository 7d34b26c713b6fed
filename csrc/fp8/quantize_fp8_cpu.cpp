// CPU kernels for quantize_fp8 / dequantize_fp8.
//
// Per-tensor scaling takes two passes (a parallel amax, then scale-and-cast). Row and block scaling are fused:
// each task takes whole tiles, finds the tile's amax and quantises it while it is still in cache.
// The casts use fp8_simd.h's vector codec and the other loops are written so that GCC vectorises them; all are
// compiled for each instruction-set level (simd::dispatch, cpu.h). One binary runs on every x86-64 machine and is
// fast where it can be.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "deepseek_ext/cpu.h"
#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/fp8_format.h"
#include "deepseek_ext/fp8_quant.h"
#include "deepseek_ext/simd.h"
#include "fp8_lut.h"
#include "fp8_simd.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

// Work per parallel task, in elements: large enough to amortise scheduling, small enough to balance 2+ cores.
constexpr int64_t kGrain = 1 << 15;

// Per input dtype: the raw bits type, the magnitude mask and the first non-finite magnitude. Non-negative
// IEEE values order like their bit patterns, so the amax is an integer max over the masked bits (exact, and
// it vectorises where a float max with NaN semantics would not).
template <typename T>
struct InputBits;
template <>
struct InputBits<float> {
  using U = uint32_t;
  static constexpr U kAbsMask = 0x7FFFFFFFu;
  static constexpr U kInf = 0x7F800000u;
  static float to_float(U b) { return bits_float(b); }
};
template <>
struct InputBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kAbsMask = 0x7FFF;
  static constexpr U kInf = 0x7C00;
  static float to_float(U b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
};
template <>
struct InputBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kAbsMask = 0x7FFF;
  static constexpr U kInf = 0x7F80;
  static float to_float(U b) { return bits_float(static_cast<uint32_t>(b) << 16); }
};

// Largest finite |x| in x[0:n] as the input type's bit pattern (inf and NaN are skipped).
template <typename T>
DSX_INLINE typename InputBits<T>::U amax_finite_bits_impl(const T* x, int64_t n) {
  using B = InputBits<T>;
  using U = typename B::U;
  const U* bits = reinterpret_cast<const U*>(x);
  U m = 0;
  for (int64_t i = 0; i < n; ++i) {
    U b = bits[i] & B::kAbsMask;
    b &= static_cast<U>(0u - static_cast<U>(b < B::kInf));
    m = std::max(m, b);
  }
  return m;
}

template <typename T>
typename InputBits<T>::U amax_finite_bits(const T* x, int64_t n) {
  return simd::dispatch([&](auto) DSX_LAMBDA_INLINE { return amax_finite_bits_impl(x, n); });
}

// q[i] = saturate_cast<fp8>(x[i] / scale). A true division, so results equal PyTorch's `x / scale` bit for bit.
template <typename T, Format F>
void quantize_span(const T* x, uint8_t* q, int64_t n, float scale) {
  const int64_t i0 = simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
    constexpr int VB = decltype(vb)::value;
    constexpr int64_t L = simd::kLanes<float, VB>;
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const auto codes = vec::encode<F, VB>(vec::load_float<T, VB>(x + i) / scale);
      simd::store(q + i, simd::narrow4<uint8_t>(codes));
    }
    return i;
  });
  for (int64_t i = i0; i < n; ++i) q[i] = float_to_fp8_bits_sat<F>(static_cast<float>(x[i]) / scale);
}

template <Format F, typename O>
void dequantize_span(const uint8_t* q, O* out, int64_t n, float scale, const float* lut) {
  const int64_t i0 = simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
    constexpr int VB = decltype(vb)::value;
    constexpr int64_t L = simd::kLanes<float, VB>;
    int64_t i = 0;
    for (; i + L <= n; i += L) vec::store_as<O, VB>(out + i, vec::decode<F, VB>(q + i) * scale);
    return i;
  });
  for (int64_t i = i0; i < n; ++i) out[i] = static_cast<O>(lut[q[i]] * scale);
}

// Row and block scaling: the work is cut into strips of one tile-row by up to kMaxStripTiles tiles, walked
// row-major so memory is read as long contiguous runs. Strips are narrowed when there are too few of them to
// keep every thread busy. fn(r0, r1, tc0, tc1) handles rows [r0, r1) of tile columns [tc0, tc1).
constexpr int64_t kMaxStripTiles = 64;

template <typename Fn>
void for_each_tile_strip(const QuantLayout& l, const Fn& fn) {
  int64_t width = std::min<int64_t>(l.tiles_c, kMaxStripTiles);
  const int64_t min_tasks = 4 * at::get_num_threads();
  while (width > 1 && l.tiles_r * ((l.tiles_c + width - 1) / width) < min_tasks) width = (width + 1) / 2;
  const int64_t per_row = (l.tiles_c + width - 1) / width;
  const int64_t strip_elems = std::max<int64_t>(l.tile_rows * width * std::min(l.tile_cols, l.cols), 1);
  at::parallel_for(0, l.tiles_r * per_row, std::max<int64_t>(1, kGrain / strip_elems), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r0 = (t / per_row) * l.tile_rows;
      const int64_t tc0 = (t % per_row) * width;
      fn(r0, std::min(r0 + l.tile_rows, l.rows), tc0, std::min(tc0 + width, l.tiles_c));
    }
  });
}

template <typename T, Format F>
void quantize_impl(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, const QuantLayout& l) {
  using B = InputBits<T>;
  using U = typename B::U;
  const T* xp = x.const_data_ptr<T>();
  auto* qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  float* sp = scale.data_ptr<float>();

  if (l.granularity == Granularity::kTensor) {
    const int64_t n = x.numel();
    const U bits = at::parallel_reduce(
        0, n, kGrain, U{0},
        [&](int64_t b, int64_t e, U acc) { return std::max(acc, amax_finite_bits<T>(xp + b, e - b)); },
        [](U a, U b) { return std::max(a, b); });
    const float s = scale_from_amax<F>(B::to_float(bits));
    *sp = s;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { quantize_span<T, F>(xp + b, qp + b, e - b, s); });
    return;
  }

  for_each_tile_strip(l, [&](int64_t r0, int64_t r1, int64_t tc0, int64_t tc1) {
    // Pass 1 streams the strip row by row, keeping one running amax per tile; pass 2 re-reads it from cache.
    U amax[kMaxStripTiles] = {};
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t tc = tc0; tc < tc1; ++tc) {
        const int64_t c0 = tc * l.tile_cols;
        const int64_t w = std::min(c0 + l.tile_cols, l.cols) - c0;
        amax[tc - tc0] = std::max(amax[tc - tc0], amax_finite_bits<T>(xp + r * l.cols + c0, w));
      }
    }
    float scales[kMaxStripTiles];
    const int64_t tr = r0 / l.tile_rows;
    for (int64_t tc = tc0; tc < tc1; ++tc) {
      scales[tc - tc0] = scale_from_amax<F>(B::to_float(amax[tc - tc0]));
      sp[tr * l.tiles_c + tc] = scales[tc - tc0];
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t tc = tc0; tc < tc1; ++tc) {
        const int64_t c0 = tc * l.tile_cols;
        const int64_t w = std::min(c0 + l.tile_cols, l.cols) - c0;
        quantize_span<T, F>(xp + r * l.cols + c0, qp + r * l.cols + c0, w, scales[tc - tc0]);
      }
    }
  });
}

template <Format F, typename O>
void dequantize_impl(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out, const QuantLayout& l,
                     const float* lut) {
  const auto* qp = reinterpret_cast<const uint8_t*>(q.const_data_ptr());
  O* op = out.data_ptr<O>();
  const float* sp = scale.const_data_ptr<float>();

  if (l.granularity == Granularity::kTensor) {
    const float s = *sp;
    at::parallel_for(0, q.numel(), kGrain,
                     [&](int64_t b, int64_t e) { dequantize_span<F, O>(qp + b, op + b, e - b, s, lut); });
    return;
  }
  for_each_tile_strip(l, [&](int64_t r0, int64_t r1, int64_t tc0, int64_t tc1) {
    const float* strip_scales = sp + (r0 / l.tile_rows) * l.tiles_c;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t tc = tc0; tc < tc1; ++tc) {
        const int64_t c0 = tc * l.tile_cols;
        const int64_t w = std::min(c0 + l.tile_cols, l.cols) - c0;
        dequantize_span<F, O>(qp + r * l.cols + c0, op + r * l.cols + c0, w, strip_scales[tc], lut);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, std::optional<at::ScalarType> dtype,
                                                    c10::string_view granularity, int64_t block_size) {
  const at::ScalarType out_dtype = quantize_dtype_or_default(dtype);
  const QuantLayout l = check_quantize_fp8(x, out_dtype, granularity, block_size);
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor scale = at::empty(l.scale_shape, x.options().dtype(at::kFloat));
  const Format format = fp8_format("quantize_fp8", "dtype", out_dtype);
  if (x.numel() == 0) {
    // Nothing to quantise; any scales (rows of zero width) are those of an all-zero input.
    dispatch_format(format, [&](auto fmt) { scale.fill_(scale_from_amax<decltype(fmt)::value>(0.0f)); });
    return {q, scale};
  }
  DSX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_fp8_cpu", [&] {
    dispatch_format(format, [&](auto fmt) { quantize_impl<scalar_t, decltype(fmt)::value>(xc, q, scale, l); });
  });
  return {q, scale};
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& x, const at::Tensor& scale, c10::string_view granularity,
                              int64_t block_size, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dtype = dequantize_dtype_or_default(out_dtype);
  const QuantLayout l = check_dequantize_fp8(x, scale, granularity, block_size, dtype);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (x.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scale.contiguous();
  const float* lut = decode_table(fp8_format("dequantize_fp8", "x", x.scalar_type()));
  DSX_DISPATCH_FLOAT_HALF_BF16(dtype, "dequantize_fp8_cpu", [&] {
    dispatch_format(fp8_format("dequantize_fp8", "x", x.scalar_type()),
                    [&](auto fmt) { dequantize_impl<decltype(fmt)::value, scalar_t>(xc, sc, out, l, lut); });
  });
  return out;
}

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("quantize_fp8", &deepseek_ext::fp8::quantize_fp8_cpu);
  m.impl("dequantize_fp8", &deepseek_ext::fp8::dequantize_fp8_cpu);
}
