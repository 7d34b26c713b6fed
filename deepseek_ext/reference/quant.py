"""Reference integer quantization in eager PyTorch (the specification of deepseek_ext.ops.quant)."""

from __future__ import annotations

import torch


def padded_k(k: int, group_size: int) -> int:
    unit = group_size if group_size > 0 else 32
    return max(unit, -(-k // unit) * unit)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, Kp) integer codes from the packed storage (see csrc/include/deepseek_ext/quant.h)."""
    if bits == 8:
        return codes.to(torch.int32)
    n = codes.shape[0]
    b = codes.to(torch.int32).view(n, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=2).view(n, -1)


def dequantize_weight(codes, scales, zeros, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """float32 (N, in_features) weights: scale * (code - zero), per group."""
    c = unpack_codes(codes, bits)
    kp = c.shape[1]
    group = group_size if group_size > 0 else kp
    s = scales.repeat_interleave(group, 1)
    z = zeros.repeat_interleave(group, 1)
    return (s * (c - z).float())[:, :in_features]


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor | None = None):
    """Symmetric int8 codes per row (or with a per-tensor static scale) and the scales, as the kernels do."""
    x = x.float()
    if act_scale is None:
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.0
    else:
        s = act_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return torch.round(x / s).clamp(-127, 127), s


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
