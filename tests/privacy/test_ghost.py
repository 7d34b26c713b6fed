"""Ghost clipping rules (deepseek_ext/privacy/ghost.py): per-sample norms and clipped sums against torch.func's
per-example gradients, in float64; the ghost DP step against per-example clipping and (where it runs) Opacus."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from deepseek_ext.privacy import DifferentialPrivacy, OuterProduct, PerSample, ghost, register_ghost_rule
from deepseek_ext.privacy.capture import Capture
from deepseek_ext.privacy.grad_sample import batch_dim


class Call:
    """How a case calls its module: positional inputs, keyword arguments, and which inputs are one tensor."""

    def __init__(self, module, inputs, kwargs=None, shared=False):
        self.module, self.inputs, self.kwargs, self.shared = module, inputs, kwargs or {}, shared

    def __call__(self, module, inputs):
        if self.shared:  # self-attention: query, key and value are the same tensor
            inputs = (inputs[0],) * 3
        out = module(*inputs, **self.kwargs)
        return out[0] if isinstance(self.module, nn.MultiheadAttention) else out


def cases():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention
    yield "linear", Call(nn.Linear(5, 3), (torch.randn(4, 5),))
    yield "linear-gram", Call(nn.Linear(16, 12), (torch.randn(4, 3, 16),))  # T(din+dout) < din*dout: Gram
    yield "linear-materialised", Call(nn.Linear(5, 3), (torch.randn(4, 7, 5),))
    yield "linear-nobias-4d", Call(nn.Linear(5, 3, bias=False), (torch.randn(4, 2, 3, 5),))
    yield "conv1d", Call(nn.Conv1d(3, 4, 3, stride=2, padding=1), (torch.randn(4, 3, 11),))
    yield "conv1d-same", Call(nn.Conv1d(3, 4, 4, padding="same", dilation=2), (torch.randn(3, 3, 10),))
    yield (
        "conv2d-groups",
        Call(nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2), (torch.randn(3, 4, 9, 8),)),
    )
    yield "conv2d-gram", Call(nn.Conv2d(8, 16, 3, stride=2), (torch.randn(3, 8, 7, 7),))  # L = 9: Gram
    yield "conv2d-depthwise", Call(nn.Conv2d(4, 8, 3, groups=4, padding="valid"), (torch.randn(3, 4, 6, 5),))
    yield "conv2d-reflect", Call(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (torch.randn(3, 2, 6, 6),))
    yield (
        "conv2d-circular",
        Call(nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="circular"), (torch.randn(2, 2, 5, 6),)),
    )
    yield "embedding", Call(nn.Embedding(11, 4, padding_idx=0), (torch.randint(0, 11, (5, 6)),))
    yield "layernorm", Call(nn.LayerNorm((6,)), (torch.randn(4, 3, 6),))
    yield "layernorm-2d", Call(nn.LayerNorm((3, 6)), (torch.randn(4, 3, 6),))
    yield "groupnorm", Call(nn.GroupNorm(2, 4), (torch.randn(3, 4, 5, 5),))
    yield "mha-self", Call(mha(8, 2, batch_first=True), (torch.randn(3, 5, 8),), {"need_weights": False}, True)
    yield "mha-seq-first", Call(mha(8, 2), (torch.randn(5, 3, 8),), {"need_weights": False}, True)
    x, kv = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    yield "mha-masks", Call(mha(8, 2, batch_first=True), (x, kv, kv), {"key_padding_mask": pad, "attn_mask": causal})
    yield (
        "mha-cross",
        Call(mha(8, 4, batch_first=True), (torch.randn(2, 3, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8))),
    )
    yield (
        "mha-kdim",
        Call(
            mha(8, 2, batch_first=True, kdim=5, vdim=3),
            (torch.randn(2, 4, 8), torch.randn(2, 6, 5), torch.randn(2, 6, 3)),
        ),
    )
    # T >= 32: the Gram matrices' halves, the off-diagonal block counted twice
    yield "linear-gram-long", Call(nn.Linear(96, 80), (torch.randn(3, 33, 96),))
    yield "conv2d-gram-long", Call(nn.Conv2d(32, 64, 3), (torch.randn(2, 32, 8, 8),))  # L = 36
    try:  # transformers' Conv1D (GPT-2's transposed Linear)
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    yield "hf-conv1d", Call(Conv1D(3, 5), (torch.randn(4, 7, 5),))


def _reference(call: Call, inputs):
    """torch.func per-example gradients of sum(output * w) for a fixed random w."""
    module = call.module
    bd = batch_dim(module)
    params = {n: p.detach() for n, p in module.named_parameters()}
    out = call(module, inputs)
    w = torch.randn_like(out)

    def loss(p, xs, wi):
        xs = tuple(x.unsqueeze(bd) for x in xs)
        return (call(lambda *a, **k: functional_call(module, p, a, k), xs) * wi.unsqueeze(bd)).sum()

    if "key_padding_mask" in call.kwargs:  # a per-example keyword: loop over examples instead of vmap
        grads = []
        for i in range(out.shape[bd]):
            sub = Call(module, (), {**call.kwargs, "key_padding_mask": call.kwargs["key_padding_mask"][i : i + 1]})
            sub.shared = call.shared

            def one(p, sub=sub, i=i):
                xs = tuple(x[i : i + 1] for x in inputs)
                return (sub(lambda *a, **k: functional_call(module, p, a, k), xs) * w[i : i + 1]).sum()

            grads.append(grad(one)(params))
        return w, {n: torch.stack([g[n] for g in grads]) for n in params}
    return w, vmap(grad(loss), in_dims=(None, bd, bd))(params, inputs, w)


@pytest.mark.parametrize("name,call", list(cases()), ids=[c[0] for c in cases()])
def test_ghost_norms_and_clipped_sums_match_per_example_gradients(name, call):
    module = call.module.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in call.inputs)
    w, expected = _reference(call, inputs)
    capture = Capture(module, loss_reduction="sum")
    (call(module, inputs) * w).sum().backward()
    (unit,) = capture.units
    terms = ghost.terms_for_unit(module, unit.records)
    by_name = dict(module.named_parameters())
    assert terms is not None and set(terms) == set(by_name.values()), name
    factors = torch.rand(inputs[0].shape[batch_dim(module)], dtype=torch.float64)
    for n, p in by_name.items():
        want = expected[n]
        norms = terms[p].sq_norms()
        print(f"{name}.{n}: max norm error {(norms - want.flatten(1).pow(2).sum(1)).abs().max().item():.2e}")
        torch.testing.assert_close(norms, want.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-10, msg=f"{name}.{n}")
        held = terms[p].held()
        got = torch.tensordot(factors, held, 1) if held is not None else terms[p].clipped_sum(factors)
        ref = torch.tensordot(factors, want, 1)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=f"{name}.{n} clipped sum")


def test_reused_layer_is_ghost_clipped_on_its_summed_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)

    def loss(p, xi):
        return functional_call(lin, p, (torch.tanh(functional_call(lin, p, (xi,))),)).sum()

    ref = vmap(grad(loss), in_dims=(None, 0))(dict(lin.named_parameters()), x.unsqueeze(1))
    capture = Capture(lin, loss_reduction="sum")
    lin(torch.tanh(lin(x))).sum().backward()
    (unit,) = capture.units
    terms = ghost.terms_for_unit(lin, unit.records, alone=False)
    assert isinstance(terms[lin.weight], OuterProduct) and terms[lin.weight].a.shape[2] == 6  # tokens of both uses
    torch.testing.assert_close(terms[lin.weight].sq_norms(), ref["weight"].flatten(1).pow(2).sum(1))


def test_outer_product_refuses_mismatched_factors():
    with pytest.raises(
        ValueError, match=r"OuterProduct: expected a \(batch, \[K,\] \[T,\] d_in\).*\(2, 3, 4\) and \(2, 5, 4\)"
    ):
        OuterProduct(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4), (4, 4))


class Gated(nn.Module):
    """y = (x @ w.T) * gate: no built-in rule."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d)
        self.gate = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (x @ self.w.T) * self.gate


