#include <cmath>

#include "deepseek_ext/attention.h"
#include "deepseek_ext/checks.h"

namespace deepseek_ext {
namespace attention {
namespace {

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims,
               const char* layout) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"query", q}, {"key", k}, {"value", v}}) {
    TORCH_CHECK_VALUE(t.dim() == dims, op, ": expected ", name, " of shape ", layout, " (", dims,
                      " dimensions), but got ", t.sizes());
    check_dtype(op, name, t, kDtypes);
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": expected query, key and value of one dtype, but got ", dtype_name(q.scalar_type()), ", ",
                   dtype_name(k.scalar_type()), " and ", dtype_name(v.scalar_type()));
  check_same_device(op, "query", q, "key", k);
  check_same_device(op, "query", q, "value", v);
  const int64_t hd = dims - 1, hh = 1;  // head dim, heads dim
  const int64_t d = q.size(hd), dv = v.size(hd);
  TORCH_CHECK_VALUE(k.size(hd) == d, op, ": expected key with the head dim of query (", d, "), but got ", k.size(hd));
  TORCH_CHECK_VALUE(d >= 1 && dv >= 1, op, ": expected head dims of at least 1, but got ", d, " (query/key) and ", dv,
                    " (value)");
  TORCH_CHECK_VALUE(d <= kMaxHeadDim && dv <= kMaxHeadDim, op, ": head dims from 1 to ", kMaxHeadDim,
                    " are supported, but got ", d, " (query/key) and ", dv,
                    " (value); deepseek_ext.ops.fused_attention falls back to scaled_dot_product_attention for these");
  const int64_t hq = q.size(hh), hkv = k.size(hh);
  TORCH_CHECK_VALUE(v.size(hh) == hkv, op, ": expected key and value with the same number of heads, but got ", hkv,
                    " and ", v.size(hh));
  TORCH_CHECK_VALUE(hkv >= 1 && hq % hkv == 0, op, ": expected query heads (", hq,
                    ") to be a multiple of key/value heads (", hkv, ") for grouped-query attention");
}

void fill_common(Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  g.heads_q = q.size(1);
  g.heads_kv = k.size(1);
  g.head_dim = q.size(-1);
  g.head_dim_v = v.size(-1);
  auto strides = [&](const at::Tensor& t) {
    return varlen ? Strides{0, t.stride(1), t.stride(0)} : Strides{t.stride(0), t.stride(1), t.stride(2)};
  };
  g.q = strides(q);
  g.k = strides(k);
  g.v = strides(v);
}

}  // namespace

Dense prepare_dense(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
                    const std::optional<at::Tensor>& seed) {
  check_qkv(op, q, k, v, 4, "(batch, heads, seq, head_dim)");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op,
                    ": expected query, key and value with one batch size, but got ", q.size(0), ", ", k.size(0),
                    " and ", v.size(0));
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), op, ": expected key and value with one sequence length, but got ",
                    k.size(2), " and ", v.size(2));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), but got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected a finite scale, but got ", scale);
  TORCH_CHECK_VALUE(!(is_causal && attn_mask.has_value()), op,
                    ": attn_mask and is_causal=True are exclusive (as in scaled_dot_product_attention)");
  Dense d;
  d.q = unit_last_stride(q);
  d.k = unit_last_stride(k);
  d.v = unit_last_stride(v);
  Geometry& g = d.geo;
  g.batch = q.size(0);
  g.seq_q = q.size(2);
  g.seq_k = k.size(2);
  fill_common(g, d.q, d.k, d.v, false);
  g.causal = is_causal;
  g.scale = scale;
  g.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong &&
                          seed->device().is_cpu(),
                      op, ": dropout_p > 0 needs seed, a one-element int64 CPU tensor");
    g.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    check_same_device(op, "query", q, "attn_mask", m);
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() ||
                         m.scalar_type() == at::kFloat,
                     op, ": expected attn_mask of dtype torch.bool, torch.float32 or the query's dtype (",
                     dtype_name(q.scalar_type()), "), but got ", dtype_name(m.scalar_type()));
    TORCH_CHECK_VALUE(m.dim() <= 4, op, ": expected attn_mask broadcastable to (batch, heads, seq_q, seq_k) = (",
                      g.batch, ", ", g.heads_q, ", ", g.seq_q, ", ", g.seq_k, "), but got ", m.sizes());
    const std::vector<int64_t> full = {g.batch, g.heads_q, g.seq_q, g.seq_k};
    for (int64_t i = 0; i < m.dim(); ++i) {
      const int64_t want = full[4 - m.dim() + i], got = m.size(i);
      TORCH_CHECK_VALUE(got == want || got == 1, op,
                        ": expected attn_mask broadcastable to (batch, heads, seq_q, seq_k) = (", g.batch, ", ",
                        g.heads_q, ", ", g.seq_q, ", ", g.seq_k, "), but got ", m.sizes());
    }
    // Float masks are read in the kernels' compute type: float32, or float64 for float64 inputs.
    const at::Tensor mm =
        m.scalar_type() == at::kBool ? m : m.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    d.mask = mm.expand(full);
    g.mask_is_bool = m.scalar_type() == at::kBool;
    g.mask = d.mask.const_data_ptr();
    g.mask_b = d.mask.stride(0);
    g.mask_h = d.mask.stride(1);
    g.mask_i = d.mask.stride(2);
    g.mask_j = d.mask.stride(3);
  }
  set_output_strides(g, false, g.seq_q);
  return d;
}

