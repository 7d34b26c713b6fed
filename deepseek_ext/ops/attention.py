"""Fused attention: :func:`fused_attention` (a drop-in for ``F.scaled_dot_product_attention``) and
:func:`fused_attention_varlen` (packed variable-length sequences).

Both run flash-style kernels: the score matrix is processed in tiles with an online softmax and never stored,
so memory grows linearly with sequence length, forward and backward. The backward recomputes the probabilities
from the per-row log-sum-exp the forward saved; dropout masks are regenerated from a Philox seed drawn from
PyTorch's default generator (so ``torch.manual_seed`` makes runs reproducible).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .._native import NATIVE_AVAILABLE, require_native

MAX_HEAD_DIM = 256
# SDPA as PyTorch defines it, captured before deepseek_ext.nn.use_fused_attention() can patch the name.
_SDPA = F.scaled_dot_product_attention
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def _draw_seed(dropout_p: float) -> torch.Tensor | None:
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _call_forward(op, args, inputs):
    """Calls a forward op; when no gradient can flow (eager, grad disabled or no input requiring it), below the
    autograd layer, whose Python formula would otherwise cost about 5 us per call on small inputs."""
    q, k, v = inputs
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if wants_grad or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _default_scale(q: torch.Tensor) -> float:
    """``1 / sqrt(head_dim)``; 1.0 for a head dim of 0 or a 0-d query, which the op's checks then reject by name."""
    d = q.size(-1) if q.dim() > 0 else 0
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


def _fallback_reason(q, k, v, attn_mask) -> str | None:
    """Why the kernels cannot run this call (and SDPA should), or None."""
    if q.size(-1) > MAX_HEAD_DIM or v.size(-1) > MAX_HEAD_DIM:
        return f"head dim {max(q.size(-1), v.size(-1))} is above {MAX_HEAD_DIM}"
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad (the fused kernels do not differentiate the mask)"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type}"
    return None


def _shape_error(given: list[tuple], why: str) -> ValueError:
    return ValueError(f"fused_attention: {why}; query, key and value were {given[0]}, {given[1]} and {given[2]}")


def _broadcast(shapes: list[tuple], given: list[tuple], what: str) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise _shape_error(given, f"expected {what} that broadcast (each 1 or one common size)") from None


