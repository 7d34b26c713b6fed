"""Quantized inference: linear layers against fp32 nn.Linear and PyTorch's own int8 dynamic quantization (fbgemm);
ResNet-50 (224 x 224, batch 1 and 8) static int8 against fp32 eager and against PyTorch's own static int8
(torch.ao FX graph mode, 'x86' backend, calibrated on the same data), with the logits' SQNR of each against float;
a BERT-base-sized encoder with dynamic W8A8 against fp32.
On CUDA: the quantized_linear op (W8A8, W4A8, W4 weight-only) against a bfloat16 matmul, with TFLOP/s."""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from benchmarks.runner import Case
from deepseek_ext.quant import QuantConfig, Quantizer

LINEARS = [(4096, 4096), (4096, 11008)]  # (in, out)
QUICK_LINEARS = [(512, 512)]
BATCHES = [1, 8, 64]
W8A8 = QuantConfig(weight_bits=8, activation_bits=8)
W4A8 = QuantConfig(weight_bits=4, activation_bits=8, group_size=128)
W4 = QuantConfig(weight_bits=4, activation_bits=None, group_size=128)
STATIC8 = QuantConfig(weight_bits=8, activation_bits=8, method="static")
STATIC4 = QuantConfig(weight_bits=4, activation_bits=8, method="static")


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # one module used three times, as in torchvision
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


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
            fp32 = _no_grad(linear, x)  # every side without autograd, as in inference
            for name, model in ours.items():
                out.append(
                    Case(
                        family="quant",
                        op=f"linear {name}",
                        config=config,
                        ours=_no_grad(model, x),
                        baseline=fp32,
                        baseline_name="fp32 nn.Linear",
                    )
                )
            out.append(
                Case(
                    family="quant",
                    op="linear w8a8",
                    config=config,
                    ours=_no_grad(ours["w8a8"], x),
                    baseline=_no_grad(ao, x),
                    baseline_name="torch.ao quantize_dynamic int8 (fbgemm)",
                )
            )
    if not quick:
        out += resnet_cases()
        out += bert_cases()
    return out


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum())).item()


def _realistic_bn(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics in a trained network's range, so folding and calibration see real variety."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _ao_static(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[0],))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return convert_fx(prepared)


def resnet_cases() -> list[Case]:
    torch.manual_seed(0)
    model = _realistic_bn(resnet50())
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(4)]
    test = torch.randn(8, 3, 224, 224, generator=gen)
    ao = _ao_static(model, calib)
    ours = {}
    for name, cfg in [("W8A8 static", STATIC8), ("W4A8 static", STATIC4)]:
        quantizer = Quantizer(model, cfg)
        ours[name] = quantizer.quantize()
        quantizer.calibrate(calib, len(calib), model=ours[name])
    with torch.no_grad():
        ref = model(test)
        sqnr = {name: _sqnr_db(ref, m(test)) for name, m in ours.items()}
        sqnr_ao = _sqnr_db(ref, ao(test))
    out = []
    for batch in (1, 8):
        x = test[:batch]
        for name, qmodel in ours.items():
            note = f"SQNR {sqnr[name]:.1f} dB (torch.ao {sqnr_ao:.1f} dB)"
            out.append(Case("quant", f"ResNet-50 {name}", f"batch {batch}, 224x224", _no_grad(qmodel, x),
                            _no_grad(model, x), f"fp32 eager; {note}", extra={"sqnr_db": sqnr[name]}))  # fmt: skip
            out.append(Case("quant", f"ResNet-50 {name}", f"batch {batch}, 224x224", _no_grad(qmodel, x),
                            _no_grad(ao, x), f"torch.ao int8 (FX, x86, calibrated); {note}",
                            extra={"sqnr_db": sqnr[name], "peer_sqnr_db": sqnr_ao}))  # fmt: skip
    return out


def bert_cases() -> list[Case]:
    """A BERT-base-sized encoder (12 x 768, seq 128, batch 8), random weights from a config (no download)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    model = BertModel(cfg).eval()
    qmodel = Quantizer(model, W8A8).quantize().eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, qmodel(ids).last_hidden_state
    note = f"fp32 eager; SQNR {_sqnr_db(a, b):.1f} dB"

    def run(m):
        def f():
            with torch.no_grad():
                return m(ids).last_hidden_state

        return f

    return [Case("quant", "BERT-base W8A8", "12x768, seq 128, batch 8", run(qmodel), run(model), note)]


def _no_grad(model, x):
    def run():
        with torch.no_grad():
            return model(x)

    return run