Varlen prepare_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, bool is_causal, double scale) {
  check_qkv(op, q, k, v, 3, "(total_tokens, heads, head_dim)");
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), op, ": expected key and value with one number of tokens, but got ",
                    k.size(0), " and ", v.size(0));
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected a finite scale, but got ", scale);
  Varlen r;
  auto check_cu_meta = [&](const char* name, const at::Tensor& cu) {
    check_dtype(op, name, cu, {at::kInt, at::kLong});
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": expected ", name,
                      " of shape (batch + 1,), but got ", cu.sizes());
  };
  auto load_cu = [&](const char* name, const at::Tensor& cu, int64_t total) {
    check_cu_meta(name, cu);
    at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(p[0] == 0, op, ": expected ", name, " to start at 0, but it starts at ", p[0]);
    for (int64_t i = 1; i < c.size(0); ++i) {
      TORCH_CHECK_VALUE(p[i] >= p[i - 1], op, ": expected ", name, " to be non-decreasing, but entry ", i, " (",
                        p[i], ") is below entry ", i - 1, " (", p[i - 1], ")");
    }
    TORCH_CHECK_VALUE(p[c.size(0) - 1] == total, op, ": expected ", name, " to end at the number of tokens (", total,
                      "), but it ends at ", p[c.size(0) - 1]);
    return c;
  };
  auto longest = [](const at::Tensor& c) {
    const int64_t* p = c.const_data_ptr<int64_t>();
    int64_t m = 0;
    for (int64_t b = 0; b + 1 < c.size(0); ++b) m = std::max(m, p[b + 1] - p[b]);
    return m;
  };
  // Offsets that live on the device of the inputs stay there: their values are read by the kernels and checked on
  // the host only in debug mode (checks.h), so a call neither synchronises nor breaks CUDA graph capture. Offsets
  // anywhere else are read and checked on the host.
  r.device_offsets = !q.device().is_cpu() && cu_seqlens_q.device() == q.device() && cu_seqlens_k.device() == q.device();
  if (r.device_offsets) {
    check_cu_meta("cu_seqlens_q", cu_seqlens_q);
    check_cu_meta("cu_seqlens_k", cu_seqlens_k);
    TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op,
                      ": expected cu_seqlens_q and cu_seqlens_k with one batch size, but got ",
                      cu_seqlens_q.size(0) - 1, " and ", cu_seqlens_k.size(0) - 1);
    int64_t mq = max_seqlen_q, mk = max_seqlen_k;  // -1: unknown (the CUDA kernels do not need them)
    if (debug_checks()) {
      const at::Tensor hq = load_cu("cu_seqlens_q", cu_seqlens_q, q.size(0));
      const at::Tensor hk = load_cu("cu_seqlens_k", cu_seqlens_k, k.size(0));
      mq = longest(hq);
      mk = longest(hk);
      TORCH_CHECK_VALUE(max_seqlen_q < 0 || max_seqlen_q >= mq, op, ": max_seqlen_q (", max_seqlen_q,
                        ") is below the longest query sequence in cu_seqlens_q (", mq, ")");
      TORCH_CHECK_VALUE(max_seqlen_k < 0 || max_seqlen_k >= mk, op, ": max_seqlen_k (", max_seqlen_k,
                        ") is below the longest key sequence in cu_seqlens_k (", mk, ")");
    }
    r.cu_q = cu_seqlens_q.to(at::kLong).contiguous();
    r.cu_k = cu_seqlens_k.to(at::kLong).contiguous();
    r.q = unit_last_stride(q);
    r.k = unit_last_stride(k);
    r.v = unit_last_stride(v);
    Geometry& g = r.geo;
    g.batch = r.cu_q.size(0) - 1;
    g.seq_q = std::max<int64_t>(mq, -1);
    g.seq_k = std::max<int64_t>(mk, -1);
    fill_common(g, r.q, r.k, r.v, true);
    g.causal = is_causal;
    g.bottom_right = true;
    g.scale = scale;
    set_output_strides(g, true, q.size(0));
    return r;
  }
  r.cu_q = load_cu("cu_seqlens_q", cu_seqlens_q, q.size(0));
  r.cu_k = load_cu("cu_seqlens_k", cu_seqlens_k, k.size(0));
  TORCH_CHECK_VALUE(r.cu_q.size(0) == r.cu_k.size(0), op,
                    ": expected cu_seqlens_q and cu_seqlens_k with one batch size, but got ", r.cu_q.size(0) - 1,
                    " and ", r.cu_k.size(0) - 1);
  r.q = unit_last_stride(q);
  r.k = unit_last_stride(k);
  r.v = unit_last_stride(v);
  Geometry& g = r.geo;
  g.batch = r.cu_q.size(0) - 1;
  g.cu_q = r.cu_q.const_data_ptr<int64_t>();
  g.cu_k = r.cu_k.const_data_ptr<int64_t>();
  int64_t mq = 0, mk = 0;
  for (int64_t b = 0; b < g.batch; ++b) {
    mq = std::max(mq, g.cu_q[b + 1] - g.cu_q[b]);
    mk = std::max(mk, g.cu_k[b + 1] - g.cu_k[b]);
  }
  TORCH_CHECK_VALUE(max_seqlen_q < 0 || max_seqlen_q >= mq, op, ": max_seqlen_q (", max_seqlen_q,
                    ") is below the longest query sequence in cu_seqlens_q (", mq, ")");
  TORCH_CHECK_VALUE(max_seqlen_k < 0 || max_seqlen_k >= mk, op, ": max_seqlen_k (", max_seqlen_k,
                    ") is below the longest key sequence in cu_seqlens_k (", mk, ")");
  g.seq_q = mq;
  g.seq_k = mk;
  fill_common(g, r.q, r.k, r.v, true);
  g.causal = is_causal;
  g.bottom_right = true;
  g.scale = scale;
  set_output_strides(g, true, q.size(0));
  return r;
}

