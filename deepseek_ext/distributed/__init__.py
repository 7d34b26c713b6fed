"""ZeRO-3 sharding over torch.distributed (:class:`ZeRO3`) and elastic, checksummed checkpoints
(:class:`CheckpointManager`, :func:`consolidate`)."""

from __future__ import annotations

from .checkpoint import CheckpointManager, consolidate, verify
from .zero3 import ZeRO3

__all__ = ["ZeRO3", "CheckpointManager", "consolidate", "verify"]
