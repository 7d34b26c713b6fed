"""Inference serving: :class:`DynamicBatcher` (a C++ request queue whose batch size follows the load) and a reference
HTTP server (``python -m deepseek_ext.serving``, in :mod:`deepseek_ext.serving.server`; it needs the optional
``serving`` extra: starlette and uvicorn).

Nothing here imports the HTTP stack: ``import deepseek_ext.serving`` works without it.
"""

from __future__ import annotations

from .batcher import DynamicBatcher
from .collate import index_split, pad_collate, stack_collate, stack_key, unpad_split
from .errors import BatcherClosed, QueueFull, RequestTimeout
from .model import ServedModel

__all__ = [
    "DynamicBatcher",
    "QueueFull",
    "RequestTimeout",
    "BatcherClosed",
    "stack_collate",
    "index_split",
    "stack_key",
    "pad_collate",
    "unpad_split",
    "ServedModel",
]
