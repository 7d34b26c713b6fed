"""Quantized inference: linear layers against fp32 nn.Linear and PyTorch's own int8 dynamic quantization (fbgemm),
and a ResNet-50 at batch 1 (224 x 224) against fp32, with top-1 agreement between float and quantized predictions.
On CUDA: the quantized_linear op (W8A8, W4A8, W4 weight-only) against a bfloat16 matmul, with TFLOP/s."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from benchmarks.runner import Case
from deepseek_ext.quant import QuantConfig, Quantizer

LINEARS = [(4096, 4096), (4096, 11008)]  # (in, out)
QUICK_LINEARS = [(512, 512)]
BATCHES = [1, 64]
W8A8 = QuantConfig(weight_bits=8, activation_bits=8)
W4A8 = QuantConfig(weight_bits=4, activation_bits=8, group_size=128)
W4 = QuantConfig(weight_bits=4, activation_bits=None, group_size=128)


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 architecture with random weights (torchvision from PyPI does not import beside the CPU
    torch build, and nothing is downloaded)."""
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes)]
    return nn.Sequential(*layers)


def _ao_dynamic(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


CUDA_SHAPES = [(1, 4096, 4096), (16, 4096, 11008), (4096, 4096, 4096)]  # (batch, in, out)
CUDA_QUICK_SHAPES = [(1, 4096, 4096), (4096, 4096, 4096)]


def cuda_cases(quick: bool) -> list[Case]:
    from deepseek_ext.ops.quant import quantize_weight, quantized_linear

    out = []
    for m, k, n in CUDA_QUICK_SHAPES if quick else CUDA_SHAPES:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=g).cuda().bfloat16(), torch.randn(n, k, generator=g).cuda()
        wb = w.bfloat16().t()
        for name, bits, group, act_bits in [("w8a8", 8, 0, 8), ("w4a8", 4, 128, 8), ("w4 weight-only", 4, 128, 16)]:
            packed = quantize_weight(w, bits, group, True)
            out.append(
                Case(
                    family="quant",
                    op=f"qlinear {name}",
                    config=f"{k}x{n} batch {m}",
                    ours=functools.partial(quantized_linear, x, *packed, bits, group, k, act_bits),
                    baseline=functools.partial(torch.matmul, x, wb),
                    baseline_name="bf16 matmul",
                    extra={"flop": 2.0 * m * n * k},
                )
            )
    return out


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    if device == "cuda":
        return cuda_cases(quick)
    out = []
    for k, n in QUICK_LINEARS if quick else LINEARS:
        torch.manual_seed(0)
        linear = nn.Linear(k, n)
        ours = {
            name: Quantizer(nn.Sequential(linear), cfg).quantize()
            for name, cfg in [("w8a8", W8A8), ("w4a8", W4A8), ("w4 weight-only", W4)]
        }
        ao = _ao_dynamic(linear)
        for m in BATCHES:
            x = torch.randn(m, k)
            config = f"{k}x{n} batch {m}"
            with torch.no_grad():
                fp32 = functools.partial(linear, x)
                for name, model in ours.items():
                    out.append(
                        Case(
                            family="quant",
                            op=f"linear {name}",
                            config=config,
                            ours=functools.partial(model, x),
                            baseline=fp32,
                            baseline_name="fp32 nn.Linear",
                        )
                    )
                out.append(
                    Case(
                        family="quant",
                        op="linear w8a8",
                        config=config,
                        ours=functools.partial(ours["w8a8"], x),
                        baseline=functools.partial(ao, x),
                        baseline_name="torch.ao quantize_dynamic int8 (fbgemm)",
                    )
                )
    if not quick:
        torch.manual_seed(0)
        model = resnet50().eval()
        images = torch.randn(16, 3, 224, 224)
        x1 = images[:1]
        for name, cfg in [("W8A8", W8A8), ("W4A8", W4A8)]:
            qmodel = Quantizer(model, cfg).quantize().eval()
            with torch.no_grad():
                agree = (model(images).argmax(1) == qmodel(images).argmax(1)).float().mean().item()
            out.append(
                Case(
                    family="quant",
                    op=f"ResNet-50 {name}",
                    config="batch 1, 224x224",
                    ours=_no_grad(qmodel, x1),
                    baseline=_no_grad(model, x1),
                    baseline_name=f"fp32 eager; top-1 agreement {agree:.2f} on 16 inputs",
                    extra={"top1_agreement": agree},
                )
            )
    return out


def _no_grad(model, x):
    def run():
        with torch.no_grad():
            return model(x)

    return run
