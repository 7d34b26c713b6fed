// Register-tiled small GEMMs for CPU kernels that multiply tiles they have just packed (attention's QK^T / PV and
// the backward's products): C[M x N] (+)= op(A)[M x K] * B[K x N] with B and C rows padded to kNR columns.
//
// gemm<T, Bytes>: float32 / float64 FMAs on simd.h vectors of `Bytes` (16, 32 or 64): MR rows x two vectors per
// micro-tile, MR = 12 with AVX-512's 32 registers and 6 otherwise. Instantiate inside a DSX_TARGET_* wrapper.
//
// gemm_bf16: AVX512-BF16 dot products (vdpbf16ps) for bfloat16 tiles with float32 accumulation. A holds rows of
// bf16 (pairs of neighbouring k in one 32-bit word); B is packed in pairs along k, "VNNI-2": element (k, n) at
// B[(k / 2) * 2 * ldb + 2 * n + k % 2]. Each instruction does two multiply-adds per float lane.
#pragma once

#include <cstdint>
#include <cstring>

#include "deepseek_ext/simd.h"

#ifdef DSX_X86
#include <immintrin.h>
#endif

namespace deepseek_ext {
namespace cpu_gemm {

template <typename T, int Bytes>
constexpr int64_t kNR = 2 * simd::kLanes<T, Bytes>;  // columns of a micro-tile
template <int Bytes>
constexpr int kMR = Bytes == 64 ? 12 : 6;  // rows of a full micro-tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR x NR] (+)= A[MR x K] * B[K x NR]. A(r, k) is A[r * lda + k], or A[k * lda + r] when TransA.
template <typename T, int Bytes, int MR, bool TransA>
DSX_INLINE void micro_kernel(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                             bool accumulate) {
  using V = simd::Vec<T, Bytes>;
  constexpr int64_t VL = simd::kLanes<T, Bytes>;
  V c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? simd::load<V>(C + r * ldc) : V{};
    c1[r] = accumulate ? simd::load<V>(C + r * ldc + VL) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = simd::load<V>(B + k * ldb), b1 = simd::load<V>(B + k * ldb + VL);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const T a = TransA ? A[k * lda + r] : A[r * lda + k];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    simd::store(C + r * ldc, c0[r]);
    simd::store(C + r * ldc + VL, c1[r]);
  }
}

// Rows left over after the full micro-tiles: one micro-kernel of exactly `rows` rows (1 <= rows < MR).
template <typename T, int Bytes, bool TransA, int R>
DSX_INLINE void micro_tail(int rows, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                           bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_kernel<T, Bytes, R, TransA>(K, A, lda, B, ldb, C, ldc, accumulate);
    } else {
      micro_tail<T, Bytes, TransA, R - 1>(rows, K, A, lda, B, ldb, C, ldc, accumulate);
    }
  }
}

// C[M x N] (+)= op(A)[M x K] * B[K x N]; N a multiple of kNR, B and C rows padded to it.
template <typename T, int Bytes, bool TransA = false>
DSX_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                     int64_t ldc, bool accumulate) {
  constexpr int64_t NR = kNR<T, Bytes>;
  constexpr int MR = kMR<Bytes>;
  auto a_at = [&](int64_t m0) { return TransA ? A + m0 : A + m0 * lda; };
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      micro_kernel<T, Bytes, MR, TransA>(K, a_at(m0), lda, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
    if (m0 < M) {
      micro_tail<T, Bytes, TransA, MR - 1>(static_cast<int>(M - m0), K, a_at(m0), lda, B + n0, ldb,
                                           C + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

#ifdef DSX_X86
constexpr int64_t kNRBf16 = 32;  // columns of a bf16 micro-tile (two zmm of float32)

template <int MR>
DSX_TARGET_AVX512_BF16 DSX_INLINE void micro_kernel_bf16(int64_t pairs, const uint16_t* A, int64_t lda,
                                                          const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                                                          bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i b0 = _mm512_loadu_si512(B + p * 2 * ldb), b1 = _mm512_loadu_si512(B + p * 2 * ldb + 32);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      int32_t a;
      std::memcpy(&a, A + r * lda + 2 * p, sizeof(a));
      const __m512i av = _mm512_set1_epi32(a);
      c0[r] = _mm512_dpbf16_ps(c0[r], (__m512bh)av, (__m512bh)b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], (__m512bh)av, (__m512bh)b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, c1[r]);
  }
}

template <int R>
DSX_TARGET_AVX512_BF16 DSX_INLINE void micro_tail_bf16(int rows, int64_t pairs, const uint16_t* A, int64_t lda,
                                                        const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                                                        bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_kernel_bf16<R>(pairs, A, lda, B, ldb, C, ldc, accumulate);
    } else {
      micro_tail_bf16<R - 1>(rows, pairs, A, lda, B, ldb, C, ldc, accumulate);
    }
  }
}

// C[M x N] (+)= A[M x 2 pairs] * B[2 pairs x N] in bf16 with float32 accumulation; A rows of lda bf16 (pairs along
// k), B in VNNI-2 pairs with ldb columns (N and ldb multiples of kNRBf16), C float32 rows of ldc.
DSX_TARGET_AVX512_BF16 DSX_INLINE void gemm_bf16(int64_t M, int64_t N, int64_t pairs, const uint16_t* A, int64_t lda,
                                                 const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                                                 bool accumulate) {
  constexpr int MR = 12;
  for (int64_t n0 = 0; n0 < N; n0 += kNRBf16) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      micro_kernel_bf16<MR>(pairs, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
    if (m0 < M) {
      micro_tail_bf16<MR - 1>(static_cast<int>(M - m0), pairs, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0,
                              ldc, accumulate);
    }
  }
}
#endif

}  // namespace cpu_gemm
}  // namespace deepseek_ext
