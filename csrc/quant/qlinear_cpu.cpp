// CPU kernels: quantize_weight (packing) and quantized_linear.
//
// act_bits = 8: activations are quantised to 7-bit codes per row (or with a calibrated per-tensor scale) and the
// products are exact integer dot products per group, in one of two shapes: a GEMV for a few rows (tiles of 4 weight
// rows x up to 3 activation rows, straight from the stored codes) and, from kGemmRows rows on, a GEMM whose weight
// blocks of 64 (AVX-512) or 16 (AVX2) output columns are repacked per call into the layout of the multiply-add
// instructions (4 consecutive k per 32-bit lane) and met by every activation row. The integer kernels exist per
// instruction set (qlinear_kernels.inc: AVX512-VNNI vpdpbusd, AVX-512BW and AVX2 vpmaddubsw/vpmaddwd; scalar code
// elsewhere); the float epilogue y = sx * sum_g fma(sw, d_g) is the same in all of them, so results are
// bit-identical across instruction sets and batch sizes. Rows with inf or NaN inputs are computed in float from the
// dequantised weights, as nn.Linear would.
// Weight-only (act_bits 16 / 0): small batches run a fused GEMV that converts codes to float in registers; larger
// batches decode tiles of weight rows to float and use the BLAS. Output tiles are spread over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "deepseek_ext/cpu.h"
#include "deepseek_ext/quant.h"
#include "deepseek_ext/simd.h"
#include "int8_kernels.h"

namespace deepseek_ext {
namespace quant {
namespace {

// Rows from which the GEMM (repacked weight blocks) replaces the GEMV.
constexpr int64_t kGemmRows = 4;
// Rows from which 4-bit blocks are widened to bytes once per task instead of unpacked in every row tile.
constexpr int64_t kWidenRows = 16;
constexpr int64_t kTileN = 4;  // weight rows per GEMV tile

// Dots of 7-bit activation codes (signed, q) with the stored codes: the scalar GEMV tile.
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

// The activation side of an int8 call: 7-bit codes (signed, and +64 as unsigned bytes), per-row scales, per-group
// code sums, and which rows hold inf or NaN.
struct Activations {
  std::vector<int8_t> q;
  std::vector<uint8_t> u;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  std::vector<uint8_t> nonfinite;
};

// x (M, K) float -> codes in [-63, 63] (M, Kp), zero-padded, with one scale per row (or the given static scale).
// Seven bits let the u8 x s8 kernels add 64 and use unsigned bytes without saturating vpmaddubsw (fbgemm's
// reduce_range); every batch size and every CPU uses the same codes. A true division and round-to-nearest-even.
Activations quantize_activations(const float* x, const QLinearPlan& p, const float* static_scale) {
  Activations a;
  a.q.resize(static_cast<size_t>(p.m * p.kp));
  a.u.resize(static_cast<size_t>(p.m * p.kp));
  a.scale.resize(static_cast<size_t>(p.m));
  a.sums.resize(static_cast<size_t>(p.m * p.groups));
  a.nonfinite.assign(static_cast<size_t>(p.m), 0);
  at::parallel_for(0, p.m, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* row = x + m * p.k;
      int8_t* q = a.q.data() + m * p.kp;
      uint8_t* u = a.u.data() + m * p.kp;
      const float s = simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
        constexpr int VB = decltype(vb)::value;
        using V = simd::Vec<float, VB>;
        constexpr int64_t L = simd::kLanes<float, VB>;
        // Largest |x| (NaN-propagating through the non-finite check below, not through the max).
        V mx{};
        V bad{};
        int64_t k = 0;
        for (; k + L <= p.k; k += L) {
          const V v = simd::load<V>(row + k);
          const V av = v < 0 ? -v : v;
          mx = av > mx ? av : mx;
          bad += v - v;  // 0 for finite lanes, NaN for inf / NaN
        }
        float amax = simd::reduce_max<float, VB>(mx, 0.0f);
        float probe = simd::reduce_add<float, VB>(bad);
        for (; k < p.k; ++k) {
          amax = std::max(amax, std::fabs(row[k]));
          probe += row[k] - row[k];
        }
        a.nonfinite[m] = probe != 0.0f || std::isnan(probe);
        const float sc = static_scale != nullptr ? *static_scale : std::max(amax, 1e-12f) / 63.0f;
        for (k = 0; k < p.k; ++k) {
          const float c = std::nearbyint(row[k] / sc);
          const float lo = c > -63.0f ? c : -63.0f;  // NaN -> -63 (such rows are recomputed in float)
          q[k] = static_cast<int8_t>(lo < 63.0f ? lo : 63.0f);
        }
        return sc;
      });
      a.scale[m] = s;
      std::fill(q + p.k, q + p.kp, int8_t{0});
      for (int64_t k = 0; k < p.kp; ++k) u[k] = static_cast<uint8_t>(q[k] + 64);
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) sum += q[k];
        a.sums[m * p.groups + g] = sum;
      }
    }
  });
  return a;
}

