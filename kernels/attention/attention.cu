// CUDA kernels of fused attention.
//
// Forward, float16/bfloat16 (tensor cores through nvcuda::wmma, 16x16x16 tiles, float accumulation): a block of
// four warps owns 64 query rows (16 per warp) of one (batch, head); key/value tiles of 32 rows are staged in
// shared memory, each warp computes its 16x32 score tile with mma, applies scale, masks and the online softmax
// in shared memory, and accumulates P V into its float output tile (kept in shared memory, because rows are
// rescaled as the running maximum changes). The score matrix never reaches global memory.
// Forward, float32/float64: one warp per query row streaming the keys (online softmax), the same semantics.
// Backward, every dtype: D_i = rowsum(dO * O); then one warp per key row accumulates dK and dV over the queries
// of its group and one warp per query row accumulates dQ over the keys, both recomputing P from the saved
// log-sum-exp and regenerating the dropout mask from the Philox seed (no atomics: deterministic).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <limits>

#include "deepseek_ext/attention.h"

namespace deepseek_ext {
namespace attention {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxPerLane = kMaxHeadDim / kWarp;  // head-dim elements a lane holds in the warp-per-row kernels


__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct DevSeq {
  int64_t q0, nq, k0, nk, off;
};

__device__ __forceinline__ DevSeq dev_sequence(const Geometry& g, int64_t b) {
  DevSeq s{0, g.seq_q, 0, g.seq_k, 0};
  if (g.cu_q != nullptr) s = DevSeq{g.cu_q[b], g.cu_q[b + 1] - g.cu_q[b], g.cu_k[b], g.cu_k[b + 1] - g.cu_k[b], 0};
  s.off = g.bottom_right ? s.nk - s.nq : 0;
  return s;
}

// Scaled, masked score of (i, j) given the raw dot product; -inf when masked.
template <typename A>
__device__ __forceinline__ A masked_score(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i,
                                          int64_t j, A dot) {
  if (g.causal && j > i + s.off) return -std::numeric_limits<A>::infinity();
  A x = dot * static_cast<A>(g.scale);
  if (g.mask != nullptr) {
    const int64_t o = b * g.mask_b + h * g.mask_h + i * g.mask_i + j * g.mask_j;
    if (g.mask_is_bool) {
      if (!static_cast<const bool*>(g.mask)[o]) return -std::numeric_limits<A>::infinity();
    } else {
      x += static_cast<A>(static_cast<const at::opmath_type<A>*>(g.mask)[o]);
    }
  }
  return x;
}

template <typename A>
__device__ __forceinline__ A dropout_factor(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i,
                                            int64_t j, uint32_t threshold) {
  if (g.dropout_p <= 0.0) return A(1);
  const uint32_t r = dropout_bits(g.seed, b, g.heads_q, h, i, j, s.nk);
  return r >= threshold ? static_cast<A>(1.0 / (1.0 - g.dropout_p)) : A(0);
}

// The warp-per-row kernels: this warp's lane, its row (query or key, by blockIdx.x), batch (blockIdx.z), head
// (blockIdx.y) and the batch's sequence.
struct WarpRow {
  int lane;
  int64_t row, b, h;
  DevSeq s;
};

__device__ __forceinline__ WarpRow warp_row(const Geometry& g) {
  const int64_t b = blockIdx.z;
  return WarpRow{static_cast<int>(threadIdx.x % kWarp),
                 static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp, b, blockIdx.y,
                 dev_sequence(g, b)};
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, one warp per query row (float32 / float64, and any dtype as the general path).
template <typename T>
__global__ void forward_rows_kernel(Geometry g, const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ o, at::opmath_type<T>* __restrict__ lse,
                                    uint32_t threshold) {
  using A = at::opmath_type<T>;
  const WarpRow w = warp_row(g);
  const int lane = w.lane;
  const int64_t row = w.row, b = w.b, h = w.h;
  const DevSeq s = w.s;
  if (row >= s.nq) return;
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const T* qr = q + b * g.q.b + h * g.q.h + (s.q0 + row) * g.q.s;
  const T* kh = k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const T* vh = v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;
  A qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    qv[e] = d < g.head_dim ? static_cast<A>(qr[d]) : A(0);
    acc[e] = 0;
  }
  A m = -std::numeric_limits<A>::infinity(), l = 0;
  const int64_t kend = g.causal ? imin(s.nk, imax(0, row + s.off + 1)) : s.nk;
  for (int64_t j = 0; j < kend; ++j) {
    const T* kr = kh + j * g.k.s;
    A dot = 0;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + e * kWarp;
      if (d < g.head_dim) dot += qv[e] * static_cast<A>(kr[d]);
    }
    const A x = masked_score(g, s, b, h, row, j, warp_sum(dot));
    if (x == -std::numeric_limits<A>::infinity()) continue;
    const A m_new = max(m, x);
    const A alpha = exp(m - m_new), p = exp(x - m_new);
    l = l * alpha + p;
    m = m_new;
    const A pd = p * dropout_factor<A>(g, s, b, h, row, j, threshold);
    const T* vr = vh + j * g.v.s;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + e * kWarp;
      acc[e] = acc[e] * alpha + (d < g.head_dim_v ? pd * static_cast<A>(vr[d]) : A(0));
    }
  }
  const A inv = l > A(0) ? A(1) / l : A(0);
  T* orow = o + b * g.o.b + h * g.o.h + (s.q0 + row) * g.o.s;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    if (d < g.head_dim_v) orow[d] = static_cast<T>(acc[e] * inv);
  }
  if (lane == 0) {
    lse[b * g.lse.b + h * g.lse.h + (s.q0 + row) * g.lse.s] =
        l > A(0) ? m + log(l) : std::numeric_limits<A>::infinity();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward on tensor cores (float16 / bfloat16).
template <typename T>
struct Wmma;
template <>
struct Wmma<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float x) { return __float2half(x); }
};
template <>
struct Wmma<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float x) { return __float2bfloat16(x); }
};

