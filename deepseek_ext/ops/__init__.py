"""Python entry points for the ``torch.ops.deepseek_ext`` operators.

Each submodule wraps one family of operators: a typed, documented function per op, the op's fake (meta)
kernel for ``torch.compile`` and, where gradients make sense, its autograd formula.
"""

from __future__ import annotations

from .amp import unscale_check_norm_
from .attention import fused_attention, fused_attention_varlen
from .fp8 import dequantize_fp8, fp8_matmul, quantize_fp8
from .privacy import clip_sum_noise, draw_seed, gaussian_noise, gaussian_noise_, per_sample_sq_norms
from .quant import pack_quantized_weight, quantize_weight, quantized_linear, unpack_quantized_weight

__all__ = [
    "quantize_fp8",
    "dequantize_fp8",
    "fp8_matmul",
    "unscale_check_norm_",
    "per_sample_sq_norms",
    "clip_sum_noise",
    "gaussian_noise",
    "gaussian_noise_",
    "draw_seed",
    "quantize_weight",
    "quantized_linear",
    "pack_quantized_weight",
    "unpack_quantized_weight",
    "fused_attention",
    "fused_attention_varlen",
]