// y[m] = sx * sum_g fma(sw, float(d_g)) in ascending g, d_g = dots - zw * xsum (- 64 * wsum for unsigned codes):
// the epilogue every kernel follows, scalar here.
float finish(const int32_t* dots, int64_t dot_stride, const float* sw, const int32_t* zw, const int32_t* wsum,
             const int32_t* xsum, int64_t groups, float sx) {
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t d = dots[g * dot_stride] - zw[g] * xsum[g];
    if (wsum != nullptr) d -= 64 * wsum[g];
    acc = std::fmaf(sw[g], static_cast<float>(d), acc);
  }
  return acc * sx;
}

// Weight codes, scales and zero points of a call.
struct Weights {
  const uint8_t* codes;
  int64_t row_bytes;
  const float* scale;
  const int32_t* zero;
};

// Rows with inf or NaN inputs: y = x . dequantised W in float, so non-finite values propagate as in nn.Linear.
void nonfinite_rows(const float* x, const QLinearPlan& p, const Weights& w, const Activations& a, float* out) {
  for (int64_t m = 0; m < p.m; ++m) {
    if (!a.nonfinite[m]) continue;
    at::parallel_for(0, p.n, 64, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < p.k; ++k) {
          const int64_t g = k / p.group;
          const float wv = w.scale[n * p.groups + g] *
                           static_cast<float>(code_at(w.codes + n * w.row_bytes, k, p.bits) - w.zero[n * p.groups + g]);
          acc += x[m * p.k + k] * wv;
        }
        out[m * p.n + n] = acc;
      }
    });
  }
}

// GEMV path: tiles of 4 weight rows x up to 3 activation rows. A small weight stays in cache while activation rows
// stream past (rows outer); a large one is streamed once per block of rows (weight tiles outer).
void int8_gemv(const QLinearPlan& p, const Weights& w, const Activations& a, const int32_t* wsum,
               const IntKernels* k, float* out) {
  constexpr int kRows = 3;
  auto weight_row = [&](int64_t n) { return w.codes + std::min(n, p.n - 1) * w.row_bytes; };  // edges repeat
  auto tile = [&](int64_t n0, int64_t m0, int32_t* dots) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.m - m0));
    const uint8_t* wr[4] = {weight_row(n0), weight_row(n0 + 1), weight_row(n0 + 2), weight_row(n0 + 3)};
    if (k != nullptr) {
      const uint8_t* xr[kRows];
      for (int r = 0; r < kRows; ++r) xr[r] = a.u.data() + (m0 + std::min(r, rows - 1)) * p.kp;
      k->dot_rows(static_cast<int>(p.bits), rows, xr, wr, p.groups, p.group, dots);
    } else {
      const int8_t* xr[kRows];
      for (int r = 0; r < kRows; ++r) xr[r] = a.q.data() + (m0 + std::min(r, rows - 1)) * p.kp;
      dot_tile_scalar(xr, wr, p, rows, dots);
    }
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < 4 && n0 + c < p.n; ++c) {
        const int64_t n = n0 + c, m = m0 + r;
        out[m * p.n + n] = finish(dots + (r * 4 + c) * p.groups, 1, w.scale + n * p.groups, w.zero + n * p.groups,
                                  k != nullptr ? wsum + n * p.groups : nullptr, a.sums.data() + m * p.groups,
                                  p.groups, a.scale[m]);
      }
    }
  };
  const int64_t tiles_n = (p.n + kTileN - 1) / kTileN, row_blocks = (p.m + kRows - 1) / kRows;
  const bool small_weight = p.n * p.kp <= (int64_t{1} << 19);
  if (small_weight) {
    at::parallel_for(0, row_blocks, 4, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> dots(static_cast<size_t>(kRows * 4 * p.groups));
      for (int64_t rb = begin; rb < end; ++rb) {
        for (int64_t n0 = 0; n0 < p.n; n0 += kTileN) tile(n0, rb * kRows, dots.data());
      }
    });
  } else {
    at::parallel_for(0, tiles_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> dots(static_cast<size_t>(kRows * 4 * p.groups));
      for (int64_t tn = begin; tn < end; ++tn) {
        for (int64_t m0 = 0; m0 < p.m; m0 += kRows) tile(tn * kTileN, m0, dots.data());
      }
    });
  }
}

