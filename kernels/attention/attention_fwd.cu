// CUDA forward of fused attention (the backward is in attention_bwd.cu; shared pieces in attention_cuda.cuh).
//
// float16 / bfloat16 (tensor cores through nvcuda::wmma, 16x16x16 tiles, float accumulation): a block of four warps
// owns 64 query rows (16 per warp) of one (batch, head); key / value tiles of 32 rows are staged in shared memory,
// each warp computes its 16x32 score tile with mma, applies scale, masks and the online softmax in shared memory, and
// accumulates P V into its float output tile (kept in shared memory, because rows are rescaled as the running maximum
// changes). The score matrix never reaches global memory.
// float32 / float64: the same tiling with FMA products (Br query rows x Bc keys per step, 4 x 4 outputs per thread,
// everything in shared memory), so K and V are read once per block of query rows instead of once per row.
// A warp-per-row kernel remains for what does not fit a block's shared memory (float64 with large head dims on GPUs
// with little shared memory).
#include <torch/library.h>

#include "attention_cuda.cuh"

namespace deepseek_ext {
namespace attention {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------------
// Host helpers shared with attention_bwd.cu.
namespace {

__global__ void tile_prefix_kernel(const int64_t* __restrict__ cu, int64_t batch, int64_t rows,
                                   int64_t* __restrict__ prefix) {
  __shared__ int64_t part[1024];
  const int64_t per = (batch + blockDim.x - 1) / blockDim.x;
  const int64_t b0 = imin(batch, threadIdx.x * per), b1 = imin(batch, b0 + per);
  auto tiles = [&](int64_t b) { return (imax(0, cu[b + 1] - cu[b]) + rows - 1) / rows; };
  int64_t s = 0;
  for (int64_t b = b0; b < b1; ++b) s += tiles(b);
  part[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) {
      const int64_t v = part[i];
      part[i] = run;
      run += v;
    }
    prefix[batch] = run;
  }
  __syncthreads();
  int64_t run = part[threadIdx.x];
  for (int64_t b = b0; b < b1; ++b) {
    prefix[b] = run;
    run += tiles(b);
  }
}

}  // namespace

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fused attention: ", blocks, " thread blocks exceed one launch's limit");
  return static_cast<unsigned>(blocks);
}

TilePlan plan_tiles(const Geometry& g, bool varlen, bool keys, int64_t heads, int64_t rows, int64_t total_rows,
                    const at::Tensor& like) {
  TilePlan p;
  p.grid.batch = g.batch;
  p.grid.heads = heads;
  if (g.batch == 0 || heads == 0) return p;
  if (!varlen) {
    p.grid.tiles = ((keys ? g.seq_k : g.seq_q) + rows - 1) / rows;
    p.blocks = g.batch * heads * p.grid.tiles;
    return p;
  }
  p.grid.tiles = (total_rows + rows - 1) / rows + g.batch;
  p.storage = at::empty({g.batch + 1}, like.options().dtype(at::kLong));
  tile_prefix_kernel<<<1, 1024, 0, c10::cuda::getCurrentCUDAStream()>>>(keys ? g.cu_k : g.cu_q, g.batch, rows,
                                                                        p.storage.data_ptr<int64_t>());
  check_launch();
  p.grid.prefix = p.storage.const_data_ptr<int64_t>();
  p.blocks = heads * p.grid.tiles;
  return p;
}

