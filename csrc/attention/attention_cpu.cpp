// CPU kernels of fused attention: flash-style forward and recomputing backward.
//
// Forward: one work item per (batch, query head, block of kBlockQ queries). The query block is converted to the
// compute type (float32; float64 for float64 inputs) and pre-scaled by scale * log2(e); key blocks of kBlockK rows
// stream past it. Each key block is packed (K transposed, V padded), S = Q K^T is computed by a register-tiled
// micro-kernel, masked, and folded into the running row maximum / row sum / output with exp2 (online softmax); the
// full score matrix never exists. Memory beyond the output is a few tiles per thread.
//
// Backward: one work item per (batch, key/value head), covering every query head of its group, so dK and dV
// accumulate without races. Q, dO and the dQ accumulator of the group are packed once per item; for every key
// block and query block P is recomputed from the saved log-sum-exp and the five products of the FlashAttention-2
// backward run on tiles. Dropout masks are regenerated from the Philox seed, never stored.
//
// The micro-kernels (cpu_gemm.h) use vector types whose width is a template parameter; each item function is
// instantiated per instruction-set level (cpu.h) and the level is chosen on every call. bfloat16 forwards use
// AVX512-BF16 dot products where the CPU has them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "deepseek_ext/attention.h"
#include "deepseek_ext/cpu.h"
#include "deepseek_ext/cpu_gemm.h"
#include "deepseek_ext/simd.h"

namespace deepseek_ext {
namespace attention {
namespace {

constexpr int64_t kBlockQ = 72;   // query rows per tile (a multiple of the micro-kernels' 6 and 12 rows)
constexpr int64_t kBlockK = 128;  // key rows per tile
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

using cpu_gemm::gemm;
using cpu_gemm::round_up;
template <typename T, int VB>
constexpr int64_t kNR = cpu_gemm::kNR<T, VB>;
template <typename T, int VB>
constexpr int64_t kVL = simd::kLanes<T, VB>;

// x[j] = 2^(x[j] - shift) for j < n (n a multiple of the vector length); returns the sum. Arguments below -125
// (and -inf) give exactly 0: they are below 2^-125 of the row's largest term, which is 1.
template <int VB>
DSX_INLINE float exp2_sum(float* x, int64_t n, float shift) {
  using V = simd::Vec<float, VB>;
  V acc{};
  for (int64_t j = 0; j < n; j += kVL<float, VB>) {
    const V r = simd::exp2<VB>(simd::load<V>(x + j) - shift);
    simd::store(x + j, r);
    acc += r;
  }
  return simd::reduce_add<float, VB>(acc);
}

template <int VB>
DSX_INLINE double exp2_sum(double* x, int64_t n, double shift) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp2(x[j] - shift));
  return s;
}

// Work buffers live per thread across calls (a fresh allocation of a few hundred KB costs page faults on every call,
// which dominates small problems); beyond kKeepBytes they are released after the call.
template <typename T>
std::vector<T>& thread_buffer() {
  thread_local std::vector<T> buf;
  return buf;
}

template <typename T>
void release_if_large(std::vector<T>& buf) {
  constexpr size_t kKeepBytes = size_t{8} << 20;
  if (buf.capacity() * sizeof(T) > kKeepBytes) std::vector<T>().swap(buf);
}

// Per-row view of a call: the (batch, head) pair's sequence offsets, lengths and causal offset.
struct Seq {
  int64_t q0, nq, k0, nk, causal_off;
};

DSX_INLINE Seq sequence(const Geometry& g, int64_t b) {
  Seq s{0, g.seq_q, 0, g.seq_k, 0};
  if (g.cu_q != nullptr) s = Seq{g.cu_q[b], g.cu_q[b + 1] - g.cu_q[b], g.cu_k[b], g.cu_k[b + 1] - g.cu_k[b], 0};
  s.causal_off = g.bottom_right ? s.nk - s.nq : 0;
  return s;
}

// Number of keys row i may see in a causal call (all of them otherwise), clamped to [0, nk].
DSX_INLINE int64_t visible_keys(const Geometry& g, const Seq& s, int64_t i) {
  if (!g.causal) return s.nk;
  return std::clamp<int64_t>(i + s.causal_off + 1, 0, s.nk);
}

// Masks row i of a score tile holding keys kb .. kb + nk (scores in log2 units); columns from nk to ncols are
// padding and become -inf too.
template <typename T>
DSX_INLINE void mask_row(const Geometry& g, const Seq& s, int64_t b, int64_t h, int64_t i, int64_t kb, int64_t nk,
                         int64_t ncols, T* row) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t limit = std::clamp<int64_t>(visible_keys(g, s, i) - kb, 0, nk);
  for (int64_t j = limit; j < ncols; ++j) row[j] = kNegInf;
  if (g.mask == nullptr) return;
  const int64_t off = b * g.mask_b + h * g.mask_h + i * g.mask_i + kb * g.mask_j;
  if (g.mask_is_bool) {
    const bool* m = static_cast<const bool*>(g.mask) + off;
    for (int64_t j = 0; j < limit; ++j) row[j] = m[j * g.mask_j] ? row[j] : kNegInf;
  } else {
    const T* m = static_cast<const T*>(g.mask) + off;
    const T l2e = static_cast<T>(kLog2e);
    for (int64_t j = 0; j < limit; ++j) row[j] += l2e * m[j * g.mask_j];
  }
}

