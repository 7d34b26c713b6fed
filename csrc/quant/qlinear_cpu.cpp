// CPU kernels: quantize_weight (packing) and quantized_linear.
//
// act_bits = 8: activations are quantised to 7-bit codes per row (or with a calibrated per-tensor scale), and
// tiles of 4 weight rows x 2 activation rows are reduced with integer multiply-adds (AVX2: vpmaddubsw/vpmaddwd),
// per group; the float epilogue applies y = sx * sum_g sw * (dot_g - zw * sum_{k in g} x_code).
// Weight-only (act_bits 16 / 0): small batches run a fused GEMV that converts codes to float in registers; larger
// batches decode tiles of weight rows to float and use the BLAS. Output tiles are spread over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "deepseek_ext/quant.h"
#include "qlinear_avx2.h"

namespace deepseek_ext {
namespace quant {
namespace {

constexpr int64_t kTileN = 4;

bool have_avx2() {
#ifdef DSX_HAVE_AVX2
  return cpu_has_avx2();
#else
  return false;
#endif
}

void dot_tile_u7(const uint8_t* const* x, const uint8_t* const* w, const QLinearPlan& p, int rows, int32_t* dots) {
#ifdef DSX_HAVE_AVX2
  const int64_t cpg = p.group / 32;
  if (p.bits == 8) {
    rows == 2 ? avx2::dot_tile_u7<8, 2>(x, w, p.groups, cpg, dots) : avx2::dot_tile_u7<8, 1>(x, w, p.groups, cpg, dots);
  } else {
    rows == 2 ? avx2::dot_tile_u7<4, 2>(x, w, p.groups, cpg, dots) : avx2::dot_tile_u7<4, 1>(x, w, p.groups, cpg, dots);
  }
#endif
}

int64_t code_at(const uint8_t* row, int64_t k, int64_t bits) {
  if (bits == 8) return static_cast<int8_t>(row[k]);
  const int64_t chunk = k / 32, j = k % 32;
  const uint8_t b = row[16 * chunk + (j % 16)];
  return j < 16 ? (b & 0x0F) : (b >> 4);
}

void set_code(uint8_t* row, int64_t k, int64_t bits, int64_t code) {
  if (bits == 8) {
    row[k] = static_cast<uint8_t>(static_cast<int8_t>(code));
    return;
  }
  const int64_t chunk = k / 32, j = k % 32;
  uint8_t& b = row[16 * chunk + (j % 16)];
  b = j < 16 ? static_cast<uint8_t>((b & 0xF0) | code) : static_cast<uint8_t>((b & 0x0F) | (code << 4));
}

// sum_{k in group g} x_code[k] (for the weight zero-point correction)
void group_sums(const int8_t* x, int64_t groups, int64_t group, int32_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    int32_t s = 0;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[k];
    out[g] = s;
  }
}

void unpack_row4(const uint8_t* row, int64_t kp, uint8_t* out) {
#ifdef DSX_HAVE_AVX2
  if (cpu_has_avx2()) {
    avx2::unpack4(row, kp, out);
    return;
  }
#endif
  for (int64_t k = 0; k < kp; ++k) out[k] = static_cast<uint8_t>(code_at(row, k, 4));
}

void dot_tile_scalar(const int8_t* const* x, const uint8_t* const* w, const QLinearPlan& p, int rows, int32_t* dots) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < 4; ++c) {
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t s = 0;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += x[r][k] * code_at(w[c], k, p.bits);
        dots[(r * 4 + c) * p.groups + g] = s;
      }
    }
  }
}

