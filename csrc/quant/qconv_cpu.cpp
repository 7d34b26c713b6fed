// CPU kernels of the static int8 path: activations stay 7-bit unsigned codes between layers (quant.h's activation
// format), channels-last (N, H, W, Cp) with channels padded to a multiple of 8 by zero-point codes.
//
// quantized_conv2d is an implicit GEMM: every output pixel is a row, every kernel tap contributes Cp channels of the
// input pixel it lands on (the zero-point row for taps in the padding), and the packed weight (pack_quantized_weight
// of the (Cout, taps * Cp) code matrix) is met block by block (64 output channels) by tiles of rows through the
// integer kernels of int8_kernels.h, whose epilogue requantises to the next layer's codes (bias, residual add and
// ReLU folded in). No im2col copy exists (except for few-channel first layers, quantized_im2col). Depthwise
// convolutions have a direct kernel.
// Pools and adds work on codes: max pooling commutes with the (monotonic) quantisation; averages and sums are
// requantised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "deepseek_ext/checks.h"
#include "deepseek_ext/quant.h"
#include "deepseek_ext/simd.h"
#include "int8_kernels.h"

namespace deepseek_ext {
namespace quant {
namespace {

int64_t round8(int64_t c) { return (c + 7) / 8 * 8; }

uint8_t quantize_value(float x, float inv_scale, int32_t zero) {
  float v = x * inv_scale;
  v = std::min(256.0f, std::max(-256.0f, v));
  const int32_t code = static_cast<int32_t>(std::nearbyint(v)) + zero;
  return static_cast<uint8_t>(std::clamp(code, 0, 127));
}

// quantize_value on vector lanes of y = x * inv_scale (rounding to nearest even by adding and subtracting 1.5 * 2^23).
template <typename VF>
DSX_INLINE auto quantize_lanes(VF y, int32_t zero) {
  using VI = simd::Vec<int32_t, static_cast<int>(sizeof(VF))>;
  y = y > -256.0f ? y : VF{} - 256.0f;
  y = y < 256.0f ? y : VF{} + 256.0f;
  VI code = __builtin_convertvector((y + 12582912.0f) - 12582912.0f, VI) + zero;
  code = code > 0 ? code : VI{};
  return code < 127 ? code : VI{} + 127;
}

void check_codes_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  check_dtype(op, name, t, {at::kByte});
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": expected ", name, " to be a ", dims,
                    "-D tensor of activation codes (channels last), but got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) % 8 == 0, op, ": expected the channels of ", name,
                    " padded to a multiple of 8, but got ", t.size(-1));
}

void check_scale_zero(const char* op, const char* name, double scale, int64_t zero) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": expected ", name, "_scale to be positive and finite, but got ",
                    scale);
  TORCH_CHECK_VALUE(zero >= 0 && zero <= 127, op, ": expected ", name, "_zero in [0, 127], but got ", zero);
}

std::pair<int64_t, int64_t> pair_of(const char* op, const char* name, at::IntArrayRef v, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": expected ", name, " to have 2 values, but got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, op, ": expected ", name, " values >= ", min, ", but got ", v);
  return {v[0], v[1]};
}