// Multiplies row i of a probability tile by the dropout mask (kept / (1 - p), dropped 0).
template <typename T>
DSX_INLINE void dropout_row(const Geometry& g, const Seq& s, int64_t b, int64_t h, int64_t i, int64_t kb, int64_t nk,
                            T* row) {
  const uint32_t threshold = dropout_threshold(g.dropout_p);
  const T keep_scale = static_cast<T>(1.0 / (1.0 - g.dropout_p));
  for (int64_t j0 = 0; j0 < nk; j0 += 4) {
    const int64_t jg = kb + j0;  // kb is a multiple of 4, so one Philox block serves four keys
    const auto r = rng::philox(g.seed, static_cast<uint64_t>(b * g.heads_q + h),
                               static_cast<uint64_t>(i * ((s.nk + 3) / 4) + (jg >> 2)));
    for (int64_t u = 0; u < 4 && j0 + u < nk; ++u) row[j0 + u] *= r.v[u] >= threshold ? keep_scale : T(0);
  }
}

template <typename S, typename T>
DSX_INLINE void load_row(const S* src, int64_t n, T mul, T* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]) * mul;
}

template <typename S, typename T>
struct ForwardWork {
  const Geometry& g;
  const S *q, *k, *v;
  S* o;
  T* lse;  // float32, or float64 for float64 inputs
};

// Largest of row[0..n) (n a multiple of the vector length), at least `init`.
template <int VB>
DSX_INLINE float row_max_of(const float* row, int64_t n, float init) {
  using V = simd::Vec<float, VB>;
  V m = simd::broadcast<V>(init);
  for (int64_t j = 0; j < n; j += kVL<float, VB>) m = simd::vmax(simd::load<V>(row + j), m);
  return simd::reduce_max<float, VB>(m, init);
}

template <int VB>
DSX_INLINE double row_max_of(const double* row, int64_t n, double init) {
  double r = init;
  for (int64_t j = 0; j < n; ++j) r = std::max(r, row[j]);
  return r;
}

// row[j] *= c for j < n (n a multiple of the vector length).
template <typename T, int VB>
DSX_INLINE void scale_row(T* row, int64_t n, T c) {
  using V = simd::Vec<T, VB>;
  for (int64_t j = 0; j < n; j += kVL<T, VB>) simd::store(row + j, simd::load<V>(row + j) * c);
}

// One step of the online softmax for the score rows st (nq x nkp) of query rows row0 + i0 .. of a key block:
// scores (times `mul`, when the queries were not pre-scaled) are masked and turned into P = 2^(s - running max) in
// place; the output rows and running sums are rescaled where the maximum grew; dropout is applied to P.
template <typename T, int VB>
DSX_INLINE void online_softmax(const Geometry& g, const Seq& s, int64_t b, int64_t h, int64_t row0, int64_t i0,
                               int64_t nq, int64_t kb, int64_t nk, int64_t nkp, T mul, T* st, T* ot, int64_t Dvp,
                               T* row_max, T* row_sum) {
  for (int64_t r = 0; r < nq; ++r) {
    T* row = st + r * nkp;
    const int64_t i = row0 + i0 + r, ri = i0 + r;
    if (mul != T(1)) scale_row<T, VB>(row, nkp, mul);
    mask_row(g, s, b, h, i, kb, nk, nkp, row);
    const T mx = row_max_of<VB>(row, nkp, row_max[ri]);
    if (mx == -std::numeric_limits<T>::infinity()) {  // nothing visible yet: the row's P is zero
      std::fill(row, row + nkp, T(0));
      continue;
    }
    const T alpha = std::exp2(row_max[ri] - mx);
    row_sum[ri] = row_sum[ri] * alpha + exp2_sum<VB>(row, nkp, mx);
    row_max[ri] = mx;
    if (alpha != T(1)) scale_row<T, VB>(ot + ri * Dvp, Dvp, alpha);
    if (g.dropout_p > 0) dropout_row(g, s, b, h, i, kb, nk, row);
  }
}

// Writes the output rows (divided by their sums) and the log-sum-exp of a finished range of query rows.
template <typename S, typename T>
DSX_INLINE void finish_rows(const ForwardWork<S, T>& w, const Seq& s, int64_t b, int64_t h, int64_t row0,
                            int64_t rows, const T* ot, int64_t Dvp, const T* row_max, const T* row_sum) {
  const Geometry& g = w.g;
  S* oh = w.o + b * g.o.b + h * g.o.h + (s.q0 + row0) * g.o.s;
  T* lh = w.lse + b * g.lse.b + h * g.lse.h + (s.q0 + row0) * g.lse.s;
  for (int64_t r = 0; r < rows; ++r) {
    const T l = row_sum[r];
    const T inv = l > T(0) ? T(1) / l : T(0);
    for (int64_t d = 0; d < g.head_dim_v; ++d) oh[r * g.o.s + d] = static_cast<S>(ot[r * Dvp + d] * inv);
    lh[r * g.lse.s] = l > T(0) ? (row_max[r] + std::log2(l)) * static_cast<T>(kLn2) : std::numeric_limits<T>::infinity();
  }
}

