"""QuantConfig, Quantizer and the quantized modules (deepseek_ext/quant)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from deepseek_ext.quant import QuantConfig, QuantizedConv2d, QuantizedLinear, Quantizer
from deepseek_ext.quant.quantizer import format_report
from tests.helpers import resnet18


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(weight_bits=8, activation_bits=8),
        QuantConfig(weight_bits=4, activation_bits=8, method="dynamic", group_size=64),
        QuantConfig(weight_bits=4, activation_bits=None, group_size=32),
    ],
    ids=["w8a8", "w4a8", "w4-weight-only"],
)
def test_resnet18_end_to_end(config):
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    quantizer = Quantizer(model, config)
    qmodel = quantizer.quantize()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    convs = [m for m in qmodel.modules() if isinstance(m, QuantizedConv2d)]
    assert len(convs) == 20 and isinstance(qmodel.fc, QuantizedLinear)
    assert isinstance(qmodel.bn1, nn.BatchNorm2d)  # the rest is untouched
    rows = quantizer.compare(qmodel, x, print_table=False)
    total = rows[-1]
    print(
        f"{config}: output SQNR {total.sqnr_db:.1f} dB, size {total.float_bytes / 2**20:.1f} -> "
        f"{total.quantized_bytes / 2**20:.1f} MiB, top-1 agreement {agreement(ref, out):.2f}"
    )
    assert total.sqnr_db > (20 if config.weight_bits == 8 else 10)
    assert total.quantized_bytes < total.float_bytes / (3 if config.weight_bits == 8 else 5)
    # Batch 1 and channels_last inputs give the same results.
    with torch.no_grad():
        one = qmodel(x[:1])
        cl = qmodel(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl, out, rtol=1e-4, atol=1e-4)


def test_skip_patterns_and_grouped_conv_fallback_are_reported():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("dw", nn.Conv2d(8, 8, 3, padding=1, groups=8))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 4))
    quantizer = Quantizer(model, QuantConfig(skip=["conv1"]))
    with pytest.warns(UserWarning, match=r"Quantizer: 1 layer\(s\) stay in float \(dw: groups=8") as record:
        qmodel = quantizer.quantize()
    assert len(record) == 1  # once, naming the layer the config did not skip (conv1 was asked for)
    assert type(qmodel.conv1) is nn.Conv2d and type(qmodel.dw) is nn.Conv2d and isinstance(qmodel.fc, QuantizedLinear)
    assert quantizer.fallbacks == {"conv1": "skipped by config", "dw": "groups=8 (grouped/depthwise convolution)"}
    rows = {r.name: r for r in quantizer.compare(qmodel, torch.randn(2, 3, 8, 8), print_table=False)}
    assert rows["dw"].status.startswith("float: groups=8") and rows["fc"].status == "quantized"


def test_bert_from_config_quantized_end_to_end():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    qmodel = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8)).quantize()
    ids = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, qmodel(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.05


def test_state_dict_round_trip_and_config_mismatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    config = QuantConfig(weight_bits=4, activation_bits=8, group_size=32)
    qmodel = Quantizer(model, config).quantize()
    buf = io.BytesIO()
    torch.save(qmodel.state_dict(), buf)
    buf.seek(0)
    fresh = Quantizer(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), config).quantize()
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), qmodel(x))
    other = Quantizer(model, QuantConfig(weight_bits=4, activation_bits=16, group_size=32)).quantize()
    with pytest.raises(ValueError, match="made with .* quantize with the same QuantConfig"):
        other.load_state_dict(qmodel.state_dict())


def test_static_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantizer = Quantizer(model, QuantConfig(method="static"))
    qmodel = quantizer.quantize()
    with pytest.raises(RuntimeError, match="needs Quantizer.calibrate"):
        qmodel(torch.randn(2, 16))
    data = [(torch.randn(8, 16), torch.zeros(8)) for _ in range(4)]
    scales = quantizer.calibrate(data, num_batches=3, model=qmodel)
    assert set(scales) == {"0", "2"}
    x = torch.randn(8, 16)
    assert ((qmodel(x) - model(x)).norm() / model(x).norm()) < 0.05
    with pytest.raises(ValueError, match="method='dynamic'"):
        Quantizer(model, QuantConfig()).calibrate(data)


def test_calibration_touches_only_the_model_it_is_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(8, 16) for _ in range(2)]
    x = torch.randn(3, 16)
    quantizer = Quantizer(model, QuantConfig(method="static"))
    first, second = quantizer.quantize(), quantizer.quantize()
    quantizer.calibrate(data, 2, model=second)
    second(x)
    with pytest.raises(RuntimeError, match="needs Quantizer.calibrate"):
        first(x)  # calibrating one model leaves the others alone
    third = quantizer.quantize()
    with pytest.warns(DeprecationWarning, match=r"calibrate\(\): pass the model to calibrate"):
        quantizer.calibrate(data, 2)  # the deprecated form: the most recently quantized model
    torch.testing.assert_close(third(x), second(x))
    with pytest.raises(RuntimeError, match="needs Quantizer.calibrate"):
        first(x)


def test_compare_logs_its_table_and_prints_only_when_asked(capsys, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    quantizer = Quantizer(model, QuantConfig())
    qmodel = quantizer.quantize()
    with caplog.at_level("INFO", logger="deepseek_ext.quant.quantizer"):
        rows = quantizer.compare(qmodel, torch.randn(2, 16))
    assert capsys.readouterr().out == "" and "<model output>" in caplog.text
    quantizer.compare(qmodel, torch.randn(2, 16), print_table=True)
    assert capsys.readouterr().out.splitlines()[0] == format_report(rows).splitlines()[0]


def test_torch_compile_of_a_quantized_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    qmodel = Quantizer(model, QuantConfig(weight_bits=4, group_size=32)).quantize()
    x = torch.randn(5, 64)
    torch.testing.assert_close(torch.compile(qmodel, fullgraph=True)(x), qmodel(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_bits=2), "weight_bits must be 8 or 4"),
        (dict(activation_bits=4), "activation_bits must be 8, 16 or None"),
        (dict(method="qat"), "method must be 'dynamic' or 'static'"),
        (dict(group_size=48), "positive multiple of 32"),
        (dict(method="static", activation_bits=None), "needs activation_bits=8"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


# ------------------------------------------------------------------------------------------ reliability (issue 16)
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_a_state_dict_for_other_in_features_is_refused_before_anything_is_loaded():
    """Linear(40, n) and Linear(50, n) pad to the same packed shape: in_features must be checked."""
    torch.manual_seed(0)
    config = QuantConfig(weight_bits=8, activation_bits=8)
    small = Quantizer(nn.Sequential(nn.Linear(40, 8)), config).quantize()
    big = Quantizer(nn.Sequential(nn.Linear(50, 8)), config).quantize()
    assert small[0].codes.shape == big[0].codes.shape
    before = _snapshot(big)
    with pytest.raises(ValueError, match=r"QuantizedLinear: this state_dict was made for in_features=40, but"):
        big.load_state_dict(small.state_dict())
    after = _snapshot(big)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"in_features=40"):  # a layer alone checks too
        big[0].load_state_dict({k.removeprefix("0."): v for k, v in small.state_dict().items()})


def test_a_config_mismatch_is_found_before_any_layer_is_overwritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    a = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=8)).quantize()
    b = Quantizer(model, QuantConfig(weight_bits=8, activation_bits=16)).quantize()
    state = a.state_dict()
    state["0.scales"] = state["0.scales"] * 3  # would be visible if layer 0 were loaded before the mismatch is seen
    before = _snapshot(b)
    with pytest.raises(ValueError, match="quantize with the same QuantConfig"):
        b.load_state_dict(state)
    after = _snapshot(b)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_mismatched_buffer_is_refused_by_name_before_the_model_changes():
    torch.manual_seed(0)
    config = QuantConfig(weight_bits=4, activation_bits=8, group_size=32)
    make = lambda: Quantizer(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), config).quantize()  # noqa: E731
    q = make()
    state = q.state_dict()
    fresh = make()
    before = _snapshot(fresh)
    bad = dict(state)
    bad["2.scales"] = state["2.scales"][:4]
    with pytest.raises(ValueError, match=r"QuantizedLinear: expected 2.scales of shape \(8, 1\)"):
        fresh.load_state_dict(bad)
    bad = dict(state)
    bad["0.zeros"] = state["0.zeros"].float()
    with pytest.raises(ValueError, match=r"expected 0.zeros of shape .* and dtype torch.int32"):
        fresh.load_state_dict(bad)
    after = _snapshot(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh.load_state_dict(state)  # the real one still loads
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize(
    "config", [QuantConfig(8, 8), QuantConfig(4, 8, group_size=32), QuantConfig(8, None)], ids=["w8a8", "w4a8", "w8"]
)
def test_transformers_conv1d_is_quantized_as_the_transposed_linear(config):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs: weight (40, 24)
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    qconv, qlinear = QuantizedLinear.from_conv1d(conv, config), QuantizedLinear(linear, config)
    x = torch.randn(3, 5, 40)
    assert torch.equal(qconv(x), qlinear(x))
    assert qconv.weight.shape == (24, 40)
    state = qconv.state_dict()
    assert state.keys() == qlinear.state_dict().keys()
    model = nn.Sequential(conv)
    quantizer = Quantizer(model, config)
    qmodel = quantizer.quantize()
    assert isinstance(qmodel[0], QuantizedLinear) and quantizer.fallbacks == {}
    assert torch.equal(qmodel(x), qlinear(x))
    rows = quantizer.compare(qmodel, x, print_table=False)
    assert rows[0].kind == "Conv1D" and rows[0].status == "quantized" and rows[0].sqnr_db > 20


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def _state_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}  # tied: counted once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_head_tied_to_an_embedding_stays_float_with_it_and_is_reported_once():
    model = _TiedLM()
    quantizer = Quantizer(model, QuantConfig(8, 8))
    with pytest.warns(UserWarning, match=r"lm_head: weight tied to 'embed' \(Embedding\)") as record:
        qmodel = quantizer.quantize()
    assert len(record) == 1
    assert isinstance(qmodel.body, QuantizedLinear) and type(qmodel.lm_head) is nn.Linear
    assert qmodel.lm_head.weight is qmodel.embed.weight  # still one tensor
    assert _state_bytes(qmodel) < _state_bytes(model)
    rows = {r.name: r for r in quantizer.compare(qmodel, torch.randint(0, 64, (2, 5)), print_table=False)}
    assert rows["lm_head"].status.startswith("float: weight tied to 'embed'")


def test_linear_subclasses_without_a_handler_are_listed_not_skipped_silently():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(32, 32), MyLinear(32, 32))
    quantizer = Quantizer(model, QuantConfig(8, 8))
    with pytest.warns(UserWarning, match=r"1: MyLinear subclasses Linear but has no handler"):
        qmodel = quantizer.quantize()
    assert isinstance(qmodel[0], QuantizedLinear) and type(qmodel[1]) is MyLinear


def test_quantized_layers_expose_their_dequantized_weight():
    torch.manual_seed(0)
    linear, conv = nn.Linear(40, 24), nn.Conv2d(3, 8, 3)
    for layer, quantized in (
        (linear, QuantizedLinear(linear, QuantConfig(8, None))),
        (conv, QuantizedConv2d(conv, QuantConfig(8, None))),
    ):
        w = quantized.weight
        assert w.shape == layer.weight.shape and w.dtype == torch.float32 and w.device == layer.weight.device
        assert (w - layer.weight).abs().max() <= layer.weight.abs().amax() / 127  # within one step of the codes
    x = torch.randn(2, 40)
    qlinear = QuantizedLinear(linear, QuantConfig(8, None))  # weight-only: exactly the dequantized weight's product
    torch.testing.assert_close(qlinear(x), nn.functional.linear(x, qlinear.weight, qlinear.bias))
