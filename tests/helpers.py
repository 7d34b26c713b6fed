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
class _BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(torch.nn.Module):
    """torchvision's ResNet-18 architecture (random weights), defined here: PyPI's torchvision does not import
    beside the CPU torch build."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet18:
    return ResNet18(num_classes)
