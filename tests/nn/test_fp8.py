"""FP8Linear and convert_to_fp8 (deepseek_ext/nn/fp8.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_ext.nn import FP8Linear, convert_to_fp8
from deepseek_ext.nn.fp8 import E4M3, E5M2, _left, _right
from deepseek_ext.reference.fp8 import expand_scale

RECIPES = ["tensor", "row", "block"]


def dequant_left(x, dtype, recipe):
    q, s = _left(x, dtype, recipe)
    if recipe == "block":
        return q.double() * expand_scale(s, q.shape, "group", 128).double()
    return q.double() * s.double()


def dequant_right(w, dtype, recipe):
    q, s = _right(w, dtype, recipe)
    if recipe == "block":
        return q.double() * expand_scale(s, q.shape, "block", 128).double()
    return q.double() * s.double()


@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_and_gradients_match_the_dequantised_reference(recipe):
    torch.manual_seed(0)
    layer = FP8Linear(300, 144, granularity=recipe)
    x = torch.randn(2, 21, 300, requires_grad=True)
    g = torch.randn(2, 21, 144)
    y = layer(x)
    y.backward(g)
    x2, g2 = x.detach().reshape(-1, 300), g.reshape(-1, 144)
    w = layer.weight.detach()
    y_ref = dequant_left(x2, E4M3, recipe) @ dequant_right(w.t(), E4M3, recipe) + layer.bias.double()
    gx_ref = dequant_left(g2, E5M2, recipe) @ dequant_right(w, E4M3, recipe)
    gw_ref = dequant_left(g2.t().contiguous(), E5M2, recipe) @ dequant_right(x2, E4M3, recipe)
    torch.testing.assert_close(y.reshape(-1, 144).double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.reshape(-1, 300).double(), gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), gw_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))
    # And the FP8 result stays close to the float layer (quantisation error, not a bug, is all that remains).
    ref = nn.functional.linear(x2, w, layer.bias)
    assert ((y.reshape(-1, 144) - ref).norm() / ref.norm()) < 0.05


def test_state_dict_matches_nn_linear_both_ways():
    lin = nn.Linear(64, 32)
    fp8 = FP8Linear(64, 32)
    assert set(fp8.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    fp8.load_state_dict(lin.state_dict())
    lin.load_state_dict(fp8.state_dict())
    assert torch.equal(fp8.weight, lin.weight) and isinstance(fp8, nn.Linear)


def test_delayed_scaling_uses_the_amax_history():
    torch.manual_seed(0)
    layer = FP8Linear(32, 16, scaling="delayed", amax_history_len=4)
    x = torch.randn(8, 32)
    layer(x)
    assert layer.amax_history[0] == x.abs().max()
    y = layer(x * 0.5)  # scale from the history (the larger amax): still accurate
    assert (y - nn.functional.linear(x * 0.5, layer.weight, layer.bias)).abs().max() < 0.1
    with pytest.raises(ValueError, match="delayed scaling is implemented for granularity='tensor'"):
        FP8Linear(32, 16, granularity="row", scaling="delayed")


def test_convert_to_fp8_replaces_what_fp8_can_take():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)))
    model.add_module("odd", nn.Linear(64, 10))  # 10 output features: not a multiple of 16
    model.add_module("lm_head", nn.Linear(64, 64))
    weight = model.encoder[0].weight
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay in float \(odd: sizes 64 x 10") as record:
        convert_to_fp8(model, granularity="row", skip=["lm_head"])
    assert len(record) == 1  # once; lm_head was skipped on request
    assert isinstance(model.encoder[0], FP8Linear) and isinstance(model.encoder[2], FP8Linear)
    assert model.encoder[0].granularity == "row" and model.encoder[0].weight is weight
    assert type(model.odd) is nn.Linear and type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="convert_to_fp8: expected granularity to be 'tensor', 'row' or 'block', but"):
        convert_to_fp8(model, granularity="columnwise")


def test_former_recipe_names_are_deprecated_aliases():
    linear = nn.Linear(32, 32)
    with pytest.warns(DeprecationWarning, match=r"FP8Linear: recipe= is deprecated, use granularity="):
        layer = FP8Linear.from_linear(linear, recipe="rowwise")
    assert layer.granularity == "row" and layer.recipe == "rowwise"
    with pytest.warns(DeprecationWarning, match=r"granularity 'blockwise' is deprecated, use 'block'"):
        layer = FP8Linear(32, 32, granularity="blockwise")
    assert layer.granularity == "block"
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.warns(DeprecationWarning, match=r"convert_to_fp8: recipe= is deprecated"):
        convert_to_fp8(model, recipe="tensorwise")
    assert model[0].granularity == "tensor"
    with pytest.raises(TypeError, match=r"pass granularity= alone"):
        FP8Linear(32, 32, granularity="row", recipe="rowwise")


@pytest.mark.parametrize("recipe", RECIPES)
def test_training_reaches_the_bf16_loss(recipe):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16))

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 16, generator=g)
    data = [torch.randn(64, 64, generator=g) for _ in range(300)]

    held_out = torch.randn(4096, 64, generator=g)

    def train(model, dtype):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for x in data:
            loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), (x @ teacher).argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():  # the trained model's loss on a fixed held-out set, in its own precision
            return nn.functional.cross_entropy(model(held_out.to(dtype)).float(), (held_out @ teacher).argmax(1)).item()

    bf16 = train(make().to(torch.bfloat16), torch.bfloat16)
    # The output head stays in high precision, as the issue's own example does with skip=["lm_head"].
    fp8 = train(convert_to_fp8(make(), granularity=recipe, skip=["4"]), torch.float32)
    print(f"{recipe}: final loss bf16 {bf16:.4f}, fp8 {fp8:.4f}")
    # Measured: 1.6-2.2% above bf16 at this tiny width (K = 64/128 makes FP8's rounding relatively large).
    assert fp8 <= bf16 * 1.03


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_conv1d_is_the_fp8_linear_of_the_transposed_weight(recipe):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from deepseek_ext.nn.fp8 import FP8Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # weight (32, 48): 32 inputs, 48 outputs
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    model = nn.Sequential(conv)
    convert_to_fp8(model, granularity=recipe)
    fp8_conv, fp8_linear = model[0], FP8Linear.from_linear(linear, granularity=recipe)
    assert isinstance(fp8_conv, FP8Conv1D) and fp8_conv.weight is conv.weight and fp8_conv.bias is conv.bias
    assert fp8_conv.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(4, 3, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = fp8_conv(x), fp8_linear(x2)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, linear.weight.grad.t())
    torch.testing.assert_close(conv.bias.grad, linear.bias.grad)
