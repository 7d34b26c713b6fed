"""The static int8 path: quantized_conv2d and the code ops against float64 references of the same integer
arithmetic, the fused graph (BatchNorm folding, residual adds), calibration, save/load and torch.compile."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepseek_ext
from deepseek_ext.ops import quant as ops
from deepseek_ext.quant import QuantConfig, Quantizer
from deepseek_ext.quant.graph import StaticQuantizedModel, fuse
from deepseek_ext.reference import quant as ref
from tests.ops.conftest import LEVELS


def _codes(n, h, w, c, zero, gen):
    cp = -(-c // 8) * 8
    x = torch.randint(0, 128, (n, h, w, cp), generator=gen, dtype=torch.uint8)
    x[..., c:] = zero
    return x


def _packed_conv(cout, cin, kh, kw, bits, gen, symmetric=True):
    cp = -(-cin // 8) * 8
    w = torch.randn(cout, kh, kw, cin, generator=gen)
    w = F.pad(w, (0, cp - cin)).reshape(cout, kh * kw * cp)
    codes, scales, zeros = ops.quantize_weight(w, bits, 0, symmetric)
    k = kh * kw * cp
    rows = ref.unpack_codes(codes, bits)[:, :k]
    packed = ops.pack_quantized_weight(codes, bits, 0, k)
    return codes, packed, scales[:, 0].contiguous(), rows.sum(1, dtype=torch.int32), zeros[:, 0].contiguous()


CONV_CASES = [
    # (n, h, w, cin, cout, kernel, stride, padding, dilation)
    (1, 7, 9, 3, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 11, 11, 16, 70, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 13, 12, 24, 64, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 15, 15, 8, 33, (7, 7), (2, 2), (3, 3), (1, 1)),
    (1, 9, 10, 16, 20, (3, 3), (1, 1), (2, 2), (2, 2)),
    (3, 5, 5, 40, 130, (1, 1), (2, 2), (0, 0), (1, 1)),
    (1, 6, 7, 5, 9, (3, 1), (1, 2), (1, 0), (1, 1)),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (8, False), (4, False)], ids=str)
@pytest.mark.parametrize("epilogue", ["plain", "relu", "residual", "float"])
def test_quantized_conv2d_matches_the_integer_reference(case, bits, symmetric, epilogue, level):
    """At every CPU level this machine has (each has its own integer kernels and epilogue primitives); asymmetric
    weights take the per-row code sums (8 bits) or are centred on their zero points (4 bits)."""
    with deepseek_ext.capped_cpu_isa(level):
        _check_conv_against_reference(case, bits, symmetric, epilogue)


def _check_conv_against_reference(case, bits, symmetric, epilogue):
    n, h, w, cin, cout, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(sum(case[:5]) + bits)
    x = _codes(n, h, w, cin, 64, gen)
    codes, packed, ws, wsum, wz = _packed_conv(cout, cin, *kernel, bits, gen, symmetric)
    assert symmetric or bool((wz != 0).any())
    bias = torch.randn(cout, generator=gen)
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    res = _codes(n, ho, wo, cout, 60, gen) if epilogue == "residual" else None
    # Output scale from the float result, so codes use their range.
    kw = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, out_channels=cout, bits=bits,
              in_scale=0.02, in_zero=64, relu=epilogue == "relu", residual=res, res_scale=0.05,
              res_zero=60)  # fmt: skip
    yf = ref.quantized_conv2d(x, codes, ws, wz, bias, output_float=True, **kw)
    out_scale = float(yf.abs().max()) / 63 if epilogue != "relu" else float(yf.max()) / 127
    out_zero = 0 if epilogue == "relu" else 64
    want = ref.quantized_conv2d(x, codes, ws, wz, bias, out_scale=out_scale, out_zero=out_zero, **kw)
    args = (x, packed, ws, wsum, wz, bias, kernel, stride, padding, dilation, cout, bits, 0.02, 64)
    extra = dict(relu=kw["relu"], residual=res, res_scale=0.05, res_zero=60)
    if epilogue == "float":
        got = ops.quantized_conv2d(*args, output_float=True, **extra)
        assert got.shape == (n, cout, ho, wo)
        torch.testing.assert_close(got.double(), yf, rtol=1e-5, atol=1e-4)
        return
    got = ops.quantized_conv2d(*args, out_scale, out_zero, **extra)
    assert got.shape == want.shape and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float32 vs float64 rounding at ties only


@pytest.mark.parametrize("level", LEVELS)
def test_code_ops_match_references_at_every_level(level):
    """Max pooling (vector slices, overlapping tails), input quantisation (vectors straight from NCHW) and the
    first-layer patches against plain PyTorch, at every CPU level: channel counts below, at and past a vector,
    odd spatial sizes, padding, dilation, ceil_mode."""
    gen = torch.Generator().manual_seed(1)
    with deepseek_ext.capped_cpu_isa(level):
        for c, kernel, stride, pad, ceil in [(72, 3, 2, 1, False), (136, 2, 1, 0, True), (8, 3, 2, 1, True),
                                             (64, 3, 1, 1, False)]:  # fmt: skip
            x = _codes(2, 9, 7, c, 0, gen)
            xf = x.double().permute(0, 3, 1, 2)
            got = ops.quantized_max_pool2d(x, (kernel, kernel), (stride, stride), (pad, pad), ceil_mode=ceil)
            want = F.max_pool2d(xf, kernel, stride, pad, ceil_mode=ceil).permute(0, 2, 3, 1).to(torch.uint8)
            assert torch.equal(got, want), (c, kernel, stride, pad, ceil)
        for shape in [(2, 3, 7, 9), (1, 70, 5, 3), (3, 5), (2, 17, 1, 1)]:
            f = torch.randn(shape, generator=gen) * 2
            codes = ops.quantize_activation(f, 0.05, 64)
            want = torch.round(f.double() / 0.05 + 64).clamp(0, 127)
            want = want.permute(0, 2, 3, 1) if f.dim() == 4 else want
            c = f.shape[1]
            assert torch.equal(codes[..., :c], want.to(torch.uint8)), shape
            assert (codes[..., c:] == 64).all()
            bad = f.clone().flatten()
            bad[bad.numel() // 2] = float("inf")
            with pytest.raises(ValueError, match="non-finite"):
                ops.quantize_activation(bad.view(shape), 0.05, 64)
        for c, kernel, stride, pad, dil in [(3, 7, 2, 3, 1), (5, 3, 1, 2, 2), (8, 3, 2, 1, 1), (40, 2, 1, 1, 1),
                                            (3, 5, 3, 0, 1)]:  # fmt: skip
            x = _codes(2, 11, 10, c, 9, gen)
            got = ops.quantized_im2col(x, (kernel, kernel), (stride, stride), (pad, pad), (dil, dil), c, 9)
            xf = F.pad(x[..., :c].permute(0, 3, 1, 2).double(), (pad,) * 4, value=9)
            cols = F.unfold(xf, kernel, dilation=dil, stride=stride)  # (N, C * taps, L), channel-major
            n, ho, wo, _ = got.shape
            want = cols.view(n, c, kernel * kernel, ho * wo).permute(0, 3, 2, 1).reshape(n, ho, wo, -1)
            k = kernel * kernel * c
            assert torch.equal(got[..., :k], want.to(torch.uint8)), (c, kernel, stride, pad, dil)
            assert (got[..., k:] == 9).all()


def test_code_ops_match_references():
    gen = torch.Generator().manual_seed(0)
    x = _codes(2, 9, 11, 24, 0, gen)
    xf = x[..., :24].double().permute(0, 3, 1, 2)
    got = ops.quantized_max_pool2d(x, (3, 3), (2, 2), (1, 1))
    want = F.max_pool2d(xf, 3, 2, 1).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(got[..., :24], want)
    for size in [(1, 1), (2, 3)]:
        got = ops.quantized_adaptive_avg_pool2d(x, size, 0.1, 0, 0.05, 3)
        want = torch.round(F.adaptive_avg_pool2d(xf * 0.1, size) / 0.05 + 3).clamp(0, 127).permute(0, 2, 3, 1)
        assert (got[..., :24].int() - want.int()).abs().max() <= 1
    a, b = _codes(1, 4, 4, 16, 64, gen), _codes(1, 4, 4, 16, 60, gen)
    got = ops.quantized_add(a, 0.1, 64, b, 0.2, 60, 0.3, 64, relu=True)
    want = torch.round(((0.1 * (a.double() - 64) + 0.2 * (b.double() - 60)).clamp_min(0)) / 0.3 + 64).clamp(0, 127)
    assert (got.int() - want.int()).abs().max() <= 1
    f = torch.randn(2, 5, 3, 3)
    codes = ops.quantize_activation(f, 0.05, 64)
    assert codes.shape == (2, 3, 3, 8) and (codes[..., 5:] == 64).all()
    back = ops.dequantize_activation(codes, 0.05, 64, 5)
    assert back.shape == f.shape and (back - f.clamp(-3.2, 3.15)).abs().max() <= 0.025 + 1e-6
    with pytest.raises(ValueError, match="quantize_activation: x has non-finite values"):
        ops.quantize_activation(torch.tensor([[1.0, float("nan")]]), 0.1, 64)
    with pytest.raises(ValueError, match="expected x_scale to be positive and finite"):
        ops.quantize_activation(f, 0.0, 64)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.layers(self.pool(self.stem(x))))


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _sqnr(a, b):
    return (10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum())).item()


def test_fusion_folds_batchnorm_exactly_and_keeps_the_function():
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet())
    gm, fallbacks = fuse(model, lambda name: False)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert "BatchNorm2d" not in kinds and "ReLU" not in kinds and fallbacks == {}
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_static_graph_model_end_to_end(bits, tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet())
    data = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    quantizer = Quantizer(model, QuantConfig(weight_bits=bits, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    assert isinstance(qmodel, StaticQuantizedModel)
    with pytest.raises(RuntimeError, match="needs Quantizer.calibrate"):
        qmodel(data[0])
    scales = quantizer.calibrate(data, num_batches=4, model=qmodel)
    assert scales and all(s > 0 for s in scales.values())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want, got = model(x), qmodel(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _sqnr(want, got) > (25 if bits == 8 else 12)
    kinds = {type(m).__name__ for m in qmodel.int8.modules()}
    assert {"QuantizedConvNode", "_MaxPool", "_AdaptiveAvgPool", "_Flatten", "_Quantize"} <= kinds
    assert "_Dequantize" not in kinds  # the last layer writes floats itself
    # save / load into a freshly quantized (uncalibrated) model
    torch.save(qmodel.state_dict(), tmp_path / "q.pt")
    fresh = Quantizer(model, QuantConfig(weight_bits=bits, activation_bits=8, method="static")).quantize()
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=False))
    assert torch.equal(fresh(x), got)
    # one sample alone gives the same result as in its batch
    assert torch.equal(qmodel(x[1:2]), got[1:2])


def test_static_graph_compiles_fullgraph():
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet())
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    quantizer.calibrate([torch.randn(2, 3, 16, 16)], 1, model=qmodel)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(qmodel, fullgraph=True)
    assert torch.equal(compiled(x), qmodel(x))


def test_calibration_refuses_non_finite_activations():
    model = _randomise_bn(SmallResNet())
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    bad = torch.randn(2, 3, 16, 16)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite activations"):
        quantizer.calibrate([bad], 1, model=qmodel)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.b(torch.relu(self.a(x)))


def test_untraceable_models_fall_back_to_module_by_module_with_a_warning():
    quantizer = Quantizer(Untraceable(), QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    with pytest.warns(UserWarning, match="could not trace Untraceable"):
        qmodel = quantizer.quantize()
    quantizer.calibrate([torch.randn(4, 8)], 1, model=qmodel)
    x = torch.randn(4, 8)
    assert qmodel(x).shape == (4, 4)


def test_skip_patterns_and_float_ops_in_between():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = torch.sigmoid(self.conv(x))  # a float op between quantized layers
            y = F.relu(self.conv2(y))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = Mixed().eval()
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static", skip=["fc"]))
    qmodel = quantizer.quantize()
    assert quantizer.fallbacks == {"fc": "skipped by config"}
    quantizer.calibrate([torch.randn(2, 3, 8, 8) for _ in range(2)], 2, model=qmodel)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = qmodel(x)
    assert _sqnr(model(x), out) > 25


@pytest.mark.parametrize("stride,padding,dilation", list(itertools.product([1, 2], [0, 1], [1, 2])))
def test_conv_grid_through_the_graph(stride, padding, dilation):
    conv = nn.Conv2d(6, 12, 3, stride, padding, dilation)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    data = [torch.randn(2, 6, 13, 11) for _ in range(3)]
    quantizer.calibrate(data, 3, model=qmodel)
    assert _sqnr(model(data[0]), qmodel(data[0])) > 25


def test_depthwise_convolutions_run_on_codes():
    class Mobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 24, 3, 2, 1)
            self.dw = nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False)
            self.bn = nn.BatchNorm2d(24)
            self.pw = nn.Conv2d(24, 40, 1)
            self.grouped = nn.Conv2d(40, 40, 3, padding=1, groups=4)  # not depthwise: stays float

        def forward(self, x):
            y = F.relu(self.stem(x))
            y = F.relu(self.bn(self.dw(y)))
            return self.grouped(F.relu(self.pw(y)))

    torch.manual_seed(0)
    model = _randomise_bn(Mobile())
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    assert set(quantizer.fallbacks) == {"grouped"} and "not depthwise" in quantizer.fallbacks["grouped"]
    quantizer.calibrate([torch.randn(2, 3, 20, 18) for _ in range(3)], 3, model=qmodel)
    kinds = {type(m).__name__ for m in qmodel.int8.modules()}
    assert "QuantizedDepthwiseNode" in kinds
    x = torch.randn(2, 3, 20, 18)
    assert _sqnr(model(x), qmodel(x)) > 25


@pytest.mark.parametrize("stride,padding,dilation,kernel", [(1, 1, 1, 3), (2, 1, 1, 3), (1, 2, 2, 3), (2, 2, 1, 5)])
def test_depthwise_op_matches_the_integer_reference(stride, padding, dilation, kernel):
    gen = torch.Generator().manual_seed(stride + kernel)
    c = 20
    x = _codes(2, 11, 9, c, 64, gen)
    w = torch.randint(-127, 128, (kernel * kernel, 24), generator=gen, dtype=torch.int8)
    w[:, c:] = 0
    ws, bias = torch.rand(c, generator=gen) * 0.01, torch.randn(c, generator=gen)
    args = ((kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation), c, 0.05, 64)
    got = ops.quantized_depthwise_conv2d(x, w, ws, bias, *args, output_float=True)
    xf = (x[..., :c].double() - 64).permute(0, 3, 1, 2)
    wf = w[:, :c].t().double().reshape(c, 1, kernel, kernel)
    want = F.conv2d(xf, wf, None, stride, padding, dilation, groups=c) * (0.05 * ws.double()).view(1, -1, 1, 1)
    want = want + bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    codes = ops.quantized_depthwise_conv2d(x, w, ws, bias, *args, 0.1, 64, relu=True)
    want_codes = torch.round(want.clamp_min(0) / 0.1 + 64).clamp(0, 127).permute(0, 2, 3, 1)
    assert (codes[..., :c].int() - want_codes.int()).abs().max() <= 1


def test_compare_reports_every_fused_layer_of_a_static_model():
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet())
    quantizer = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
    qmodel = quantizer.quantize()
    quantizer.calibrate([torch.randn(2, 3, 16, 16) for _ in range(2)], 2, model=qmodel)
    rows = quantizer.compare(qmodel, torch.randn(2, 3, 16, 16), print_table=False)
    layers = [r for r in rows if r.status.startswith("quantized")]
    assert len(layers) == len(qmodel.quantized_layers()) == 9  # 8 convolutions (BN folded) and the Linear
    assert layers[0].name == "stem.0+stem.1" and all(r.sqnr_db > 20 for r in layers)
    assert rows[-1].name == "<model output>" and rows[-1].quantized_bytes < rows[-1].float_bytes / 2.5
