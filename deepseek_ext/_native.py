"""Loading of the native module ``deepseek_ext._C`` and what the build contains.

Importing ``_C`` runs the static initialisers of the shared library, which register every
``torch.ops.deepseek_ext.*`` operator with PyTorch's dispatcher. A failed load (a build for another torch, a
missing CUDA runtime) must never break ``import deepseek_ext``: it gives one warning, and each op then raises
an error that repeats the reason.
"""

from __future__ import annotations

import warnings
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


def capabilities() -> dict[str, Any]:
    """What this build of deepseek_ext contains and can run here.

    Returns:
        A dict with
        ``native`` (bool): whether ``deepseek_ext._C`` loaded (``native_error`` says why not);
        ``torch_built`` / ``torch_runtime``: the torch version compiled against and the one imported now;
        ``cpu`` (bool): CPU kernels present; ``cuda`` (bool): CUDA kernels compiled in;
        ``cuda_version`` and ``cuda_archs`` (list of str, e.g. ``['8.0', '9.0a']``) of the CUDA build;
        ``cuda_available`` (bool): a CUDA device is usable right now;
        ``ops``: ``{name: {'cpu': bool, 'cuda': bool}}``, the kernels registered per operator.

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
    if not NATIVE_AVAILABLE:
        caps.update(torch_built=None, cpu=False, cuda=False, cuda_version=None, cuda_archs=[], ops={})
        return caps
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
    )
    return caps
