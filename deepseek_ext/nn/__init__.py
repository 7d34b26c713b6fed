"""Drop-in modules: :class:`FP8Linear` and :func:`convert_to_fp8`."""

from __future__ import annotations

from .fp8 import FP8Linear, convert_to_fp8

__all__ = ["FP8Linear", "convert_to_fp8"]
