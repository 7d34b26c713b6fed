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