// A convolution window's kernel, stride, padding and dilation (two values each), checked.
struct Window {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

Window window_of(const char* op, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation) {
  const auto [kh, kw] = pair_of(op, "kernel", kernel, 1);
  const auto [sh, sw] = pair_of(op, "stride", stride, 1);
  const auto [ph, pw] = pair_of(op, "padding", padding, 0);
  const auto [dh, dw] = pair_of(op, "dilation", dilation, 1);
  return {kh, kw, sh, sw, ph, pw, dh, dw};
}

// n <= 32 bytes copied without a library call: overlapping 16- or 8-byte moves (never past src + n or dst + n).
inline void copy_small(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 16) {
    uint8_t a[16], b[16];
    std::memcpy(a, src, 16);
    std::memcpy(b, src + n - 16, 16);
    std::memcpy(dst, a, 16);
    std::memcpy(dst + n - 16, b, 16);
  } else if (n >= 8) {
    uint64_t a, b;
    std::memcpy(&a, src, 8);
    std::memcpy(&b, src + n - 8, 8);
    std::memcpy(dst, &a, 8);
    std::memcpy(dst + n - 8, &b, 8);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

}  // namespace

// x (N, C, H, W) or (N, C) float -> codes (N, H, W, Cp) or (N, Cp).
at::Tensor quantize_activation_cpu(const at::Tensor& x, double scale, int64_t zero_point) {
  constexpr const char* op = "quantize_activation";
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 2, op, ": expected x of shape (N, C, H, W) or (N, C), but got ",
                    x.sizes());
  check_scale_zero(op, "x", scale, zero_point);
  // Per (image, channel): a contiguous plane of `plane` floats (NCHW; 1 for (N, C)), quantised with vectors and
  // scattered to the channels-last codes.
  const bool image = x.dim() == 4;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t nb = x.size(0), c = x.size(1), cp = round8(c), plane = image ? x.size(2) * x.size(3) : 1;
  at::Tensor out = image ? at::empty({nb, x.size(2), x.size(3), cp}, x.options().dtype(at::kByte))
                         : at::empty({nb, cp}, x.options().dtype(at::kByte));
  const float* src = xf.const_data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float inv = static_cast<float>(1.0 / scale);
  const int32_t zero = static_cast<int32_t>(zero_point);
  std::atomic<bool> bad{false};
  // Work items: (image, pixel block of 256); every channel of a block per item.
  constexpr int64_t kBlock = 256;
  const int64_t blocks_per_image = (plane + kBlock - 1) / kBlock;
  at::parallel_for(0, nb * blocks_per_image, image ? 1 : 64, [&](int64_t begin, int64_t end) {
    simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
      constexpr int VB = decltype(vb)::value;
      using VF = simd::Vec<float, VB>;
      using VI = simd::Vec<int32_t, VB>;
      constexpr int64_t L = simd::kLanes<float, VB>;
      bool local_bad = false;
      VI nonfinite{};
      for (int64_t item = begin; item < end; ++item) {
        const int64_t img = item / blocks_per_image, p0 = item % blocks_per_image * kBlock;
        const int64_t p1 = std::min(plane, p0 + kBlock);
        if (cp > c) {  // channel padding: zero-point codes
          for (int64_t p = p0; p < p1; ++p) std::memset(dst + (img * plane + p) * cp + c, zero, static_cast<size_t>(cp - c));
        }
        for (int64_t ch = 0; ch < c; ++ch) {
          const float* s = src + (img * c + ch) * plane;
          uint8_t* d = dst + img * plane * cp + ch;
          int64_t p = p0;
          for (; p + L <= p1; p += L) {
            const VF v = simd::load<VF>(s + p);
            VI bits;
            std::memcpy(&bits, &v, sizeof(bits));
            nonfinite |= VI((bits & 0x7F800000) == 0x7F800000);
            const VI code = quantize_lanes(v * inv, zero);
#pragma GCC unroll 16
            for (int64_t i = 0; i < L; ++i) d[(p + i) * cp] = static_cast<uint8_t>(code[i]);
          }
          for (; p < p1; ++p) {
            local_bad |= !std::isfinite(s[p]);
            d[p * cp] = quantize_value(s[p], inv, zero);
          }
        }
      }
      for (int64_t i = 0; i < L; ++i) local_bad |= nonfinite[i] != 0;
      if (local_bad) bad = true;
    });
  });
  TORCH_CHECK_VALUE(!bad, op, ": x has non-finite values (inf or nan); a static int8 model takes finite inputs");
  return out;
}

// codes (N, H, W, Cp) or (N, Cp) -> float (N, channels, H, W) (channels-last memory) or (N, channels).
at::Tensor dequantize_activation_cpu(const at::Tensor& codes, double scale, int64_t zero_point, int64_t channels) {
  constexpr const char* op = "dequantize_activation";
  check_dtype(op, "codes", codes, {at::kByte});
  TORCH_CHECK_VALUE(codes.dim() == 4 || codes.dim() == 2, op, ": expected codes of shape (N, H, W, Cp) or (N, Cp)");
  check_scale_zero(op, "codes", scale, zero_point);
  TORCH_CHECK_VALUE(channels > 0 && channels <= codes.size(-1), op, ": expected 0 < channels <= ", codes.size(-1),
                    ", but got ", channels);
  const at::Tensor cc = codes.contiguous();
  const int64_t cp = cc.size(-1), pixels = cc.numel() / std::max<int64_t>(cp, 1);
  std::vector<int64_t> sizes(cc.sizes().begin(), cc.sizes().end());
  sizes.back() = channels;
  at::Tensor out = at::empty(sizes, codes.options().dtype(at::kFloat));
  const uint8_t* src = cc.const_data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, pixels, 256, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      for (int64_t i = 0; i < channels; ++i) dst[p * channels + i] = s * static_cast<float>(src[p * cp + i] - zero_point);
    }
  });
  return codes.dim() == 4 ? out.permute({0, 3, 1, 2}) : out;
}

