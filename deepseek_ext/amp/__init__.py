"""Per-module-group mixed precision: :class:`AutoMixedPrecision`."""

from __future__ import annotations

from .mixed_precision import AutoMixedPrecision
from .patterns import matches

__all__ = ["AutoMixedPrecision", "matches"]
