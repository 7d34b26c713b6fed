"""Integer quantization ops: ``quantize_weight`` (packing) and ``quantized_linear``.

Formats (see ``csrc/include/deepseek_ext/quant.h``): a weight ``(N, K)`` becomes per-group scales and zero points
``(N, G)`` and codes: int8 ``(N, Kp)`` for 8 bits, two 4-bit codes per byte ``(N, Kp / 2)`` for 4 bits, with ``K``
padded to ``Kp`` (a multiple of the group, or of 32 for per-channel scales) by zero-point codes.
``w[n, k] ~= scale[n, g] * (code[n, k] - zero[n, g])``.
"""

from __future__ import annotations

import torch

from .._native import NATIVE_AVAILABLE, require_native
from ..reference.quant import padded_k


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int = 0, symmetric: bool = True):
    """Packs a float weight ``(out_features, in_features)``.

    Args:
        w: float32/float16/bfloat16, 2-D.
        bits: 8 (int8 codes in [-127, 127], symmetric around 0 or asymmetric) or 4 (codes 0..15, symmetric
            around 8 or asymmetric).
        group_size: 0 for one scale per output channel, or 32/64/128/... input features per scale.
        symmetric: zero point fixed (0 for 8 bits, 8 for 4 bits), or chosen per group from its range.

    Returns:
        ``(codes, scales, zeros)``: codes int8 ``(N, Kp)`` or uint8 ``(N, Kp/2)``; float32 scales and int32 zero
        points ``(N, G)`` with ``G = Kp / group``.

    Example:
        >>> w = torch.randn(256, 512)
        >>> codes, scales, zeros = quantize_weight(w, bits=4, group_size=128, symmetric=True)
    """
    require_native("ops.quantize_weight")
    return torch.ops.deepseek_ext.quantize_weight.default(w, bits, group_size, symmetric)


def quantized_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int = 8,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    code_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequantize(W)^T + bias`` with a packed weight.

    Args:
        x: ``(M, in_features)`` float32/float16/bfloat16 (the output has its dtype).
        codes, scales, zeros, bits, group_size: from :func:`quantize_weight`; in_features: the unpadded K. On the CPU
            the codes may also be in the layout of :func:`pack_quantized_weight` (what ``QuantizedLinear`` keeps),
            which the integer GEMM reads directly; with the stored layout the CPU kernel rearranges the weight on
            every call with 4 rows or more. Results are the same either way, and bit-identical across CPU
            instruction sets and batch sizes.
        act_bits: 8 — activations are quantised to symmetric 7-bit codes in [-63, 63] (per row, or with
            ``act_scale``; the reduce_range that keeps AVX2's u8 x s8 multiply-adds from saturating, as in fbgemm) and
            the products are integer (int32 accumulation per group), finished by
            ``y = sx * sum_g fmaf(sw_g, float(d_g), acc)`` in ascending group order: bit-identical on every CPU and
            on CUDA; 16 or 0 — weight-only: activations stay float, weights are dequantised to float32 and the
            products are float32 for every activation dtype.
        bias: optional ``(N,)``.
        act_scale: a one-element per-tensor activation scale from calibration (static quantization): codes are
            ``round(x / act_scale)`` clamped to [-63, 63]. It must be positive and finite (checked on the CPU; on
            CUDA only with ``DEEPSEEK_EXT_DEBUG_CHECKS=1``).
        code_sums: per-group sums of the weight codes, ``(N, G)`` int32 (:func:`code_sums`); the batched integer
            kernel needs them and computes them on every call when they are not given.

    Example:
        >>> codes, scales, zeros = quantize_weight(w, 8, 0, True)              # w: (out, in)
        >>> y = quantized_linear(x, codes, scales, zeros, 8, 0, w.shape[1], act_bits=8, bias=b)
    """
    require_native("ops.quantized_linear")
    return torch.ops.deepseek_ext.quantized_linear.default(
        x, codes, scales, zeros, bits, group_size, in_features, act_bits, bias, act_scale, code_sums
    )


def pack_quantized_weight(codes: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Rearranges codes from :func:`quantize_weight` for the CPU's integer GEMM; :func:`quantized_linear` takes the
    result in place of the codes.

    The layout (``csrc/include/deepseek_ext/quant.h``) is blocks of 64 output columns with 4 bytes per column per
    step, the operand order of the u8 x s8 multiply-add instructions (8 bits: 4 codes; 4 bits: 8 codes as nibble
    pairs). It is the same on every CPU and holds the same bytes as the codes (plus padding to 64 outputs).
    :func:`unpack_quantized_weight` is the inverse; state_dicts keep the stored layout.

    Args:
        codes: from :func:`quantize_weight`.
        bits, group_size, in_features: as for :func:`quantized_linear`.

    Returns:
        int8 ``(ceil(N / 64), Kp / 4, 64, 4)`` for 8 bits, uint8 ``(ceil(N / 64), Kp / 8, 64, 4)`` for 4 bits.

    Example:
        >>> codes, scales, zeros = quantize_weight(w, 4, 128, True)
        >>> packed = pack_quantized_weight(codes, 4, 128, w.shape[1])
        >>> y = quantized_linear(x, packed, scales, zeros, 4, 128, w.shape[1], act_bits=8)
    """
    require_native("ops.pack_quantized_weight")
    return torch.ops.deepseek_ext.pack_quantized_weight.default(codes, bits, group_size, in_features)


def unpack_quantized_weight(
    packed: torch.Tensor, bits: int, group_size: int, in_features: int, out_features: int
) -> torch.Tensor:
    """The inverse of :func:`pack_quantized_weight`: codes in :func:`quantize_weight`'s layout.

    Example:
        >>> codes2 = unpack_quantized_weight(pack_quantized_weight(codes, 8, 0, 512), 8, 0, 512, codes.shape[0])
        >>> torch.equal(codes, codes2)
        True
    """
    require_native("ops.unpack_quantized_weight")
    return torch.ops.deepseek_ext.unpack_quantized_weight.default(packed, bits, group_size, in_features, out_features)


def code_sums(codes: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Per-group sums of a packed weight's codes, ``(N, groups)`` int32 (computed once per weight)."""
    from ..reference.quant import unpack_codes

    c = unpack_codes(codes, bits)
    return c.view(c.shape[0], groups, -1).sum(-1, dtype=torch.int32)


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::quantize_weight")
    def _quantize_weight_fake(w, bits, group_size, symmetric):
        n, k = w.shape
        kp = padded_k(k, group_size)
        groups = kp // (group_size if group_size > 0 else kp)
        codes = w.new_empty((n, kp if bits == 8 else kp // 2), dtype=torch.int8 if bits == 8 else torch.uint8)
        return codes, w.new_empty((n, groups), dtype=torch.float32), w.new_empty((n, groups), dtype=torch.int32)

    @torch.library.register_fake("deepseek_ext::quantized_linear")
    def _quantized_linear_fake(
        x,
        codes,
        scales,
        zeros,
        bits,
        group_size,
        in_features,
        act_bits,
        bias=None,
        act_scale=None,
        code_sums=None,
    ):
        torch._check(x.dim() == 2 and x.shape[1] == in_features, lambda: "quantized_linear: x must be (M, in_features)")
        return x.new_empty((x.shape[0], scales.shape[0]))