// GEMM path on packed codes: tasks of (block of kPackN output columns, chunk of rows); each task runs every row of
// its chunk against its block, group by group, with the shared epilogue.
void int8_gemm(const QLinearPlan& p, const Weights& w, const Activations& a, const int32_t* wsum, const IntKernels& k,
               float* out) {
  constexpr int64_t nb = kPackN;
  const bool widen = p.bits == 4 && p.m >= kWidenRows;
  const int bits = widen ? 8 : static_cast<int>(p.bits);  // the layout the tile kernel reads
  const int64_t mr = bits == 8 ? k.mr8 : k.mr4;
  const int64_t blocks = (p.n + nb - 1) / nb, block_bytes = p.bits == 8 ? p.kp * nb : p.kp * nb / 2;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>((2 * threads + blocks - 1) / blocks, 1, (p.m + mr - 1) / mr);
  const int64_t rows_per = (p.m + chunks - 1) / chunks;
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sT(static_cast<size_t>(p.groups * nb));
    std::vector<int32_t> zT(static_cast<size_t>(p.groups * nb)), wT(static_cast<size_t>(p.groups * nb));
    std::vector<int32_t> dots(static_cast<size_t>(mr * nb));
    std::vector<float> acc(static_cast<size_t>(mr * nb));
    std::vector<uint8_t> wide(widen ? static_cast<size_t>(p.kp * nb) : 0);
    int64_t current = -1;
    const uint8_t* wp = nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t / chunks, ch = t % chunks;
      const int64_t n0 = blk * nb, cols = std::min(nb, p.n - n0);
      if (blk != current) {
        wp = w.codes + blk * block_bytes;
        if (widen) {
          k.widen_block(wp, p.kp, wide.data(), nullptr);
          wp = wide.data();
        }
        for (int64_t g = 0; g < p.groups; ++g) {
          for (int64_t c = 0; c < nb; ++c) {
            const int64_t n = n0 + std::min(c, cols - 1);
            sT[g * nb + c] = w.scale[n * p.groups + g];
            zT[g * nb + c] = w.zero[n * p.groups + g];
            wT[g * nb + c] = wsum[n * p.groups + g];
          }
        }
        current = blk;
      }
      const int64_t m_end = std::min(p.m, (ch + 1) * rows_per);
      for (int64_t m0 = ch * rows_per; m0 < m_end; m0 += mr) {
        const int rows = static_cast<int>(std::min<int64_t>(mr, m_end - m0));
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t g = 0; g < p.groups; ++g) {
          k.gemm_rows(bits, rows, a.u.data() + m0 * p.kp, p.kp, wp, g * p.group,
                      (g + 1) * p.group, dots.data());
          k.accumulate_group(rows, dots.data(), sT.data() + g * nb, zT.data() + g * nb, wT.data() + g * nb,
                             a.sums.data() + m0 * p.groups + g, p.groups, acc.data());
        }
        for (int r = 0; r < rows; ++r) {
          const float sx = a.scale[m0 + r];
          for (int64_t c = 0; c < cols; ++c) out[(m0 + r) * p.n + n0 + c] = acc[r * nb + c] * sx;
        }
      }
    }
  });
}