def _model(kind):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), kind(8), nn.Tanh(), nn.Linear(8, 3))


def _clip_only_update(model, x, y, clipping, max_norm=0.05):
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, max_norm, clipping=clipping)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters())]


def test_layer_without_rule_is_materialised_with_one_warning_and_same_result():
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    flat = _clip_only_update(_model(Gated), x, y, "flat")
    ghost._WARNED.discard(Gated)
    with pytest.warns(UserWarning, match=r"no ghost rule covers module '2' \(Gated\).*register_ghost_rule\(Gated\)"):
        got = _clip_only_update(_model(Gated), x, y, "ghost")
    for a, b in zip(got, flat):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with warnings.catch_warnings():  # once per type
        warnings.simplefilter("error")
        _clip_only_update(_model(Gated), x, y, "ghost")


def test_register_ghost_rule_for_a_custom_layer():
    class Gated2(Gated):
        pass

    calls = []

    @register_ghost_rule(Gated2)
    def _(module, activations, grad_outputs, kwargs):
        calls.append(1)
        (x,), (gy,) = activations, grad_outputs
        return {
            module.w: OuterProduct(x, gy * module.gate.detach(), module.w.shape),
            module.gate: PerSample(gy * (x @ module.w.detach().T)),
        }

    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    flat = _clip_only_update(_model(Gated2), x, y, "flat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _clip_only_update(_model(Gated2), x, y, "ghost")
    assert calls
    for a, b in zip(got, flat):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(13, 6)
        self.ln = nn.LayerNorm(6)
        self.mix = nn.Conv1d(6, 6, 3, padding=1)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 13, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        h = self.ln(self.embed(ids))
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h).mean(1)


