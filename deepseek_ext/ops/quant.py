"""Integer quantization ops: ``quantize_weight`` (packing) and ``quantized_linear``.

Formats (see ``csrc/include/deepseek_ext/quant.h``): a weight ``(N, K)`` becomes per-group scales and zero points
``(N, G)`` and codes: int8 ``(N, Kp)`` for 8 bits, two 4-bit codes per byte ``(N, Kp / 2)`` for 4 bits, with ``K``
padded to ``Kp`` (a multiple of the group, or of 32 for per-channel scales) by zero-point codes.
``w[n, k] ~= scale[n, g] * (code[n, k] - zero[n, g])``.
"""

from __future__ import annotations

import torch

from .._native import NATIVE_AVAILABLE, require_native
from ..utils.packing import none_as_zero, padded_k, unpack_codes


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True):
    """Packs a float weight ``(out_features, in_features)``.

    Args:
        w: float32/float16/bfloat16, 2-D.
        bits: 8 (int8 codes in [-127, 127], symmetric around 0 or asymmetric) or 4 (codes 0..15, symmetric
            around 8 or asymmetric).
        group_size: None for one scale per output channel (``QuantConfig``'s spelling; 0, the schema's, is
            accepted too), or 32/64/128/... input features per scale.
        symmetric: zero point fixed (0 for 8 bits, 8 for 4 bits), or chosen per group from its range.

    Returns:
        ``(codes, scales, zeros)``: codes int8 ``(N, Kp)`` or uint8 ``(N, Kp/2)``; float32 scales and int32 zero
        points ``(N, G)`` with ``G = Kp / group``.

    Example:
        >>> w = torch.randn(256, 512)
        >>> codes, scales, zeros = quantize_weight(w, bits=4, group_size=128, symmetric=True)
    """
    require_native("ops.quantize_weight")
    return torch.ops.deepseek_ext.quantize_weight.default(w, bits, none_as_zero(group_size), symmetric)


def quantized_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    in_features: int,
    act_bits: int | None = 8,
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
            on CUDA; None (``QuantConfig(activation_bits=None)``; 16 and the schema's 0 are accepted too) —
            weight-only: activations stay float, weights are dequantised to float32 and the
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
        x,
        codes,
        scales,
        zeros,
        bits,
        none_as_zero(group_size),
        in_features,
        none_as_zero(act_bits),
        bias,
        act_scale,
        code_sums,
    )


