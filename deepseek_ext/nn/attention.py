"""Drop-in fused attention for models: :func:`use_fused_attention` and :class:`FusedMultiheadAttention`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention as _attention

_lock = threading.Lock()
_depth = 0
_original_sdpa = _attention._SDPA


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` routed to :func:`deepseek_ext.ops.fused_attention`, which takes every shape
    SDPA takes (broadcast batch and head dimensions included); SDPA itself for nested tensors, devices other than
    CPU/CUDA and inputs of fewer than 2 dimensions (SDPA's own error)."""
    on_device = query.device.type in ("cpu", "cuda")
    unsupported = not on_device or any(t.is_nested or t.dim() < 2 for t in (query, key, value))
    attend = _original_sdpa if unsupported else _attention.fused_attention
    return attend(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


@contextlib.contextmanager
def use_fused_attention() -> Iterator[None]:
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` runs deepseek_ext's fused kernels.

    Every caller that looks SDPA up at call time is routed: transformers models with ``attn_implementation="sdpa"``
    (the default), ``F.multi_head_attention_forward``, user code calling ``F.scaled_dot_product_attention``.
    Semantics are SDPA's (masks, ``is_causal``, dropout, scale, ``enable_gqa``); gradients flow as usual. Nested
    use is fine. The patch is process-wide while any block is active, so other threads see it too.

    Example:
        >>> with deepseek_ext.nn.use_fused_attention():
        ...     loss = model(**batch).loss
        ...     loss.backward()
    """
    global _depth
    with _lock:
        if _depth == 0:
            F.scaled_dot_product_attention = _fused_sdpa
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.scaled_dot_product_attention = _original_sdpa


class FusedMultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs the fused kernels.

    Same constructor, forward arguments, results and ``state_dict`` keys as ``nn.MultiheadAttention`` (weights load
    either way). Calls with ``need_weights=False`` (the fast configuration, and what transformer layers pass) run
    the projections and then :func:`deepseek_ext.ops.fused_attention`; ``need_weights=True`` (the parent's
    default) must return the attention matrix, so it runs the parent's explicit path.

    Example:
        >>> mha = FusedMultiheadAttention(256, 8, batch_first=True)
        >>> out, _ = mha(x, x, x, need_weights=False, is_causal=True, attn_mask=causal)
    """

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> FusedMultiheadAttention:
        """A FusedMultiheadAttention sharing ``mha``'s configuration and a copy of its weights."""
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=mha.out_proj.weight.device,
            dtype=mha.out_proj.weight.dtype,
        )
        new.load_state_dict(mha.state_dict())
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=True,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        with use_fused_attention():
            out, _ = F.multi_head_attention_forward(
                query,
                key,
                value,
                self.embed_dim,
                self.num_heads,
                self.in_proj_weight,
                self.in_proj_bias,
                self.bias_k,
                self.bias_v,
                self.add_zero_attn,
                self.dropout,
                self.out_proj.weight,
                self.out_proj.bias,
                training=self.training,
                key_padding_mask=key_padding_mask,
                need_weights=False,
                attn_mask=attn_mask,
                use_separate_proj_weight=separate,
                q_proj_weight=self.q_proj_weight,
                k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight,
                is_causal=is_causal,
            )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, None