constexpr int kTcWarps = 4, kTcRows = 16 * kTcWarps, kTcKeys = 32;

struct TcLayout {
  int dp, dvp, ldq, ldk, ldv, lds, ldp, ldo;  // padded dims and leading dimensions (elements)
  size_t q_off, k_off, v_off, s_off, p_off, o_off, stat_off, bytes;
};

__host__ __device__ inline TcLayout tc_layout(int64_t d, int64_t dv) {
  TcLayout t{};
  t.dp = static_cast<int>((d + 15) / 16 * 16);
  t.dvp = static_cast<int>((dv + 15) / 16 * 16);
  t.ldq = t.ldk = t.dp + 8;  // +8 halves: rows start on different banks, fragments stay 32-byte aligned
  t.ldv = t.dvp + 8;
  t.lds = kTcKeys + 4;
  t.ldp = kTcKeys + 8;
  t.ldo = t.dvp + 4;
  size_t off = 0;
  auto take = [&](size_t n) {
    const size_t at = off;
    off += (n + 127) / 128 * 128;
    return at;
  };
  t.q_off = take(sizeof(uint16_t) * kTcRows * t.ldq);
  t.k_off = take(sizeof(uint16_t) * kTcKeys * t.ldk);
  t.v_off = take(sizeof(uint16_t) * kTcKeys * t.ldv);
  t.s_off = take(sizeof(float) * kTcRows * t.lds);
  t.p_off = take(sizeof(uint16_t) * kTcRows * t.ldp);
  t.o_off = take(sizeof(float) * kTcRows * t.ldo);
  t.stat_off = take(sizeof(float) * kTcRows * 3);  // running max, running sum, rescale factor
  t.bytes = off;
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kTcWarps * kWarp)
    forward_tc_kernel(Geometry g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      T* __restrict__ o, float* __restrict__ lse, uint32_t threshold) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 mma needs sm_80; the host only launches this kernel there