void float_dots(const float* x, const uint8_t* w, const QLinearPlan& p, float* out) {
#ifdef DSX_HAVE_AVX2
  if (cpu_has_avx2()) {
    if (p.bits == 8) {
      avx2::float_dots<8>(x, w, p.groups, p.group / 32, out);
    } else {
      avx2::float_dots<4>(x, w, p.groups, p.group / 32, out);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < p.groups; ++g) {
    float s = 0.0f;
    for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += x[k] * static_cast<float>(code_at(w, k, p.bits));
    out[g] = s;
  }
}

void decode_row(const uint8_t* w, const QLinearPlan& p, const float* scale, const int32_t* zero, float* out) {
#ifdef DSX_HAVE_AVX2
  if (cpu_has_avx2()) {
    p.bits == 8 ? avx2::decode_row<8>(w, p.groups, p.group / 32, scale, zero, out)
                : avx2::decode_row<4>(w, p.groups, p.group / 32, scale, zero, out);
    return;
  }
#endif
  for (int64_t k = 0; k < p.kp; ++k) {
    const int64_t g = k / p.group;
    out[k] = scale[g] * static_cast<float>(code_at(w, k, p.bits) - zero[g]);
  }
}

// x (M, K) float -> 7-bit codes in [-63, 63] (M, Kp), zero-padded, with one scale per row (or the given static
// scale). Seven bits let the AVX2 kernel add 64 and use unsigned bytes without saturating vpmaddubsw (fbgemm's
// reduce_range); every batch size and every CPU uses the same codes, so results do not depend on either.
void quantize_activations(const float* x, const QLinearPlan& p, const float* static_scale, int8_t* xq, uint8_t* xu,
                          float* sx, int32_t* xsum) {
  const bool simd = have_avx2();
  at::parallel_for(0, p.m, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* row = x + m * p.k;
      float s;
      if (static_scale != nullptr) {
        s = *static_scale;
      } else {
        float amax = 0.0f;
#ifdef DSX_HAVE_AVX2
        if (simd) amax = avx2::row_amax(row, p.k);
#endif
        if (!simd) {
          for (int64_t k = 0; k < p.k; ++k) amax = std::max(amax, std::fabs(row[k]));
        }
        s = std::max(amax, 1e-12f) / 63.0f;
      }
      sx[m] = s;
      int8_t* q = xq + m * p.kp;
      uint8_t* u = xu + m * p.kp;
      int64_t k = 0;
#ifdef DSX_HAVE_AVX2
      if (simd) k = avx2::quantize_row7(row, p.k, s, q, u);
#endif
      for (; k < p.k; ++k) {
        q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(row[k] / s), -63.0f, 63.0f));
        u[k] = static_cast<uint8_t>(q[k] + 64);
      }
      std::fill(q + p.k, q + p.kp, int8_t{0});
      std::fill(u + p.k, u + p.kp, uint8_t{64});
      group_sums(q, p.groups, p.group, xsum + m * p.groups);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_weight_cpu(const at::Tensor& w, int64_t bits,
                                                                   int64_t group_size, bool symmetric) {
  check_quantize_weight(w, bits, group_size);
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1), kp = padded_k(k, group_size), group = effective_group(kp, group_size);
  const int64_t groups = kp / group;
  at::Tensor codes = at::zeros({n, bits == 8 ? kp : kp / 2}, w.options().dtype(bits == 8 ? at::kChar : at::kByte));
  at::Tensor scales = at::empty({n, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, groups}, w.options().dtype(at::kInt));
  const float* wp = wf.const_data_ptr<float>();
  auto* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  float* sp = scales.data_ptr<float>();
  int32_t* zp = zeros.data_ptr<int32_t>();
  const int64_t row_bytes = codes.size(1);
  // Code range: 8 bits signed [-127, 127] (never -128: the kernel negates codes, and -(-128) does not fit a byte);
  // 4 bits unsigned [0, 15].
  const float qmax_sym = bits == 8 ? 127.0f : 7.0f;
  const int64_t lo_code = bits == 8 ? -127 : 0, hi_code = bits == 8 ? 127 : 15;
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = wp + r * k;
      uint8_t* out = cp + r * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group, k1 = std::min(k, k0 + group);
        float mn = 0.0f, mx = 0.0f;
        for (int64_t i = k0; i < k1; ++i) {
          mn = std::min(mn, row[i]);
          mx = std::max(mx, row[i]);
        }
        float scale;
        int64_t zero;
        if (symmetric) {
          scale = std::max(std::max(-mn, mx), 1e-12f) / qmax_sym;
          zero = bits == 8 ? 0 : 8;
        } else {
          scale = std::max(mx - mn, 1e-12f) / static_cast<float>(hi_code - lo_code);
          zero = std::clamp<int64_t>(static_cast<int64_t>(std::nearbyint(lo_code - mn / scale)), lo_code, hi_code);
        }
        sp[r * groups + g] = scale;
        zp[r * groups + g] = static_cast<int32_t>(zero);
        const int64_t lo = symmetric ? zero - static_cast<int64_t>(qmax_sym) : lo_code;
        const int64_t hi = symmetric ? zero + static_cast<int64_t>(qmax_sym) : hi_code;
        for (int64_t i = k0; i < k0 + group; ++i) {
          const int64_t code =
              i < k1 ? std::clamp<int64_t>(static_cast<int64_t>(std::nearbyint(row[i] / scale)) + zero, lo, hi) : zero;
          set_code(out, i, bits, code);
        }
      }
    }
  });
  return {codes, scales, zeros};
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features,
                                int64_t act_bits, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& act_scale,
                                const std::optional<at::Tensor>& code_sums) {
  const QLinearPlan p = check_quantized_linear(x, codes, scales, zeros, bits, group_size, in_features, act_bits, bias,
                                               act_scale, code_sums);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({p.m, p.n}, x.options().dtype(at::kFloat));
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const auto* wp = reinterpret_cast<const uint8_t*>(cc.const_data_ptr());
  const float* sw = sc.const_data_ptr<float>();
  const int32_t* zw = zc.const_data_ptr<int32_t>();
  const int64_t row_bytes = cc.size(1);
  float* op = out.data_ptr<float>();
  if (p.m > 0 && p.n > 0) {
    if (p.act_bits == 8) {
      std::vector<int8_t> xq(static_cast<size_t>(p.m * p.kp));
      std::vector<uint8_t> xu(static_cast<size_t>(p.m * p.kp));  // codes + 64, for the unsigned AVX2 kernel
      std::vector<float> sx(static_cast<size_t>(p.m));
      std::vector<int32_t> xsum(static_cast<size_t>(p.m * p.groups));
      const at::Tensor st = act_scale.has_value() ? act_scale->to(at::kFloat).cpu() : at::Tensor();
      quantize_activations(xf.const_data_ptr<float>(), p, st.defined() ? st.const_data_ptr<float>() : nullptr,
                           xq.data(), xu.data(), sx.data(), xsum.data());
      const bool u7 = have_avx2();
      std::vector<int32_t> wsum;
      if (u7) {  // the +64 shift of the activation codes is undone with the weights' per-group code sums
        wsum.resize(static_cast<size_t>(p.n * p.groups));
        if (code_sums.has_value()) {
          const at::Tensor cs = code_sums->cpu().contiguous();
          std::copy_n(cs.const_data_ptr<int32_t>(), wsum.size(), wsum.data());
        } else {
          at::parallel_for(0, p.n, 64, [&](int64_t b, int64_t e) {
            for (int64_t n = b; n < e; ++n) {
              for (int64_t g = 0; g < p.groups; ++g) {
                int32_t s = 0;
                for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += code_at(wp + n * row_bytes, k, p.bits);
                wsum[n * p.groups + g] = s;
              }
            }
          });
        }
      }
      const int64_t tiles_n = (p.n + kTileN - 1) / kTileN, pairs = (p.m + 1) / 2;
      // Loop order by what fits in cache: a small weight (convolutions: few output channels, short K) stays in cache
      // while activation rows stream past once (rows outer); a large one is streamed once while the activation
      // block stays in cache (weight tiles outer). 4-bit weights are unpacked to one byte per code first when several
      // activation rows will reuse them.
      const bool small_weight = p.n * p.kp <= (int64_t{1} << 19);
      const bool unpack = u7 && p.bits == 4 && p.m > 2;
      QLinearPlan p8 = p;
      p8.bits = 8;
      const QLinearPlan& pk = unpack ? p8 : p;
      std::vector<uint8_t> unpacked(unpack && small_weight ? static_cast<size_t>(p.n * p.kp) : 0);
      if (!unpacked.empty()) {
        at::parallel_for(0, p.n, 16, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n) unpack_row4(wp + n * row_bytes, p.kp, unpacked.data() + n * p.kp);
        });
      }
      auto weight_row = [&](int64_t n) {
        n = std::min(n, p.n - 1);  // edge tiles repeat the last row
        return unpacked.empty() ? wp + n * row_bytes : unpacked.data() + n * p.kp;
      };
      auto tile = [&](int64_t n0, const uint8_t* const* w, int64_t m0, int32_t* dots) {
        const int rows = std::min<int64_t>(2, p.m - m0);
        if (u7) {
          const uint8_t* xr[2] = {xu.data() + m0 * p.kp, xu.data() + (m0 + rows - 1) * p.kp};
          dot_tile_u7(xr, w, pk, rows, dots);
        } else {
          const int8_t* xr[2] = {xq.data() + m0 * p.kp, xq.data() + (m0 + rows - 1) * p.kp};
          dot_tile_scalar(xr, w, p, rows, dots);
        }
        for (int r = 0; r < rows; ++r) {
          for (int c = 0; c < 4 && n0 + c < p.n; ++c) {
            const int64_t n = n0 + c;
            float acc = 0.0f;
            for (int64_t g = 0; g < p.groups; ++g) {
              int32_t d = dots[(r * 4 + c) * p.groups + g] - zw[n * p.groups + g] * xsum[(m0 + r) * p.groups + g];
              if (u7) d -= 64 * wsum[n * p.groups + g];
              acc += sw[n * p.groups + g] * static_cast<float>(d);
            }
            op[(m0 + r) * p.n + n] = acc * sx[m0 + r];
          }
        }
      };
      if (small_weight) {
        at::parallel_for(0, pairs, 4, [&](int64_t begin, int64_t end) {
          std::vector<int32_t> dots(static_cast<size_t>(2 * 4 * p.groups));
          for (int64_t pr = begin; pr < end; ++pr) {
            for (int64_t n0 = 0; n0 < p.n; n0 += kTileN) {
              const uint8_t* w[4] = {weight_row(n0), weight_row(n0 + 1), weight_row(n0 + 2), weight_row(n0 + 3)};
              tile(n0, w, pr * 2, dots.data());
            }
          }
        });
      } else {
        at::parallel_for(0, tiles_n, 1, [&](int64_t begin, int64_t end) {
          std::vector<int32_t> dots(static_cast<size_t>(2 * 4 * p.groups));
          std::vector<uint8_t> bytes(unpack ? static_cast<size_t>(4 * p.kp) : 0);
          for (int64_t tn = begin; tn < end; ++tn) {
            const int64_t n0 = tn * kTileN;
            const uint8_t* w[4] = {weight_row(n0), weight_row(n0 + 1), weight_row(n0 + 2), weight_row(n0 + 3)};
            if (unpack) {
              for (int c = 0; c < 4; ++c) {
                unpack_row4(w[c], p.kp, bytes.data() + c * p.kp);
                w[c] = bytes.data() + c * p.kp;
              }
            }
            for (int64_t m0 = 0; m0 < p.m; m0 += 2) tile(n0, w, m0, dots.data());
          }
        });
      }
    } else if (p.m < 8) {  // weight-only, small batch: fused GEMV, codes converted in registers
      std::vector<float> xpad(static_cast<size_t>(p.m * p.kp), 0.0f);
      std::vector<float> xgs(static_cast<size_t>(p.m * p.groups), 0.0f);
      for (int64_t m = 0; m < p.m; ++m) {
        std::copy_n(xf.const_data_ptr<float>() + m * p.k, p.k, xpad.data() + m * p.kp);
        for (int64_t k = 0; k < p.kp; ++k) xgs[m * p.groups + k / p.group] += xpad[m * p.kp + k];
      }
      at::parallel_for(0, p.n, 64, [&](int64_t begin, int64_t end) {
        std::vector<float> dots(static_cast<size_t>(p.groups));
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t m = 0; m < p.m; ++m) {
            float_dots(xpad.data() + m * p.kp, wp + n * row_bytes, p, dots.data());
            float acc = 0.0f;
            for (int64_t g = 0; g < p.groups; ++g) {
              acc += sw[n * p.groups + g] * (dots[g] - static_cast<float>(zw[n * p.groups + g]) * xgs[m * p.groups + g]);
            }
            op[m * p.n + n] = acc;
          }
        }
      });
    } else {  // weight-only, larger batch: decode 256-row weight tiles to float, multiply with the BLAS
      constexpr int64_t kRows = 256;
      const at::Tensor xv = xf;
      at::parallel_for(0, (p.n + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n0 = t * kRows, nr = std::min(kRows, p.n - n0);
          at::Tensor tile = at::empty({nr, p.kp}, at::kFloat);
          float* tp = tile.data_ptr<float>();
          for (int64_t r = 0; r < nr; ++r) decode_row(wp + (n0 + r) * row_bytes, p, sw + (n0 + r) * p.groups,
                                                      zw + (n0 + r) * p.groups, tp + r * p.kp);
          out.narrow(1, n0, nr).copy_(at::mm(xv, tile.narrow(1, 0, p.k).t()));
        }
      });
    }
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace quant
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("quantize_weight", &deepseek_ext::quant::quantize_weight_cpu);
  m.impl("quantized_linear", &deepseek_ext::quant::quantized_linear_cpu);
}
