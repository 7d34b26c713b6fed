"""Data utilities: :class:`DynamicSampler`, a C++-backed batch sampler with a steerable, adaptive class mix."""

from __future__ import annotations

from .sampler import DynamicSampler

__all__ = ["DynamicSampler"]
