"""Reference attention: ``softmax(q k^T * scale + mask) v`` in plain PyTorch, materialising the score matrix.

Conventions shared with the kernels: a boolean mask keeps True entries; ``is_causal`` keeps key ``j`` for query
``i`` when ``j <= i + offset`` with offset 0 (top-left, SDPA) or ``seq_k - seq_q`` (``bottom_right``, as
FlashAttention's varlen op); rows whose keys are all masked give zeros; ``dropout_mask`` (0/1, broadcastable to
the scores) multiplies the probabilities, scaled by ``1 / (1 - dropout_p)``.
"""

from __future__ import annotations

import math

import torch


def causal_mask(seq_q: int, seq_k: int, bottom_right: bool = False, device=None) -> torch.Tensor:
    """``(seq_q, seq_k)`` boolean mask, True where query i may attend key j."""
    offset = seq_k - seq_q if bottom_right else 0
    i = torch.arange(seq_q, device=device).unsqueeze(1)
    j = torch.arange(seq_k, device=device).unsqueeze(0)
    return j <= i + offset


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bottom_right: bool = False,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense attention over ``(batch, heads, seq, dim)`` tensors (grouped-query heads repeated); returns the
    output in the dtype of ``q`` (compute in that dtype: pass float64 tensors for an oracle)."""
    group = q.size(-3) // k.size(-3)
    if group > 1:
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    keep = torch.ones_like(s, dtype=torch.bool)
    if is_causal:
        keep = keep & causal_mask(q.size(-2), k.size(-2), bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(keep.any(dim=-1, keepdim=True), p, torch.zeros_like(p))  # fully masked rows: zeros
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    return p @ v


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal=False, scale=None) -> torch.Tensor:
    """Packed ``(tokens, heads, dim)`` sequences, each attended separately (causal bottom-right aligned)."""
    out = q.new_zeros(q.size(0), q.size(1), v.size(2))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]]
        vs = v[ck[b] : ck[b + 1]]
        if qs.size(0) == 0:
            continue
        if ks.size(0) == 0:
            continue  # no keys: zeros
        o = attention(
            qs.transpose(0, 1),
            ks.transpose(0, 1),
            vs.transpose(0, 1),
            is_causal=is_causal,
            scale=scale,
            bottom_right=True,
        )
        out[cq[b] : cq[b + 1]] = o.transpose(0, 1)
    return out
