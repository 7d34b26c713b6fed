"""Randomness of DP-SGD: uniforms for Poisson sampling and Gaussian noise, from torch generators or the operating
system's CSPRNG (``secure_rng=True``)."""

from __future__ import annotations

import math
import os

import torch


def secure_uniform(n: int) -> torch.Tensor:
    """``n`` uniforms in [0, 1) (float64) from the operating system's CSPRNG (53 random bits per value)."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)
    return (raw & ((1 << 53) - 1)).double() / float(1 << 53)


def secure_normal(shape, std: float, device) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` (float32) from the OS CSPRNG (Box-Muller on its uniforms)."""
    n = math.prod(shape)
    u = secure_uniform(2 * ((n + 1) // 2)).view(2, -1)
    u1 = u[0].clamp_min(1e-300)
    r = torch.sqrt(-2 * torch.log(u1))
    z = torch.cat([r * torch.cos(2 * math.pi * u[1]), r * torch.sin(2 * math.pi * u[1])])[:n]
    return (z * std).float().view(shape).to(device)


class GaussianNoise:
    """The noise of a DP step: ``N(0, std^2)`` per coordinate, ``std = noise_multiplier * max_grad_norm``.

    ``draw(p)`` gives a tensor of ``p``'s shape on its device, or None when ``std`` is 0 (no noise at all).
    """

    def __init__(self, std: float, generator: torch.Generator | None = None, secure_rng: bool = False):
        self.std = std
        self.generator = generator
        self.secure_rng = secure_rng

    def draw(self, p: torch.Tensor) -> torch.Tensor | None:
        if self.std == 0:
            return None
        if self.secure_rng:
            return secure_normal(p.shape, self.std, p.device)
        return torch.normal(0.0, self.std, p.shape, generator=self.generator).to(p.device)
