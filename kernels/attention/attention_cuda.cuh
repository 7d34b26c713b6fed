// Shared pieces of the CUDA fused-attention kernels (attention_fwd.cu, attention_bwd.cu): sequence geometry on the
// device, the score rule, dropout, how a launch's blocks map to (batch, head, tile), and the tile products.
//
// Scores are handled in log2 units, as on the CPU: x = q.k * (scale * log2 e) + mask * log2 e, in the compute type
// (float32 for float32 / float16 / bfloat16 inputs, float64 for float64). A score that is -inf there is masked: a
// boolean False, the causal rule, or an additive mask that is -inf or so negative that mask * log2 e overflows to -inf
// (finfo(float32).min, the value transformers uses, in float32 compute). A row whose scores are all masked has output
// zero and lse +inf, and no gradient flows through it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <limits>
#include <mutex>
#include <type_traits>

#include "deepseek_ext/attention.h"

namespace deepseek_ext {
namespace attention {
namespace cuda {

constexpr int kWarp = 32;
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;
constexpr int kThreads = 128;  // every tiled kernel: four warps
constexpr int kRowWarps = 4;   // warps (rows) per block of the warp-per-row kernels

__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

struct DevSeq {
  int64_t q0, nq, k0, nk, off;
};

__device__ __forceinline__ DevSeq dev_sequence(const Geometry& g, int64_t b) {
  DevSeq s{0, g.seq_q, 0, g.seq_k, 0};
  if (g.cu_q != nullptr) {
    s = DevSeq{g.cu_q[b], imax(0, g.cu_q[b + 1] - g.cu_q[b]), g.cu_k[b], imax(0, g.cu_k[b + 1] - g.cu_k[b]), 0};
  }
  s.off = g.bottom_right ? s.nk - s.nq : 0;
  return s;
}

// Score (i, j) in log2 units from the raw dot product; -inf when masked (see the top of this file).
template <typename A>
__device__ __forceinline__ A score_log2(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i, int64_t j,
                                        A dot, A scale_log2) {
  if (g.causal && j > i + s.off) return neg_inf<A>();
  A x = dot * scale_log2;
  if (g.mask != nullptr) {
    const int64_t o = b * g.mask_b + h * g.mask_h + i * g.mask_i + j * g.mask_j;
    if (g.mask_is_bool) {
      if (!static_cast<const bool*>(g.mask)[o]) return neg_inf<A>();
    } else {
      x += static_cast<A>(kLog2e) * static_cast<const A*>(g.mask)[o];
    }
  }
  return x;
}

// Dropout factors of keys j4 .. j4 + 3 (j4 a multiple of 4) of row i: one Philox block (attention.h's dropout_bits
// rule, which both backends follow) for four keys.
template <typename A>
struct Keep4 {
  A z[4];
};

template <typename A>
__device__ __forceinline__ Keep4<A> dropout4(const Geometry& g, const DevSeq& s, int64_t b, int64_t h, int64_t i,
                                             int64_t j4, uint32_t threshold) {
  Keep4<A> k{{A(1), A(1), A(1), A(1)}};
  if (g.dropout_p <= 0.0) return k;
  const A keep = static_cast<A>(1.0 / (1.0 - g.dropout_p));
  const auto r = rng::philox(g.seed, static_cast<uint64_t>(b * g.heads_q + h),
                             static_cast<uint64_t>(i * ((s.nk + 3) / 4) + (j4 >> 2)));
#pragma unroll
  for (int u = 0; u < 4; ++u) k.z[u] = r.v[u] >= threshold ? keep : A(0);
  return k;
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks -> (batch, head, tile) on blockIdx.x alone (up to 2^31 - 1 blocks; gridDim.y / z would cap heads or batch at
// 65,535). Dense: `tiles` tiles per (batch, head), tile fastest so neighbouring blocks share K / V in L2. Varlen:
// global tile numbers over the sequences, prefix[b] = the first tile of sequence b (computed on the device: nothing is
// read back to the host); `tiles` is the bound ceil(total_rows / rows) + batch and blocks past the last tile return.
struct TileGrid {
  int64_t batch = 0, heads = 0, tiles = 0;
  const int64_t* prefix = nullptr;
};

struct Tile {
  int64_t b, h, t;
};

__device__ __forceinline__ bool tile_of(const TileGrid& tg, Tile& out) {
  const int64_t x = blockIdx.x;
  const int64_t t = x % tg.tiles, rest = x / tg.tiles;
  out.h = rest % tg.heads;
  if (tg.prefix == nullptr) {
    out.b = rest / tg.heads;
    out.t = t;
    return out.b < tg.batch;
  }
  if (t >= tg.prefix[tg.batch]) return false;
  int64_t lo = 0, hi = tg.batch - 1;  // the last sequence whose first tile is <= t: it holds t
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tg.prefix[mid] <= t) lo = mid; else hi = mid - 1;
  }
  out.b = lo;
  out.t = t - tg.prefix[lo];
  return true;
}

// A launch plan: the grid and how many blocks (0: nothing to launch); `storage` keeps the prefix alive.
struct TilePlan {
  TileGrid grid;
  int64_t blocks = 0;
  at::Tensor storage;
};

// Tiles of `rows` query rows (keys = false) or key rows (keys = true) for `heads` heads.
TilePlan plan_tiles(const Geometry& g, bool varlen, bool keys, int64_t heads, int64_t rows, int64_t total_rows,
                    const at::Tensor& like);

unsigned grid_size(int64_t blocks);

// Raises the dynamic shared-memory limit of `Kernel` to the device's opt-in maximum, once per device and process
// (setting it per call with the call's own size races between threads launching different head dims).
template <auto Kernel>
void allow_max_dynamic_smem(int device) {
  static std::once_flag once[64];
  TORCH_CHECK(device >= 0 && device < 64, "fused attention: device index ", device, " out of range");
  std::call_once(once[device], [device] {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  });
}

struct SmemLimits {
  int64_t per_block = 0, per_sm = 0;
};
SmemLimits smem_limits(int device);

// ---------------------------------------------------------------------------------------------------------------
// Tile products in shared memory, C[M x N] (+)= A[M x K] B[K x N], M, N, K multiples of 16, accumulators in memory.
// A(m, k) = a[m * lda + k] (row-major) or a[k * lda + m] (ACol); B(k, n) = b[k * ldb + n] or b[n * ldb + k] (BCol).
// Tensor cores (wmma 16x16x16, float accumulation) for float16 / bfloat16; a register-tiled FMA loop for float32 /
// float64. Work is spread over the block's warps / threads; the caller synchronises around it.
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

// Operand / accumulator types and products for input dtype T.
template <typename T, bool TensorCores = !std::is_same_v<T, float> && !std::is_same_v<T, double>>
struct Ops;

template <typename T>
struct Ops<T, true> {
  using Op = typename Wmma<T>::type;
  using Acc = float;
  static constexpr int kPadOp = 8, kPadAcc = 4;  // leading dims: rows on different banks, 32-byte aligned fragments
  static __device__ __forceinline__ Op op(float x) { return Wmma<T>::from_float(x); }
  static __device__ __forceinline__ Op load(const T* p) { return *reinterpret_cast<const Op*>(p); }
  static __device__ __forceinline__ Op zero() { return Wmma<T>::from_float(0.f); }