#else
  using namespace nvcuda;
  using W = typename Wmma<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const TcLayout t = tc_layout(g.head_dim, g.head_dim_v);
  W* qs = reinterpret_cast<W*>(smem + t.q_off);
  W* ks = reinterpret_cast<W*>(smem + t.k_off);
  W* vs = reinterpret_cast<W*>(smem + t.v_off);
  float* ss = reinterpret_cast<float*>(smem + t.s_off);
  W* ps = reinterpret_cast<W*>(smem + t.p_off);
  float* os = reinterpret_cast<float*>(smem + t.o_off);
  float* row_max = reinterpret_cast<float*>(smem + t.stat_off);
  float* row_sum = row_max + kTcRows;
  float* row_alpha = row_sum + kTcRows;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nthreads = blockDim.x;
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const DevSeq s = dev_sequence(g, b);
  if (i0 >= s.nq) return;
  const int64_t nq = imin(kTcRows, s.nq - i0);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const T* qh = q + b * g.q.b + h * g.q.h + (s.q0 + i0) * g.q.s;
  const T* kh = k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const T* vh = v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;

  for (int idx = threadIdx.x; idx < kTcRows * t.dp; idx += nthreads) {
    const int r = idx / t.dp, d = idx % t.dp;
    qs[r * t.ldq + d] = (r < nq && d < g.head_dim) ? reinterpret_cast<const W*>(qh)[r * g.q.s + d] : Wmma<T>::from_float(0.f);
  }
  for (int idx = threadIdx.x; idx < kTcRows * t.dvp; idx += nthreads) os[(idx / t.dvp) * t.ldo + idx % t.dvp] = 0.f;
  for (int r = threadIdx.x; r < kTcRows; r += nthreads) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const int64_t kend = g.causal ? imin(s.nk, imax(0, i0 + nq - 1 + s.off + 1)) : s.nk;
  for (int64_t kb = 0; kb < kend; kb += kTcKeys) {
    const int64_t nk = imin(kTcKeys, kend - kb);
    __syncthreads();  // previous tile's readers are done
    for (int idx = threadIdx.x; idx < kTcKeys * t.dp; idx += nthreads) {
      const int j = idx / t.dp, d = idx % t.dp;
      ks[j * t.ldk + d] = (j < nk && d < g.head_dim) ? reinterpret_cast<const W*>(kh)[(kb + j) * g.k.s + d]
                                                     : Wmma<T>::from_float(0.f);
    }
    for (int idx = threadIdx.x; idx < kTcKeys * t.dvp; idx += nthreads) {
      const int j = idx / t.dvp, d = idx % t.dvp;
      vs[j * t.ldv + d] = (j < nk && d < g.head_dim_v) ? reinterpret_cast<const W*>(vh)[(kb + j) * g.v.s + d]
                                                       : Wmma<T>::from_float(0.f);
    }
    __syncthreads();
    // S (16 x 32 per warp) = Q_w K^T
    const int r0 = warp * 16;
#pragma unroll
    for (int c = 0; c < kTcKeys / 16; ++c) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int d0 = 0; d0 < t.dp; d0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> bt;
        wmma::load_matrix_sync(a, qs + r0 * t.ldq + d0, t.ldq);
        wmma::load_matrix_sync(bt, ks + (c * 16) * t.ldk + d0, t.ldk);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(ss + r0 * t.lds + c * 16, acc, t.lds, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax on the warp's 16 rows: two lanes per row, 16 keys each.
    {
      const int r = r0 + lane / 2, half = lane % 2;
      const int64_t i = i0 + r;
      float* srow = ss + r * t.lds;
      float mx = -INFINITY;
      for (int jj = 0; jj < kTcKeys / 2; ++jj) {
        const int j = half * (kTcKeys / 2) + jj;
        float x = -INFINITY;
        if (r < nq && j < nk) {
          const float sc = masked_score<float>(g, s, b, h, i, kb + j, srow[j]);
          x = sc == -INFINITY ? -INFINITY : sc * 1.4426950408889634f;  // log2 units
        }
        srow[j] = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = row_max[r], m_new = fmaxf(m_old, mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      W* prow = ps + r * t.ldp;
      for (int jj = 0; jj < kTcKeys / 2; ++jj) {
        const int j = half * (kTcKeys / 2) + jj;
        const float p = exp2f(srow[j] - base);
        sum += p;
        const float pd = (r < nq && j < nk) ? p * dropout_factor<float>(g, s, b, h, i, kb + j, threshold) : 0.f;
        prow[j] = Wmma<T>::from_float(pd);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      if (half == 0) {
        const float alpha = m_old == -INFINITY ? (m_new == -INFINITY ? 1.f : 0.f) : exp2f(m_old - m_new);
        row_alpha[r] = alpha;
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
      }
    }
    __syncwarp();
    // O_w = alpha * O_w + P_w V
    for (int idx = lane; idx < 16 * t.dvp; idx += kWarp) {
      const int r = r0 + idx / t.dvp, d = idx % t.dvp;
      os[r * t.ldo + d] *= row_alpha[r];
    }
    __syncwarp();
    for (int c = 0; c < t.dvp; c += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + r0 * t.ldo + c, t.ldo, wmma::mem_row_major);
#pragma unroll
      for (int j0 = 0; j0 < kTcKeys; j0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> bv;
        wmma::load_matrix_sync(a, ps + r0 * t.ldp + j0, t.ldp);
        wmma::load_matrix_sync(bv, vs + j0 * t.ldv + c, t.ldv);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + r0 * t.ldo + c, acc, t.ldo, wmma::mem_row_major);
    }
  }
  __syncthreads();
  T* oh = o + b * g.o.b + h * g.o.h + (s.q0 + i0) * g.o.s;
  for (int idx = threadIdx.x; idx < nq * g.head_dim_v; idx += nthreads) {
    const int r = idx / g.head_dim_v, d = idx % g.head_dim_v;
    const float l = row_sum[r];
    oh[r * g.o.s + d] = static_cast<T>(l > 0.f ? os[r * t.ldo + d] / l : 0.f);
  }
  for (int r = threadIdx.x; r < nq; r += nthreads) {
    const float l = row_sum[r];
    lse[b * g.lse.b + h * g.lse.h + (s.q0 + i0 + r) * g.lse.s] =
        l > 0.f ? (row_max[r] + log2f(l)) * 0.6931471805599453f : INFINITY;
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.
template <typename T>
__global__ void delta_kernel(Geometry g, const T* __restrict__ o, const T* __restrict__ dout, Strides ds,
                             at::opmath_type<T>* __restrict__ delta) {
  using A = at::opmath_type<T>;
  const WarpRow w = warp_row(g);
  const int lane = w.lane;
  const int64_t row = w.row, b = w.b, h = w.h;
  const DevSeq s = w.s;
  if (row >= s.nq) return;
  const T* orow = o + b * g.o.b + h * g.o.h + (s.q0 + row) * g.o.s;
  const T* drow = dout + b * ds.b + h * ds.h + (s.q0 + row) * ds.s;
  A acc = 0;
  for (int64_t d = lane; d < g.head_dim_v; d += kWarp) acc += static_cast<A>(orow[d]) * static_cast<A>(drow[d]);
  acc = warp_sum(acc);
  if (lane == 0) delta[b * g.lse.b + h * g.lse.h + (s.q0 + row) * g.lse.s] = acc;
}

// P, and the gradient of the score dS = P * (dP * z - D_i), for one (query row, key) pair; dot products are
// reduced across the warp, every lane gets the results.
template <typename A>
struct PairGrad {
  A p_dropped, ds;
};

template <typename T, typename A>
__device__ __forceinline__ PairGrad<A> pair_grad(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i,
                                                 int64_t j, A qk_partial, A dov_partial, A lse_i, A delta_i,
                                                 uint32_t threshold) {
  const A x = masked_score(g, s, b, h, i, j, warp_sum(qk_partial));
  const A dp = warp_sum(dov_partial);
  if (x == -std::numeric_limits<A>::infinity() || lse_i == std::numeric_limits<A>::infinity()) return {A(0), A(0)};
  const A p = exp(x - lse_i);
  const A z = dropout_factor<A>(g, s, b, h, i, j, threshold);
  return {p * z, p * (dp * z - delta_i)};
}

template <typename T>
__global__ void dkdv_kernel(Geometry g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ dout, Strides ds, const at::opmath_type<T>* __restrict__ lse,
                            const at::opmath_type<T>* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv, Strides dks,
                            Strides dvs, uint32_t threshold) {
  using A = at::opmath_type<T>;
  const WarpRow w = warp_row(g);
  const int lane = w.lane;
  const int64_t j = w.row, b = w.b, hk = w.h;
  const DevSeq s = w.s;
  if (j >= s.nk) return;
  const int64_t G = g.heads_q / g.heads_kv;
  const T* kr = k + b * g.k.b + hk * g.k.h + (s.k0 + j) * g.k.s;
  const T* vr = v + b * g.v.b + hk * g.v.h + (s.k0 + j) * g.v.s;
  A kv[kMaxPerLane], vv[kMaxPerLane], dkacc[kMaxPerLane], dvacc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    kv[e] = d < g.head_dim ? static_cast<A>(kr[d]) : A(0);
    vv[e] = d < g.head_dim_v ? static_cast<A>(vr[d]) : A(0);
    dkacc[e] = dvacc[e] = 0;
  }
  const int64_t ifirst = g.causal ? imax(0, j - s.off) : 0;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = hk * G + gi;
    for (int64_t i = ifirst; i < s.nq; ++i) {
      const T* qr = q + b * g.q.b + h * g.q.h + (s.q0 + i) * g.q.s;
      const T* dor = dout + b * ds.b + h * ds.h + (s.q0 + i) * ds.s;
      A qk = 0, dov = 0, qv[kMaxPerLane], dov_e[kMaxPerLane];
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int64_t d = lane + e * kWarp;
        qv[e] = d < g.head_dim ? static_cast<A>(qr[d]) : A(0);
        dov_e[e] = d < g.head_dim_v ? static_cast<A>(dor[d]) : A(0);
        qk += qv[e] * kv[e];
        dov += dov_e[e] * vv[e];
      }
      const int64_t li = b * g.lse.b + h * g.lse.h + (s.q0 + i) * g.lse.s;
      const PairGrad<A> pg = pair_grad<T, A>(g, s, b, h, i, j, qk, dov, lse[li], delta[li], threshold);
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        dvacc[e] += pg.p_dropped * dov_e[e];
        dkacc[e] += pg.ds * qv[e];
      }
    }
  }
  T* dkr = dk + b * dks.b + hk * dks.h + (s.k0 + j) * dks.s;
  T* dvr = dv + b * dvs.b + hk * dvs.h + (s.k0 + j) * dvs.s;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    if (d < g.head_dim) dkr[d] = static_cast<T>(dkacc[e] * static_cast<A>(g.scale));
    if (d < g.head_dim_v) dvr[d] = static_cast<T>(dvacc[e]);
  }
}

