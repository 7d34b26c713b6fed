"""Per-sample clipping strategies: one object per ``clipping=`` mode, chosen once by ``make_clipping``.

A strategy sees a ``CapturedBatch`` (what the capture hooks recorded for one physical batch: every unit's inputs and
output gradients) and works in two stages:

1. ``per_sample_norms(batch) -> {group: (B,) L2 norms}``: one norm per example for each *clip group* (``ALL`` for
   one norm over every parameter; one group per parameter for per-layer clipping);
2. ``clipped_sum(batch, factors, noise, scale) -> {param: (sum_i c_i g_i + noise) * scale}`` with the clip factors
   ``c_i = min(1, bound / (norm_i + CLIP_EPS))`` of each parameter's group.

``clip()`` runs both. A new algorithm (a cheaper norm rule, a one-backward clipped sum) is a subclass registered
with ``register_clipping``; each parameter's noise is added where its sum is formed (``rng.noisy_clip_sum`` /
``rng.with_noise``), generated inside the reduction.

Example:
    >>> strategy = make_clipping("ghost", max_grad_norm=1.0)
    >>> clipped = strategy.clip(batch, GaussianNoise(0.5), scale=1 / 256)   # clipped.sums: {param: gradient}
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..ops.privacy import per_sample_sq_norms
from . import grad_sample
from .capture import Record, Unit
from .rng import GaussianNoise, noisy_clip_sum, with_noise

CLIP_EPS = 1e-6  # clip factor min(1, C / (||g_i|| + CLIP_EPS))
ALL = "all"  # the clip group of a strategy with one norm per example over every parameter


@dataclass
class CapturedBatch:
    """One physical batch as recorded by the capture hooks.

    Attributes:
        units: ``(unit, records)`` for every unit with at least one record whose output gradient arrived.
        uses: how many units hold each trainable parameter (more than one: a tied parameter).
        batch_size: the number of examples.
    """

    units: list[tuple[Unit, list[Record]]]
    uses: dict[nn.Parameter, int]
    batch_size: int
    _per_sample: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_units(cls, units: list[Unit]) -> CapturedBatch:
        uses: dict[nn.Parameter, int] = {}
        for u in units:
            for p in u.params:
                uses[p] = uses.get(p, 0) + 1
        live = [(u, rs) for u in units if (rs := [r for r in u.records if any(g is not None for g in r.grad_outputs)])]
        return cls(live, uses, max((r.batch_size for _, rs in live for r in rs), default=0))

    def alone(self, unit: Unit, records: list[Record]) -> bool:
        """The unit ran once and holds no tied parameter: its gradient needs no other unit's."""
        return len(records) == 1 and all(self.uses[p] == 1 for p in unit.params)

    def per_sample_grads(self, unit: Unit, records: list[Record]) -> dict[nn.Parameter, torch.Tensor]:
        """The unit's per-sample gradients ``{param: (B, *param.shape)}``, summed over its uses in the batch
        (computed once per batch, then cached)."""
        if id(unit) in self._per_sample:
            return self._per_sample[id(unit)]
        total: dict = {}
        for r in records:
            try:
                grads = grad_sample.per_sample_grads(
                    unit.module, r.activations, tuple(r.grad_outputs), r.kwargs, r.batch_size
                )
            except Exception as e:  # a clear pointer instead of an obscure vmap error
                how = "the torch.func fallback" if not grad_sample.has_sampler(unit.module) else "its grad sampler"
                raise RuntimeError(
                    f"DifferentialPrivacy: cannot compute per-sample gradients of module '{unit.name}' "
                    f"({type(unit.module).__name__}) with {how}: {e}. Register a grad sampler: "
                    f"@deepseek_ext.privacy.register_grad_sampler({type(unit.module).__name__})"
                ) from e
            _add_into(total, grads)
        self._per_sample[id(unit)] = total
        return total

    def materialised(self, units: list[tuple[Unit, list[Record]]]) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradients of ``units``, a tied parameter's summed over its units."""
        total: dict = {}
        for u, rs in units:
            _add_into(total, self.per_sample_grads(u, rs))
        return total


def _add_into(total: dict, grads: dict) -> None:
    for p, g in grads.items():
        total[p] = g if p not in total else total[p] + g


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """``min(1, bound / (norm_i + CLIP_EPS))`` for each example."""
    return (bound / (norms + CLIP_EPS)).clamp(max=1.0)


@dataclass
class Clipped:
    """The result of clipping one physical batch.

    Attributes:
        sums: ``{param: (sum_i c_i g_i + noise) * scale}`` for every parameter some example reached.
        factors: ``{group: (B,) clip factors}``.
    """

    sums: dict[nn.Parameter, torch.Tensor]
    factors: dict[Hashable, torch.Tensor]