at::Tensor quantized_conv2d_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                                const at::Tensor& w_sum, const at::Tensor& w_zero, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, int64_t out_channels, int64_t bits,
                                double in_scale, int64_t in_zero, double out_scale, int64_t out_zero, bool relu,
                                const std::optional<at::Tensor>& residual, double res_scale, int64_t res_zero,
                                bool output_float) {
  constexpr const char* op = "quantized_conv2d";
  check_codes_tensor(op, "x", x, 4);
  const auto [kh, kw, sh, sw, ph, pw, dh, dw] = window_of(op, kernel, stride, padding, dilation);
  check_scale_zero(op, "in", in_scale, in_zero);
  if (!output_float) check_scale_zero(op, "out", out_scale, out_zero);
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": expected bits to be 8 or 4, but got ", bits);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cp = x.size(3);
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, wo = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, op, ": the kernel does not fit the padded input (", h, "x", w, ")");
  TORCH_CHECK_VALUE(groups == 1, op, ": the implicit GEMM takes groups=1 (depthwise has its own op), but got ", groups);
  const int64_t taps = kh * kw, cout = out_channels, coutp = round8(cout);
  const std::vector<int64_t> want = packed_shape(cout, padded_k(taps * cp, 0), bits);
  check_dtype(op, "packed", packed, {bits == 8 ? at::kChar : at::kByte});
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(want), op, ": expected packed weights of shape ", want,
                    " for ", cout, " outputs, a ", kh, "x", kw, " kernel and ", cp, " input channels, but got ",
                    packed.sizes());
  for (auto [t, name, dt] : {std::tuple{&w_scale, "w_scale", at::kFloat}, {&w_sum, "w_sum", at::kInt},
                             {&w_zero, "w_zero", at::kInt}}) {
    check_dtype(op, name, *t, {dt});
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cout, op, ": expected ", name, " of shape [", cout, "], but got ",
                      t->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == cout, op, ": expected bias of shape [", cout, "], but got ",
                      bias->sizes());
  }
  if (residual.has_value()) {
    check_codes_tensor(op, "residual", *residual, 4);
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({n, ho, wo, coutp}), op,
                      ": expected residual codes of shape [", n, ", ", ho, ", ", wo, ", ", coutp, "], but got ",
                      residual->sizes());
    check_scale_zero(op, "res", res_scale, res_zero);
  }

  const at::Tensor xc = x.contiguous(), pk = packed.contiguous();
  const at::Tensor ws = w_scale.contiguous(), wsum = w_sum.contiguous(), wz = w_zero.contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({cout}, x.options().dtype(at::kFloat));
  const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = output_float ? at::empty({n, ho, wo, cout}, x.options().dtype(at::kFloat))
                                : at::empty({n, ho, wo, coutp}, x.options());
  const uint8_t* xp = xc.const_data_ptr<uint8_t>();
  const auto* wp = reinterpret_cast<const uint8_t*>(pk.const_data_ptr());
  const int32_t* wzp = wz.const_data_ptr<int32_t>();
  // 4-bit weights are widened to the 8-bit layout per block and centred on their zero points (code - zero, exact
  // in a signed byte); 8-bit weights with zero points keep them and the per-row code sums correct the products.
  const bool centred = bits == 4;
  if (centred) {
    for (int64_t c = 0; c < cout; ++c) {
      TORCH_CHECK_VALUE(wzp[c] >= 0 && wzp[c] <= 15, op, ": expected 4-bit weight zero points in [0, 15], but got ",
                        wzp[c], " for output channel ", c);
    }
  }
  const bool row_sums = !centred && std::any_of(wzp, wzp + cout, [](int32_t z) { return z != 0; });

  // Per input pixel: the sum of its codes minus the zero point (for weights with a zero point).
  std::vector<int32_t> pixel_q;
  if (row_sums) {
    pixel_q.resize(static_cast<size_t>(n * h * w));
    at::parallel_for(0, n * h * w, 1024, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        int32_t s = 0;
        for (int64_t c = 0; c < cp; ++c) s += xp[p * cp + c];
        pixel_q[p] = s - static_cast<int32_t>(in_zero * cp);
      }
    });
  }
  const std::vector<uint8_t> zero_row(static_cast<size_t>(cp), static_cast<uint8_t>(in_zero));
  const IntKernels& k = *int8_gemm_kernels();
  const int64_t mr = k.mr8;
  const int64_t rows = n * ho * wo, blocks = want[0], kp = padded_k(taps * cp, 0);
  const int64_t block_bytes = pk.numel() / blocks, wide_bytes = kp * kPackN;  // a block stored / in the 8-bit layout
  // Work: (group of blocks, chunk of rows). A group's weights (at most ~256 KiB) stay in L2 while each tile of rows,
  // set up once, meets every block of the group.
  const int64_t per_group = std::clamp<int64_t>((int64_t{256} << 10) / wide_bytes, 1, blocks);
  const int64_t block_groups = (blocks + per_group - 1) / per_group;
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = (rows + mr - 1) / mr;
  const int64_t chunks = std::clamp<int64_t>((4 * threads + block_groups - 1) / block_groups, 1, tiles);
  const int64_t per_chunk = (tiles + chunks - 1) / chunks * mr;  // whole tiles per chunk
  // The epilogue's constants (see Requant): scales, bias, residual zero point and 1 / out_scale folded per column.
  const float inv_out = output_float ? 1.0f : static_cast<float>(1.0 / out_scale);
  const float out_z = output_float ? 0.0f : static_cast<float>(out_zero);
  const float res_s = residual.has_value() ? static_cast<float>(res_scale) : 0.0f;
  const float res_add = residual.has_value() ? res_s * static_cast<float>(res_zero) : 0.0f;
  const float* wsp = ws.const_data_ptr<float>();
  const float* bp = bf.const_data_ptr<float>();
  const int32_t* wsump = wsum.const_data_ptr<int32_t>();
  const uint8_t* resp = residual.has_value() ? rc.const_data_ptr<uint8_t>() : nullptr;
  float* out_f = output_float ? out.data_ptr<float>() : nullptr;
  uint8_t* out_c = output_float ? nullptr : out.data_ptr<uint8_t>();
  const int64_t out_stride = output_float ? cout : coutp;
  const bool pointwise = taps == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;

  at::parallel_for(0, block_groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const uint8_t*> by_tap(static_cast<size_t>(taps * kConvRowStride));
    std::vector<uint8_t> wide(centred ? static_cast<size_t>(per_group * wide_bytes) : 0);
    std::vector<int32_t> xsum(static_cast<size_t>(mr));
    const size_t consts = static_cast<size_t>(per_group * kPackN);
    std::vector<float> mul(consts), add(consts);
    std::vector<int32_t> acc0(consts), wzv(consts);
    std::vector<Requant> q(static_cast<size_t>(per_group));
    std::vector<const uint8_t*> wblk(static_cast<size_t>(per_group));
    std::vector<const uint8_t*> res_rows(static_cast<size_t>(mr));
    std::vector<uint8_t*> out_codes(static_cast<size_t>(mr));
    std::vector<float*> out_float(static_cast<size_t>(mr));
    const TileRows tile{by_tap.data(), xsum.data(), residual.has_value() ? res_rows.data() : nullptr,
                        output_float ? nullptr : out_codes.data(), output_float ? out_float.data() : nullptr};
    int64_t current = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / chunks, ch = t % chunks;
      const int64_t b0 = g * per_group, nb = std::min(per_group, blocks - b0);
      if (g != current) {  // the group's per-column constants and (4-bit) widened, centred weights
        current = g;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t c0 = (b0 + j) * kPackN;
          uint8_t zero_bytes[kPackN];
          for (int64_t c = 0; c < kPackN; ++c) {
            const int64_t oc = std::min(c0 + c, cout - 1), i = j * kPackN + c;
            const int32_t z = c0 + c < cout ? wzp[oc] : 0;
            mul[i] = static_cast<float>(in_scale) * wsp[oc] * inv_out;
            add[i] = (bp[oc] - res_add) * inv_out + out_z;
            // Sum of the codes the products meet: the stored codes, or the centred ones.
            const int32_t sum = centred ? wsump[oc] - z * static_cast<int32_t>(taps * cp) : wsump[oc];
            acc0[i] = -static_cast<int32_t>(in_zero) * sum;
            wzv[i] = z;
            zero_bytes[c] = static_cast<uint8_t>(z);
          }
          wblk[j] = wp + (b0 + j) * block_bytes;
          if (centred) {
            k.widen_block(wblk[j], kp, wide.data() + j * wide_bytes, zero_bytes);
            wblk[j] = wide.data() + j * wide_bytes;
          }
          const int64_t i = j * kPackN;
          q[j] = Requant{acc0.data() + i, row_sums ? wzv.data() + i : nullptr, mul.data() + i, add.data() + i,
                         res_s * inv_out, relu ? out_z : 0.0f, 127.0f, relu, std::min(kPackN, cout - c0), c0};
        }
      }
      const int64_t r_begin = ch * per_chunk, r_end = std::min(rows, r_begin + per_chunk);
      int64_t b = r_begin / (ho * wo), oy = r_begin / wo % ho, ox = r_begin % wo;  // stepped row by row below
      for (int64_t r0 = r_begin; r0 < r_end; r0 += mr) {
        const int nr = static_cast<int>(std::min<int64_t>(mr, r_end - r0));
        for (int r = 0; r < nr; ++r) {
          const int64_t m = r0 + r;
          if (pointwise) {  // output pixel m reads input pixel m
            by_tap[r] = xp + m * cp;
            xsum[r] = row_sums ? pixel_q[m] : 0;
            if (resp != nullptr) res_rows[r] = resp + m * coutp;
            if (output_float) {
              out_float[r] = out_f + m * out_stride;
            } else {
              out_codes[r] = out_c + m * out_stride;
            }
            continue;
          }
          int32_t qs = 0;
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t iy = oy * sh - ph + ty * dh;
            for (int64_t tx = 0; tx < kw; ++tx) {
              const int64_t ix = ox * sw - pw + tx * dw;
              const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
              const int64_t pix = (b * h + iy) * w + ix;
              by_tap[(ty * kw + tx) * kConvRowStride + r] = inside ? xp + pix * cp : zero_row.data();
              if (row_sums && inside) qs += pixel_q[pix];
            }
          }
          xsum[r] = qs;
          if (resp != nullptr) res_rows[r] = resp + m * coutp;
          if (output_float) {
            out_float[r] = out_f + m * out_stride;
          } else {
            out_codes[r] = out_c + m * out_stride;
          }
          if (++ox == wo) {
            ox = 0;
            if (++oy == ho) {
              oy = 0;
              ++b;
            }
          }
        }
        for (int64_t j = 0; j < nb; ++j) k.conv_rows(nr, taps, cp, wblk[j], tile, q[j]);
      }
    }
  });
  if (!output_float && coutp > cout) out.narrow(3, cout, coutp - cout).fill_(static_cast<uint8_t>(out_zero));
  return output_float ? out.permute({0, 3, 1, 2}) : out;
}