template <typename T>
__global__ void dq_kernel(Geometry g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ dout, Strides ds, const at::opmath_type<T>* __restrict__ lse,
                          const at::opmath_type<T>* __restrict__ delta, T* __restrict__ dq, Strides dqs, uint32_t threshold) {
  using A = at::opmath_type<T>;
  const WarpRow w = warp_row(g);
  const int lane = w.lane;
  const int64_t i = w.row, b = w.b, h = w.h;
  const DevSeq s = w.s;
  if (i >= s.nq) return;
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const T* qr = q + b * g.q.b + h * g.q.h + (s.q0 + i) * g.q.s;
  const T* dor = dout + b * ds.b + h * ds.h + (s.q0 + i) * ds.s;
  A qv[kMaxPerLane], dov_e[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    qv[e] = d < g.head_dim ? static_cast<A>(qr[d]) : A(0);
    dov_e[e] = d < g.head_dim_v ? static_cast<A>(dor[d]) : A(0);
    acc[e] = 0;
  }
  const int64_t li = b * g.lse.b + h * g.lse.h + (s.q0 + i) * g.lse.s;
  const A lse_i = lse[li], delta_i = delta[li];
  const int64_t kend = g.causal ? imin(s.nk, imax(0, i + s.off + 1)) : s.nk;
  for (int64_t j = 0; j < kend; ++j) {
    const T* kr = k + b * g.k.b + hk * g.k.h + (s.k0 + j) * g.k.s;
    const T* vr = v + b * g.v.b + hk * g.v.h + (s.k0 + j) * g.v.s;
    A qk = 0, dov = 0, kv[kMaxPerLane];
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + e * kWarp;
      kv[e] = d < g.head_dim ? static_cast<A>(kr[d]) : A(0);
      qk += qv[e] * kv[e];
      dov += dov_e[e] * (d < g.head_dim_v ? static_cast<A>(vr[d]) : A(0));
    }
    const PairGrad<A> pg = pair_grad<T, A>(g, s, b, h, i, j, qk, dov, lse_i, delta_i, threshold);
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) acc[e] += pg.ds * kv[e];
  }
  T* dqr = dq + b * dqs.b + h * dqs.h + (s.q0 + i) * dqs.s;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + e * kWarp;
    if (d < g.head_dim) dqr[d] = static_cast<T>(acc[e] * static_cast<A>(g.scale));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