class ClippingStrategy(ABC):
    """Per-sample clipping of one physical batch to ``max_grad_norm``: per-sample norms, then the clipped sum.

    Subclasses implement ``per_sample_norms`` and ``clipped_sum`` (and ``bound`` when groups have their own bound);
    ``clip`` turns the norms into clip factors and forms the sums.

    Example:
        >>> @register_clipping
        ... class Materialised(ClippingStrategy):
        ...     name = "materialised"
        ...     def per_sample_norms(self, batch):
        ...         grads = batch.materialised(batch.units).values()
        ...         return {ALL: sum(per_sample_sq_norms(g) for g in grads).sqrt()}
        ...     def clipped_sum(self, batch, factors, noise, scale):
        ...         return {p: noisy_clip_sum(g, factors[ALL], noise, p, scale)
        ...                 for p, g in batch.materialised(batch.units).items()}
        >>> DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, clipping="materialised")
    """

    name: ClassVar[str]

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm

    @abstractmethod
    def per_sample_norms(self, batch: CapturedBatch) -> dict[Hashable, torch.Tensor]:
        """``{group: (B,) per-sample L2 norms}``, one entry per clip group."""

    def bound(self, batch: CapturedBatch, group: Hashable) -> float:
        """The clipping bound of ``group`` (``max_grad_norm`` unless a strategy splits it)."""
        return self.max_grad_norm

    @abstractmethod
    def clipped_sum(
        self, batch: CapturedBatch, factors: dict[Hashable, torch.Tensor], noise: GaussianNoise | None, scale: float
    ) -> dict[nn.Parameter, torch.Tensor]:
        """``{param: (sum_i factors[group(param)]_i * g_i + noise of param) * scale}``."""

    def clip(self, batch: CapturedBatch, noise: GaussianNoise | None = None, scale: float = 1.0) -> Clipped:
        norms = self.per_sample_norms(batch)
        factors = {g: clip_factors(n, self.bound(batch, g)) for g, n in norms.items()}
        return Clipped(self.clipped_sum(batch, factors, noise, scale), factors)


class FlatClipping(ClippingStrategy):
    """One norm per example over every parameter; per-sample gradients materialised, then one fused
    clip/sum/noise op per parameter (it reads each per-sample gradient once)."""

    name = "flat"

    def per_sample_norms(self, batch):
        sq = torch.zeros(batch.batch_size, dtype=torch.float32)
        for g in batch.materialised(batch.units).values():
            sq = sq + per_sample_sq_norms(g).float().cpu()
        return {ALL: sq.sqrt()}

    def clipped_sum(self, batch, factors, noise, scale):
        f = factors[ALL]
        return {
            p: noisy_clip_sum(g, f.to(g.device), noise, p, scale)
            for p, g in batch.materialised(batch.units).items()
        }


class GhostClipping(FlatClipping):
    """As ``FlatClipping``, but a unit with a norm sampler (``register_norm_sampler``) that ran once and holds no tied
    parameter gets its per-sample norms and clipped sum from its inputs and output gradients, without per-sample
    gradients ("ghost clipping"); the other units are materialised. Same result as 'flat'."""

    name = "ghost"

    @staticmethod
    def _split(batch: CapturedBatch):
        ghosted, rest = [], []
        for u, rs in batch.units:
            ok = batch.alone(u, rs) and grad_sample.supports_ghost(u.module)
            (ghosted if ok else rest).append((u, rs))
        return ghosted, rest

    def per_sample_norms(self, batch):
        ghosted, rest = self._split(batch)
        sq = torch.zeros(batch.batch_size, dtype=torch.float32)
        for u, (r,) in ghosted:
            for v in grad_sample.ghost_norms(u.module, r.activations, tuple(r.grad_outputs)).values():
                sq = sq + v.float().cpu()
        for g in batch.materialised(rest).values():
            sq = sq + per_sample_sq_norms(g).float().cpu()
        return {ALL: sq.sqrt()}

    def clipped_sum(self, batch, factors, noise, scale):
        ghosted, rest = self._split(batch)
        f = factors[ALL]
        materialised = batch.materialised(rest)
        sums = {p: noisy_clip_sum(g, f.to(g.device), noise, p, scale) for p, g in materialised.items()}
        for u, (r,) in ghosted:
            device = u.params[0].device
            for p, s in grad_sample.ghost_sums(u.module, r.activations, tuple(r.grad_outputs), f.to(device)).items():
                sums[p] = with_noise(s, p, noise, scale)
        return sums


class PerLayerClipping(ClippingStrategy):
    """Each parameter clipped on its own to ``max_grad_norm / sqrt(#parameters)`` (a tied parameter once, on its
    per-sample gradient summed over its units)."""

    name = "per_layer"

    def per_sample_norms(self, batch):
        return {p: per_sample_sq_norms(g).sqrt() for p, g in batch.materialised(batch.units).items()}

    def bound(self, batch, group):
        return self.max_grad_norm / math.sqrt(max(len(batch.uses), 1))

    def clipped_sum(self, batch, factors, noise, scale):
        return {
            p: noisy_clip_sum(g, factors[p].float(), noise, p, scale)
            for p, g in batch.materialised(batch.units).items()
        }


_STRATEGIES: dict[str, Callable[[float], ClippingStrategy]] = {}


def register_clipping(cls: type[ClippingStrategy]) -> type[ClippingStrategy]:
    """Class decorator: makes ``clipping=cls.name`` available to ``DifferentialPrivacy`` and ``clip_only``.

    Example:
        >>> @register_clipping
        ... class Loose(FlatClipping):
        ...     name = "loose"
        ...     def bound(self, batch, group):
        ...         return 2 * self.max_grad_norm
    """
    _STRATEGIES[cls.name] = cls
    return cls


for _cls in (FlatClipping, GhostClipping, PerLayerClipping):
    register_clipping(_cls)


def make_clipping(name: str, max_grad_norm: float, owner: str = "DifferentialPrivacy") -> ClippingStrategy:
    """The strategy for ``clipping=name``; ``ValueError`` naming ``owner`` and the known names otherwise.

    Example:
        >>> make_clipping("ghost", max_grad_norm=1.0)
        <deepseek_ext.privacy.clipping.GhostClipping object at ...>
    """
    if name not in _STRATEGIES:
        known = list(_STRATEGIES)
        names = ", ".join(repr(n) for n in known[:-1]) + f" or {known[-1]!r}" if len(known) > 1 else repr(known[0])
        raise ValueError(f"{owner}: clipping must be {names}, got {name!r}")
    return _STRATEGIES[name](max_grad_norm)
