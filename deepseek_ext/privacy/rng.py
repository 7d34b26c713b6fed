"""Randomness of DP-SGD: uniforms for Poisson sampling and Gaussian noise, from torch generators or the operating
system's CSPRNG (``secure_rng=True``)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..ops.privacy import clip_sum_noise, draw_seed, gaussian_noise_


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

    Generated inside ``clip_sum_noise`` (Philox, counter-based: the noise never exists as a tensor): each step draws
    one seed from ``generator`` (PyTorch's default generator when None, so ``torch.manual_seed`` reproduces runs) and
    each parameter reads its own range of that stream (whole tiles of 64 values), in the order ``start_step`` lists
    them. With ``secure_rng`` the noise comes from the operating system's CSPRNG as a tensor instead (slower).
    Strategies use it through :func:`noisy_clip_sum` and :func:`with_noise`.
    """

    TILE = 64  # values of the stream per tile: each parameter starts on a tile of its own

    def __init__(self, std: float, generator: torch.Generator | None = None, secure_rng: bool = False):
        self.std = std
        self.generator = generator
        self.secure_rng = secure_rng
        self._seed: torch.Tensor | None = None
        self._offsets: dict[nn.Parameter, int] = {}
        self._next = 0

    def start_step(self, params) -> None:
        """A new step: a new seed, and the stream's ranges handed out to ``params`` in their order."""
        self._seed, self._offsets, self._next = None, {}, 0
        if self.std != 0 and not self.secure_rng:
            self._seed = draw_seed(self.generator)
        for p in params:
            self._range(p)

    def _range(self, p: torch.Tensor) -> int:
        if p not in self._offsets:
            self._offsets[p] = self._next
            self._next += -(-p.numel() // self.TILE) * self.TILE
        return self._offsets[p]

    def op_args(self, p: torch.Tensor) -> dict:
        """The ``clip_sum_noise`` keyword arguments that add ``p``'s noise of this step."""
        if self.std == 0:
            return {}
        if self.secure_rng:
            return {"noise": secure_normal(p.shape, self.std, p.device)}
        if self._seed is None:
            self.start_step(())
        return {"noise_std": self.std, "seed": self._seed, "offset": self._range(p)}


def noisy_clip_sum(
    grads: torch.Tensor, factors: torch.Tensor, noise: GaussianNoise | None, p: torch.Tensor, scale: float
) -> torch.Tensor:
    """``(sum_i factors_i * grads_i + noise of p) * scale`` in one ``clip_sum_noise`` call (``noise`` None: none)."""
    return clip_sum_noise(grads, factors, scale=scale, **({} if noise is None else noise.op_args(p)))


@torch.no_grad()
def with_noise(total: torch.Tensor | None, p: torch.Tensor, noise: GaussianNoise | None, scale: float) -> torch.Tensor:
    """``(total + noise of p) * scale`` for a gradient already summed over the examples, written into ``total`` (the
    caller's own tensor: a clipped sum it formed) by ``gaussian_noise_``, with no new memory and one pass. ``total``
    None: no example reached ``p``, so its gradient is the noise alone (or zeros without noise), in a new tensor."""
    accumulate = total is not None
    if total is None:
        total = torch.empty_like(p, memory_format=torch.contiguous_format).detach()
    args = {} if noise is None else noise.op_args(p)
    if "noise" in args:  # secure_rng: the noise is a tensor
        return (total.add_(args["noise"]) if accumulate else total.copy_(args["noise"])).mul_(scale)
    if not args:  # no noise: the sum scaled, or zeros
        return total.zero_() if not accumulate else total.mul_(scale) if scale != 1.0 else total
    return gaussian_noise_(total, args["noise_std"], args["seed"], args["offset"], scale=scale, accumulate=accumulate)