constexpr int kRowWarps = 4;  // warps per block in the warp-per-row kernels

// Device copies of the varlen offsets (the geometry's pointers are host memory after the checks).
struct DeviceOffsets {
  at::Tensor cu_q, cu_k;
};

DeviceOffsets to_device(Geometry& g, const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Device& device) {
  DeviceOffsets d;
  if (!cu_q.defined()) return d;
  d.cu_q = cu_q.to(device);
  d.cu_k = cu_k.to(device);
  g.cu_q = d.cu_q.const_data_ptr<int64_t>();
  g.cu_k = d.cu_k.const_data_ptr<int64_t>();
  return d;
}

// The backend the shared entry points (Entry<CudaBackend> in attention.h) run.
struct CudaBackend {
  static std::tuple<at::Tensor, at::Tensor> forward(Geometry g, bool varlen, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(Geometry g, bool varlen, const at::Tensor& grad_out,
                                                                 const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& out,
                                                                 const at::Tensor& lse);
  static DeviceOffsets offsets(Varlen& r) { return to_device(r.geo, r.cu_q, r.cu_k, r.q.device()); }
};

std::tuple<at::Tensor, at::Tensor> CudaBackend::forward(Geometry g, bool varlen, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(out_sizes(q, v, varlen), q.options());
  at::Tensor lse = at::empty(lse_sizes(q, varlen), q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  if (g.batch == 0 || g.seq_q == 0) return {out, lse};
  const uint32_t threshold = dropout_threshold(g.dropout_p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Tensor cores for float16/bfloat16 on sm_80+, when the tiles fit the block's shared memory (head dims up to
  // 256 on A100/H100; smaller on consumer parts, which take the warp-per-row kernel for the largest dims).
  const TcLayout t = tc_layout(g.head_dim, g.head_dim_v);
  int major = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  const bool tensor_cores = (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) && major >= 8 &&
                            t.bytes <= static_cast<size_t>(smem_optin);
  if (tensor_cores) {
    const dim3 grid((g.seq_q + kTcRows - 1) / kTcRows, g.heads_q, g.batch);
    AT_DISPATCH_SWITCH(q.scalar_type(), "fused_attention_cuda", AT_DISPATCH_CASE(at::kHalf, [&] {
      auto kernel = forward_tc_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(t.bytes)));
      kernel<<<grid, kTcWarps * kWarp, t.bytes, stream>>>(g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                          v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                          lse.mutable_data_ptr<float>(), threshold);
    }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
      auto kernel = forward_tc_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(t.bytes)));
      kernel<<<grid, kTcWarps * kWarp, t.bytes, stream>>>(g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                          v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                          lse.mutable_data_ptr<float>(), threshold);
    }));
  } else {
    const dim3 grid((g.seq_q + kRowWarps - 1) / kRowWarps, g.heads_q, g.batch);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_cuda", [&] {
      forward_rows_kernel<scalar_t><<<grid, kRowWarps * kWarp, 0, stream>>>(
          g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<at::opmath_type<scalar_t>>(), threshold);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> CudaBackend::backward(Geometry g, bool varlen, const at::Tensor& grad_out,
                                                            const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& out,
                                                            const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() + k.numel() + v.numel() == 0 || g.batch == 0) return {dq, dk, dv};
  const at::Tensor dout = (grad_out.scalar_type() == q.scalar_type() ? grad_out : grad_out.to(q.scalar_type())).contiguous();
  const at::Tensor o = out.contiguous();
  const at::Tensor l = lse.contiguous();
  g.o = strides_of(o, varlen);
  g.lse = varlen ? Strides{0, l.stride(0), l.stride(1)} : Strides{l.stride(0), l.stride(1), l.stride(2)};
  at::Tensor delta = at::empty_like(l);
  const Strides ds = strides_of(dout, varlen);
  const uint32_t threshold = dropout_threshold(g.dropout_p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kRowWarps * kWarp);
  const dim3 grid_q((imax(g.seq_q, 1) + kRowWarps - 1) / kRowWarps, g.heads_q, g.batch);
  const dim3 grid_k((imax(g.seq_k, 1) + kRowWarps - 1) / kRowWarps, g.heads_kv, g.batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    delta_kernel<scalar_t><<<grid_q, block, 0, stream>>>(g, o.const_data_ptr<scalar_t>(),
                                                         dout.const_data_ptr<scalar_t>(), ds, delta.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dkdv_kernel<scalar_t><<<grid_k, block, 0, stream>>>(
        g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dout.const_data_ptr<scalar_t>(), ds, l.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), strides_of(dk, varlen),
        strides_of(dv, varlen), threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dq_kernel<scalar_t><<<grid_q, block, 0, stream>>>(
        g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dout.const_data_ptr<scalar_t>(), ds, l.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dq.mutable_data_ptr<scalar_t>(), strides_of(dq, varlen), threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}


}  // namespace
}  // namespace attention
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) { DSX_REGISTER_ATTENTION(m, deepseek_ext::attention::CudaBackend); }
