// CPU kernel of fp8_matmul: a tiled GEMM that dequantises FP8 tiles on the fly. The output is cut into
// (Mb x Nb) tiles spread over threads; each task decodes its rows of a and its panel of b into small buffers and
// multiplies them, then applies per-tensor / per-row scales and the bias in the epilogue. No full-size dequantised
// copy of either operand exists at any time.
// Two ways to multiply a tile, chosen per call:
//   AVX512-BF16: FP8 values are exact in bfloat16, so tiles are decoded to bf16 (b packed in pairs of k) and
//     multiplied with vdpbf16ps, float32 accumulation; block scales are applied per block of k to a float32
//     partial sum (DeepSeek-V3's promotion of each 128-deep block), so no scaled operand is ever rounded.
//   otherwise: tiles decoded to float32 (block scales applied while decoding) and the BLAS sgemm behind at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef DSX_X86
#include <immintrin.h>
#endif

#include "deepseek_ext/cpu.h"
#include "deepseek_ext/cpu_gemm.h"
#include "deepseek_ext/dispatch.h"
#include "deepseek_ext/fp8_quant.h"
#include "deepseek_ext/simd.h"
#include "fp8_simd.h"
#include "fp8_lut.h"

namespace deepseek_ext {
namespace fp8 {
namespace {

constexpr int64_t kTileN = 512;

// d[0:n] = decode(s[0:n]) * scale, vectorised for the current level.
template <Format F>
void decode_span_as(const uint8_t* s, float* d, int64_t n, float scale, const float* lut) {
  const int64_t i0 = simd::dispatch([&](auto vb) DSX_LAMBDA_INLINE {
    constexpr int VB = decltype(vb)::value;
    constexpr int64_t L = simd::kLanes<float, VB>;
    int64_t i = 0;
    for (; i + L <= n; i += L) simd::store(d + i, vec::decode<F, VB>(s + i) * scale);
    return i;
  });
  for (int64_t i = i0; i < n; ++i) d[i] = lut[s[i]] * scale;
}

void decode_span(const uint8_t* s, float* d, int64_t n, float scale, Format f, const float* lut) {
  f == Format::kE4M3FN ? decode_span_as<Format::kE4M3FN>(s, d, n, scale, lut)
                       : decode_span_as<Format::kE5M2>(s, d, n, scale, lut);
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

#ifdef DSX_X86
// d[0:n] = decode(s[0:n]) as bfloat16 bits (exact: every FP8 value is a bfloat16 value).
template <Format F>
DSX_TARGET_AVX512_BF16 void decode_span_bf16(const uint8_t* s, uint16_t* d, int64_t n, const float* lut) {
  using VU = simd::Vec<uint32_t, 64>;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const VU bits = vec::bit_cast<VU>(vec::decode<F, 64>(s + i)) >> 16;
    simd::store(d + i, __builtin_convertvector(bits, simd::Vec<uint16_t, 32>));
  }
  for (; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &lut[s[i]], sizeof(bits));
    d[i] = static_cast<uint16_t>(bits >> 16);
  }
}

DSX_TARGET_AVX512_BF16 void decode_bf16(const uint8_t* s, uint16_t* d, int64_t n, Format f, const float* lut) {
  f == Format::kE4M3FN ? decode_span_bf16<Format::kE4M3FN>(s, d, n, lut) : decode_span_bf16<Format::kE5M2>(s, d, n, lut);
}

// The bf16 multiply of one output tile: a rows (mh x K, row stride lda) times the b panel (K x nw at column n0,
// row stride ldb), into c (mh x ncp float32). `kstep` is the depth over which products are summed before
// block_scale(r0, kb, c_partial) folds them into c (block scaling), or K (other modes: c holds the raw sums).
struct Bf16Tile {
  std::vector<uint16_t> a, b;  // a: mh x Kp rows; b: Kp / 2 pairs x ncp columns x 2
  std::vector<float> part;     // block scaling: the partial sums of one block of k
};

DSX_TARGET_AVX512_BF16 void pack_b_bf16(const uint8_t* b, int64_t ldb, int64_t k, int64_t nw, int64_t ncp, Format f,
                                        const float* lut, uint16_t* out) {
  std::vector<uint16_t> r0(static_cast<size_t>(nw)), r1(static_cast<size_t>(nw));
  auto* out32 = reinterpret_cast<uint32_t*>(out);
  for (int64_t kk = 0; kk < k; kk += 2) {
    decode_bf16(b + kk * ldb, r0.data(), nw, f, lut);
    if (kk + 1 < k) {
      decode_bf16(b + (kk + 1) * ldb, r1.data(), nw, f, lut);
    } else {
      std::fill(r1.begin(), r1.end(), uint16_t{0});
    }
    uint32_t* o = out32 + (kk / 2) * ncp;
    for (int64_t j = 0; j < nw; ++j) o[j] = r0[j] | (static_cast<uint32_t>(r1[j]) << 16);
    std::fill(o + nw, o + ncp, 0u);
  }
}

// c (mh x ncp) = sum over k of a . b, or with block scaling sum over blocks of sa[row, kb] * sb[kb, col block] *
// (the block's sums).
DSX_TARGET_AVX512_BF16 void multiply_bf16(const uint16_t* a, int64_t kp, const uint16_t* b, int64_t mh, int64_t ncp,
                                          int64_t k, int64_t bs, bool block, const float* sa, int64_t sa_ld,
                                          const float* sb, int64_t n0, int64_t nb, float* part, float* c) {
  if (!block) {
    constexpr int64_t kChunk = 256;  // depth per pass: a panel of b stays in L1 while the rows of a stream past
    for (int64_t k0 = 0; k0 < kp; k0 += kChunk) {
      const int64_t pairs = std::min(kChunk, kp - k0) / 2;
      cpu_gemm::gemm_bf16(mh, ncp, pairs, a + k0, kp, b + k0 * ncp, ncp, c, ncp, k0 > 0);
    }
    return;
  }
  std::fill(c, c + mh * ncp, 0.0f);
  for (int64_t kb = 0; kb * bs < k; ++kb) {
    const int64_t k0 = kb * bs, pairs = (std::min(k0 + bs, kp) - k0) / 2;
    cpu_gemm::gemm_bf16(mh, ncp, pairs, a + k0, kp, b + k0 * ncp, ncp, part, ncp, false);
    float* col = part + mh * ncp;  // the block's scale of each column
    for (int64_t j = 0; j < ncp; ++j) col[j] = sb[kb * nb + std::min((n0 + j) / bs, nb - 1)];
    for (int64_t r = 0; r < mh; ++r) {
      const float s_row = sa[r * sa_ld + kb];
      for (int64_t j = 0; j < ncp; ++j) c[r * ncp + j] += part[r * ncp + j] * (s_row * col[j]);
    }
  }
}
#endif

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

