"""The C++ argument checks (csrc/checks.cpp and each op's *_checks.cpp) restated for the fake kernels, with the same
messages and exception types, so an op called eagerly and the same op traced by ``torch.compile`` fail alike."""

from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def dtype_list(dtypes) -> str:
    """``'torch.float32, torch.float16 or torch.bfloat16'``, as the C++ ``dtype_list``."""
    names = [dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_dtype(op: str, arg: str, t: torch.Tensor, allowed) -> None:
    torch._check_type(
        t.dtype in allowed,
        lambda: f"{op}: expected {arg} to have dtype {dtype_list(allowed)}, but got {dtype_name(t.dtype)}",
    )


def check_dtype_value(op: str, arg: str, dtype: torch.dtype, allowed) -> None:
    """A dtype argument (not a tensor's): ``op: expected arg to be ..., but got ...``."""
    torch._check_type(
        dtype in allowed, lambda: f"{op}: expected {arg} to be {dtype_list(allowed)}, but got {dtype_name(dtype)}"
    )


def check_same_device(op: str, arg_a: str, a: torch.Tensor, arg_b: str, b: torch.Tensor) -> None:
    torch._check(
        a.device == b.device,
        lambda: f"{op}: expected {arg_a} and {arg_b} to be on the same device, but got {_device(a)} and {_device(b)}",
    )


def _device(t: torch.Tensor) -> str:
    return str(t.device)


def sizes(shape) -> str:
    """A shape as C++ prints ``IntArrayRef``: ``[2, 3]``."""
    return str(list(shape))
