// Fused attention: the host-side rules shared by the CPU and CUDA kernels, and the geometry both kernels read.
//
// Dense:  q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv), lse (B, Hq, Sq) float32 (float64 for
// float64 inputs).
// Varlen: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), sequence b spanning rows cu_q[b]..cu_q[b+1] of q and
//         cu_k[b]..cu_k[b+1] of k/v; out (Tq, Hq, Dv), lse (Hq, Tq) float32 (FlashAttention's layout).
// lse is the natural log-sum-exp of each row's scaled, masked scores (+inf for a row with every key masked, whose
// output is zero). Causal masking keeps key j for query i when j <= i + offset, offset 0 (top-left, SDPA's
// convention) for the dense op and Sk_b - Sq_b (bottom-right, FlashAttention's) for the varlen op.
// Dropout keeps score (b, h, i, j) when the Philox draw for it is at or above p * 2^32 (see dropout_bits), so the
// backward pass and either device regenerate the same mask from the seed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "deepseek_ext/host_device.h"
#include "deepseek_ext/philox.h"

namespace deepseek_ext {
namespace attention {

constexpr int64_t kMaxHeadDim = 256;

// Element strides of a (batch, head, seq, dim) view with a unit dim stride; varlen tensors have stride_b = 0.
struct Strides {
  int64_t b = 0, h = 0, s = 0;
};

// The strides of a (B, H, S, D) tensor, or of a varlen (T, H, D) one.
inline Strides strides_of(const at::Tensor& t, bool varlen) {
  return varlen ? Strides{0, t.stride(1), t.stride(0)} : Strides{t.stride(0), t.stride(1), t.stride(2)};
}

struct Geometry {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  int64_t seq_q = 0, seq_k = 0;            // dense lengths, or the varlen maxima
  const int64_t* cu_q = nullptr;           // varlen offsets (batch + 1 entries), host memory for CPU kernels
  const int64_t* cu_k = nullptr;
  bool causal = false, bottom_right = false;
  double scale = 1.0, dropout_p = 0.0;
  uint64_t seed = 0;
  // Additive float (float32) or boolean mask, expanded to (B, Hq, Sq, Sk) strides; null when there is none.
  const void* mask = nullptr;
  bool mask_is_bool = false;
  int64_t mask_b = 0, mask_h = 0, mask_i = 0, mask_j = 0;
  Strides q, k, v, o, lse;
};

// The tensors of a dense call, checked and in the layout the kernels take (unit stride on the last dim; the mask
// converted to bool or float32 and expanded without copying).
struct Dense {
  at::Tensor q, k, v, mask;
  Geometry geo;
};

// Checks every argument of fused_attention_fwd / _bwd (op names the caller in messages) and fills the geometry,
// strides of out and lse included (for contiguous out / lse tensors the caller allocates).
Dense prepare_dense(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
                    const std::optional<at::Tensor>& seed);

// cu_* as int64: on the CPU (geo.cu_* point at them; values checked), or, when q and both offsets are on one
// device, on that device (device_offsets; geo.cu_* null, values checked only in debug mode, seq_q / seq_k the given
// max_seqlen_* or -1 when unknown).
struct Varlen {
  at::Tensor q, k, v, cu_q, cu_k;
  bool device_offsets = false;
  Geometry geo;
};

Varlen prepare_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, bool is_causal, double scale);

// Checks grad_out / out / lse of a backward call against the geometry of its forward.
void check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& q, const at::Tensor& v, bool varlen);

// lse is float32, or float64 for float64 inputs (so that float64 gradients are exact to float64 rounding).
inline at::ScalarType lse_dtype(at::ScalarType q) { return q == at::kDouble ? at::kDouble : at::kFloat; }

// Output sizes: out and lse.
std::vector<int64_t> out_sizes(const at::Tensor& q, const at::Tensor& v, bool varlen);
std::vector<int64_t> lse_sizes(const at::Tensor& q, bool varlen);

// Strides of contiguous out (..., Dv) and lse tensors in the geometry's (batch, head, seq) terms.
void set_output_strides(Geometry& g, bool varlen, int64_t total_q);

// The four operator entry points, the same for every backend: check the arguments, then run the backend's kernels.
// Backend::forward(Geometry, varlen, q, k, v) -> (out, lse); Backend::backward(Geometry, varlen, grad_out, q, k, v,
// out, lse) -> (dq, dk, dv); Backend::offsets(Varlen&) points the geometry at cu_seqlens the kernels can read
// and returns whatever must stay alive while they run.
template <typename Backend>
struct Entry {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                                bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
    const Dense d = prepare_dense("fused_attention_fwd", q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
    return Backend::forward(d.geo, false, d.q, d.k, d.v);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const std::optional<at::Tensor>& attn_mask,
                                                            double dropout_p, bool is_causal, double scale,
                                                            const std::optional<at::Tensor>& seed) {
    constexpr const char* op = "fused_attention_bwd";
    const Dense d = prepare_dense(op, q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
    check_backward(op, grad_out, out, lse, q, v, false);
    return Backend::backward(d.geo, false, grad_out, d.q, d.k, d.v, out, lse);
  }

  static std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                                       double scale) {
    Varlen r = prepare_varlen("fused_attention_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, is_causal, scale);
    [[maybe_unused]] const auto keep = Backend::offsets(r);  // alive until the kernels are done
    return Backend::forward(r.geo, true, r.q, r.k, r.v);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
      int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale) {
    constexpr const char* op = "fused_attention_varlen_bwd";
    Varlen r = prepare_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale);
    check_backward(op, grad_out, out, lse, q, v, true);
    [[maybe_unused]] const auto keep = Backend::offsets(r);  // alive until the kernels are done
    return Backend::backward(r.geo, true, grad_out, r.q, r.k, r.v, out, lse);
  }
};

// Registers a backend's kernels under the four schemas (inside TORCH_LIBRARY_IMPL).
#define DSX_REGISTER_ATTENTION(m, Backend)                                              \
  m.impl("fused_attention_fwd", &deepseek_ext::attention::Entry<Backend>::fwd);               \
  m.impl("fused_attention_bwd", &deepseek_ext::attention::Entry<Backend>::bwd);               \
  m.impl("fused_attention_varlen_fwd", &deepseek_ext::attention::Entry<Backend>::varlen_fwd); \
  m.impl("fused_attention_varlen_bwd", &deepseek_ext::attention::Entry<Backend>::varlen_bwd)

// 32 random bits for score (b, h, i, j) of a call: one Philox block covers four neighbouring keys of a row.
DSX_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, int64_t b, int64_t heads, int64_t h, int64_t i, int64_t j, int64_t seq_k) {
  const uint64_t stream = static_cast<uint64_t>(b * heads + h);
  const uint64_t position = static_cast<uint64_t>(i * ((seq_k + 3) / 4) + (j >> 2));
  return rng::philox(seed, stream, position).v[j & 3];
}

inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace attention
}  // namespace deepseek_ext