def _kernel_layout(q, k, v, attn_mask, enable_gqa):
    """SDPA's shape rules mapped onto the kernels' ``(batch, heads, seq, dim)`` layout.

    SDPA takes inputs of any rank >= 2 whose leading dimensions (batch, then heads at dim -3) broadcast against each
    other; ``enable_gqa`` instead lets key/value have fewer heads, divisors of the query's. Returns
    ``(q4, k4, v4, mask, out_shape)``, the kernels' inputs being views wherever possible: a broadcast batch or query
    head dimension is an expanded view, and key/value heads that divide the query's (one head, as in multi-query
    attention, always does) run on the kernels' grouped-query path instead of being copied. Autograd sums the
    gradients of expanded views over the broadcast dimensions, as SDPA's are. Raises ValueError where SDPA raises
    (shapes that do not broadcast). ``out_shape`` is None when the inputs already have the kernels' layout."""
    if q.dim() == k.dim() == v.dim() == 4 and q.size(0) == k.size(0) == v.size(0):  # the common case, quickly
        hq, hk, hv = q.size(1), k.size(1), v.size(1)
        if hk == hv and (hk == hq or (enable_gqa and hk and hq % hk == 0)):
            return q, k, v, attn_mask, None
    given = [tuple(x.shape) for x in (q, k, v)]
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise _shape_error(given, "expected query, key and value with at least 2 dimensions (seq, head_dim)")
    out_rank = max(q.dim(), k.dim(), v.dim())
    nd = max(out_rank, 3)
    q, k, v = (x.view((1,) * (nd - x.dim()) + tuple(x.shape)) for x in (q, k, v))
    hq, hk, hv = q.size(-3), k.size(-3), v.size(-3)
    if enable_gqa:
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise _shape_error(
                given, f"enable_gqa=True needs key/value heads ({hk}, {hv}) that divide the query heads ({hq})"
            )
        heads = hq
    else:
        h_kv = hv if hk == 1 else hk
        if hq != 1 and h_kv not in (0, 1, hq) and hq % h_kv == 0 and hv in (1, h_kv):
            raise ValueError(
                f"fused_attention: query has {hq} heads and key/value {h_kv}; pass enable_gqa=True for "
                "grouped-query attention (as with scaled_dot_product_attention)"
            )
        heads = _broadcast([(hq,), (hk,), (hv,)], given, "head counts")[0]
    batch = _broadcast([x.shape[:-3] for x in (q, k, v)], given, "batch dimensions")
    if hk == hv and (hk == heads or (hk and heads % hk == 0)):
        kv_heads = hk  # the same count for key and value, dividing the query's: grouped-query attention, no copy
    elif min(hk, hv) == 1 and heads % max(hk, hv) == 0:
        kv_heads = max(hk, hv)  # one of them broadcast: expand it (a view)
    else:  # enable_gqa with two different divisors: both repeated to the query heads, as SDPA does
        kv_heads = heads
        k = k.repeat_interleave(heads // hk, dim=-3)
        v = v.repeat_interleave(heads // hv, dim=-3)

    def to4(x, h):
        x = x.expand(*batch, h, *x.shape[-2:])
        return x if len(batch) == 1 else x.reshape(-1, *x.shape[-3:])

    if attn_mask is not None and len(batch) > 1:  # several batch dims become one: the mask must follow them
        score_shape = (*batch, heads, q.size(-2), k.size(-2))
        try:
            attn_mask = attn_mask.expand(score_shape).reshape(-1, *score_shape[-3:])
        except RuntimeError:
            raise _shape_error(
                given, f"expected attn_mask broadcastable to {score_shape}, but got {tuple(attn_mask.shape)}"
            ) from None
    out_shape = (*batch, heads, q.size(-2), v.size(-1))[-out_rank:]
    return to4(q, heads), to4(k, kv_heads), to4(v, kv_heads), attn_mask, out_shape


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, with the arguments and result of
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: ``(batch, heads_q, seq_q, head_dim)`` (or ``(heads_q, seq_q, head_dim)``, or any rank >= 2 with the
            leading dims as batch), float32/float16/bfloat16/float64; any strides.
        k: ``(batch, heads_kv, seq_k, head_dim)``.
        v: ``(batch, heads_kv, seq_k, head_dim_v)``.
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(batch, heads_q, seq_q,
            seq_k)``. Exclusive with ``is_causal``.
        dropout_p: probability of dropping an attention weight (apply only in training, as with SDPA).
        is_causal: query ``i`` attends keys ``j <= i`` (top-left alignment, as SDPA).
        scale: score scale, ``1 / sqrt(head_dim)`` by default.
        enable_gqa: allow ``heads_q`` to be a multiple of ``heads_kv`` (grouped-query attention).

    As with SDPA, batch and head dimensions broadcast: q, k and v may each have a batch or head count of 1 (a key
    and value with one head is multi-query attention, with or without ``enable_gqa``; it runs on the kernels'
    grouped-query path, without copies), and the result has the broadcast shape. Shapes SDPA rejects raise a
    ``ValueError``.

    Returns:
        ``(batch, heads_q, seq_q, head_dim_v)`` in ``q``'s dtype. Rows whose keys are all masked give zeros.
        Gradients flow to q, k and v (not to ``attn_mask``: a mask that requires grad routes the call to SDPA).

    Head dims above 256 and other cases outside the kernels fall back to SDPA with a one-time warning.

    Example:
        >>> q = k = v = torch.randn(2, 8, 128, 64)
        >>> out = fused_attention(q, k, v, is_causal=True)
    """
    require_native("ops.fused_attention")
    q4, k4, v4, mask, out_shape = _kernel_layout(q, k, v, attn_mask, enable_gqa)
    reason = _fallback_reason(q4, k4, v4, mask)
    if reason is not None:
        _warn_once(
            reason,
            f"deepseek_ext.fused_attention: {reason}; falling back to torch.nn.functional."
            "scaled_dot_product_attention for such calls",
        )
        return _SDPA(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    sc = _default_scale(q4) if scale is None else float(scale)
    args = (q4, k4, v4, mask, float(dropout_p), bool(is_causal), sc, _draw_seed(dropout_p))
    out, _ = _call_forward(torch.ops.deepseek_ext.fused_attention_fwd.default, args, (q4, k4, v4))
    return out if out_shape is None or out.shape == out_shape else out.reshape(out_shape)


def fused_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func`` layout).

    Args:
        q: ``(total_q, heads_q, head_dim)``: the queries of every sequence, one after another.
        k: ``(total_k, heads_kv, head_dim)``; ``v``: ``(total_k, heads_kv, head_dim_v)``. ``heads_q`` must be a
            multiple of ``heads_kv``.
        cu_seqlens_q / cu_seqlens_k: ``(batch + 1,)`` int32 or int64 offsets: sequence ``b`` is rows
            ``cu[b]:cu[b + 1]``. Zero-length sequences are allowed. On CUDA keep them on the GPU: the kernels read
            them there (no host synchronisation; CUDA graphs can capture the call) and their values are checked only
            with ``DEEPSEEK_EXT_DEBUG_CHECKS=1``.
        max_seqlen_q / max_seqlen_k: longest sequences (computed from ``cu_seqlens`` when omitted).
        is_causal: causal mask aligned bottom-right (query ``i`` of a sequence with ``n_q`` queries and ``n_k``
            keys attends keys ``j <= i + n_k - n_q``), as FlashAttention.
        scale: ``1 / sqrt(head_dim)`` by default.

    Returns:
        ``(total_q, heads_q, head_dim_v)`` in ``q``'s dtype; differentiable in q, k, v.

    Example:
        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> q = k = v = torch.randn(12, 4, 64)
        >>> out = fused_attention_varlen(q, k, v, cu, cu, is_causal=True)
    """
    require_native("ops.fused_attention_varlen")
    sc = _default_scale(q) if scale is None else float(scale)
    args = (
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        -1 if max_seqlen_q is None else int(max_seqlen_q),
        -1 if max_seqlen_k is None else int(max_seqlen_k),
        bool(is_causal),
        sc,
    )
    out, _ = _call_forward(torch.ops.deepseek_ext.fused_attention_varlen_fwd.default, args, (q, k, v))
    return out


if NATIVE_AVAILABLE:

    def _lse_dtype(q):
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def _check_fake(op, q, k, v, dims):
        torch._check(
            q.dim() == dims and k.dim() == dims and v.dim() == dims,
            lambda: f"{op}: expected query, key and value with {dims} dimensions",
        )
        torch._check(q.dtype in _DTYPES, lambda: f"{op}: unsupported dtype {q.dtype}")
        torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: f"{op}: query, key, value dtypes differ")

    @torch.library.register_fake("deepseek_ext::fused_attention_fwd")
    def _fwd_fake(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0, seed=None):
        _check_fake("fused_attention_fwd", q, k, v, 4)
        out = q.new_empty((q.size(0), q.size(1), q.size(2), v.size(3)))
        return out, q.new_empty((q.size(0), q.size(1), q.size(2)), dtype=_lse_dtype(q))

    @torch.library.register_fake("deepseek_ext::fused_attention_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0, seed=None):
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("deepseek_ext::fused_attention_varlen_fwd")
    def _varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q=-1, max_k=-1, is_causal=False, scale=1.0):
        _check_fake("fused_attention_varlen_fwd", q, k, v, 3)
        out = q.new_empty((q.size(0), q.size(1), v.size(2)))
        return out, q.new_empty((q.size(1), q.size(0)), dtype=_lse_dtype(q))

    @torch.library.register_fake("deepseek_ext::fused_attention_varlen_bwd")
    def _varlen_bwd_fake(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q=-1, max_k=-1, is_causal=False, scale=1.0):
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )

    # Autograd: the forward saves q, k, v, the output and the log-sum-exp (no score matrix); the lse output is
    # not differentiable (its incoming gradient is ignored).
    def _fwd_setup(ctx, inputs, output):
        q, k, v, attn_mask, dropout_p, is_causal, scale, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
        ctx.args = (float(dropout_p), bool(is_causal), float(scale))
        ctx.mark_non_differentiable(lse)

    def _fwd_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
        dropout_p, is_causal, scale = ctx.args
        dq, dk, dv = torch.ops.deepseek_ext.fused_attention_bwd.default(
            grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed
        )
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("deepseek_ext::fused_attention_fwd", _fwd_backward, setup_context=_fwd_setup)

    # The backward ops are not differentiable themselves: differentiating a gradient (double backward) through
    # them is a clear error instead of PyTorch's silent "not registered" fallback.
    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "deepseek_ext fused attention: double backward (differentiating the attention gradients) is not "
            "supported; use torch.nn.functional.scaled_dot_product_attention for it"
        )

    def _no_setup(ctx, inputs, output):
        pass

    for _name in ("fused_attention_bwd", "fused_attention_varlen_bwd"):
        torch.library.register_autograd(f"deepseek_ext::{_name}", _no_double_backward, setup_context=_no_setup)

    def _varlen_setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (int(max_q), int(max_k), bool(is_causal), float(scale))
        ctx.mark_non_differentiable(lse)

    def _varlen_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, is_causal, scale = ctx.args
        dq, dk, dv = torch.ops.deepseek_ext.fused_attention_varlen_bwd.default(
            grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale
        )
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd(
        "deepseek_ext::fused_attention_varlen_fwd", _varlen_backward, setup_context=_varlen_setup
    )
