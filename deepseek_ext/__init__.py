"""deepseek-ext: drop-in PyTorch extensions in C++ and CUDA.

Operators live in PyTorch's dispatcher under ``torch.ops.deepseek_ext`` and are wrapped, with documentation
and type hints, in :mod:`deepseek_ext.ops`. ``capabilities()`` tells what this build contains.
"""

from __future__ import annotations

from . import ops
from ._native import LOAD_ERROR, NATIVE_AVAILABLE, capabilities, capped_cpu_isa, cpu_isa, set_cpu_isa_cap

__version__ = "0.1.0"

__all__ = [
    "ops",
    "capabilities",
    "cpu_isa",
    "set_cpu_isa_cap",
    "capped_cpu_isa",
    "NATIVE_AVAILABLE",
    "LOAD_ERROR",
    "__version__",
]