SmemLimits smem_limits(int device) {
  int block = 0, sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return {block, sm};
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Forward on tensor cores (float16 / bfloat16).
constexpr int kTcWarps = 4, kTcRows = 16 * kTcWarps, kTcKeys = 32;

struct TcLayout {
  int dp, dvp, ldq, ldk, ldv, lds, ldp, ldo;  // padded dims and leading dimensions (elements)
  size_t q_off, k_off, v_off, s_off, p_off, o_off, stat_off, bytes;
};

__host__ __device__ inline TcLayout tc_layout(int64_t d, int64_t dv) {
  TcLayout t{};
  t.dp = static_cast<int>(round16(d));
  t.dvp = static_cast<int>(round16(dv));
  t.ldq = t.ldk = t.dp + 8;  // +8 halves: rows start on different banks, fragments stay 32-byte aligned
  t.ldv = t.dvp + 8;
  t.lds = kTcKeys + 4;
  t.ldp = kTcKeys + 8;
  t.ldo = t.dvp + 4;
  Carver c;
  t.q_off = c.take(sizeof(uint16_t) * kTcRows * t.ldq);
  t.k_off = c.take(sizeof(uint16_t) * kTcKeys * t.ldk);
  t.v_off = c.take(sizeof(uint16_t) * kTcKeys * t.ldv);
  t.s_off = c.take(sizeof(float) * kTcRows * t.lds);
  t.p_off = c.take(sizeof(uint16_t) * kTcRows * t.ldp);
  t.o_off = c.take(sizeof(float) * kTcRows * t.ldo);
  t.stat_off = c.take(sizeof(float) * kTcRows * 3);  // running max, running sum, rescale factor
  t.bytes = c.off;
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kTcWarps * kWarp)
    forward_tc_kernel(Geometry g, TileGrid tg, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse, uint32_t threshold) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 mma needs sm_80; the host only launches this kernel there
#else
  using namespace nvcuda;
  using W = typename Wmma<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!tile_of(tg, tile)) return;
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
  const int64_t b = tile.b, h = tile.h, i0 = tile.t * kTcRows;
  const DevSeq s = dev_sequence(g, b);
  if (i0 >= s.nq) return;
  const int64_t nq = imin(kTcRows, s.nq - i0);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const float scale_log2 = static_cast<float>(g.scale * kLog2e);
  const T* qh = q + b * g.q.b + h * g.q.h + (s.q0 + i0) * g.q.s;
  const T* kh = k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const T* vh = v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;

  load_tile(qs, t.ldq, kTcRows, t.dp, qh, g.q.s, nq, g.head_dim);
  for (int idx = threadIdx.x; idx < kTcRows * t.dvp; idx += nthreads) os[(idx / t.dvp) * t.ldo + idx % t.dvp] = 0.f;
  for (int r = threadIdx.x; r < kTcRows; r += nthreads) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const int64_t kend = g.causal ? imin(s.nk, imax(0, i0 + nq - 1 + s.off + 1)) : s.nk;
  for (int64_t kb = 0; kb < kend; kb += kTcKeys) {
    const int64_t nk = imin(kTcKeys, kend - kb);
    __syncthreads();  // previous tile's readers are done
    load_tile(ks, t.ldk, kTcKeys, t.dp, kh + kb * g.k.s, g.k.s, nk, g.head_dim);
    load_tile(vs, t.ldv, kTcKeys, t.dvp, vh + kb * g.v.s, g.v.s, nk, g.head_dim_v);
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
    // Online softmax on the warp's 16 rows: two lanes per row, 16 keys each (four Philox draws for dropout).
    {
      const int r = r0 + lane / 2, half = lane % 2;
      const int64_t i = i0 + r;
      float* srow = ss + r * t.lds;
      float mx = -INFINITY;
      for (int jj = 0; jj < kTcKeys / 2; ++jj) {
        const int j = half * (kTcKeys / 2) + jj;
        float x = -INFINITY;
        if (r < nq && j < nk) x = score_log2<float>(g, s, b, h, i, kb + j, srow[j], scale_log2);
        srow[j] = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = row_max[r], m_new = fmaxf(m_old, mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      W* prow = ps + r * t.ldp;
      for (int j4 = half * (kTcKeys / 2); j4 < (half + 1) * (kTcKeys / 2); j4 += 4) {
        Keep4<float> z{{1.f, 1.f, 1.f, 1.f}};
        if (g.dropout_p > 0.0 && r < nq && j4 < nk) z = dropout4<float>(g, s, b, h, i, kb + j4, threshold);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = j4 + u;
          const float p = exp2f(srow[j] - base);  // exp2(-inf) = 0 for masked and padding keys
          sum += p;
          prow[j] = Wmma<T>::from_float(p * z.z[u]);
        }
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
        l > 0.f ? (row_max[r] + log2f(l)) * static_cast<float>(kLn2) : INFINITY;
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Forward with FMA products in shared memory (float32 / float64): Br query rows per block, Bc keys per step.
struct FwdTiles {
  int br, bc, dp, dvp, ldq, ldk, ldv, lds, ldo;
  size_t q_off, k_off, v_off, s_off, o_off, stat_off, bytes;
};

template <typename T>
FwdTiles fwd_tiles(int br, int bc, int64_t d, int64_t dv) {
  FwdTiles f{};
  f.br = br;
  f.bc = bc;
  f.dp = static_cast<int>(round16(d));
  f.dvp = static_cast<int>(round16(dv));
  f.ldq = f.ldk = f.dp + 4;
  f.ldv = f.ldo = f.dvp + 4;
  f.lds = bc + 4;
  Carver c;
  f.q_off = c.take(sizeof(T) * br * f.ldq);
  f.k_off = c.take(sizeof(T) * bc * f.ldk);
  f.v_off = c.take(sizeof(T) * bc * f.ldv);
  f.s_off = c.take(sizeof(T) * br * f.lds);
  f.o_off = c.take(sizeof(T) * br * f.ldo);
  f.stat_off = c.take(sizeof(T) * br * 3);
  f.bytes = c.off;
  return f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_tiled_kernel(Geometry g, TileGrid tg, FwdTiles f, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, T* __restrict__ o, T* __restrict__ lse, uint32_t threshold) {
  using O = Ops<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!tile_of(tg, tile)) return;
  T* qs = reinterpret_cast<T*>(smem + f.q_off);
  T* ks = reinterpret_cast<T*>(smem + f.k_off);
  T* vs = reinterpret_cast<T*>(smem + f.v_off);
  T* ss = reinterpret_cast<T*>(smem + f.s_off);
  T* os = reinterpret_cast<T*>(smem + f.o_off);
  T* row_max = reinterpret_cast<T*>(smem + f.stat_off);
  T* row_sum = row_max + f.br;
  T* row_alpha = row_sum + f.br;
  const int64_t b = tile.b, h = tile.h, i0 = tile.t * f.br;
  const DevSeq s = dev_sequence(g, b);
  if (i0 >= s.nq) return;
  const int64_t nq = imin(f.br, s.nq - i0);
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const T scale_log2 = static_cast<T>(g.scale * kLog2e);
  const T* kh = k + b * g.k.b + hk * g.k.h + s.k0 * g.k.s;
  const T* vh = v + b * g.v.b + hk * g.v.h + s.k0 * g.v.s;
  load_tile(qs, f.ldq, f.br, f.dp, q + b * g.q.b + h * g.q.h + (s.q0 + i0) * g.q.s, g.q.s, nq, g.head_dim);
  for (int idx = threadIdx.x; idx < f.br * f.dvp; idx += blockDim.x) os[(idx / f.dvp) * f.ldo + idx % f.dvp] = T(0);
  for (int r = threadIdx.x; r < f.br; r += blockDim.x) {
    row_max[r] = neg_inf<T>();
    row_sum[r] = T(0);
  }
  // Rows of the softmax phase: `group` threads per row (a power of two dividing 32), keys in runs of four.
  const int group = blockDim.x / f.br, lig = threadIdx.x % group, r = threadIdx.x / group;
  const int64_t kend = g.causal ? imin(s.nk, imax(0, i0 + nq - 1 + s.off + 1)) : s.nk;
  for (int64_t kb = 0; kb < kend; kb += f.bc) {
    const int64_t nk = imin(f.bc, kend - kb);
    __syncthreads();
    load_tile(ks, f.ldk, f.bc, f.dp, kh + kb * g.k.s, g.k.s, nk, g.head_dim);
    load_tile(vs, f.ldv, f.bc, f.dvp, vh + kb * g.v.s, g.v.s, nk, g.head_dim_v);
    __syncthreads();
    O::template gemm<false, true>(f.br, f.bc, f.dp, qs, f.ldq, ks, f.ldk, ss, f.lds, false);
    __syncthreads();
    {
      const int64_t i = i0 + r;
      T* srow = ss + r * f.lds;
      T mx = neg_inf<T>();
      for (int j4 = lig * 4; j4 < f.bc; j4 += group * 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = j4 + u;
          T x = neg_inf<T>();
          if (r < nq && j < nk) x = score_log2<T>(g, s, b, h, i, kb + j, srow[j], scale_log2);
          srow[j] = x;
          mx = max(mx, x);
        }
      }
      for (int off = group / 2; off > 0; off /= 2) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const T m_old = row_max[r], m_new = max(m_old, mx);
      const T base = m_new == neg_inf<T>() ? T(0) : m_new;
      T sum = 0;
      for (int j4 = lig * 4; j4 < f.bc; j4 += group * 4) {
        Keep4<T> z{{T(1), T(1), T(1), T(1)}};
        if (g.dropout_p > 0.0 && r < nq && j4 < nk) z = dropout4<T>(g, s, b, h, i, kb + j4, threshold);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const T p = exp2(srow[j4 + u] - base);
          sum += p;
          srow[j4 + u] = p * z.z[u];
        }
      }
      for (int off = group / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      __syncwarp();
      if (lig == 0) {
        const T alpha = m_old == neg_inf<T>() ? (m_new == neg_inf<T>() ? T(1) : T(0)) : exp2(m_old - m_new);
        row_alpha[r] = alpha;
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < f.br * f.dvp; idx += blockDim.x) {
      const int rr = idx / f.dvp, d = idx % f.dvp;
      os[rr * f.ldo + d] *= row_alpha[rr];
    }
    __syncthreads();
    O::template gemm<false, false>(f.br, f.dvp, f.bc, ss, f.lds, vs, f.ldv, os, f.ldo, true);
  }
  __syncthreads();
  T* oh = o + b * g.o.b + h * g.o.h + (s.q0 + i0) * g.o.s;
  for (int idx = threadIdx.x; idx < nq * g.head_dim_v; idx += blockDim.x) {
    const int rr = idx / g.head_dim_v, d = idx % g.head_dim_v;
    const T l = row_sum[rr];
    oh[rr * g.o.s + d] = l > T(0) ? os[rr * f.ldo + d] / l : T(0);
  }
  for (int rr = threadIdx.x; rr < nq; rr += blockDim.x) {
    const T l = row_sum[rr];
    lse[b * g.lse.b + h * g.lse.h + (s.q0 + i0 + rr) * g.lse.s] =
        l > T(0) ? (row_max[rr] + log2(l)) * static_cast<T>(kLn2) : std::numeric_limits<T>::infinity();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, one warp per query row, streaming the keys (the fallback for tiles that do not fit shared memory).
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

constexpr int kMaxPerLane = kMaxHeadDim / kWarp;

template <typename T>
__global__ void forward_rows_kernel(Geometry g, TileGrid tg, const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ o, at::opmath_type<T>* __restrict__ lse,
                                    uint32_t threshold) {
  using A = at::opmath_type<T>;
  Tile tile;
  if (!tile_of(tg, tile)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = tile.b, h = tile.h, row = tile.t * kRowWarps + threadIdx.x / kWarp;
  const DevSeq s = dev_sequence(g, b);
  if (row >= s.nq) return;
  const int64_t hk = h / (g.heads_q / g.heads_kv);
  const A scale_log2 = static_cast<A>(g.scale * kLog2e);
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
  A m = neg_inf<A>(), l = 0;
  Keep4<A> z{{A(1), A(1), A(1), A(1)}};
  const int64_t kend = g.causal ? imin(s.nk, imax(0, row + s.off + 1)) : s.nk;
  for (int64_t j = 0; j < kend; ++j) {
    if (g.dropout_p > 0.0 && (j & 3) == 0) z = dropout4<A>(g, s, b, h, row, j, threshold);
    const T* kr = kh + j * g.k.s;
    A dot = 0;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + e * kWarp;
      if (d < g.head_dim) dot += qv[e] * static_cast<A>(kr[d]);
    }
    const A x = score_log2<A>(g, s, b, h, row, j, warp_sum(dot), scale_log2);
    if (x == neg_inf<A>()) continue;
    const A m_new = max(m, x);
    const A alpha = exp2(m - m_new), p = exp2(x - m_new);
    l = l * alpha + p;
    m = m_new;
    const A pd = p * z.z[j & 3];
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
        l > A(0) ? (m + log2(l)) * static_cast<A>(kLn2) : std::numeric_limits<A>::infinity();
  }
}

// Tile shapes tried for the FMA forward, largest first.
constexpr int kFwdTiles[][2] = {{64, 32}, {32, 32}, {16, 16}};

}  // namespace

// The backend the shared forward entry points (Entry<...> in attention.h) run.
struct CudaForward {
  static std::tuple<at::Tensor, at::Tensor> forward(Geometry g, bool varlen, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v);
  static at::Tensor offsets(Varlen& r) {
    if (!r.cu_q.defined()) return {};
    if (!r.device_offsets) {  // host offsets (checked on the host): copied to the device
      r.cu_q = r.cu_q.to(r.q.device());
      r.cu_k = r.cu_k.to(r.q.device());
    }
    r.geo.cu_q = r.cu_q.const_data_ptr<int64_t>();
    r.geo.cu_k = r.cu_k.const_data_ptr<int64_t>();
    return r.cu_q;
  }
};

std::tuple<at::Tensor, at::Tensor> CudaForward::forward(Geometry g, bool varlen, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(out_sizes(q, v, varlen), q.options());
  at::Tensor lse = at::empty(lse_sizes(q, varlen), q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) {
    if (lse.numel() > 0) lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const int64_t total_q = varlen ? q.size(0) : 0;
  const uint32_t threshold = dropout_threshold(g.dropout_p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = q.get_device();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const SmemLimits lim = smem_limits(device);
  // Every output row is written by the kernels (rows past a sequence's keys get zeros and lse = +inf), except
  // varlen tokens outside every sequence, which valid offsets do not leave.
  const bool low_precision = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const TcLayout t = tc_layout(g.head_dim, g.head_dim_v);
  if (low_precision && major >= 8 && t.bytes <= static_cast<size_t>(lim.per_block)) {
    const TilePlan plan = plan_tiles(g, varlen, false, g.heads_q, kTcRows, total_q, q);
    if (plan.blocks == 0) return {out, lse};
    AT_DISPATCH_SWITCH(q.scalar_type(), "fused_attention_cuda", AT_DISPATCH_CASE(at::kHalf, [&] {
      allow_max_dynamic_smem<forward_tc_kernel<scalar_t>>(device);
      forward_tc_kernel<scalar_t><<<grid_size(plan.blocks), kTcWarps * kWarp, t.bytes, stream>>>(
          g, plan.grid, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), threshold);
    }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
      allow_max_dynamic_smem<forward_tc_kernel<scalar_t>>(device);
      forward_tc_kernel<scalar_t><<<grid_size(plan.blocks), kTcWarps * kWarp, t.bytes, stream>>>(
          g, plan.grid, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), threshold);
    }));
    check_launch();
    return {out, lse};
  }
  if (!low_precision) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_attention_tiled_cuda", [&] {
      for (const auto& shape : kFwdTiles) {
        const FwdTiles f = fwd_tiles<scalar_t>(shape[0], shape[1], g.head_dim, g.head_dim_v);
        if (f.bytes > static_cast<size_t>(lim.per_block)) continue;
        const TilePlan plan = plan_tiles(g, varlen, false, g.heads_q, f.br, total_q, q);
        if (plan.blocks > 0) {
          allow_max_dynamic_smem<forward_tiled_kernel<scalar_t>>(device);
          forward_tiled_kernel<scalar_t><<<grid_size(plan.blocks), kThreads, f.bytes, stream>>>(
              g, plan.grid, f, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
              v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(),
              threshold);
          check_launch();
        }
        done = true;
        break;
      }
    });
    if (done) return {out, lse};
  }
  const TilePlan plan = plan_tiles(g, varlen, false, g.heads_q, kRowWarps, total_q, q);
  if (plan.blocks == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_rows_cuda", [&] {
    forward_rows_kernel<scalar_t><<<grid_size(plan.blocks), kRowWarps * kWarp, 0, stream>>>(
        g, plan.grid, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<at::opmath_type<scalar_t>>(), threshold);
  });
  check_launch();
  return {out, lse};
}

}  // namespace cuda
}  // namespace attention
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  using Fwd = deepseek_ext::attention::Entry<deepseek_ext::attention::cuda::CudaForward>;
  m.impl("fused_attention_fwd", &Fwd::fwd);
  m.impl("fused_attention_varlen_fwd", &Fwd::varlen_fwd);
}