// Asks for the K and V rows of the next key block [kb, kb + n) while the current one is being computed, so its
// packing reads from cache rather than waiting on memory row by row.
template <typename S>
DSX_INLINE void prefetch_rows(const S* k, int64_t k_stride, const S* v, int64_t v_stride, int64_t kb, int64_t n,
                              int64_t D, int64_t Dv) {
  for (int64_t j = kb; j < kb + n; ++j) {
    const char* kr = reinterpret_cast<const char*>(k + j * k_stride);
    const char* vr = reinterpret_cast<const char*>(v + j * v_stride);
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(S)); b += 64) __builtin_prefetch(kr + b);
    for (int64_t b = 0; b < Dv * static_cast<int64_t>(sizeof(S)); b += 64) __builtin_prefetch(vr + b);
  }
}

// Query blocks [qb_begin, qb_end) of one (batch, query head). Every key block is packed once (K transposed, V
// padded) and then meets each query block of the range, which keeps its own output tile, row maxima and sums.
template <typename S, typename T, int VB>
DSX_INLINE void forward_item(const ForwardWork<S, T>& w, int64_t b, int64_t h, int64_t qb_begin, int64_t qb_end,
                                 std::vector<T>& buf) {
  const Geometry& g = w.g;
  const Seq s = sequence(g, b);
  qb_end = std::min(qb_end, (s.nq + kBlockQ - 1) / kBlockQ);
  if (qb_begin >= qb_end) return;
  const int64_t row0 = qb_begin * kBlockQ, rows = std::min(qb_end * kBlockQ, s.nq) - row0;
  const int64_t D = g.head_dim, Dv = g.head_dim_v, Dvp = round_up(Dv, kNR<T, VB>), BKp = round_up(kBlockK, kNR<T, VB>);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  buf.resize(rows * D + rows * Dvp + 2 * rows + D * BKp + kBlockK * Dvp + kBlockQ * BKp);
  T* qt = buf.data();
  T* ot = qt + rows * D;
  T* row_max = ot + rows * Dvp;
  T* row_sum = row_max + rows;
  T* kt = row_sum + rows;
  T* vt = kt + D * BKp;
  T* st = vt + kBlockK * Dvp;

  const S* qh = w.q + b * g.q.b + h * g.q.h + (s.q0 + row0) * g.q.s;
  const S* kh = w.k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const S* vh = w.v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;
  const T qmul = static_cast<T>(g.scale * kLog2e);
  for (int64_t r = 0; r < rows; ++r) load_row(qh + r * g.q.s, D, qmul, qt + r * D);
  std::fill(ot, ot + rows * Dvp, T(0));
  std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
  std::fill(row_sum, row_sum + rows, T(0));

  const int64_t kend = visible_keys(g, s, row0 + rows - 1);
  for (int64_t kb = 0; kb < kend; kb += kBlockK) {
    const int64_t nk = std::min(kBlockK, kend - kb), nkp = round_up(nk, kNR<T, VB>);
    // K^T in 16-dim strips, so the strided writes stay within a few cache lines.
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t d1 = std::min(D, d0 + 16);
      for (int64_t j = 0; j < nk; ++j) {
        const S* kr = kh + (kb + j) * g.k.s;
        for (int64_t d = d0; d < d1; ++d) kt[d * nkp + j] = static_cast<T>(kr[d]);
      }
    }
    for (int64_t d = 0; d < D; ++d) std::fill(kt + d * nkp + nk, kt + (d + 1) * nkp, T(0));
    for (int64_t j = 0; j < nk; ++j) {
      load_row(vh + (kb + j) * g.v.s, Dv, T(1), vt + j * Dvp);
      std::fill(vt + j * Dvp + Dv, vt + (j + 1) * Dvp, T(0));
    }
    if (kb + kBlockK < kend) prefetch_rows(kh, g.k.s, vh, g.v.s, kb + kBlockK, std::min(kBlockK, kend - kb - kBlockK), D, Dv);
    for (int64_t i0 = 0; i0 < rows; i0 += kBlockQ) {
      const int64_t nq = std::min(kBlockQ, rows - i0);
      const int64_t vis = visible_keys(g, s, row0 + i0 + nq - 1);
      if (vis <= kb) continue;  // causal: this key block is entirely in the future of these queries
      gemm<T, VB>(nq, nkp, D, qt + i0 * D, D, kt, nkp, st, nkp, false);
      online_softmax<T, VB>(g, s, b, h, row0, i0, nq, kb, nk, nkp, T(1), st, ot, Dvp, row_max, row_sum);
      gemm<T, VB>(nq, Dvp, nk, st, nkp, vt, Dvp, ot + i0 * Dvp, Dvp, true);
    }
  }

  finish_rows(w, s, b, h, row0, rows, ot, Dvp, row_max, row_sum);
}

