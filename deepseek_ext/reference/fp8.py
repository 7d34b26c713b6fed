"""Reference FP8 quantisation in eager PyTorch (the specification of deepseek_ext.ops.fp8)."""

from __future__ import annotations

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
AMAX_FLOOR = 1e-12


def _tile_amax(x: torch.Tensor, granularity: str, block_size: int) -> torch.Tensor:
    """Largest finite |x| per tile: shape (), (M, 1) or (ceil(M/b), ceil(N/b))."""
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    if granularity == "tensor":
        return a.amax() if a.numel() else a.new_zeros(())
    rows, cols = a.shape
    if granularity == "row":
        return a.amax(dim=1, keepdim=True) if cols else a.new_zeros(rows, 1)
    b = block_size
    rb = 1 if granularity == "group" else b
    tr, tc = -(-rows // rb), -(-cols // b)
    padded = a.new_zeros(tr * rb, tc * b)
    padded[:rows, :cols] = a
    return padded.view(tr, rb, tc, b).amax(dim=(1, 3))


def expand_scale(scale: torch.Tensor, shape: torch.Size, granularity: str, block_size: int) -> torch.Tensor:
    """Broadcasts per-tile scales to one per element of a tensor of ``shape``."""
    if granularity not in ("block", "group"):
        return scale
    rows, cols = shape
    row_block = 1 if granularity == "group" else block_size
    return scale.repeat_interleave(row_block, 0)[:rows].repeat_interleave(block_size, 1)[:, :cols]


def quantize_fp8(x: torch.Tensor, dtype=torch.float8_e4m3fn, granularity: str = "tensor", block_size: int = 128):
    fmax = FP8_MAX[dtype]
    scale = _tile_amax(x, granularity, block_size).clamp_min(AMAX_FLOOR) / fmax
    q = (x.float() / expand_scale(scale, x.shape, granularity, block_size)).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, granularity: str = "tensor", block_size: int = 128, out_dtype=torch.float32
) -> torch.Tensor:
    return (q.float() * expand_scale(scale, q.shape, granularity, block_size)).to(out_dtype)
