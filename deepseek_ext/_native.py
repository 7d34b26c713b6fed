"""Loading of the native module ``deepseek_ext._C`` and what the build contains.

Importing ``_C`` runs the static initialisers of the shared library, which register every
``torch.ops.deepseek_ext.*`` operator with PyTorch's dispatcher. A failed load (a build for another torch, a
missing CUDA runtime) must never break ``import deepseek_ext``: it gives one warning, and each op then raises
an error that repeats the reason.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Iterator
from typing import Any

import torch

_REBUILD_HINT = "pip install --no-build-isolation --no-deps --force-reinstall deepseek-ext (or `make build` in a clone)"

_C: Any | None
LOAD_ERROR: BaseException | None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]

    LOAD_ERROR = None
except (ImportError, OSError) as exc:  # pragma: no cover - exercised in a subprocess by tests/test_native.py
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"deepseek_ext: the native module failed to load ({exc}). torch.ops.deepseek_ext.* is unavailable. "
        f"This torch is {torch.__version__}; rebuild against it with: {_REBUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )

NATIVE_AVAILABLE: bool = _C is not None


def require_native(op: str) -> None:
    """Raises a RuntimeError naming ``op`` and the load error when the native module is missing."""
    if not NATIVE_AVAILABLE:
        raise RuntimeError(
            f"deepseek_ext.{op} needs the native module, which failed to load: {LOAD_ERROR}. Rebuild: {_REBUILD_HINT}"
        )


def registered_ops() -> list[str]:
    """Names of the operators this build registered under torch.ops.deepseek_ext."""
    prefix = "deepseek_ext::"
    return sorted(name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


CPU_ISA_LEVELS = ("scalar", "avx2", "avx512", "amx")


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels use now: ``'scalar'``, ``'avx2'``, ``'avx512'`` or ``'amx'``.

    It is the best level this CPU supports, capped by the environment variable ``DEEPSEEK_EXT_CPU_ISA`` (read on the
    first kernel call) or by :func:`set_cpu_isa_cap`. ``'avx512'`` kernels also use AVX512-VNNI and AVX512-BF16
    where the CPU has them (``capabilities()['cpu_features']``); ``'amx'`` reaches AMX through PyTorch's oneDNN
    micro-kernels.

    Example:
        >>> import deepseek_ext
        >>> deepseek_ext.cpu_isa() in ("scalar", "avx2", "avx512", "amx")
        True
    """
    require_native("cpu_isa")
    return _C.cpu_isa()[0]


def set_cpu_isa_cap(level: str | None) -> None:
    """Caps the instruction-set level of the CPU kernels (``None``: no cap). Takes effect on the next call.

    Args:
        level: ``'scalar'``, ``'avx2'``, ``'avx512'``, ``'amx'`` or ``None``. A level above what the CPU supports
            is allowed and changes nothing.

    Raises:
        ValueError: for any other name.

    Example:
        >>> import deepseek_ext
        >>> deepseek_ext.set_cpu_isa_cap("avx2"); deepseek_ext.cpu_isa() in ("scalar", "avx2")
        True
        >>> deepseek_ext.set_cpu_isa_cap(None)
    """
    require_native("set_cpu_isa_cap")
    if level is not None and not isinstance(level, str):
        raise TypeError(f"set_cpu_isa_cap: expected a level name or None, but got {type(level).__name__}")
    _C.set_cpu_isa_cap("amx" if level is None else level)


@contextlib.contextmanager
def capped_cpu_isa(level: str | None) -> Iterator[str]:
    """Context manager: runs the block with the CPU kernels capped at ``level`` and restores the previous cap.
    Yields the level in effect. The cap is process-wide (not per thread).

    Example:
        >>> import deepseek_ext, torch
        >>> with deepseek_ext.capped_cpu_isa("scalar") as level:
        ...     level
        'scalar'
    """
    require_native("capped_cpu_isa")
    previous = _C.cpu_isa()[2]
    set_cpu_isa_cap(level)
    try:
        yield cpu_isa()
    finally:
        _C.set_cpu_isa_cap(previous)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for benchmark reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capabilities() -> dict[str, Any]:
    """What this build of deepseek_ext contains and can run here.

    Returns:
        A dict with
        ``native`` (bool): whether ``deepseek_ext._C`` loaded (``native_error`` says why not);
        ``torch_built`` / ``torch_runtime``: the torch version compiled against and the one imported now;
        ``cpu`` (bool): CPU kernels present; ``cuda`` (bool): CUDA kernels compiled in;
        ``cuda_version`` and ``cuda_archs`` (list of str, e.g. ``['8.0', '9.0a']``) of the CUDA build;
        ``cuda_available`` (bool): a CUDA device is usable right now;
        ``ops``: ``{name: {'cpu': bool, 'cuda': bool}}``, the kernels registered per operator;
        ``cpu_model`` (str); ``cpu_isa`` (the level the CPU kernels use now, see :func:`cpu_isa`),
        ``cpu_isa_detected`` (the CPU's best level, without the cap) and ``cpu_features`` (e.g. ``['avx2',
        'avx512', 'avx512_vnni', 'avx512_bf16']``); ``cpu_paths``: ``{op family: {case: path}}``, which kernel
        each op family runs at the current level.

    Example:
        >>> import deepseek_ext
        >>> deepseek_ext.capabilities()["cpu"]
        True
    """
    caps: dict[str, Any] = {
        "native": NATIVE_AVAILABLE,
        "native_error": None if LOAD_ERROR is None else str(LOAD_ERROR),
        "torch_runtime": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    caps["cpu_model"] = cpu_model()
    if not NATIVE_AVAILABLE:
        caps.update(torch_built=None, cpu=False, cuda=False, cuda_version=None, cuda_archs=[], ops={})
        return caps
    level, detected, _cap, features = _C.cpu_isa()
    ops = {
        name: {
            key.lower(): torch._C._dispatch_has_kernel_for_dispatch_key(f"deepseek_ext::{name}", key)
            for key in ("CPU", "CUDA")
        }
        for name in registered_ops()
    }
    caps.update(
        torch_built=_C.TORCH_VERSION,
        cpu=any(k["cpu"] for k in ops.values()),
        cuda=bool(_C.WITH_CUDA),
        cuda_version=_C.CUDA_VERSION or None,
        cuda_archs=[a for a in _C.CUDA_ARCHS.replace(",", ";").replace(" ", ";").split(";") if a],
        ops=ops,
        cpu_isa=level,
        cpu_isa_detected=detected,
        cpu_features=list(features),
        cpu_paths=_C.cpu_paths(),
    )
    return caps