// Depthwise convolution (one filter per channel) on codes: per output pixel, per tap, a vector multiply-add over
// channels with int32 accumulators (the weights are per-channel centred codes, value = w_scale[c] * code), then the
// same requantisation as quantized_conv2d. One source for every instruction set (simd::dispatch).
at::Tensor quantized_depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t channels, double in_scale, int64_t in_zero, double out_scale,
                                          int64_t out_zero, bool relu, bool output_float) {
  constexpr const char* op = "quantized_depthwise_conv2d";
  check_codes_tensor(op, "x", x, 4);
  const auto [kh, kw, sh, sw, ph, pw, dh, dw] = window_of(op, kernel, stride, padding, dilation);
  check_scale_zero(op, "in", in_scale, in_zero);
  if (!output_float) check_scale_zero(op, "out", out_scale, out_zero);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cp = x.size(3), taps = kh * kw;
  TORCH_CHECK_VALUE(channels > 0 && round8(channels) == cp, op, ": expected ", channels,
                    " channels padded to ", round8(channels), ", but x has ", cp);
  check_dtype(op, "weight", weight, {at::kChar});
  TORCH_CHECK_VALUE(weight.sizes() == at::IntArrayRef({taps, cp}), op, ": expected weight codes of shape [", taps,
                    ", ", cp, "], but got ", weight.sizes());
  check_dtype(op, "w_scale", w_scale, {at::kFloat});
  TORCH_CHECK_VALUE(w_scale.dim() == 1 && w_scale.size(0) == channels, op, ": expected w_scale of shape [", channels,
                    "], but got ", w_scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == channels, op, ": expected bias of shape [", channels,
                      "], but got ", bias->sizes());
  }
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, wo = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, op, ": the kernel does not fit the padded input (", h, "x", w, ")");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  std::vector<float> scale(static_cast<size_t>(cp), 0.0f), biasv(static_cast<size_t>(cp), 0.0f);
  const at::Tensor ws = w_scale.contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = static_cast<float>(in_scale) * ws.const_data_ptr<float>()[c];
    biasv[c] = bf.defined() ? bf.const_data_ptr<float>()[c] : 0.0f;
  }
  at::Tensor out = output_float ? at::empty({n, ho, wo, channels}, x.options().dtype(at::kFloat))
                                : at::empty({n, ho, wo, cp}, x.options());
  const uint8_t* xp = xc.const_data_ptr<uint8_t>();
  const int8_t* wp = wc.const_data_ptr<int8_t>();
  const float inv_out = output_float ? 1.0f : static_cast<float>(1.0 / out_scale);
  at::parallel_for(0, n * ho * wo, 16, [&](int64_t b, int64_t e) {
    simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
      constexpr int VB = decltype(vb)::value;
      using VI = simd::Vec<int32_t, VB>;
      using VF = simd::Vec<float, VB>;
      constexpr int64_t L = simd::kLanes<int32_t, VB>;
      using VU8 = simd::Vec<uint8_t, L>;
      using VS8 = simd::Vec<int8_t, L>;
      std::vector<int32_t> acc(static_cast<size_t>(cp));
      for (int64_t m = b; m < e; ++m) {
        const int64_t bi = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t ty = 0; ty < kh; ++ty) {
          const int64_t iy = oy * sh - ph + ty * dh;
          if (iy < 0 || iy >= h) continue;  // padding: value 0 contributes nothing
          for (int64_t tx = 0; tx < kw; ++tx) {
            const int64_t ix = ox * sw - pw + tx * dw;
            if (ix < 0 || ix >= w) continue;
            const uint8_t* row = xp + ((bi * h + iy) * w + ix) * cp;
            const int8_t* wt = wp + (ty * kw + tx) * cp;
            for (int64_t c = 0; c + L <= cp; c += L) {
              const VI u = simd::widen4<int32_t>(simd::load<VU8>(row + c)) - static_cast<int32_t>(in_zero);
              const VI wv = simd::widen4<int32_t>(simd::load<VS8>(wt + c));
              simd::store(acc.data() + c, simd::load<VI>(acc.data() + c) + u * wv);
            }
            for (int64_t c = cp / L * L; c < cp; ++c) acc[c] += (row[c] - static_cast<int32_t>(in_zero)) * wt[c];
          }
        }
        if (output_float) {
          float* dst = out.data_ptr<float>() + m * channels;
          for (int64_t c = 0; c < channels; ++c) {
            float y = static_cast<float>(acc[c]) * scale[c] + biasv[c];
            dst[c] = relu ? std::max(y, 0.0f) : y;
          }
          continue;
        }
        uint8_t* dst = out.data_ptr<uint8_t>() + m * cp;
        for (int64_t c = 0; c + L <= cp; c += L) {
          VF y = __builtin_convertvector(simd::load<VI>(acc.data() + c), VF) * simd::load<VF>(scale.data() + c) +
                 simd::load<VF>(biasv.data() + c);
          if (relu) y = y > 0.0f ? y : VF{};
          simd::store(dst + c, simd::narrow4<uint8_t>(quantize_lanes(y * inv_out, static_cast<int32_t>(out_zero))));
        }
        for (int64_t c = cp / L * L; c < cp; ++c) {
          float y = static_cast<float>(acc[c]) * scale[c] + biasv[c];
          if (relu) y = std::max(y, 0.0f);
          dst[c] = quantize_value(y, inv_out, static_cast<int32_t>(out_zero));
        }
        for (int64_t c = channels; c < cp; ++c) dst[c] = static_cast<uint8_t>(out_zero);
      }
    });
  });
  return output_float ? out.permute({0, 3, 1, 2}) : out;
}

