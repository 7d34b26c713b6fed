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
from . import ghost, grad_sample
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
        grad_scale: the factor that turns the recorded output gradients into those of the per-sample losses (the
            batch size under a mean loss). Per-sample gradients are linear in the output gradients, so strategies
            apply it to norms (``* grad_scale``) and clip factors (``* grad_scale``) instead of to every gradient.
    """

    units: list[tuple[Unit, list[Record]]]
    uses: dict[nn.Parameter, int]
    batch_size: int
    grad_scale: float = 1.0
    _per_sample: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_units(cls, units: list[Unit]) -> CapturedBatch:
        uses: dict[nn.Parameter, int] = {}
        for u in units:
            for p in u.params:
                uses[p] = uses.get(p, 0) + 1
        live = [(u, rs) for u in units if (rs := [r for r in u.records if _arrived(r)])]
        records = [r for _, rs in live for r in rs]
        scales = {r.scale for r in records}
        if len(scales) > 1:  # forwards of different batch sizes under a mean loss: rescale them to one scale
            for r in records:
                r.grad_outputs = [None if g is None else g * r.scale for g in r.grad_outputs]
                if r.ready is not None:
                    r.ready = {p: _per_sample(v) * r.scale for p, v in r.ready.items()}
                r.scale = 1.0
            scales = {1.0}
        scale = scales.pop() if scales else 1.0
        return cls(live, uses, max((r.batch_size for r in records), default=0), scale)

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
            if r.ready is not None:  # computed in the backward
                _add_into(total, {p: _per_sample(v) for p, v in r.ready.items()})
                continue
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


def _arrived(r: Record) -> bool:
    return r.ready is not None or any(g is not None for g in r.grad_outputs)


def _per_sample(v) -> torch.Tensor:
    """A per-sample gradient, or a ghost term's."""
    return v if isinstance(v, torch.Tensor) else v.per_sample()


def materialise_early(unit: Unit, record: Record) -> None:
    """Per-sample gradients of a record as soon as its gradients arrive (units with a grad sampler; the torch.func
    fallback waits for the step), so the backward can free its activations and output gradients."""
    if grad_sample.has_sampler(unit.module) and all(g is not None for g in record.grad_outputs[:1]):
        record.ready = grad_sample.per_sample_grads(unit.module, record.activations, tuple(record.grad_outputs))
        record.activations, record.grad_outputs = (), []


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
        """``{group: (B,) per-sample L2 norms}``, one entry per clip group, of the gradients as recorded (``clip``
        multiplies them by ``batch.grad_scale``)."""

    def bound(self, batch: CapturedBatch, group: Hashable) -> float:
        """The clipping bound of ``group`` (``max_grad_norm`` unless a strategy splits it)."""
        return self.max_grad_norm

    @abstractmethod
    def clipped_sum(
        self, batch: CapturedBatch, factors: dict[Hashable, torch.Tensor], noise: GaussianNoise | None, scale: float
    ) -> dict[nn.Parameter, torch.Tensor]:
        """``{param: (sum_i factors[group(param)]_i * g_i + noise of param) * scale}`` over the gradients as
        recorded (``clip`` passes factors multiplied by ``batch.grad_scale``)."""

    def on_gradients(self, unit: Unit, record: Record) -> None:
        """Called in the backward once a record's output gradients have arrived: work that needs no other record
        (and may drop the record's activations) goes here. Nothing by default."""
        return None

    def clip(self, batch: CapturedBatch, noise: GaussianNoise | None = None, scale: float = 1.0) -> Clipped:
        gs = batch.grad_scale
        norms = {g: n * gs for g, n in self.per_sample_norms(batch).items()}
        factors = {g: clip_factors(n, self.bound(batch, g)) for g, n in norms.items()}
        # the sums see the recorded (unscaled) gradients: the factors carry the scale
        sums = self.clipped_sum(batch, {g: f * gs for g, f in factors.items()}, noise, scale)
        return Clipped(sums, factors)