#ifdef DSX_X86
// The bfloat16 forward with AVX512-BF16 dot products: Q K^T and P V multiply bf16 pairs with float32 accumulation
// (vdpbf16ps, twice the multiply-adds of float32 FMAs per instruction); the softmax stays in float32 and P is
// rounded to bf16 only for its product with V, as PyTorch's own CPU kernel and FlashAttention do. Q is used as
// given and the scale applied to the float32 scores. K is packed in pairs of head dims, V in pairs of keys
// (cpu_gemm.h's VNNI-2 layout).
DSX_TARGET_AVX512_BF16 void forward_item_bf16(const ForwardWork<c10::BFloat16, float>& w, int64_t b, int64_t h,
                                              int64_t qb_begin, int64_t qb_end, std::vector<float>& buf) {
  using S = c10::BFloat16;
  constexpr int VB = 64;
  constexpr int64_t NR = cpu_gemm::kNRBf16;
  static_assert(NR == kNR<float, VB>);
  const Geometry& g = w.g;
  const Seq s = sequence(g, b);
  qb_end = std::min(qb_end, (s.nq + kBlockQ - 1) / kBlockQ);
  if (qb_begin >= qb_end) return;
  const int64_t row0 = qb_begin * kBlockQ, rows = std::min(qb_end * kBlockQ, s.nq) - row0;
  const int64_t D = g.head_dim, D2 = round_up(D, 2), Dv = g.head_dim_v, Dvp = round_up(Dv, NR);
  const int64_t BKp = round_up(kBlockK, NR);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  // float32: output tile, row maxima and sums, scores; bf16 (two per float): Q, packed K and V, P.
  const int64_t halves = rows * D2 + D2 * BKp + kBlockK * Dvp + kBlockQ * BKp;
  buf.resize(rows * Dvp + 2 * rows + kBlockQ * BKp + (halves + 1) / 2 + 16);
  float* ot = buf.data();
  float* row_max = ot + rows * Dvp;
  float* row_sum = row_max + rows;
  float* st = row_sum + rows;
  uint16_t* qt = reinterpret_cast<uint16_t*>(st + kBlockQ * BKp);
  uint16_t* kt = qt + rows * D2;
  uint16_t* vt = kt + D2 * BKp;
  uint16_t* pt = vt + kBlockK * Dvp;
  auto bits = [](const S* p) { return reinterpret_cast<const uint16_t*>(p); };

  const S* qh = w.q + b * g.q.b + h * g.q.h + (s.q0 + row0) * g.q.s;
  const S* kh = w.k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const S* vh = w.v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(qt + r * D2, bits(qh + r * g.q.s), D * sizeof(uint16_t));
    if (D2 > D) qt[r * D2 + D] = 0;
  }
  std::fill(ot, ot + rows * Dvp, 0.0f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.0f);
  const float sl2 = static_cast<float>(g.scale * kLog2e);

  const int64_t kend = visible_keys(g, s, row0 + rows - 1);
  for (int64_t kb = 0; kb < kend; kb += kBlockK) {
    const int64_t nk = std::min(kBlockK, kend - kb), nkp = round_up(nk, NR), nk2 = round_up(nk, 2);
    // K: pair p of head dims of key j at kt[(p * nkp + j) * 2]; padding keys (and the odd last dim) are zero.
    auto* kt32 = reinterpret_cast<uint32_t*>(kt);
    for (int64_t j = 0; j < nk; ++j) {
      const uint16_t* kr = bits(kh + (kb + j) * g.k.s);
      for (int64_t p = 0; p < D / 2; ++p) {
        uint32_t pair;
        std::memcpy(&pair, kr + 2 * p, sizeof(pair));
        kt32[p * nkp + j] = pair;
      }
      if (D2 > D) kt32[(D / 2) * nkp + j] = kr[D - 1];
    }
    for (int64_t p = 0; p < D2 / 2; ++p) std::fill(kt32 + p * nkp + nk, kt32 + (p + 1) * nkp, 0u);
    // V: pair of keys (2p, 2p + 1), head dim d at vt[(p * Dvp + d) * 2]; an odd last key pairs with zeros.
    auto* vt32 = reinterpret_cast<uint32_t*>(vt);
    for (int64_t j = 0; j < nk2; j += 2) {
      const uint16_t* v0 = bits(vh + (kb + j) * g.v.s);
      const uint16_t* v1 = j + 1 < nk ? bits(vh + (kb + j + 1) * g.v.s) : nullptr;
      uint32_t* out = vt32 + (j / 2) * Dvp;
      for (int64_t d = 0; d < Dv; ++d) out[d] = v0[d] | (v1 != nullptr ? uint32_t{v1[d]} << 16 : 0u);
      std::fill(out + Dv, out + Dvp, 0u);
    }
    if (kb + kBlockK < kend) prefetch_rows(kh, g.k.s, vh, g.v.s, kb + kBlockK, std::min(kBlockK, kend - kb - kBlockK), D, Dv);
    for (int64_t i0 = 0; i0 < rows; i0 += kBlockQ) {
      const int64_t nq = std::min(kBlockQ, rows - i0);
      if (visible_keys(g, s, row0 + i0 + nq - 1) <= kb) continue;  // causal: every key is in the future
      cpu_gemm::gemm_bf16(nq, nkp, D2 / 2, qt + i0 * D2, D2, kt, nkp, st, nkp, false);
      online_softmax<float, VB>(g, s, b, h, row0, i0, nq, kb, nk, nkp, sl2, st, ot, Dvp, row_max, row_sum);
      for (int64_t r = 0; r < nq; ++r) {
        for (int64_t j = 0; j < nkp; j += 16) {
          const __m256bh p16 = _mm512_cvtneps_pbh(_mm512_loadu_ps(st + r * nkp + j));
          std::memcpy(pt + r * nkp + j, &p16, sizeof(p16));
        }
      }
      cpu_gemm::gemm_bf16(nq, Dvp, nk2 / 2, pt, nkp, vt, Dvp, ot + i0 * Dvp, Dvp, true);
    }
  }
  finish_rows(w, s, b, h, row0, rows, ot, Dvp, row_max, row_sum);
}
#endif