// codes: contiguous, in the stored layout or packed (p.packed); each layout is made from the other when a kernel
// needs it (the GEMM: packed; the GEMV, the code sums and non-finite rows: stored).
void int8_linear(const float* x, const QLinearPlan& p, const at::Tensor& codes, const float* scale,
                 const int32_t* zero, int64_t group_size, const float* static_scale,
                 const std::optional<at::Tensor>& code_sums, float* out) {
  const Activations a = quantize_activations(x, p, static_scale);
  const IntKernels* gemm = p.packed || p.m >= kGemmRows ? int8_gemm_kernels() : nullptr;
  const IntKernels* gemv = gemm == nullptr ? int8_gemv_kernels(p.group) : nullptr;
  at::Tensor stored = p.packed ? at::Tensor() : codes, packed = p.packed ? codes : at::Tensor();
  auto view = [&](bool want_packed) {
    at::Tensor& t = want_packed ? packed : stored;
    if (!t.defined()) {
      t = want_packed ? pack_quantized_weight(codes, p.bits, group_size, p.k)
                      : unpack_quantized_weight(codes, p.bits, group_size, p.k, p.n);
    }
    return Weights{reinterpret_cast<const uint8_t*>(t.const_data_ptr()), want_packed ? 0 : t.size(1), scale, zero};
  };
  std::vector<int32_t> wsum;
  const int32_t* wsum_p = nullptr;
  at::Tensor given_sums;
  if (gemm != nullptr || gemv != nullptr) {  // the +64 shift of the activation codes is undone with these sums
    if (code_sums.has_value()) {
      given_sums = code_sums->cpu().contiguous();
      wsum_p = given_sums.const_data_ptr<int32_t>();
    } else {
      wsum.resize(static_cast<size_t>(p.n * p.groups));
      wsum_p = wsum.data();
      const Weights w = view(false);
      at::parallel_for(0, p.n, 64, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          for (int64_t g = 0; g < p.groups; ++g) {
            int32_t s = 0;
            for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += code_at(w.codes + n * w.row_bytes, k, p.bits);
            wsum[n * p.groups + g] = s;
          }
        }
      });
    }
  }
  if (gemm != nullptr) {
    int8_gemm(p, view(true), a, wsum_p, *gemm, out);
  } else {
    int8_gemv(p, view(false), a, wsum_p, gemv, out);
  }
  if (std::any_of(a.nonfinite.begin(), a.nonfinite.end(), [](uint8_t f) { return f != 0; })) {
    nonfinite_rows(x, p, view(false), a, out);
  }
}

// Weight-only kernels, one source for every instruction set (simd::dispatch). Codes are read in runs of 32 (a
// multiple of 32 divides every group and the padded K): 8-bit, 32 consecutive bytes; 4-bit, one 16-byte run whose low
// nibbles are codes 0-15 and high nibbles codes 16-31. Vector j of a run (L lanes) minus the group's zero point, as
// float lanes: exact small integers.
template <int Bits, int VB>
DSX_INLINE simd::Vec<float, VB> run_codes(const uint8_t* run, int j, int32_t zero, const uint8_t* end) {
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  using VI = simd::Vec<int32_t, VB>;
  using VU = simd::Vec<uint32_t, VB>;
  VI c;
  if constexpr (Bits == 8) {  // signed bytes: each moved to the top of its lane, then shifted down with its sign
    const VU w = simd::spread_words<VB>(run + j * L, end);
    c = VI(w << (VU{} + 24 - simd::byte_shifts<VB>())) >> 24;
  } else {
    const VU w = simd::spread_words<VB>(run + (j * L) % 16, end);
    c = VI((w >> (simd::byte_shifts<VB>() + (j * L < 16 ? 0 : 4))) & 0x0F);
  }
  return __builtin_convertvector(c - zero, simd::Vec<float, VB>);
}

// out[r * ldo + c] = sum_g scale[c][g] * sum_{k in g} x[r][k] * (code[c][k] - zero[c][g]) for R rows of x (padded
// to Kp with zeros) and NR weight rows: each weight vector is decoded once and met by every row of x, each x vector
// by every weight row, and the R * NR sums are independent chains (one row of x alone takes four weight rows, so
// the FMAs do not wait on each other). The group's scale is applied once per group.
template <int Bits, int VB, int R, int NR>
DSX_INLINE void weight_only_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t row_bytes, const uint8_t* end,
                                 const QLinearPlan& p, const float* sw, const int32_t* zw, float* out, int64_t ldo) {
  using VF = simd::Vec<float, VB>;
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  constexpr int kRunBytes = Bits == 8 ? 32 : 16;
  VF acc[R][NR] = {};
  for (int64_t g = 0; g < p.groups; ++g) {
    VF dot[R][NR] = {};
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      const uint8_t* run = w + k / 32 * kRunBytes;
#pragma GCC unroll 8
      for (int j = 0; j < 32 / L; ++j) {
        VF wv[NR];
#pragma GCC unroll 4
        for (int c = 0; c < NR; ++c) wv[c] = run_codes<Bits, VB>(run + c * row_bytes, j, zw[c * p.groups + g], end);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const VF xv = simd::load<VF>(x + r * ldx + k + j * L);
#pragma GCC unroll 4
          for (int c = 0; c < NR; ++c) dot[r][c] += xv * wv[c];
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < NR; ++c) acc[r][c] += dot[r][c] * sw[c * p.groups + g];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) out[r * ldo + c] = simd::reduce_add<float, VB>(acc[r][c]);
  }
}