  // bf16 dot products where the CPU has them (block scaling needs whole pairs of k per block).
  bool bf16 = false;
#ifdef DSX_X86
  bf16 = cpu_has(CpuFeature::kAvx512Bf16) && (!block || bs % 2 == 0);
#endif
  // Row tiles large enough to keep the GEMM efficient, small enough to give every thread work. Tasks walk the
  // row tiles of one column panel after another, so each thread decodes a panel of b once for several tiles of a.
  const int64_t tile_m = std::min<int64_t>(m, 256);
  const int64_t tiles_m = (m + tile_m - 1) / tile_m, tiles_n = (n + kTileN - 1) / kTileN;
  auto epilogue = [&](auto* op, const float* c, int64_t ldc, int64_t m0, int64_t mh, int64_t n0, int64_t nw) {
    using scalar_t = std::remove_pointer_t<decltype(op)>;
    for (int64_t r = 0; r < mh; ++r) {
      const float row_scale = p.scaling == MatmulScaling::kTensor ? sap[0] * sbp[0]
                              : p.scaling == MatmulScaling::kRow  ? sap[m0 + r]
                                                                  : 1.0f;
      scalar_t* dst = op + (m0 + r) * n + n0;
      for (int64_t j = 0; j < nw; ++j) {
        float v = c[r * ldc + j] * row_scale;
        if (p.scaling == MatmulScaling::kRow) v *= sbp[n0 + j];
        if (biasp) v += biasp[n0 + j];
        dst[j] = static_cast<scalar_t>(v);
      }
    }
  };
  DSX_DISPATCH_FLOAT_HALF_BF16(p.out_dtype, "fp8_matmul_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
#ifdef DSX_X86
    if (bf16) {
      const int64_t kp = (k + 1) / 2 * 2;
      const float* lut_a = decode_table(fa);
      const float* lut_b = decode_table(fb);
      at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
        thread_local Bf16Tile buf;
        std::vector<float> c;
        int64_t cached_tn = -1;
        for (int64_t t = begin; t < end; ++t) {
          const int64_t tn = t / tiles_m, tm = t % tiles_m;
          const int64_t m0 = tm * tile_m, mh = std::min(tile_m, m - m0);
          const int64_t n0 = tn * kTileN, nw = std::min(kTileN, n - n0), ncp = cpu_gemm::round_up(nw, 32);
          if (tn != cached_tn) {
            buf.b.resize(static_cast<size_t>(kp * ncp));
            pack_b_bf16(bp + n0, n, k, nw, ncp, fb, lut_b, buf.b.data());
            cached_tn = tn;
          }
          buf.a.resize(static_cast<size_t>(mh * kp));
          for (int64_t r = 0; r < mh; ++r) {
            decode_bf16(ap + (m0 + r) * k, buf.a.data() + r * kp, k, fa, lut_a);
            if (kp > k) buf.a[r * kp + k] = 0;
          }
          c.resize(static_cast<size_t>(mh * ncp));
          if (block) buf.part.resize(static_cast<size_t>(mh * ncp + ncp));
          multiply_bf16(buf.a.data(), kp, buf.b.data(), mh, ncp, k, bs, block, sap + m0 * kb, kb, sbp, n0, nb,
                        buf.part.data(), c.data());
          epilogue(op, c.data(), ncp, m0, mh, n0, nw);
        }
        constexpr size_t kKeep = size_t{32} << 20;  // keep up to 64 MB of decode buffers per thread between calls
        if (buf.a.size() + buf.b.size() + buf.part.size() > kKeep) buf = Bf16Tile{};
      });
      return;
    }
#endif
    at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
      // Decode buffers live per thread across calls: fresh multi-MB allocations would cost a page fault per 4 KB.
      thread_local std::vector<float> a_store, b_store;
      a_store.resize(static_cast<size_t>(tile_m * k));
      b_store.resize(static_cast<size_t>(k * kTileN));
      at::Tensor cbuf;
      int64_t cached_tn = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t tn = t / tiles_m, tm = t % tiles_m;
        const int64_t m0 = tm * tile_m, mh = std::min(tile_m, m - m0);
        const int64_t n0 = tn * kTileN, nw = std::min(kTileN, n - n0);
        const at::Tensor abuf = at::from_blob(a_store.data(), {mh, k}, at::kFloat);
        const at::Tensor bbuf = at::from_blob(b_store.data(), {k, nw}, at::kFloat);
        if (tn != cached_tn) {  // consecutive tasks of a thread usually share a column panel: decode it once
          if (block) {  // runs of bs columns share a scale (tiles start at multiples of 512, so of bs when bs | 512)
            const int64_t run = kTileN % bs == 0 ? bs : 1;
            decode_tile(bp + n0, n, k, nw, run, fb, bbuf.data_ptr<float>(),
                        [&](int64_t r, int64_t c) { return sbp[(r / bs) * nb + (n0 + c) / bs]; });
          } else {
            decode_tile(bp + n0, n, k, nw, nw, fb, bbuf.data_ptr<float>(), [](int64_t, int64_t) { return 1.0f; });
          }
          cached_tn = tn;
        }
        if (block) {
          decode_tile(ap + m0 * k, k, mh, k, bs, fa, abuf.data_ptr<float>(),
                      [&](int64_t r, int64_t c) { return sap[(m0 + r) * kb + c / bs]; });
        } else {
          decode_tile(ap + m0 * k, k, mh, k, k, fa, abuf.data_ptr<float>(), [](int64_t, int64_t) { return 1.0f; });
        }
        cbuf = at::mm(abuf, bbuf);  // float32 accumulation in the BLAS
        epilogue(op, cbuf.const_data_ptr<float>(), nw, m0, mh, n0, nw);
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

namespace {

std::vector<std::pair<std::string, std::string>> describe_paths(Isa isa) {
  if (cpu_has(CpuFeature::kAvx512Bf16)) {
    return {{"all scalings", "avx512_bf16: tiles decoded exactly to bf16, vdpbf16ps with float32 accumulation"}};
  }
  return {{"all scalings", std::string(isa_name(std::min(isa, Isa::kAvx512))) +
                               ": tiles decoded to float32, the BLAS sgemm (at::mm)"}};
}

const DescribeCpuPaths kPaths("fp8_matmul", &describe_paths);

}  // namespace

}  // namespace fp8
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("fp8_matmul", &deepseek_ext::fp8::fp8_matmul_cpu);
}