// One wrapper per instruction-set level around the same item functions (see cpu.h).
template <typename S, typename T>
using ForwardItem = void (*)(const ForwardWork<S, T>&, int64_t, int64_t, int64_t, int64_t, std::vector<T>&);

template <typename S, typename T>
void forward_baseline(const ForwardWork<S, T>& w, int64_t b, int64_t h, int64_t q0, int64_t q1, std::vector<T>& buf) {
  forward_item<S, T, simd::kBytes<Isa::kScalar>>(w, b, h, q0, q1, buf);
}
#ifdef DSX_X86
template <typename S, typename T>
DSX_TARGET_AVX2 void forward_avx2(const ForwardWork<S, T>& w, int64_t b, int64_t h, int64_t q0, int64_t q1,
                                  std::vector<T>& buf) {
  forward_item<S, T, simd::kBytes<Isa::kAvx2>>(w, b, h, q0, q1, buf);
}
template <typename S, typename T>
DSX_TARGET_AVX512 void forward_avx512(const ForwardWork<S, T>& w, int64_t b, int64_t h, int64_t q0, int64_t q1,
                                      std::vector<T>& buf) {
  forward_item<S, T, simd::kBytes<Isa::kAvx512>>(w, b, h, q0, q1, buf);
}
#endif

template <typename S, typename T>
ForwardItem<S, T> forward_kernel() {
#ifdef DSX_X86
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (cpu_has(CpuFeature::kAvx512Bf16)) return &forward_item_bf16;
  }
  const Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512) return &forward_avx512<S, T>;
  if (isa >= Isa::kAvx2) return &forward_avx2<S, T>;
#endif
  return &forward_baseline<S, T>;
}

template <typename S, typename T>
void forward_all(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse) {
  const ForwardWork<S, T> w{g, q.const_data_ptr<S>(), k.const_data_ptr<S>(), v.const_data_ptr<S>(),
                            out.mutable_data_ptr<S>(), lse.mutable_data_ptr<T>()};
  // Work items: (batch, head, chunk of query blocks). Chunks are long (each key block is packed once per chunk) but
  // at most kMaxChunkBlocks blocks, which bounds the per-thread buffers, and there are at least four items per
  // thread to balance causal and ragged work.
  constexpr int64_t kMaxChunkBlocks = 16;
  const int64_t nqb = (g.seq_q + kBlockQ - 1) / kBlockQ;
  const int64_t heads = g.batch * g.heads_q;
  const int64_t want = std::max((4 * at::get_num_threads() + heads - 1) / heads,
                                (nqb + kMaxChunkBlocks - 1) / kMaxChunkBlocks);
  const int64_t chunks = std::clamp<int64_t>(want, 1, std::max<int64_t>(nqb, 1));
  const int64_t per_chunk = (nqb + chunks - 1) / chunks;
  const ForwardItem<S, T> item = forward_kernel<S, T>();
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& buf = thread_buffer<T>();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / chunks, c = it % chunks;
      item(w, bh / g.heads_q, bh % g.heads_q, c * per_chunk, (c + 1) * per_chunk, buf);
    }
    release_if_large(buf);
  });
}

template <typename S, typename T>
struct BackwardWork {
  const Geometry& g;
  const S *q, *k, *v, *o, *dout;
  const T* lse;
  Strides dout_s;
  S *dq, *dk, *dv;
  Strides dq_s, dk_s, dv_s;
};

// One query head's part of the backward buffer: Q and dO packed, the dQ accumulator, lse in log2 units and
// D_i = rowsum(dO * O).
template <typename T>
struct HeadBuffers {
  T *q, *dout, *dq, *lse2, *delta;
};