class FlatClipping(ClippingStrategy):
    """One norm per example over every parameter; per-sample gradients materialised, then one fused
    clip/sum/noise op per parameter (it reads each per-sample gradient once)."""

    name = "flat"

    def on_gradients(self, unit, record):
        materialise_early(unit, record)

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
    """As ``FlatClipping`` (same result), but every unit with a ghost rule (``ghost.py``: Linear, convolutions,
    Embedding, LayerNorm/GroupNorm, nn.MultiheadAttention, transformers' Conv1D, ``register_ghost_rule``,
    ``register_norm_sampler``) gets its per-sample norms and clipped sum from its inputs and output gradients; its
    per-sample gradients are held only where they are no larger than those (then the clipped sum is the fused
    reduction). Reused layers and tied parameters merge their terms; units without a rule are materialised, named
    in a one-time warning."""

    name = "ghost"

    def __init__(self, max_grad_norm: float):
        super().__init__(max_grad_norm)
        self._batch: CapturedBatch | None = None
        self._terms: dict = {}
        self._rest: list = []

    def on_gradients(self, unit, record):
        """A record's terms as its gradients arrive; those that hold per-sample gradients (no larger than the
        activations) compute them now, so the record's activations and output gradients can go."""
        terms = ghost.record_terms(unit.module, record)
        if terms is not None:
            record.ready = terms
            record.activations, record.grad_outputs = (), []

    def _split(self, batch: CapturedBatch):
        """``({param: term}, units to materialise)``, computed once per batch."""
        if self._batch is batch:
            return self._terms, self._rest
        terms, rest = {}, []
        for u, rs in batch.units:
            unit_terms = ghost.terms_for_unit(u.module, rs, batch.alone(u, rs))
            if unit_terms is None:
                ghost.warn_materialised(u.module, u.name)
                rest.append((u, rs))
                continue
            for p, t in unit_terms.items():
                terms[p] = t if p not in terms else terms[p].merge(t)
        # a parameter shared with a materialised unit: materialise the ghost units holding it too (until none is)
        while tied := {p for p in batch.materialised(rest) if p in terms}:
            for u, rs in batch.units:
                if all(u is not v for v, _ in rest) and any(p in tied for p in u.params):
                    rest.append((u, rs))
                    for p in u.params:
                        terms.pop(p, None)
        self._batch, self._terms, self._rest = batch, terms, rest
        return terms, rest

    def per_sample_norms(self, batch):
        terms, rest = self._split(batch)
        sq = torch.zeros(batch.batch_size, dtype=torch.float32)
        for t in terms.values():
            sq = sq + t.sq_norms().float().cpu()
        for g in batch.materialised(rest).values():
            sq = sq + per_sample_sq_norms(g).float().cpu()
        return {ALL: sq.sqrt()}

    def clipped_sum(self, batch, factors, noise, scale):
        terms, rest = self._split(batch)
        self._batch, self._terms, self._rest = None, {}, []  # nothing of the batch outlives its step
        f = factors[ALL]
        sums = {p: noisy_clip_sum(g, f.to(g.device), noise, p, scale) for p, g in batch.materialised(rest).items()}
        for p, t in terms.items():
            held = t.held()
            if held is not None:  # per-sample gradients already exist: the fused reduction
                sums[p] = noisy_clip_sum(held, f.to(held.device), noise, p, scale)
            else:
                sums[p] = with_noise(t.clipped_sum(f.to(p.device)), p, noise, scale)
        return sums


class PerLayerClipping(ClippingStrategy):
    """Each parameter clipped on its own to ``max_grad_norm / sqrt(#parameters)`` (a tied parameter once, on its
    per-sample gradient summed over its units)."""

    name = "per_layer"

    def on_gradients(self, unit, record):
        materialise_early(unit, record)

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