void check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& q, const at::Tensor& v, bool varlen) {
  const auto want = out_sizes(q, v, varlen);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(want), op, ": expected grad_out of shape ",
                    at::IntArrayRef(want), ", but got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(want), op, ": expected out of shape ", at::IntArrayRef(want),
                    ", but got ", out.sizes());
  check_dtype(op, "grad_out", grad_out, kDtypes);
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": expected lse of dtype ",
                   dtype_name(lse_dtype(q.scalar_type())), " (from the forward), but got ", dtype_name(lse.scalar_type()));
  const auto want_lse = lse_sizes(q, varlen);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(want_lse), op, ": expected lse of shape ",
                    at::IntArrayRef(want_lse), ", but got ", lse.sizes());
  check_same_device(op, "query", q, "grad_out", grad_out);
  check_same_device(op, "query", q, "out", out);
  check_same_device(op, "query", q, "lse", lse);
}

std::vector<int64_t> out_sizes(const at::Tensor& q, const at::Tensor& v, bool varlen) {
  if (varlen) return {q.size(0), q.size(1), v.size(2)};
  return {q.size(0), q.size(1), q.size(2), v.size(3)};
}

std::vector<int64_t> lse_sizes(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}

void set_output_strides(Geometry& g, bool varlen, int64_t total_q) {
  if (varlen) {
    g.o = Strides{0, g.head_dim_v, g.heads_q * g.head_dim_v};
    g.lse = Strides{0, total_q, 1};
  } else {
    g.o = Strides{g.heads_q * g.seq_q * g.head_dim_v, g.seq_q * g.head_dim_v, g.head_dim_v};
    g.lse = Strides{g.heads_q * g.seq_q, g.seq_q, 1};
  }
}

}  // namespace attention
}  // namespace deepseek_ext