template <typename T>
DSX_INLINE HeadBuffers<T> head_buffers(T* heads, int64_t gi, int64_t nq, int64_t Dp, int64_t Dvp) {
  T* q = heads + gi * nq * (2 * Dp + Dvp + 2);
  T* dout = q + nq * Dp;
  T* dq = dout + nq * Dvp;
  T* lse2 = dq + nq * Dp;
  return {q, dout, dq, lse2, lse2 + nq};
}

// One (batch, key/value head) of the backward pass, for every query head of its group.
template <typename S, typename T, int VB>
DSX_INLINE void backward_item(const BackwardWork<S, T>& w, int64_t b, int64_t hk, std::vector<T>& buf) {
  const Geometry& g = w.g;
  const Seq s = sequence(g, b);
  const int64_t G = g.heads_q / g.heads_kv;
  const int64_t D = g.head_dim, Dv = g.head_dim_v;
  const int64_t Dp = round_up(D, kNR<T, VB>), Dvp = round_up(Dv, kNR<T, VB>), BKp = round_up(kBlockK, kNR<T, VB>);
  const int64_t nq_all = s.nq, nk_all = s.nk;
  S* dkh = w.dk + b * w.dk_s.b + hk * w.dk_s.h + s.k0 * w.dk_s.s;
  S* dvh = w.dv + b * w.dv_s.b + hk * w.dv_s.h + s.k0 * w.dv_s.s;
  if (nk_all == 0 || nq_all == 0) {
    for (int64_t j = 0; j < nk_all; ++j) {
      std::fill(dkh + j * w.dk_s.s, dkh + j * w.dk_s.s + D, S(0));
      std::fill(dvh + j * w.dv_s.s, dvh + j * w.dv_s.s + Dv, S(0));
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      S* dqh = w.dq + b * w.dq_s.b + (hk * G + gi) * w.dq_s.h + s.q0 * w.dq_s.s;
      for (int64_t i = 0; i < nq_all; ++i) std::fill(dqh + i * w.dq_s.s, dqh + i * w.dq_s.s + D, S(0));
    }
    return;
  }
  // Per group: Q (nq x Dp), dO (nq x Dvp), dQ accumulator (nq x Dp), lse in log2 units, D_i = rowsum(dO * O).
  const int64_t per_head = nq_all * (2 * Dp + Dvp + 2);
  buf.resize(G * per_head + 2 * nk_all * std::max(Dp, Dvp) + D * BKp + Dv * BKp + kBlockK * Dp +
             3 * kBlockQ * BKp);
  T* heads = buf.data();
  T* dk_acc = heads + G * per_head;
  T* dv_acc = dk_acc + nk_all * Dp;
  T* kt = dv_acc + nk_all * Dvp;
  T* vtt = kt + D * BKp;
  T* kp = vtt + Dv * BKp;
  T* pt = kp + kBlockK * Dp;
  T* dpt = pt + kBlockQ * BKp;
  T* pd = dpt + kBlockQ * BKp;  // dropped-out P
  std::fill(dk_acc, dk_acc + nk_all * Dp + nk_all * Dvp, T(0));
  const T l2e = static_cast<T>(kLog2e), sl2 = static_cast<T>(g.scale * kLog2e);
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = hk * G + gi;
    const auto [qp, dop, dqa, lse2, di] = head_buffers(heads, gi, nq_all, Dp, Dvp);
    const S* qh = w.q + b * g.q.b + h * g.q.h + s.q0 * g.q.s;
    const S* oh = w.o + b * g.o.b + h * g.o.h + s.q0 * g.o.s;
    const S* doh = w.dout + b * w.dout_s.b + h * w.dout_s.h + s.q0 * w.dout_s.s;
    const T* lh = w.lse + b * g.lse.b + h * g.lse.h + s.q0 * g.lse.s;
    std::fill(dqa, dqa + nq_all * Dp, T(0));
    for (int64_t i = 0; i < nq_all; ++i) {
      load_row(qh + i * g.q.s, D, T(1), qp + i * Dp);
      std::fill(qp + i * Dp + D, qp + (i + 1) * Dp, T(0));
      load_row(doh + i * w.dout_s.s, Dv, T(1), dop + i * Dvp);
      std::fill(dop + i * Dvp + Dv, dop + (i + 1) * Dvp, T(0));
      T acc = 0;
      for (int64_t d = 0; d < Dv; ++d) acc += dop[i * Dvp + d] * static_cast<T>(oh[i * g.o.s + d]);
      di[i] = acc;
      lse2[i] = static_cast<T>(lh[i * g.lse.s]) * l2e;
    }
  }

  for (int64_t kb = 0; kb < nk_all; kb += kBlockK) {
    const int64_t nk = std::min(kBlockK, nk_all - kb), nkp = round_up(nk, kNR<T, VB>);
    for (int64_t j = 0; j < nk; ++j) {
      const S* kr = w.k + b * g.k.b + hk * g.k.h + (s.k0 + kb + j) * g.k.s;
      const S* vr = w.v + b * g.v.b + hk * g.v.h + (s.k0 + kb + j) * g.v.s;
      for (int64_t d = 0; d < D; ++d) kt[d * nkp + j] = kp[j * Dp + d] = static_cast<T>(kr[d]);
      std::fill(kp + j * Dp + D, kp + (j + 1) * Dp, T(0));
      for (int64_t d = 0; d < Dv; ++d) vtt[d * nkp + j] = static_cast<T>(vr[d]);
    }
    for (int64_t d = 0; d < D; ++d) std::fill(kt + d * nkp + nk, kt + (d + 1) * nkp, T(0));
    for (int64_t d = 0; d < Dv; ++d) std::fill(vtt + d * nkp + nk, vtt + (d + 1) * nkp, T(0));
    if (kb + kBlockK < nk_all) {
      prefetch_rows(w.k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s, g.k.s, w.v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s,
                    g.v.s, kb + kBlockK, std::min(kBlockK, nk_all - kb - kBlockK), D, Dv);
    }
    // First query that sees this key block (causal): key kb is visible from row kb - causal_off on.
    const int64_t ifirst = g.causal ? std::clamp<int64_t>(kb - s.causal_off, 0, nq_all) : 0;
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t h = hk * G + gi;
      const auto [qp, dop, dqa, lse2, di] = head_buffers(heads, gi, nq_all, Dp, Dvp);
      for (int64_t i0 = ifirst / kBlockQ * kBlockQ; i0 < nq_all; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, nq_all - i0);
        // P = exp2(S * scale * log2e + mask - lse2)
        gemm<T, VB>(nq, nkp, D, qp + i0 * Dp, Dp, kt, nkp, pt, nkp, false);
        bool any = false;
        for (int64_t r = 0; r < nq; ++r) {
          T* row = pt + r * nkp;
          const int64_t i = i0 + r;
          scale_row<T, VB>(row, nkp, sl2);
          mask_row(g, s, b, h, i, kb, nk, nkp, row);
          if (std::isinf(lse2[i])) {  // a fully masked row: no gradient flows through it
            std::fill(row, row + nkp, T(0));
          } else {
            exp2_sum<VB>(row, nkp, lse2[i]);
            any = true;
          }
        }
        if (!any) continue;
        const bool drop = g.dropout_p > 0;
        if (drop) {
          for (int64_t r = 0; r < nq; ++r) {
            std::copy(pt + r * nkp, pt + (r + 1) * nkp, pd + r * nkp);
            dropout_row(g, s, b, h, i0 + r, kb, nk, pd + r * nkp);
          }
        }
        // dV += P_dropped^T dO
        gemm<T, VB, true>(nk, Dvp, nq, drop ? pd : pt, nkp, dop + i0 * Dvp, Dvp, dv_acc + kb * Dvp, Dvp, true);
        // dP = dO V^T (then through dropout); dS = P * (dP - D_i)
        gemm<T, VB>(nq, nkp, Dv, dop + i0 * Dvp, Dvp, vtt, nkp, dpt, nkp, false);
        for (int64_t r = 0; r < nq; ++r) {
          T* dp = dpt + r * nkp;
          const T* p = pt + r * nkp;
          if (drop) {
            const T* q_drop = pd + r * nkp;
            // The dropout factor of each key is P_dropped / P where P > 0 (P == 0 makes dS zero either way).
            for (int64_t j = 0; j < nkp; ++j) dp[j] = p[j] > T(0) ? dp[j] * (q_drop[j] / p[j]) : T(0);
          }
          const T dii = di[i0 + r];
          for (int64_t j = 0; j < nkp; ++j) dp[j] = p[j] * (dp[j] - dii);
        }
        // dQ += dS K ; dK += dS^T Q  (scale applied at the end)
        gemm<T, VB>(nq, Dp, nk, dpt, nkp, kp, Dp, dqa + i0 * Dp, Dp, true);
        gemm<T, VB, true>(nk, Dp, nq, dpt, nkp, qp + i0 * Dp, Dp, dk_acc + kb * Dp, Dp, true);
      }
    }
  }

  const T sc = static_cast<T>(g.scale);
  for (int64_t j = 0; j < nk_all; ++j) {
    for (int64_t d = 0; d < D; ++d) dkh[j * w.dk_s.s + d] = static_cast<S>(dk_acc[j * Dp + d] * sc);
    for (int64_t d = 0; d < Dv; ++d) dvh[j * w.dv_s.s + d] = static_cast<S>(dv_acc[j * Dvp + d]);
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    const T* dqa = head_buffers(heads, gi, nq_all, Dp, Dvp).dq;
    S* dqh = w.dq + b * w.dq_s.b + (hk * G + gi) * w.dq_s.h + s.q0 * w.dq_s.s;
    for (int64_t i = 0; i < nq_all; ++i) {
      for (int64_t d = 0; d < D; ++d) dqh[i * w.dq_s.s + d] = static_cast<S>(dqa[i * Dp + d] * sc);
    }
  }
}