// Patches of a few-channel input (a network's first layer: 3 channels padded to 8 would waste most of the
// implicit GEMM's work): codes (N, Ho, Wo, round8(kh * kw * channels)), taps outer, channels inner, padding taps
// and the tail filled with the zero point.
at::Tensor quantized_im2col_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t channels, int64_t zero) {
  constexpr const char* op = "quantized_im2col";
  check_codes_tensor(op, "x", x, 4);
  const auto [kh, kw, sh, sw, ph, pw, dh, dw] = window_of(op, kernel, stride, padding, dilation);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cp = x.size(3);
  TORCH_CHECK_VALUE(channels > 0 && channels <= cp, op, ": expected 0 < channels <= ", cp, ", but got ", channels);
  TORCH_CHECK_VALUE(zero >= 0 && zero <= 127, op, ": expected zero in [0, 127], but got ", zero);
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, wo = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, op, ": the kernel does not fit the padded input (", h, "x", w, ")");
  const int64_t k = kh * kw * channels, kp = round8(k);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({n, ho, wo, kp}, x.options());
  const uint8_t* xp = xc.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  if (dw == 1 && kw * channels <= 32) {
    // A kernel row's taps over consecutive pixels are one run of kw * channels bytes of the input without its
    // channel padding; with the spatial padding made real (zero-point codes), every run lies inside it: one short
    // copy per kernel row, no bounds checks.
    const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
    at::Tensor padded = at::full({n, hp, wp, channels}, zero, xc.options());
    padded.narrow(1, ph, h).narrow(2, pw, w).copy_(xc.narrow(3, 0, channels));
    const uint8_t* pp = padded.const_data_ptr<uint8_t>();
    const int64_t run = kw * channels;
    uint8_t tail[8];
    std::memset(tail, static_cast<int>(zero), sizeof(tail));
    at::parallel_for(0, n * ho * wo, 256, [&](int64_t b, int64_t e) {
      int64_t bi = b / (ho * wo), oy = b / wo % ho, ox = b % wo;  // stepped row by row
      for (int64_t m = b; m < e; ++m) {
        uint8_t* row = dst + m * kp;
        const uint8_t* src = pp + ((bi * hp + oy * sh) * wp + ox * sw) * channels;
        for (int64_t ty = 0; ty < kh; ++ty) copy_small(row + ty * run, src + ty * dh * wp * channels, run);
        copy_small(row + k, tail, kp - k);  // kp - k < 8
        if (++ox == wo) {
          ox = 0;
          if (++oy == ho) {
            oy = 0;
            ++bi;
          }
        }
      }
    });
    return out;
  }
  at::parallel_for(0, n * ho * wo, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const int64_t bi = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
      uint8_t* row = dst + m * kp;
      for (int64_t ty = 0; ty < kh; ++ty) {
        const int64_t iy = oy * sh - ph + ty * dh;
        uint8_t* d = row + ty * kw * channels;
        for (int64_t tx = 0; tx < kw; ++tx, d += channels) {
          const int64_t ix = ox * sw - pw + tx * dw;
          if (iy < 0 || iy >= h || ix < 0 || ix >= w) {
            std::memset(d, static_cast<int>(zero), static_cast<size_t>(channels));
          } else {
            std::memcpy(d, xp + ((bi * h + iy) * w + ix) * cp, static_cast<size_t>(channels));
          }
        }
      }
      std::memset(row + k, static_cast<int>(zero), static_cast<size_t>(kp - k));
    }
  });
  return out;
}

