"""Reference DP-SGD reduction and Gaussian noise stream in eager PyTorch (the specification of
deepseek_ext.ops.privacy): Philox4x32-10 on int64 tensors and Box-Muller in float64.

The stream ``(seed, offset)`` is a sequence of standard normals; element ``j`` of a call is the normal at position
``offset + j``. Positions come in tiles of 64: tile ``t`` holds the 16 Philox blocks with counters ``16 t + i``
(the 64-bit counter in words c0 c1, the stream tag ``"gauss"`` in words c2 c3, the seed as the key), and block ``i``'s
words ``(x0, x1, x2, x3)`` give positions ``64 t + i + 16 k`` for ``k = 0..3``: ``r0 cos a0, r0 sin a0, r1 cos a1,
r1 sin a1`` with ``r = sqrt(-2 ln u)``, ``u = (floor(x_even / 2) + 1/2) / 2^31`` and ``a = 2 pi x_odd / 2^32``.
"""

from __future__ import annotations

import math

import torch

GAUSSIAN_STREAM = 0x6761757373  # "gauss"
TILE = 64
TILE_BLOCKS = 16
_M32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product m * c, from two products below 2^48 (no int64 overflow)."""
    a, b = c * (m & 0xFFFF), c * (m >> 16)
    low = a + ((b & 0xFFFF) << 16)
    return (b >> 16) + (low >> 32), low & _M32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (Salmon et al., SC'11)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _M32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _box_muller(xu: torch.Tensor, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = ((xu >> 1).double() + 0.5) / 2.0**31
    r = torch.sqrt(-2.0 * torch.log(u))
    a = (2 * math.pi / 2.0**32) * xa.double()
    return r * torch.cos(a), r * torch.sin(a)


def gaussian_noise(shape, std: float, seed: int, offset: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``std`` times the normals at positions ``offset .. offset + numel - 1`` of the stream ``seed``, shaped
    ``shape`` (computed in float64, then cast to ``dtype``)."""
    n = math.prod(shape)
    seed = int(seed) % 2**64
    position = torch.arange(n, dtype=torch.int64) + offset
    tile, within = position // TILE, position % TILE
    k, i = within // TILE_BLOCKS, within % TILE_BLOCKS
    block = tile * TILE_BLOCKS + i
    x = philox4x32_10(block, block >> 32, GAUSSIAN_STREAM & _M32, GAUSSIAN_STREAM >> 32, seed & _M32, seed >> 32)
    c0, s0 = _box_muller(x[0], x[1])
    c1, s1 = _box_muller(x[2], x[3])
    z = torch.stack([c0, s0, c1, s1]).gather(0, k.view(1, -1)).view(-1)
    return (std * z).to(dtype).view(shape)


def clip_sum_noise(grads, factors, noise=None, scale: float = 1.0, noise_std: float = 0.0, seed=None, offset=0):
    """``(sum_i factors[i] * grads[i] + noise) * scale`` in float64, with ``noise`` a tensor or, for
    ``noise_std > 0``, ``gaussian_noise(grads.shape[1:], noise_std, seed, offset)``."""
    g = grads.double()
    total = (g * factors.double().view(-1, *([1] * (g.dim() - 1)))).sum(0)
    if noise is not None:
        total = total + noise.double()
    elif noise_std > 0:
        total = total + gaussian_noise(tuple(grads.shape[1:]), noise_std, int(seed), offset, torch.float64)
    return total * scale