// Weight rows [n0, n1) against R rows of x: NR weight rows at a time (four for one row of x, two for two, one for
// more), the rest one by one.
template <int Bits, int VB, int R>
DSX_INLINE void weight_only_rows(const float* x, const Weights& w, const QLinearPlan& p, int64_t n0, int64_t n1,
                                 float* out) {
  constexpr int NR = R == 1 ? 4 : R == 2 ? 2 : 1;
  const uint8_t* end = w.codes + p.n * w.row_bytes;  // where the codes end: no vector load reads past it
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    weight_only_tile<Bits, VB, R, NR>(x, p.kp, w.codes + n * w.row_bytes, w.row_bytes, end, p, w.scale + n * p.groups,
                                      w.zero + n * p.groups, out + n, p.n);
  }
  for (; n < n1; ++n) {
    weight_only_tile<Bits, VB, R, 1>(x, p.kp, w.codes + n * w.row_bytes, w.row_bytes, end, p, w.scale + n * p.groups,
                                     w.zero + n * p.groups, out + n, p.n);
  }
}

template <int Bits, int VB>
DSX_INLINE void weight_only_block(const float* x, int64_t rows, const Weights& w, const QLinearPlan& p, int64_t n0,
                                  int64_t n1, float* out) {
  constexpr int kR = 6;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) weight_only_rows<Bits, VB, kR>(x + r * p.kp, w, p, n0, n1, out + r * p.n);
  switch (rows - r) {
    case 5: weight_only_rows<Bits, VB, 5>(x + r * p.kp, w, p, n0, n1, out + r * p.n); break;
    case 4: weight_only_rows<Bits, VB, 4>(x + r * p.kp, w, p, n0, n1, out + r * p.n); break;
    case 3: weight_only_rows<Bits, VB, 3>(x + r * p.kp, w, p, n0, n1, out + r * p.n); break;
    case 2: weight_only_rows<Bits, VB, 2>(x + r * p.kp, w, p, n0, n1, out + r * p.n); break;
    case 1: weight_only_rows<Bits, VB, 1>(x + r * p.kp, w, p, n0, n1, out + r * p.n); break;
    default: break;
  }
}

// One weight row dequantised to float: out[k] = scale[g] * (code[k] - zero[g]) for k < kp (`end`: where the codes
// end).
template <int Bits, int VB>
DSX_INLINE void decode_row(const uint8_t* w, const uint8_t* end, const QLinearPlan& p, const float* scale,
                           const int32_t* zero, float* out) {
  constexpr int L = static_cast<int>(simd::kLanes<float, VB>);
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      const uint8_t* run = w + k / 32 * (Bits == 8 ? 32 : 16);
#pragma GCC unroll 8
      for (int j = 0; j < 32 / L; ++j) simd::store(out + k + j * L, run_codes<Bits, VB>(run, j, zero[g], end) * scale[g]);
    }
  }
}

// Rows of x from which weight-only layers decode weight tiles for the BLAS instead of running the fused GEMV.
constexpr int64_t kWeightOnlyGemmRows = 16;