template <typename S, typename T>
using BackwardItem = void (*)(const BackwardWork<S, T>&, int64_t, int64_t, std::vector<T>&);

template <typename S, typename T>
void backward_baseline(const BackwardWork<S, T>& w, int64_t b, int64_t hk, std::vector<T>& buf) {
  backward_item<S, T, simd::kBytes<Isa::kScalar>>(w, b, hk, buf);
}
#ifdef DSX_X86
template <typename S, typename T>
DSX_TARGET_AVX2 void backward_avx2(const BackwardWork<S, T>& w, int64_t b, int64_t hk, std::vector<T>& buf) {
  backward_item<S, T, simd::kBytes<Isa::kAvx2>>(w, b, hk, buf);
}
template <typename S, typename T>
DSX_TARGET_AVX512 void backward_avx512(const BackwardWork<S, T>& w, int64_t b, int64_t hk, std::vector<T>& buf) {
  backward_item<S, T, simd::kBytes<Isa::kAvx512>>(w, b, hk, buf);
}
#endif

template <typename S, typename T>
BackwardItem<S, T> backward_kernel() {
#ifdef DSX_X86
  const Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512) return &backward_avx512<S, T>;
  if (isa >= Isa::kAvx2) return &backward_avx2<S, T>;
#endif
  return &backward_baseline<S, T>;
}