def pack_quantized_weight(codes: torch.Tensor, bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
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
    return torch.ops.deepseek_ext.pack_quantized_weight.default(codes, bits, none_as_zero(group_size), in_features)


def unpack_quantized_weight(
    packed: torch.Tensor, bits: int, group_size: int | None, in_features: int, out_features: int
) -> torch.Tensor:
    """The inverse of :func:`pack_quantized_weight`: codes in :func:`quantize_weight`'s layout.

    Example:
        >>> codes2 = unpack_quantized_weight(pack_quantized_weight(codes, 8, 0, 512), 8, 0, 512, codes.shape[0])
        >>> torch.equal(codes, codes2)
        True
    """
    require_native("ops.unpack_quantized_weight")
    return torch.ops.deepseek_ext.unpack_quantized_weight.default(
        packed, bits, none_as_zero(group_size), in_features, out_features
    )


def code_sums(codes: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Per-group sums of a packed weight's codes, ``(N, groups)`` int32 (computed once per weight)."""
    c = unpack_codes(codes, bits)
    return c.view(c.shape[0], groups, c.shape[1] // groups).sum(-1, dtype=torch.int32)


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


# ---------------------------------------------------------------------------------------------------------------
# The static int8 path (deepseek_ext.quant.graph): activation codes between layers. Codes are unsigned 7-bit values
# ``u`` in [0, 127] with a per-tensor scale ``s`` and zero point ``z`` (value ``s * (u - z)``), channels last
# (N, H, W, Cp) or (N, Cp), channels padded to a multiple of 8 with ``z``.


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Float ``(N, C, H, W)`` or ``(N, C)`` -> codes ``(N, H, W, Cp)`` / ``(N, Cp)``: ``clamp(round(x / scale) + z,
    0, 127)``. Non-finite inputs are a ValueError.

    Example:
        >>> codes = quantize_activation(torch.rand(1, 3, 8, 8), 1 / 127, 0)   # (1, 8, 8, 8) uint8
    """
    require_native("ops.quantize_activation")
    return torch.ops.deepseek_ext.quantize_activation.default(x, float(scale), int(zero_point))


def dequantize_activation(codes: torch.Tensor, scale: float, zero_point: int, channels: int) -> torch.Tensor:
    """Codes -> float ``(N, channels, H, W)`` (channels-last memory) or ``(N, channels)``.

    Example:
        >>> x = dequantize_activation(codes, 1 / 127, 0, 3)   # (1, 3, 8, 8) float32
    """
    require_native("ops.dequantize_activation")
    return torch.ops.deepseek_ext.dequantize_activation.default(codes, float(scale), int(zero_point), int(channels))


def quantized_conv2d(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_channels: int,
    bits: int,
    in_scale: float,
    in_zero: int,
    out_scale: float = 1.0,
    out_zero: int = 0,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    res_scale: float = 1.0,
    res_zero: int = 0,
    output_float: bool = False,
) -> torch.Tensor:
    """A convolution on activation codes (implicit GEMM, no im2col), requantised to the next layer's codes.

    ``y = conv(s_in * (x - z_in), w) + bias (+ s_res * (residual - z_res))``, ReLU when asked, then codes
    ``clamp(round(y / out_scale) + out_zero, 0, 127)`` (or ``y`` as float ``(N, Cout, Ho, Wo)`` when
    ``output_float``).

    Args:
        x: codes ``(N, H, W, Cp)`` uint8.
        packed: :func:`pack_quantized_weight` of the ``(Cout, kh * kw * Cp)`` codes (taps outer, channels inner).
        w_scale, w_sum, w_zero: per output channel: float32 scale, int32 sum of codes, int32 zero point.
        bias: float ``(Cout,)`` or None. kernel, stride, padding, dilation: pairs. bits: 8 or 4.
        residual: codes ``(N, Ho, Wo, Coutp)`` added before the ReLU.

    Returns:
        codes ``(N, Ho, Wo, Coutp)`` uint8, or float ``(N, Cout, Ho, Wo)``.

    Example:
        >>> y = quantized_conv2d(x, packed, ws, wsum, wz, b, (3, 3), (1, 1), (1, 1), (1, 1), 64, 8, 0.02, 0,
        ...                      0.05, 0, relu=True)
    """
    require_native("ops.quantized_conv2d")
    return torch.ops.deepseek_ext.quantized_conv2d.default(
        x, packed, w_scale, w_sum, w_zero, bias, list(kernel), list(stride), list(padding), list(dilation), 1,
        int(out_channels), int(bits), float(in_scale), int(in_zero), float(out_scale), int(out_zero), bool(relu),
        residual, float(res_scale), int(res_zero), bool(output_float),
    )  # fmt: skip


def quantized_depthwise_conv2d(
    x, weight, w_scale, bias, kernel, stride, padding, dilation, channels: int, in_scale: float, in_zero: int,
    out_scale: float = 1.0, out_zero: int = 0, relu: bool = False, output_float: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Depthwise convolution (one filter per channel) on codes ``(N, H, W, Cp)``.

    Args:
        weight: int8 ``(kh * kw, Cp)`` centred codes (weight = ``w_scale[c] * code``), padding channels 0.
        w_scale: float32 ``(channels,)``; bias: ``(channels,)`` or None. Other arguments as :func:`quantized_conv2d`.

    Example:
        >>> y = quantized_depthwise_conv2d(codes, w, ws, b, (3, 3), (1, 1), (1, 1), (1, 1), 32, 0.05, 0, 0.04, 0)
    """
    require_native("ops.quantized_depthwise_conv2d")
    return torch.ops.deepseek_ext.quantized_depthwise_conv2d.default(
        x, weight, w_scale, bias, list(kernel), list(stride), list(padding), list(dilation), int(channels),
        float(in_scale), int(in_zero), float(out_scale), int(out_zero), bool(relu), bool(output_float),
    )  # fmt: skip


def quantized_im2col(x, kernel, stride, padding, dilation, channels: int, zero: int) -> torch.Tensor:
    """Patches of codes ``(N, H, W, Cp)`` -> ``(N, Ho, Wo, round8(kh * kw * channels))`` (taps outer, channels
    inner, out-of-image taps and the tail filled with ``zero``): a first layer with few channels then runs as a
    1x1 :func:`quantized_conv2d` without multiplying channel padding.

    Example:
        >>> patches = quantized_im2col(codes, (7, 7), (2, 2), (3, 3), (1, 1), 3, 64)
    """
    require_native("ops.quantized_im2col")
    return torch.ops.deepseek_ext.quantized_im2col.default(
        x, list(kernel), list(stride), list(padding), list(dilation), int(channels), int(zero)
    )


def quantized_max_pool2d(x, kernel, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False) -> torch.Tensor:
    """Max pooling on codes ``(N, H, W, Cp)`` (max commutes with the quantisation; scale and zero point are kept).

    Example:
        >>> y = quantized_max_pool2d(codes, (3, 3), (2, 2), (1, 1))
    """
    require_native("ops.quantized_max_pool2d")
    return torch.ops.deepseek_ext.quantized_max_pool2d.default(
        x, list(kernel), list(stride), list(padding), list(dilation), bool(ceil_mode)
    )


def quantized_adaptive_avg_pool2d(x, output_size, in_scale, in_zero, out_scale, out_zero) -> torch.Tensor:
    """Adaptive average pooling on codes (PyTorch's windows), requantised to ``(out_scale, out_zero)``.

    Example:
        >>> y = quantized_adaptive_avg_pool2d(codes, (1, 1), 0.05, 0, 0.02, 0)
    """
    require_native("ops.quantized_adaptive_avg_pool2d")
    return torch.ops.deepseek_ext.quantized_adaptive_avg_pool2d.default(
        x, list(output_size), float(in_scale), int(in_zero), float(out_scale), int(out_zero)
    )


def quantized_add(a, a_scale, a_zero, b, b_scale, b_zero, out_scale, out_zero, relu=False) -> torch.Tensor:
    """``a + b`` on codes of the same shape, requantised (ReLU when asked).

    Example:
        >>> y = quantized_add(a, 0.05, 64, b, 0.03, 64, 0.06, 64)
    """
    require_native("ops.quantized_add")
    return torch.ops.deepseek_ext.quantized_add.default(
        a, float(a_scale), int(a_zero), b, float(b_scale), int(b_zero), float(out_scale), int(out_zero), bool(relu)
    )


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pad8(c: int) -> int:
    return -(-c // 8) * 8


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::quantize_activation")
    def _quantize_activation_fake(x, scale, zero_point):
        if x.dim() == 4:
            n, c, h, w = x.shape
            return x.new_empty((n, h, w, _pad8(c)), dtype=torch.uint8)
        return x.new_empty((x.shape[0], _pad8(x.shape[1])), dtype=torch.uint8)

    @torch.library.register_fake("deepseek_ext::dequantize_activation")
    def _dequantize_activation_fake(codes, scale, zero_point, channels):
        if codes.dim() == 4:
            n, h, w, _ = codes.shape
            return codes.new_empty((n, h, w, channels), dtype=torch.float32).permute(0, 3, 1, 2)
        return codes.new_empty((codes.shape[0], channels), dtype=torch.float32)

    def _conv_fake_output(x, kernel, stride, padding, dilation, channels, code_channels, output_float):
        """A convolution's output on channels-last codes ``x``: float NCHW (a channels-last view) or uint8 codes
        with ``code_channels`` channels."""
        n, h, w, _ = x.shape
        ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
        wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
        if output_float:
            return x.new_empty((n, ho, wo, channels), dtype=torch.float32).permute(0, 3, 1, 2)
        return x.new_empty((n, ho, wo, code_channels), dtype=torch.uint8)

    @torch.library.register_fake("deepseek_ext::quantized_conv2d")
    def _quantized_conv2d_fake(
        x, packed, w_scale, w_sum, w_zero, bias, kernel, stride, padding, dilation, groups, out_channels, bits,
        in_scale, in_zero, out_scale, out_zero, relu=False, residual=None, res_scale=1.0, res_zero=0,
        output_float=False,
    ):  # fmt: skip
        return _conv_fake_output(x, kernel, stride, padding, dilation, out_channels, _pad8(out_channels), output_float)

    @torch.library.register_fake("deepseek_ext::quantized_depthwise_conv2d")
    def _quantized_depthwise_conv2d_fake(
        x, weight, w_scale, bias, kernel, stride, padding, dilation, channels, in_scale, in_zero, out_scale, out_zero,
        relu=False, output_float=False,
    ):  # fmt: skip
        return _conv_fake_output(x, kernel, stride, padding, dilation, channels, x.shape[3], output_float)

    @torch.library.register_fake("deepseek_ext::quantized_im2col")
    def _quantized_im2col_fake(x, kernel, stride, padding, dilation, channels, zero):
        n, h, w, _ = x.shape
        ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
        wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
        return x.new_empty((n, ho, wo, _pad8(kernel[0] * kernel[1] * channels)))

    @torch.library.register_fake("deepseek_ext::quantized_max_pool2d")
    def _quantized_max_pool2d_fake(x, kernel, stride, padding, dilation, ceil_mode=False):
        n, h, w, c = x.shape
        stride = stride or kernel

        def out_len(size, k, s, p, d):
            span = size + 2 * p - d * (k - 1) - 1
            o = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (o - 1) * s >= size + p:
                o -= 1
            return o

        ho = out_len(h, kernel[0], stride[0], padding[0], dilation[0])
        wo = out_len(w, kernel[1], stride[1], padding[1], dilation[1])
        return x.new_empty((n, ho, wo, c))

    @torch.library.register_fake("deepseek_ext::quantized_adaptive_avg_pool2d")
    def _quantized_adaptive_avg_pool2d_fake(x, output_size, in_scale, in_zero, out_scale, out_zero):
        return x.new_empty((x.shape[0], output_size[0], output_size[1], x.shape[3]))

    @torch.library.register_fake("deepseek_ext::quantized_add")
    def _quantized_add_fake(a, a_scale, a_zero, b, b_scale, b_zero, out_scale, out_zero, relu=False):
        return torch.empty_like(a)
