"""Helpers shared across the package's rooms (no torch ops, no model-level state): module-name matching
(names.py) and integer weight storage (packing.py)."""

from __future__ import annotations

from .names import matches
from .packing import dequantize_weight, padded_k, unpack_codes

__all__ = ["matches", "padded_k", "unpack_codes", "dequantize_weight"]