template <typename S, typename T>
void backward_all(const Geometry& g, bool varlen, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  const BackwardWork<S, T> w{g,
                             q.const_data_ptr<S>(),
                             k.const_data_ptr<S>(),
                             v.const_data_ptr<S>(),
                             out.const_data_ptr<S>(),
                             dout.const_data_ptr<S>(),
                             lse.const_data_ptr<T>(),
                             strides_of(dout, varlen),
                             dq.mutable_data_ptr<S>(),
                             dk.mutable_data_ptr<S>(),
                             dv.mutable_data_ptr<S>(),
                             strides_of(dq, varlen),
                             strides_of(dk, varlen),
                             strides_of(dv, varlen)};
  const BackwardItem<S, T> item = backward_kernel<S, T>();
  at::parallel_for(0, g.batch * g.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& buf = thread_buffer<T>();
    for (int64_t it = begin; it < end; ++it) item(w, it / g.heads_kv, it % g.heads_kv, buf);
    release_if_large(buf);
  });
}


// The backend the shared entry points (Entry<CpuBackend> in attention.h) run.
struct CpuBackend {
  static std::tuple<at::Tensor, at::Tensor> forward(const Geometry& g, bool varlen, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Geometry& g, bool varlen, const at::Tensor& grad_out,
                                                                 const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& out,
                                                                 const at::Tensor& lse);
  static int offsets(Varlen&) { return 0; }  // the checks already hold cu_seqlens in host memory
};

std::tuple<at::Tensor, at::Tensor> CpuBackend::forward(const Geometry& g, bool varlen, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v) {
  at::Tensor out = at::empty(out_sizes(q, v, varlen), q.options());
  at::Tensor lse = at::empty(lse_sizes(q, varlen), q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_cpu", [&] {
    forward_all<scalar_t, at::opmath_type<scalar_t>>(g, q, k, v, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> CpuBackend::backward(const Geometry& g, bool varlen, const at::Tensor& dout,
                                                            const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& out,
                                                            const at::Tensor& lse) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() + k.numel() + v.numel() == 0) return {dq, dk, dv};
  const at::Tensor d_out = dout.scalar_type() == q.scalar_type() ? dout.contiguous() : dout.to(q.scalar_type()).contiguous();
  const at::Tensor o = out.contiguous();
  const at::Tensor l = lse.contiguous();
  Geometry gg = g;
  gg.o = strides_of(o, varlen);
  gg.lse = varlen ? Strides{0, l.stride(0), l.stride(1)} : Strides{l.stride(0), l.stride(1), l.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_backward_cpu", [&] {
    backward_all<scalar_t, at::opmath_type<scalar_t>>(gg, varlen, d_out, q, k, v, o, l, dq, dk, dv);
  });
  return {dq, dk, dv};
}


std::vector<std::pair<std::string, std::string>> describe_paths(Isa isa) {
  const char* fma = isa >= Isa::kAvx512 ? "avx512: float32 FMA micro-kernel, 12x32 tiles"
                    : isa == Isa::kAvx2 ? "avx2: float32 FMA micro-kernel, 6x16 tiles"
                                        : "scalar: portable vector code (SSE2/NEON), 6x8 tiles";
  const bool bf16dp = cpu_has(CpuFeature::kAvx512Bf16);
  return {
      {"float32 / float16 forward and backward", fma},
      {"bfloat16 forward", bf16dp ? "avx512_bf16: bf16 dot products (vdpbf16ps), float32 softmax" : fma},
      {"bfloat16 backward", fma},
      {"float64", std::string(isa_name(std::min(isa, Isa::kAvx512))) + ": float64 FMA micro-kernel"},
  };
}

const DescribeCpuPaths kPaths("fused_attention", &describe_paths);

}  // namespace
}  // namespace attention
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) { DSX_REGISTER_ATTENTION(m, deepseek_ext::attention::CpuBackend); }
