"""Integer weight storage shared by the quantized ops, modules and their references: the padded reduction length,
4-bit nibble unpacking (csrc/include/deepseek_ext/quant.h's layout) and dequantisation."""

from __future__ import annotations

import torch


def none_as_zero(value: int | None) -> int:
    """The op schemas' integer for "none": ``group_size=None`` (one scale per output channel) and
    ``act_bits=None`` (weight-only) travel as None from ``QuantConfig`` to the op wrappers, which pass 0 to C++."""
    return 0 if value is None else value


def padded_k(k: int, group_size: int | None) -> int:
    """The reduction length the codes are stored with: ``k`` rounded up to the group (32 for per-channel)."""
    group_size = none_as_zero(group_size)
    unit = group_size if group_size > 0 else 32
    return max(unit, -(-k // unit) * unit)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, Kp) integer codes from the packed storage (see csrc/include/deepseek_ext/quant.h)."""
    if bits == 8:
        return codes.to(torch.int32)
    n, cols = codes.shape
    b = codes.to(torch.int32).view(n, cols // 16, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=2).view(n, 2 * cols)


def dequantize_weight(codes, scales, zeros, bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """float32 (N, in_features) weights: scale * (code - zero), per group (``group_size=None``: per channel)."""
    c = unpack_codes(codes, bits)
    kp = c.shape[1]
    group_size = none_as_zero(group_size)
    group = group_size if group_size > 0 else kp
    s = scales.repeat_interleave(group, 1)
    z = zeros.repeat_interleave(group, 1)
    return (s * (c - z).float())[:, :in_features]