  template <bool ACol, bool BCol>
  static __device__ void gemm(int M, int N, int K, const Op* a, int lda, const Op* b, int ldb, float* c, int ldc,
                              bool accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bfloat16 mma needs sm_80; the host launches these kernels there only
#else
    using namespace nvcuda;
    using LA = std::conditional_t<ACol, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<BCol, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
    const int tn = N / 16, tiles = (M / 16) * tn;
    for (int t = warp; t < tiles; t += warps) {
      const int m0 = (t / tn) * 16, n0 = (t % tn) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
      if (accumulate) {
        wmma::load_matrix_sync(f, c + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(f, 0.f);
      }
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Op, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Op, LB> fb;
        wmma::load_matrix_sync(fa, ACol ? a + k0 * lda + m0 : a + m0 * lda + k0, lda);
        wmma::load_matrix_sync(fb, BCol ? b + n0 * ldb + k0 : b + k0 * ldb + n0, ldb);
        wmma::mma_sync(f, fa, fb, f);
      }
      wmma::store_matrix_sync(c + m0 * ldc + n0, f, ldc, wmma::mem_row_major);
    }
#endif
  }
};

template <typename T>
struct Ops<T, false> {
  using Op = T;
  using Acc = T;
  static constexpr int kPadOp = 4, kPadAcc = 4;
  static __device__ __forceinline__ Op op(T x) { return x; }
  static __device__ __forceinline__ Op load(const T* p) { return *p; }
  static __device__ __forceinline__ Op zero() { return T(0); }

  // Each thread computes 4 x 4 outputs at a time.
  template <bool ACol, bool BCol>
  static __device__ void gemm(int M, int N, int K, const T* a, int lda, const T* b, int ldb, T* c, int ldc,
                              bool accumulate) {
    const int tn = N / 4, tiles = (M / 4) * tn;
    for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
      const int m0 = (t / tn) * 4, n0 = (t % tn) * 4;
      T r[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] = accumulate ? c[(m0 + i) * ldc + n0 + j] : T(0);
      }
      for (int k = 0; k < K; ++k) {
        T av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = ACol ? a[k * lda + m0 + i] : a[(m0 + i) * lda + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = BCol ? b[(n0 + j) * ldb + k] : b[k * ldb + n0 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) r[i][j] += av[i] * bv[j];
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) c[(m0 + i) * ldc + n0 + j] = r[i][j];
      }
    }
  }
};

// Shared-memory carving: consecutive buffers, each starting on a 128-byte boundary.
struct Carver {
  size_t off = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = off;
    off += (bytes + 127) / 128 * 128;
    return at;
  }
};

// Copies rows r < n of a (rows x cols) tile from global memory (row stride `stride`, `cols` valid columns) into shared
// memory with leading dim ld and padded width `width`; padding is zero. 16-byte loads and stores when the layout
// allows (the usual case: contiguous rows, head dims that are multiples of 8 / 4 / 2 elements), else element-wise.
template <typename T, typename O>
__device__ __forceinline__ void load_tile(O* dst, int ld, int rows, int width, const T* src, int64_t stride,
                                          int64_t n, int64_t cols) {
  static_assert(sizeof(O) == sizeof(T), "shared-memory operands keep the input's bits");
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = cols % kVec == 0 && stride % kVec == 0 && ld % kVec == 0 && width % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    const int chunks = width / kVec;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
      const int r = idx / chunks, c = (idx % chunks) * kVec;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: +0 in every floating type
      if (r < n && c < cols) v = *reinterpret_cast<const uint4*>(src + r * stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
    return;
  }
  using Op = Ops<T>;
  for (int idx = threadIdx.x; idx < rows * width; idx += blockDim.x) {
    const int r = idx / width, d = idx % width;
    dst[r * ld + d] = (r < n && d < cols) ? Op::load(src + r * stride + d) : Op::zero();
  }
}

// Host: the dropout threshold and a launch check shared by both files.
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace cuda
}  // namespace attention
}  // namespace deepseek_ext
