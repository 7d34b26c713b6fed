// CUDA backward of fused attention, FlashAttention-2 style (shared pieces in attention_cuda.cuh).
//
// D_i = rowsum(dO_i * O_i) first (a warp per row). Then two tiled kernels that recompute the probabilities from the
// saved log-sum-exp, P = exp2(x - lse * log2 e), and regenerate dropout from the Philox seed (one draw per four keys):
//   dK / dV: a block owns Bc keys of one (batch, kv head); for every query tile that can see them (and every query
//     head of the GQA group) it stages Q and dO in shared memory and computes S = Q K^T, dP = dO V^T, then
//     dV += P_dropped^T dO and dK += dS^T Q with dS = P * (dP * z - D);
//   dQ: a block owns Br queries of one (batch, head) and runs over the key tiles they see: S, dP, dS as above, then
//     dQ += dS K.
// Products run on tensor cores (wmma, float accumulation) for float16 / bfloat16, with P and dS rounded to the input
// dtype as FlashAttention does, and as register-tiled FMA loops for float32 / float64. Each gradient element is
// written by one block: no atomics, and results are deterministic. dQ costs two extra products (S and dP are computed
// in both kernels) — the price of leaving out FlashAttention-2's atomic dQ accumulation.
// Warp-per-row kernels remain for tiles that do not fit a block's shared memory.
#include <torch/library.h>

#include "attention_cuda.cuh"

