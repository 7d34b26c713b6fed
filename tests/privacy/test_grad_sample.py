"""Per-sample gradients from hooks (deepseek_ext/privacy/grad_sample.py) against torch.func, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from deepseek_ext.privacy import grad_sample
from deepseek_ext.privacy.capture import Capture


class Scale(nn.Module):
    """A layer with no registered sampler: exercises the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x * self.weight)


def cases():
    torch.manual_seed(0)
    f64 = torch.float64
    yield "linear", nn.Linear(5, 3), torch.randn(4, 5)
    yield "linear-seq", nn.Linear(5, 3), torch.randn(4, 7, 5)
    yield "linear-nobias", nn.Linear(5, 3, bias=False), torch.randn(4, 2, 3, 5)
    yield "conv1d", nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(4, 3, 11)
    yield (
        "conv2d",
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
        torch.randn(3, 4, 9, 8),
    )
    yield "conv2d-reflect", nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), torch.randn(3, 2, 6, 6)
    yield "embedding", nn.Embedding(11, 4, padding_idx=0), torch.randint(0, 11, (5, 6))
    yield "layernorm", nn.LayerNorm((6,)), torch.randn(4, 3, 6)
    yield "layernorm-2d", nn.LayerNorm((3, 6)), torch.randn(4, 3, 6)
    yield "groupnorm", nn.GroupNorm(2, 4), torch.randn(3, 4, 5, 5)
    yield "mha", nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(3, 5, 8)
    yield "mha-seq-first", nn.MultiheadAttention(8, 2), torch.randn(5, 3, 8)
    yield "fallback", Scale(6), torch.randn(4, 6, dtype=f64)
    try:  # transformers' Conv1D (GPT-2's transposed Linear), registered when transformers is loaded
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    yield "hf-conv1d", Conv1D(3, 5), torch.randn(4, 7, 5)


def _forward(module, x):
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def _reference(module, x):
    """torch.func per-sample gradients of sum(output * w) for a fixed random w."""
    bd = grad_sample.batch_dim(module)
    params = {n: p.detach() for n, p in module.named_parameters()}
    out = _forward(module, x)
    w = torch.randn_like(out)

    def loss(p, xi, wi):
        xi, wi = xi.unsqueeze(bd), wi.unsqueeze(bd)
        mod_out = (
            functional_call(module, p, (xi, xi, xi), {"need_weights": False})[0]
            if isinstance(module, nn.MultiheadAttention)
            else functional_call(module, p, (xi,))
        )
        return (mod_out * wi).sum()

    return w, vmap(grad(loss), in_dims=(None, bd, bd))(params, x, w)


@pytest.mark.parametrize("name,module,x", list(cases()), ids=[c[0] for c in cases()])
def test_per_sample_grads_match_torch_func(name, module, x):
    module = module.double()
    if x.is_floating_point():
        x = x.double()
    w, expected = _reference(module, x)
    capture = Capture(module, loss_reduction="sum")
    (_forward(module, x) * w).sum().backward()
    (unit,) = capture.units
    (record,) = unit.records
    with capture.paused():  # the torch.func fallback re-runs the module
        got = grad_sample.per_sample_grads(module, record.activations, tuple(record.grad_outputs), record.kwargs)
    assert len(unit.records) == 1
    by_name = {n: p for n, p in module.named_parameters()}
    assert set(got) == set(by_name.values())
    for n, p in by_name.items():
        torch.testing.assert_close(got[p], expected[n], rtol=1e-9, atol=1e-10, msg=f"{name}: {n}")


def test_batch_norm_is_refused_with_a_pointer_to_group_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(
        ValueError, match=r"module '1' \(BatchNorm2d\) mixes the examples.*nn.GroupNorm\(min\(32, 8\), 8\)"
    ):
        grad_sample.refuse_batch_norm(model)


def test_register_grad_sampler_for_a_custom_layer():
    calls = []

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    @grad_sample.register_grad_sampler(Mine)
    def _(module, activations, grad_outputs):
        calls.append(1)
        return {module.weight: activations[0] * grad_outputs[0]}

    m = Mine()
    capture = Capture(m, loss_reduction="sum")
    x = torch.randn(4, 3)
    m(x).sum().backward()
    (record,) = capture.units[0].records
    got = grad_sample.per_sample_grads(m, record.activations, tuple(record.grad_outputs))
    assert calls and torch.equal(got[m.weight], x)


@pytest.mark.parametrize(
    "kernel,dilation,padding,stride",
    [((3, 3), (1, 1), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (2, 2)), ((2, 3), (2, 1), (0, 2), (1, 3))],
)
def test_unfold_equals_torch_unfold(kernel, dilation, padding, stride):
    x = torch.randn(5, 3, 9, 11)[:, :, :, 1:]  # non-contiguous: the view starts from the strides given
    want = nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(grad_sample.unfold(x, kernel, dilation, padding, stride), want)