void weight_only_linear(const float* x, const QLinearPlan& p, const Weights& w, float* out, const at::Tensor& xf) {
  if (p.m < kWeightOnlyGemmRows) {
    std::vector<float> xpad(static_cast<size_t>(p.m * p.kp), 0.0f);
    for (int64_t m = 0; m < p.m; ++m) std::copy_n(x + m * p.k, p.k, xpad.data() + m * p.kp);
    at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
      simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
        constexpr int VB = decltype(vb)::value;
        p.bits == 8 ? weight_only_block<8, VB>(xpad.data(), p.m, w, p, begin, end, out)
                    : weight_only_block<4, VB>(xpad.data(), p.m, w, p, begin, end, out);
      });
    });
    return;
  }
  // Larger batches: dequantise 256-row weight tiles to float and multiply with the BLAS.
  constexpr int64_t kRows = 256;
  const uint8_t* codes_end = w.codes + p.n * w.row_bytes;
  at::Tensor o = at::from_blob(out, {p.m, p.n}, at::kFloat);
  at::parallel_for(0, (p.n + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kRows, nr = std::min(kRows, p.n - n0);
      at::Tensor tile = at::empty({nr, p.kp}, at::kFloat);
      float* tp = tile.data_ptr<float>();
      simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
        constexpr int VB = decltype(vb)::value;
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t n = n0 + r;
          p.bits == 8 ? decode_row<8, VB>(w.codes + n * w.row_bytes, codes_end, p, w.scale + n * p.groups, w.zero + n * p.groups, tp + r * p.kp)
                      : decode_row<4, VB>(w.codes + n * w.row_bytes, codes_end, p, w.scale + n * p.groups, w.zero + n * p.groups, tp + r * p.kp);
        }
      });
      o.narrow(1, n0, nr).copy_(at::mm(xf, tile.narrow(1, 0, p.k).t()));
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
  // An integer code cannot stand for inf or NaN: such weights are an error, reported before anything is packed.
  const bool finite = at::parallel_reduce(
      0, n * k, int64_t{1} << 16, true,
      [&](int64_t b, int64_t e, bool ok) {
        float probe = 0.0f;
        for (int64_t i = b; i < e; ++i) probe += wp[i] * 0.0f;  // stays 0 unless some value is inf or NaN
        return ok && probe == 0.0f;
      },
      [](bool a, bool b) { return a && b; });
  TORCH_CHECK_VALUE(finite, "quantize_weight: w has non-finite values (inf or nan); integer codes cannot represent "
                            "them");
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
  const float* sw = sc.const_data_ptr<float>();
  const int32_t* zw = zc.const_data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  if (p.m > 0 && p.n > 0) {
    if (p.act_bits == 8) {
      // The checks have made sure a static scale is a finite, positive float32 value.
      const float static_scale = act_scale.has_value() ? act_scale->cpu().item<float>() : 0.0f;
      int8_linear(xf.const_data_ptr<float>(), p, cc, sw, zw, group_size, act_scale.has_value() ? &static_scale : nullptr,
                  code_sums, op);
    } else {
      const at::Tensor stored = p.packed ? unpack_quantized_weight(cc, bits, group_size, in_features, p.n) : cc;
      const Weights w{reinterpret_cast<const uint8_t*>(stored.const_data_ptr()), stored.size(1), sw, zw};
      weight_only_linear(xf.const_data_ptr<float>(), p, w, op, xf);
    }
  }
  if (bias.has_value() && p.m > 0) {  // in place, without another dispatcher call per layer
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    const float* bp = bf.const_data_ptr<float>();
    at::parallel_for(0, p.m, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.n, 1)), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        float* row = op + m * p.n;
        for (int64_t n = 0; n < p.n; ++n) row[n] += bp[n];
      }
    });
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

namespace {

std::vector<std::pair<std::string, std::string>> describe_paths(Isa) {  // the level is read by the helpers
  const IntKernels* gemm = int8_gemm_kernels();
  const IntKernels* gemv = int8_gemv_kernels(128);
  const std::string weight_only = std::string(isa_name(std::min(cpu_isa(), Isa::kAvx512))) +
                                  ": weights dequantised in registers, batch < 16 (GEMV); dequantised tiles and the "
                                  "BLAS from 16 rows";
  return {
      {"int8 activations, batch >= 4", gemm != nullptr ? std::string(gemm->name) + ": repacked weight blocks, GEMM"
                                                       : "scalar: exact integer dot products"},
      {"int8 activations, batch < 4", gemv != nullptr ? std::string(gemv->name) + ": GEMV on the stored codes"
                                                      : "scalar: exact integer dot products"},
      {"weight-only", weight_only},
  };
}

const DescribeCpuPaths kPaths("quantized_linear", &describe_paths);

}  // namespace

}  // namespace quant
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("quantize_weight", &deepseek_ext::quant::quantize_weight_cpu);
  m.impl("quantized_linear", &deepseek_ext::quant::quantized_linear_cpu);
}