namespace deepseek_ext {
namespace attention {
namespace cuda {
namespace {

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// D = rowsum(dO * O) over every (batch, head, row): dense rows (B, Hq, Sq), varlen (tokens, Hq) with batch 1.
template <typename T>
__global__ void delta_kernel(Geometry g, int64_t batch, int64_t rows, const T* __restrict__ o,
                             const T* __restrict__ dout, Strides ds, at::opmath_type<T>* __restrict__ delta) {
  using A = at::opmath_type<T>;
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= batch * g.heads_q * rows) return;
  const int64_t i = item % rows, bh = item / rows, h = bh % g.heads_q, b = bh / g.heads_q;
  const T* orow = o + b * g.o.b + h * g.o.h + i * g.o.s;
  const T* drow = dout + b * ds.b + h * ds.h + i * ds.s;
  A acc = 0;
  for (int64_t d = lane; d < g.head_dim_v; d += kWarp) acc += static_cast<A>(orow[d]) * static_cast<A>(drow[d]);
  acc = warp_sum(acc);
  if (lane == 0) delta[b * g.lse.b + h * g.lse.h + i * g.lse.s] = acc;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory layout of the tiled kernels: R query rows, C keys per step.
struct BwdTiles {
  int br, bc, dp, dvp;
  int ldq, ldk, ldv, ldo, lds, ldp, ldk_acc, ldv_acc;
  size_t q_off, do_off, k_off, v_off, s_off, dp_off, p_off, ds_off, dk_off, dv_off, stat_off, bytes;
};

// dkdv: accumulators for dK and dV (C rows); dq: one for dQ (R rows), no P buffer.
template <typename T>
BwdTiles bwd_tiles(bool dkdv, int br, int bc, int64_t d, int64_t dv) {
  using O = Ops<T>;
  using Op = typename O::Op;
  using Acc = typename O::Acc;
  BwdTiles t{};
  t.br = br;
  t.bc = bc;
  t.dp = static_cast<int>(round16(d));
  t.dvp = static_cast<int>(round16(dv));
  t.ldq = t.ldk = t.dp + O::kPadOp;
  t.ldv = t.ldo = t.dvp + O::kPadOp;
  t.lds = bc + O::kPadAcc;
  t.ldp = bc + O::kPadOp;
  t.ldk_acc = t.dp + O::kPadAcc;
  t.ldv_acc = t.dvp + O::kPadAcc;
  Carver c;
  t.q_off = c.take(sizeof(Op) * br * t.ldq);
  t.do_off = c.take(sizeof(Op) * br * t.ldo);
  t.k_off = c.take(sizeof(Op) * bc * t.ldk);
  t.v_off = c.take(sizeof(Op) * bc * t.ldv);
  t.s_off = c.take(sizeof(Acc) * br * t.lds);
  t.dp_off = c.take(sizeof(Acc) * br * t.lds);
  t.p_off = dkdv ? c.take(sizeof(Op) * br * t.ldp) : 0;
  t.ds_off = c.take(sizeof(Op) * br * t.ldp);
  if (dkdv) {
    t.dk_off = c.take(sizeof(Acc) * bc * t.ldk_acc);
    t.dv_off = c.take(sizeof(Acc) * bc * t.ldv_acc);
  } else {
    t.dk_off = c.take(sizeof(Acc) * br * t.ldk_acc);  // the dQ accumulator
  }
  t.stat_off = c.take(sizeof(Acc) * br * 2);  // lse (log2 units) and D of the staged rows
  t.bytes = c.off;
  return t;
}

// P and dS of the staged (R x C) tile from S and dP: P = exp2(x - lse2) with x the masked score in log2 units,
// Pd = P * z (dropout), dS = P * (dP * z - D). Keys in runs of four (one Philox draw each).
template <typename T, bool WithP>
__device__ __forceinline__ void probabilities(const Geometry& g, const DevSeq& s, const BwdTiles& t, int64_t b,
                                              int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                                              unsigned char* smem, uint32_t threshold) {
  using O = Ops<T>;
  using Op = typename O::Op;
  using Acc = typename O::Acc;
  const Acc* ss = reinterpret_cast<const Acc*>(smem + t.s_off);
  const Acc* dps = reinterpret_cast<const Acc*>(smem + t.dp_off);
  Op* ps = reinterpret_cast<Op*>(smem + t.p_off);
  Op* dss = reinterpret_cast<Op*>(smem + t.ds_off);
  const Acc* lse2 = reinterpret_cast<const Acc*>(smem + t.stat_off);
  const Acc* dlt = lse2 + t.br;
  const Acc scale_log2 = static_cast<Acc>(g.scale * kLog2e);
  const int runs = t.bc / 4;
  for (int idx = threadIdx.x; idx < t.br * runs; idx += blockDim.x) {
    const int r = idx / runs, c4 = (idx % runs) * 4;
    const int64_t i = i0 + r;
    Keep4<Acc> z{{Acc(1), Acc(1), Acc(1), Acc(1)}};
    const bool live = r < nq && c4 < nk && lse2[r] != std::numeric_limits<Acc>::infinity();
    if (live && g.dropout_p > 0.0) z = dropout4<Acc>(g, s, b, h, i, j0 + c4, threshold);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int c = c4 + u;
      Acc p = 0;
      if (live && c < nk) {
        const Acc x = score_log2<Acc>(g, s, b, h, i, j0 + c, ss[r * t.lds + c], scale_log2);
        if (x != neg_inf<Acc>()) p = exp2(x - lse2[r]);
      }
      if (WithP) ps[r * t.ldp + c] = O::op(p * z.z[u]);
      dss[r * t.ldp + c] = O::op(p * (dps[r * t.lds + c] * z.z[u] - dlt[r]));
    }
  }
}

// Stages Q / dO rows i0 .. i0 + nq of head h, and their lse (as log2 units) and D.
template <typename T>
__device__ __forceinline__ void stage_queries(const Geometry& g, const DevSeq& s, const BwdTiles& t, int64_t b,
                                              int64_t h, int64_t i0, int64_t nq, const T* q, const T* dout,
                                              const Strides& ds, const at::opmath_type<T>* lse,
                                              const at::opmath_type<T>* delta, unsigned char* smem) {
  using O = Ops<T>;
  using Op = typename O::Op;
  using Acc = typename O::Acc;
  load_tile(reinterpret_cast<Op*>(smem + t.q_off), t.ldq, t.br, t.dp, q + b * g.q.b + h * g.q.h + (s.q0 + i0) * g.q.s,
            g.q.s, nq, g.head_dim);
  load_tile(reinterpret_cast<Op*>(smem + t.do_off), t.ldo, t.br, t.dvp, dout + b * ds.b + h * ds.h + (s.q0 + i0) * ds.s,
            ds.s, nq, g.head_dim_v);
  Acc* lse2 = reinterpret_cast<Acc*>(smem + t.stat_off);
  for (int r = threadIdx.x; r < t.br; r += blockDim.x) {
    const int64_t li = b * g.lse.b + h * g.lse.h + (s.q0 + i0 + r) * g.lse.s;
    const Acc l = r < nq ? static_cast<Acc>(lse[li]) : std::numeric_limits<Acc>::infinity();
    lse2[r] = l == std::numeric_limits<Acc>::infinity() ? l : l * static_cast<Acc>(kLog2e);
    lse2[t.br + r] = r < nq ? static_cast<Acc>(delta[li]) : Acc(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dkdv_tiled_kernel(Geometry g, TileGrid tg, BwdTiles t, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const T* __restrict__ dout, Strides ds,
                      const at::opmath_type<T>* __restrict__ lse, const at::opmath_type<T>* __restrict__ delta,
                      T* __restrict__ dk, T* __restrict__ dv, Strides dks, Strides dvs, uint32_t threshold) {
  using O = Ops<T>;
  using Op = typename O::Op;
  using Acc = typename O::Acc;
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!tile_of(tg, tile)) return;
  const int64_t b = tile.b, hk = tile.h, j0 = tile.t * t.bc;
  const DevSeq s = dev_sequence(g, b);
  if (j0 >= s.nk) return;
  const int64_t nk = imin(t.bc, s.nk - j0);
  Op* qs = reinterpret_cast<Op*>(smem + t.q_off);
  Op* dos = reinterpret_cast<Op*>(smem + t.do_off);
  Op* ks = reinterpret_cast<Op*>(smem + t.k_off);
  Op* vs = reinterpret_cast<Op*>(smem + t.v_off);
  Acc* ss = reinterpret_cast<Acc*>(smem + t.s_off);
  Acc* dps = reinterpret_cast<Acc*>(smem + t.dp_off);
  Op* ps = reinterpret_cast<Op*>(smem + t.p_off);
  Op* dss = reinterpret_cast<Op*>(smem + t.ds_off);
  Acc* dka = reinterpret_cast<Acc*>(smem + t.dk_off);
  Acc* dva = reinterpret_cast<Acc*>(smem + t.dv_off);
  load_tile(ks, t.ldk, t.bc, t.dp, k + b * g.k.b + hk * g.k.h + (s.k0 + j0) * g.k.s, g.k.s, nk, g.head_dim);
  load_tile(vs, t.ldv, t.bc, t.dvp, v + b * g.v.b + hk * g.v.h + (s.k0 + j0) * g.v.s, g.v.s, nk, g.head_dim_v);
  for (int idx = threadIdx.x; idx < t.bc * t.dp; idx += blockDim.x) dka[(idx / t.dp) * t.ldk_acc + idx % t.dp] = 0;
  for (int idx = threadIdx.x; idx < t.bc * t.dvp; idx += blockDim.x) dva[(idx / t.dvp) * t.ldv_acc + idx % t.dvp] = 0;
  const int64_t group = g.heads_q / g.heads_kv;
  // Queries that can see key j0 (causal: i + off >= j0), from the start of their tile.
  const int64_t first = g.causal ? imax(0, j0 - s.off) : 0;
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t h = hk * group + gi;
    for (int64_t i0 = first / t.br * t.br; i0 < s.nq; i0 += t.br) {
      const int64_t nq = imin(t.br, s.nq - i0);
      __syncthreads();  // the previous step's readers of Q, dO, P, dS are done
      stage_queries(g, s, t, b, h, i0, nq, q, dout, ds, lse, delta, smem);
      __syncthreads();
      O::template gemm<false, true>(t.br, t.bc, t.dp, qs, t.ldq, ks, t.ldk, ss, t.lds, false);    // S = Q K^T
      O::template gemm<false, true>(t.br, t.bc, t.dvp, dos, t.ldo, vs, t.ldv, dps, t.lds, false);  // dP = dO V^T
      __syncthreads();
      probabilities<T, true>(g, s, t, b, h, i0, nq, j0, nk, smem, threshold);
      __syncthreads();
      O::template gemm<true, false>(t.bc, t.dvp, t.br, ps, t.ldp, dos, t.ldo, dva, t.ldv_acc, true);  // dV += Pd^T dO
      O::template gemm<true, false>(t.bc, t.dp, t.br, dss, t.ldp, qs, t.ldq, dka, t.ldk_acc, true);   // dK += dS^T Q
    }
  }
  __syncthreads();
  const Acc scale = static_cast<Acc>(g.scale);
  T* dkh = dk + b * dks.b + hk * dks.h + (s.k0 + j0) * dks.s;
  T* dvh = dv + b * dvs.b + hk * dvs.h + (s.k0 + j0) * dvs.s;
  for (int idx = threadIdx.x; idx < nk * g.head_dim; idx += blockDim.x) {
    const int r = idx / g.head_dim, d = idx % g.head_dim;
    dkh[r * dks.s + d] = static_cast<T>(dka[r * t.ldk_acc + d] * scale);
  }
  for (int idx = threadIdx.x; idx < nk * g.head_dim_v; idx += blockDim.x) {
    const int r = idx / g.head_dim_v, d = idx % g.head_dim_v;
    dvh[r * dvs.s + d] = static_cast<T>(dva[r * t.ldv_acc + d]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dq_tiled_kernel(Geometry g, TileGrid tg, BwdTiles t, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, const T* __restrict__ dout, Strides ds,
                    const at::opmath_type<T>* __restrict__ lse, const at::opmath_type<T>* __restrict__ delta,
                    T* __restrict__ dq, Strides dqs, uint32_t threshold) {
  using O = Ops<T>;
  using Op = typename O::Op;
  using Acc = typename O::Acc;
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!tile_of(tg, tile)) return;
  const int64_t b = tile.b, h = tile.h, i0 = tile.t * t.br;
  const DevSeq s = dev_sequence(g, b);
  if (i0 >= s.nq) return;
  const int64_t nq = imin(t.br, s.nq - i0);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  Op* qs = reinterpret_cast<Op*>(smem + t.q_off);
  Op* dos = reinterpret_cast<Op*>(smem + t.do_off);
  Op* ks = reinterpret_cast<Op*>(smem + t.k_off);
  Op* vs = reinterpret_cast<Op*>(smem + t.v_off);
  Acc* ss = reinterpret_cast<Acc*>(smem + t.s_off);
  Acc* dps = reinterpret_cast<Acc*>(smem + t.dp_off);
  Op* dss = reinterpret_cast<Op*>(smem + t.ds_off);
  Acc* dqa = reinterpret_cast<Acc*>(smem + t.dk_off);
  stage_queries(g, s, t, b, h, i0, nq, q, dout, ds, lse, delta, smem);
  for (int idx = threadIdx.x; idx < t.br * t.dp; idx += blockDim.x) dqa[(idx / t.dp) * t.ldk_acc + idx % t.dp] = 0;
  const T* kh = k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const T* vh = v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;
  const int64_t kend = g.causal ? imin(s.nk, imax(0, i0 + nq - 1 + s.off + 1)) : s.nk;
  for (int64_t j0 = 0; j0 < kend; j0 += t.bc) {
    const int64_t nk = imin(t.bc, kend - j0);
    __syncthreads();
    load_tile(ks, t.ldk, t.bc, t.dp, kh + j0 * g.k.s, g.k.s, nk, g.head_dim);
    load_tile(vs, t.ldv, t.bc, t.dvp, vh + j0 * g.v.s, g.v.s, nk, g.head_dim_v);
    __syncthreads();
    O::template gemm<false, true>(t.br, t.bc, t.dp, qs, t.ldq, ks, t.ldk, ss, t.lds, false);
    O::template gemm<false, true>(t.br, t.bc, t.dvp, dos, t.ldo, vs, t.ldv, dps, t.lds, false);
    __syncthreads();
    probabilities<T, false>(g, s, t, b, h, i0, nq, j0, nk, smem, threshold);
    __syncthreads();
    O::template gemm<false, false>(t.br, t.dp, t.bc, dss, t.ldp, ks, t.ldk, dqa, t.ldk_acc, true);  // dQ += dS K
  }
  __syncthreads();
  const Acc scale = static_cast<Acc>(g.scale);
  T* dqh = dq + b * dqs.b + h * dqs.h + (s.q0 + i0) * dqs.s;
  for (int idx = threadIdx.x; idx < nq * g.head_dim; idx += blockDim.x) {
    const int r = idx / g.head_dim, d = idx % g.head_dim;
    dqh[r * dqs.s + d] = static_cast<T>(dqa[r * t.ldk_acc + d] * scale);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Warp-per-row fallbacks (tiles that do not fit shared memory): dK / dV per key row, dQ per query row.
constexpr int kMaxPerLane = kMaxHeadDim / kWarp;

template <typename A>
struct PairGrad {
  A p_dropped, ds;
};

template <typename A>
__device__ __forceinline__ PairGrad<A> pair_grad(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i,
                                                 int64_t j, A qk_partial, A dov_partial, A lse_i, A delta_i,
                                                 uint32_t threshold) {
  const A x = score_log2<A>(g, s, b, h, i, j, warp_sum(qk_partial), static_cast<A>(g.scale * kLog2e));
  const A dp = warp_sum(dov_partial);
  if (x == neg_inf<A>() || lse_i == std::numeric_limits<A>::infinity()) return {A(0), A(0)};
  const A p = exp2(x - lse_i * static_cast<A>(kLog2e));
  const A z = g.dropout_p > 0.0 ? dropout4<A>(g, s, b, h, i, j & ~int64_t{3}, threshold).z[j & 3] : A(1);
  return {p * z, p * (dp * z - delta_i)};
}

template <typename T>
__global__ void dkdv_rows_kernel(Geometry g, TileGrid tg, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout, Strides ds,
                                 const at::opmath_type<T>* __restrict__ lse,
                                 const at::opmath_type<T>* __restrict__ delta, T* __restrict__ dk,
                                 T* __restrict__ dv, Strides dks, Strides dvs, uint32_t threshold) {
  using A = at::opmath_type<T>;
  Tile tile;
  if (!tile_of(tg, tile)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = tile.b, hk = tile.h, j = tile.t * kRowWarps + threadIdx.x / kWarp;
  const DevSeq s = dev_sequence(g, b);
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
      const PairGrad<A> pg = pair_grad<A>(g, s, b, h, i, j, qk, dov, lse[li], delta[li], threshold);
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
__global__ void dq_rows_kernel(Geometry g, TileGrid tg, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const T* __restrict__ dout, Strides ds,
                               const at::opmath_type<T>* __restrict__ lse, const at::opmath_type<T>* __restrict__ delta,
                               T* __restrict__ dq, Strides dqs, uint32_t threshold) {
  using A = at::opmath_type<T>;
  Tile tile;
  if (!tile_of(tg, tile)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = tile.b, h = tile.h, i = tile.t * kRowWarps + threadIdx.x / kWarp;
  const DevSeq s = dev_sequence(g, b);
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
    const PairGrad<A> pg = pair_grad<A>(g, s, b, h, i, j, qk, dov, lse_i, delta_i, threshold);
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

// Tile shapes (R query rows, C keys) tried for the tiled kernels, largest first; the first one that fits twice into
// an SM's shared memory (two blocks per SM), else the first that fits once.
constexpr int kBwdTiles[][2] = {{64, 64}, {32, 64}, {32, 32}, {16, 16}};

template <typename T>
bool pick_tiles(bool dkdv, const Geometry& g, const SmemLimits& lim, BwdTiles& out) {
  bool found = false;
  for (const auto& shape : kBwdTiles) {
    const BwdTiles t = bwd_tiles<T>(dkdv, shape[0], shape[1], g.head_dim, g.head_dim_v);
    if (t.bytes > static_cast<size_t>(lim.per_block)) continue;
    if (2 * (t.bytes + 1024) <= static_cast<size_t>(lim.per_sm)) {
      out = t;
      return true;
    }
    if (!found) {
      out = t;
      found = true;
    }
  }
  return found;
}

}  // namespace

// The backend the shared backward entry points (Entry<...> in attention.h) run.
struct CudaBackward {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(Geometry g, bool varlen, const at::Tensor& grad_out,
                                                                 const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& out,
                                                                 const at::Tensor& lse);
  static at::Tensor offsets(Varlen& r) {
    if (!r.cu_q.defined()) return {};
    if (!r.device_offsets) {
      r.cu_q = r.cu_q.to(r.q.device());
      r.cu_k = r.cu_k.to(r.q.device());
    }
    r.geo.cu_q = r.cu_q.const_data_ptr<int64_t>();
    r.geo.cu_k = r.cu_k.const_data_ptr<int64_t>();
    return r.cu_q;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> CudaBackward::backward(Geometry g, bool varlen,
                                                                      const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0 || g.batch == 0) {
    // No queries (or heads_q == 0): no gradient reaches K and V; no keys: P = 0 and dQ = 0. Nothing to launch.
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor dout = (grad_out.scalar_type() == q.scalar_type() ? grad_out : grad_out.to(q.scalar_type())).contiguous();
  const at::Tensor o = out.contiguous();
  const at::Tensor l = lse.contiguous();
  g.o = strides_of(o, varlen);
  g.lse = varlen ? Strides{0, l.stride(0), l.stride(1)} : Strides{l.stride(0), l.stride(1), l.stride(2)};
  at::Tensor delta = at::empty_like(l);
  const Strides ds = strides_of(dout, varlen);
  const uint32_t threshold = dropout_threshold(g.dropout_p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = q.get_device();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const SmemLimits lim = smem_limits(device);
  const int64_t total_q = varlen ? q.size(0) : 0, total_k = varlen ? k.size(0) : 0;
  const bool low_precision = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool tiled_ok = !low_precision || major >= 8;  // tensor-core tiles need sm_80
  const Strides dks = strides_of(dk, varlen), dvs = strides_of(dv, varlen), dqs = strides_of(dq, varlen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* dop = dout.const_data_ptr<scalar_t>();
    const A* lp = l.const_data_ptr<A>();
    A* dlt = delta.mutable_data_ptr<A>();
    {
      const int64_t batch = varlen ? 1 : g.batch, rows = varlen ? total_q : g.seq_q;
      const int64_t warps = batch * g.heads_q * rows;
      if (warps > 0) {
        delta_kernel<scalar_t><<<grid_size((warps + kRowWarps - 1) / kRowWarps), kRowWarps * kWarp, 0, stream>>>(
            g, batch, rows, o.const_data_ptr<scalar_t>(), dop, ds, dlt);
        check_launch();
      }
    }
    BwdTiles t{};
    if (tiled_ok && pick_tiles<scalar_t>(true, g, lim, t)) {
      const TilePlan plan = plan_tiles(g, varlen, true, g.heads_kv, t.bc, total_k, q);
      if (plan.blocks > 0) {
        allow_max_dynamic_smem<dkdv_tiled_kernel<scalar_t>>(device);
        dkdv_tiled_kernel<scalar_t><<<grid_size(plan.blocks), kThreads, t.bytes, stream>>>(
            g, plan.grid, t, qp, kp, vp, dop, ds, lp, dlt, dk.mutable_data_ptr<scalar_t>(),
            dv.mutable_data_ptr<scalar_t>(), dks, dvs, threshold);
        check_launch();
      }
    } else {
      const TilePlan plan = plan_tiles(g, varlen, true, g.heads_kv, kRowWarps, total_k, q);
      if (plan.blocks > 0) {
        dkdv_rows_kernel<scalar_t><<<grid_size(plan.blocks), kRowWarps * kWarp, 0, stream>>>(
            g, plan.grid, qp, kp, vp, dop, ds, lp, dlt, dk.mutable_data_ptr<scalar_t>(),
            dv.mutable_data_ptr<scalar_t>(), dks, dvs, threshold);
        check_launch();
      }
    }
    if (tiled_ok && pick_tiles<scalar_t>(false, g, lim, t)) {
      const TilePlan plan = plan_tiles(g, varlen, false, g.heads_q, t.br, total_q, q);
      if (plan.blocks > 0) {
        allow_max_dynamic_smem<dq_tiled_kernel<scalar_t>>(device);
        dq_tiled_kernel<scalar_t><<<grid_size(plan.blocks), kThreads, t.bytes, stream>>>(
            g, plan.grid, t, qp, kp, vp, dop, ds, lp, dlt, dq.mutable_data_ptr<scalar_t>(), dqs, threshold);
        check_launch();
      }
    } else {
      const TilePlan plan = plan_tiles(g, varlen, false, g.heads_q, kRowWarps, total_q, q);
      if (plan.blocks > 0) {
        dq_rows_kernel<scalar_t><<<grid_size(plan.blocks), kRowWarps * kWarp, 0, stream>>>(
            g, plan.grid, qp, kp, vp, dop, ds, lp, dlt, dq.mutable_data_ptr<scalar_t>(), dqs, threshold);
        check_launch();
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace cuda
}  // namespace attention
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  using Bwd = deepseek_ext::attention::Entry<deepseek_ext::attention::cuda::CudaBackward>;
  m.impl("fused_attention_bwd", &Bwd::bwd);
  m.impl("fused_attention_varlen_bwd", &Bwd::varlen_bwd);
}