def test_mixed_model_ghost_equals_flat_clipping():
    """Embedding tied to the output layer, LayerNorm, a convolution and attention in one model: every clipping
    mode's flat-norm semantics agree."""
    x, y = torch.randint(0, 13, (7, 5)), torch.randint(0, 13, (7,))
    flat = _clip_only_update(TiedLM(), x, y, "flat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer has a rule
        got = _clip_only_update(TiedLM(), x, y, "ghost")
    for a, b in zip(got, flat):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_ghost_clipped_sums_equal_opacus():
    """Opacus (an optional oracle): its per-sample gradients, flat-clipped and averaged, equal our ghost step."""
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 5),
    )
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    gsm = opacus.GradSampleModule(nn.Sequential(*[m for m in model]))
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = [p for p in gsm.parameters()]
    norms = torch.stack([p.grad_sample.flatten(1).pow(2).sum(1) for p in params]).sum(0).sqrt()
    f = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    want = [torch.tensordot(f, p.grad_sample, 1) / len(x) for p in params]
    gsm._close()
    got = _clip_only_update(model, x, y, "ghost", max_norm=0.5)
    assert (f < 1).any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "per_layer"])
def test_backward_turns_records_into_per_sample_results_and_drops_activations(clipping):
    """Book-keeping in the backward: per-sample gradients (flat, per-layer) or ghost terms are formed as each
    layer's gradients arrive, so the recorded activations and output gradients are released before the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 0.05, clipping=clipping)
    x = torch.randn(5, 4, 6)
    model(x).sum().backward()
    for u in opt.capture.units:
        (r,) = u.records
        assert r.ready is not None and r.activations == () and r.grad_outputs == [], u.name
        if clipping == "ghost":  # 4 tokens: per-sample gradients no larger than the activations, held
            assert r.ready[u.module.weight].held() is not None
    opt.step()