at::Tensor quantized_max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "quantized_max_pool2d";
  check_codes_tensor(op, "x", x, 4);
  const auto [kh, kw] = pair_of(op, "kernel", kernel, 1);
  const auto [sh, sw] = stride.empty() ? std::pair{kh, kw} : pair_of(op, "stride", stride, 1);
  const auto [ph, pw] = pair_of(op, "padding", padding, 0);
  const auto [dh, dw] = pair_of(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(2 * ph <= kh && 2 * pw <= kw, op, ": padding should be at most half the kernel, but got ", padding,
                    " for a kernel of ", kernel);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cp = x.size(3);
  auto out_len = [&](int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
    const int64_t span = in + 2 * p - d * (k - 1) - 1;
    int64_t o = (ceil_mode ? (span + s - 1) / s : span / s) + 1;
    if (ceil_mode && (o - 1) * s >= in + p) --o;  // PyTorch's rule: the last window starts inside the input
    return o;
  };
  const int64_t ho = out_len(h, kh, sh, ph, dh), wo = out_len(w, kw, sw, pw, dw);
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, op, ": output size is not positive for input ", h, "x", w);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({n, ho, wo, cp}, x.options());
  const uint8_t* xp = xc.const_data_ptr<uint8_t>();
  uint8_t* op_ = out.data_ptr<uint8_t>();
  at::parallel_for(0, n * ho * wo, 64, [&](int64_t b, int64_t e) {
    simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
      constexpr int VB = decltype(vb)::value;
      using VU = simd::Vec<uint8_t, VB>;
      for (int64_t m = b; m < e; ++m) {
        const int64_t bi = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
        uint8_t* dst = op_ + m * cp;
        // Channel slices of one vector (the last one may overlap the previous: max is idempotent).
        for (int64_t c0 = 0; c0 < cp; c0 += VB) {
          const int64_t c = cp >= VB ? std::min(c0, cp - VB) : 0;
          VU best{};
          uint8_t tail[VB] = {};
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t iy = oy * sh - ph + ty * dh;
            if (iy < 0 || iy >= h) continue;
            for (int64_t tx = 0; tx < kw; ++tx) {
              const int64_t ix = ox * sw - pw + tx * dw;
              if (ix < 0 || ix >= w) continue;
              const uint8_t* row = xp + ((bi * h + iy) * w + ix) * cp + c;
              if (cp >= VB) {
                best = simd::vmax(best, simd::load<VU>(row));
              } else {
                for (int64_t i = 0; i < cp; ++i) tail[i] = std::max(tail[i], row[i]);
              }
            }
          }
          if (cp >= VB) {
            simd::store(dst + c, best);
          } else {
            std::memcpy(dst, tail, static_cast<size_t>(cp));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor quantized_adaptive_avg_pool2d_cpu(const at::Tensor& x, at::IntArrayRef output_size, double in_scale,
                                             int64_t in_zero, double out_scale, int64_t out_zero) {
  constexpr const char* op = "quantized_adaptive_avg_pool2d";
  check_codes_tensor(op, "x", x, 4);
  const auto [oh, ow] = pair_of(op, "output_size", output_size, 1);
  check_scale_zero(op, "in", in_scale, in_zero);
  check_scale_zero(op, "out", out_scale, out_zero);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cp = x.size(3);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({n, oh, ow, cp}, x.options());
  const uint8_t* xp = xc.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float ratio = static_cast<float>(in_scale / out_scale);
  at::parallel_for(0, n * oh * ow, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(static_cast<size_t>(cp));
    for (int64_t m = b; m < e; ++m) {
      const int64_t bi = m / (oh * ow), oy = (m / ow) % oh, ox = m % ow;
      const int64_t y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;  // PyTorch's adaptive windows
      const int64_t x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t iy = y0; iy < y1; ++iy) {
        for (int64_t ix = x0; ix < x1; ++ix) {
          const uint8_t* row = xp + ((bi * h + iy) * w + ix) * cp;
          for (int64_t c = 0; c < cp; ++c) acc[c] += row[c];
        }
      }
      const int32_t count = static_cast<int32_t>((y1 - y0) * (x1 - x0));
      for (int64_t c = 0; c < cp; ++c) {
        const float mean = static_cast<float>(acc[c] - count * in_zero) / static_cast<float>(count);
        dst[m * cp + c] = quantize_value(mean * ratio, 1.0f, static_cast<int32_t>(out_zero));
      }
    }
  });
  return out;
}

at::Tensor quantized_add_cpu(const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& b, double b_scale,
                             int64_t b_zero, double out_scale, int64_t out_zero, bool relu) {
  constexpr const char* op = "quantized_add";
  check_dtype(op, "a", a, {at::kByte});
  check_dtype(op, "b", b, {at::kByte});
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": expected a and b of the same shape, but got ", a.sizes(), " and ",
                    b.sizes());
  check_scale_zero(op, "a", a_scale, a_zero);
  check_scale_zero(op, "b", b_scale, b_zero);
  check_scale_zero(op, "out", out_scale, out_zero);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  const uint8_t* ap = ac.const_data_ptr<uint8_t>();
  const uint8_t* bp = bc.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float sa = static_cast<float>(a_scale / out_scale), sb = static_cast<float>(b_scale / out_scale);
  at::parallel_for(0, a.numel(), 1 << 14, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      float v = sa * static_cast<float>(ap[i] - a_zero) + sb * static_cast<float>(bp[i] - b_zero);
      if (relu) v = std::max(v, 0.0f);
      dst[i] = quantize_value(v, 1.0f, static_cast<int32_t>(out_zero));
    }
  });
  return out;
}

}  // namespace quant
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("quantize_activation", &deepseek_ext::quant::quantize_activation_cpu);
  m.impl("dequantize_activation", &deepseek_ext::quant::dequantize_activation_cpu);
  m.impl("quantized_conv2d", &deepseek_ext::quant::quantized_conv2d_cpu);
  m.impl("quantized_im2col", &deepseek_ext::quant::quantized_im2col_cpu);
  m.impl("quantized_depthwise_conv2d", &deepseek_ext::quant::quantized_depthwise_conv2d_cpu);
  m.impl("quantized_max_pool2d", &deepseek_ext::quant::quantized_max_pool2d_cpu);
  m.impl("quantized_adaptive_avg_pool2d", &deepseek_ext::quant::quantized_adaptive_avg_pool2d_cpu);
  m.impl("quantized_add", &deepseek_ext::quant::quantized_add_cpu);
}
