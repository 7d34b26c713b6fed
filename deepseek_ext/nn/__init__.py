"""Drop-in modules: :class:`FP8Linear` / :class:`FP8Conv1D` / :func:`convert_to_fp8`, and fused attention for models:
:func:`use_fused_attention` / :class:`FusedMultiheadAttention`."""

from __future__ import annotations

from .attention import FusedMultiheadAttention, use_fused_attention
from .fp8 import FP8Conv1D, FP8Linear, convert_to_fp8

__all__ = ["FP8Linear", "FP8Conv1D", "convert_to_fp8", "FusedMultiheadAttention", "use_fused_attention"]
