"""Reference integer quantization in eager PyTorch (the specification of deepseek_ext.ops.quant)."""

from __future__ import annotations

import torch

from ..utils.packing import dequantize_weight, padded_k, unpack_codes

__all__ = ["dequantize_weight", "padded_k", "unpack_codes"]


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor | None = None):
    """Symmetric 7-bit codes in [-63, 63] per row (or with a per-tensor static scale) and the scales, as the kernels
    do (the reduce_range that keeps AVX2's vpmaddubsw from saturating)."""
    x = x.float()
    if act_scale is None:
        amax = x.abs().amax(1, keepdim=True) if x.shape[1] else x.new_zeros(x.shape[0], 1)
        s = amax.clamp_min(1e-12) / 63.0
    else:
        s = act_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return torch.round(x / s).clamp(-63, 63), s


def quantized_linear(
    x, codes, scales, zeros, bits, group_size, in_features, act_bits, bias=None, act_scale=None, seven_bit=False
):
    """``seven_bit``: the batched kernel's activation codes (int8 codes requantised to [-63, 63])."""
    w = dequantize_weight(codes, scales, zeros, bits, group_size, in_features).double()
    if act_bits == 8:
        xq, s = quantize_activations(x, act_scale)
        if seven_bit:
            xq, s = torch.round(xq * (63.0 / 127.0)), s * (127.0 / 63.0)
        y = (xq.double() @ w.t()) * s.double()
    else:
        y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Codes (unpacked, (N, Kp) int32), scales and zeros, computed as the kernels do."""
    n, k = w.shape
    kp = padded_k(k, group_size)
    group = group_size if group_size > 0 else kp
    g = torch.full((n, kp), float("nan"))
    g[:, :k] = w.float()
    g = g.view(n, kp // group, group)
    finite = torch.nan_to_num(g, 0.0)
    mn, mx = finite.amin(-1).clamp_max(0.0), finite.amax(-1).clamp_min(0.0)
    qmax = 127.0 if bits == 8 else 7.0
    lo_code, hi_code = (-127, 127) if bits == 8 else (0, 15)
    if symmetric:
        scales = torch.maximum(-mn, mx).clamp_min(1e-12) / qmax
        zeros = torch.full(scales.shape, 0 if bits == 8 else 8, dtype=torch.int32)
        lo, hi = zeros - int(qmax), zeros + int(qmax)
    else:
        scales = (mx - mn).clamp_min(1e-12) / (hi_code - lo_code)
        zeros = torch.round(lo_code - mn / scales).clamp(lo_code, hi_code).to(torch.int32)
        lo, hi = torch.full_like(zeros, lo_code), torch.full_like(zeros, hi_code)
    q = torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = torch.where(torch.isnan(g), zeros.unsqueeze(-1).float(), q)
    q = torch.maximum(torch.minimum(q, hi.unsqueeze(-1).float()), lo.unsqueeze(-1).float())
    return q.view(n, kp).to(torch.int32), scales, zeros


def quantized_conv2d(
    x,
    codes,
    w_scale,
    w_zero,
    bias,
    kernel,
    stride,
    padding,
    dilation,
    out_channels,
    bits,
    in_scale,
    in_zero,
    out_scale=1.0,
    out_zero=0,
    relu=False,
    residual=None,
    res_scale=1.0,
    res_zero=0,
    output_float=False,
):
    """float64 reference of ``quantized_conv2d`` from the stored-layout codes ``(Cout, kh * kw * Cp)`` (taps outer,
    channels inner): the same integer products, then the requantisation."""
    n, h, w, cp = x.shape
    kh, kw = kernel
    k = kh * kw * cp
    wc = unpack_codes(codes, bits)[:, :k].double() - w_zero.double().view(-1, 1)
    weight = wc.view(out_channels, kh, kw, cp).permute(0, 3, 1, 2)  # integer-valued (Cout, Cp, kh, kw)
    xf = (x.double() - in_zero).permute(0, 3, 1, 2)
    acc = torch.nn.functional.conv2d(xf, weight, None, stride, padding, dilation)  # exact integers
    y = acc * (in_scale * w_scale.double()).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + res_scale * (residual[..., :out_channels].double() - res_zero).permute(0, 3, 1, 2)
    if relu:
        y = y.clamp_min(0)
    if output_float:
        return y
    codes_out = torch.round(y / out_scale + out_zero).clamp(0, 127).to(torch.uint8).permute(0, 2, 3, 1)
    coutp = -(-out_channels // 8) * 8
    return torch.nn.functional.pad(codes_out, (0, coutp - out_channels), value=out_zero)
