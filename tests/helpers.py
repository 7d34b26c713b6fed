"""Helpers shared by the test modules: devices, dtype sets, and awkward-size input factories."""

from __future__ import annotations

import pytest
import torch

# Every op test is parametrised over these; the CUDA case carries the `cuda` marker (`pytest -m cuda`).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spread_randn(shape, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """Gaussian values whose magnitude varies by orders of magnitude along the first dimension, so that
    per-row and per-block scales differ and small values reach the FP8 subnormal range."""
    x = torch.randn(shape, generator=generator)
    if x.dim() >= 1 and x.numel():
        exps = torch.randint(-4, 5, (x.shape[0],), generator=generator).float()
        x = x * torch.pow(10.0, exps).view(-1, *([1] * (x.dim() - 1)))
    return x.to(dtype=dtype, device=device)


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of float16 or bfloat16 (infinities and NaNs included) as a (256, 256) tensor whose
    row index is the high byte, so each row spans one sign and a narrow band of exponents."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    order = (bits.to(torch.int32) & 0xFFFF).argsort()
    return bits[order].view(dtype).view(256, 256)


# ---------------------------------------------------------------------------------------------------- models
# ResNet-18 (torchvision's architecture, random weights) lives with the examples, which use it for latency. Loaded by
# path: `examples` is not a package of this project (and some PyPI packages install a top-level one).
def _load_examples_common():
    import importlib.util
    import sys
    from pathlib import Path

    name = "deepseek_ext_examples_common"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "examples" / "_common.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ResNet18 = _load_examples_common().ResNet18
resnet18 = _load_examples_common().resnet18


# ----------------------------------------------------------------------------------------------- isolation
def run_isolated(fn, timeout: float = 120.0, allow_exit: bool = False):
    """Runs ``fn()`` in a forked child, so that a crash (a signal) or a hang fails the calling test instead of
    killing or stalling pytest. Returns ``("ok", fn())`` or ``("raised", exception)`` (the exception rebuilt in the
    parent: same type for built-in ones, with the message); ``fn``'s result travels back through ``torch.save``.

    The child runs single-threaded (``torch.set_num_threads(1)``): OpenMP thread pools do not survive a fork. With
    ``allow_exit``, a child that leaves through ``os._exit(code)`` (a simulated kill) returns ``("exit", code)``.
    """
    import io
    import os
    import select
    import signal
    import time
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            torch.set_num_threads(1)
            try:
                out = ("ok", fn())
            except BaseException as e:  # noqa: B036 - everything goes back to the parent
                out = ("raised", e, type(e).__module__, type(e).__name__, str(e), traceback.format_exc())
            buf = io.BytesIO()
            try:
                torch.save(out, buf)
            except Exception:  # an exception object that does not pickle: its type name and message
                buf = io.BytesIO()
                torch.save(("raised", None, *out[2:]), buf)
            data = buf.getvalue()
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                view = view[n:]
        except BaseException:  # noqa: B036
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the call did not finish within {timeout:.0f} s (a hang)")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                block = os.read(r, 1 << 20)
                if not block:
                    break
                chunks.append(block)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the call crashed: the child process was killed by {signal.Signals(os.WTERMSIG(status)).name}")
    if allow_exit and not chunks:
        return ("exit", os.WEXITSTATUS(status))
    if os.WEXITSTATUS(status) != 0 or not chunks:
        pytest.fail(f"the child process exited with status {os.WEXITSTATUS(status)} without a result")
    out = torch.load(io.BytesIO(b"".join(chunks)), weights_only=False)
    if out[0] == "ok":
        return out
    _, exc, module, name, message, tb = out
    if exc is None:
        import builtins

        cls = getattr(builtins, name, None) if module == "builtins" else None
        builtin = isinstance(cls, type) and issubclass(cls, BaseException)
        exc = cls(message) if builtin else RuntimeError(f"{module}.{name}: {message}")
    exc.child_traceback = tb
    return ("raised", exc)


def assert_clear_error(outcome, op: str, args) -> None:
    """``outcome`` (from :func:`run_isolated`) is a TypeError or ValueError whose message names ``op`` and one of the
    argument names ``args``."""
    assert outcome[0] == "raised", f"{op}: expected a TypeError/ValueError naming {args}, but the call succeeded"
    exc = outcome[1]
    message = str(exc)
    tb = getattr(exc, "child_traceback", "")
    assert isinstance(exc, (TypeError, ValueError)), f"{op}: expected TypeError/ValueError, got {exc!r}\n{tb}"
    assert op in message, f"the message does not name the op {op!r}: {message}"
    args = (args,) if isinstance(args, str) else tuple(args)
    assert any(a in message for a in args), f"the message names none of {args}: {message}"


def result_of(outcome):
    """The value of a successful :func:`run_isolated` call; fails with the child's traceback otherwise."""
    if outcome[0] != "ok":
        exc = outcome[1]
        pytest.fail(f"valid arguments raised {type(exc).__name__}: {exc}\n{getattr(exc, 'child_traceback', '')}")
    return outcome[1]
