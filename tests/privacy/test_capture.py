"""How the capture hooks (deepseek_ext/privacy/capture.py) read a layer's batch: batch-shared inputs (position ids of
shape (1, seq), as stock BERT and GPT-2 build them), tokens flattened example by example (OPT), layers whose output
ignores their floating input (BART's positions) and batch-less inputs (T5's relative attention bias, refused by
name). Every DP step is checked against the hand-written per-example reference of tests/privacy/test_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_ext.privacy import DifferentialPrivacy
from tests.privacy.test_engine import reference_clipped_mean

SEQ, VOCAB, DIM, CLASSES = 5, 20, 6, 3


class Positions(nn.Module):
    """Token and position embeddings; positions shared by the batch as (1, seq) unless given per example."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(16, DIM)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0), persistent=False)

    def forward(self, x, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids[:, : x.shape[1]]
        return self.tok(x) + self.pos(position_ids)


class ScaledPositions(nn.Module):
    """A layer without a dedicated sampler (the torch.func fallback) taking the positions as a keyword."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, DIM) * 0.1)

    def forward(self, x, *, position_ids):
        return x * (1 + self.table[position_ids])


class ShapeOnly(nn.Module):
    """Its output depends on the input's shape only (as BART's encoder positions): arange positions, looked up."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, DIM) * 0.1)

    def forward(self, x):
        return self.weight[torch.arange(x.shape[1])].expand(x.shape[0], -1, -1)


class Model(nn.Module):
    def __init__(self, flatten=False, shape_only=False, fallback=False, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = Positions()
        self.scaled = ScaledPositions() if fallback else None
        self.shape_only = ShapeOnly() if shape_only else None
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB if tied else CLASSES)
        if tied:
            self.head.weight = self.embed.tok.weight
        self.flatten = flatten

    def forward(self, x, position_ids=None):
        h = self.embed(x, position_ids)
        if self.scaled is not None:
            ids = self.embed.position_ids[:, : x.shape[1]] if position_ids is None else position_ids
            h = self.scaled(h, position_ids=ids)
        if self.shape_only is not None:
            h = h + self.shape_only(h)
        if self.flatten:  # (batch * seq, dim) rows into the norm and the MLP, as OPT's decoder layers
            b, n, d = h.shape
            h = torch.tanh(self.fc(self.norm(h.reshape(b * n, d)))).view(b, n, d)
        else:
            h = torch.tanh(self.fc(self.norm(h)))
        return self.head(h.mean(1))


def _step(model, x, y, clipping, C, **kwargs):
    """The gradients one clip-only DP step leaves in .grad (the optimizer itself moves nothing: lr=0)."""
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=0.0), model, C, clipping=clipping)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x, **kwargs), y).backward()
    opt.step()
    opt.capture.remove()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("clipping", ["flat", "ghost", "per_layer"])
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(flatten=True), dict(fallback=True), dict(shape_only=True), dict(tied=True)],
    ids=["shared-positions", "flattened-tokens", "fallback-kwargs", "shape-only", "tied-head"],
)
def test_dp_step_equals_per_example_reference_and_explicit_positions(clipping, variant):
    model = Model(**variant)
    x = torch.randint(0, VOCAB, (7, SEQ))
    y = torch.randint(0, VOCAB if variant.get("tied") else CLASSES, (7,))
    C = 0.05
    want = reference_clipped_mean(model, x, y, C, per_layer=clipping == "per_layer")
    got = _step(model, x, y, clipping, C)
    explicit = _step(model, x, y, clipping, C, position_ids=torch.arange(SEQ).expand(7, SEQ).contiguous())
    for g, e, w in zip(got, explicit, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_a_batch_shared_gradient_is_never_clipped_as_one_example():
    """The position embedding's per-example gradients are clipped one by one (per_layer: the mode that used to clip
    the batch-wide gradient of a (1, seq) lookup as if it were one example's)."""
    model = Model()
    x, y = torch.randint(0, VOCAB, (8, SEQ)), torch.randint(0, CLASSES, (8,))
    C = 1e-3
    want = reference_clipped_mean(model, x, y, C, per_layer=True)
    got = _step(model, x, y, "per_layer", C)
    pos = [n for n, _ in model.named_parameters()].index("embed.pos.weight")
    torch.testing.assert_close(got[pos], want[pos], rtol=1e-4, atol=1e-9)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # the batch's gradient, clipped once: what it is not

    batch_wide = model.embed.pos.weight.grad
    bound = C / len(want) ** 0.5
    as_one = batch_wide * min(1.0, bound / batch_wide.norm().item()) / 8  # the mean gradient as one example
    assert (got[pos] - as_one).norm() > 0.1 * want[pos].norm()


class RelativeBias(nn.Module):
    """A bias table looked up by (seq, seq) relative positions: no batch dimension at all (T5)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Embedding(2 * SEQ, 1)

    def forward(self, h):
        n = h.shape[1]
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None] + SEQ
        return h + self.bias(rel).squeeze(-1).mean(1)[None, :, None]


def test_a_layer_without_the_batch_is_refused_by_name_until_frozen():
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), RelativeBias(), nn.Flatten(), nn.Linear(SEQ * DIM, CLASSES))
    x, y = torch.randint(0, VOCAB, (3, SEQ)), torch.randint(0, CLASSES, (3,))
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 1.0)
    with pytest.raises(
        ValueError,
        match=r"module '1\.bias' \(Embedding\) returned an output with 5 at its batch "
        r"dimension 0, but the batch has 3 examples.*Freeze it \(model\.1\.bias\.requires_grad_",
    ):
        model(x)
    opt.capture.remove()
    model[1].bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append([p.grad.clone() for p in params])
    factors = [min(1.0, 0.05 / (torch.sqrt(sum(g.pow(2).sum() for g in gs)).item() + 1e-6)) for gs in per_example]
    want = [sum(f * gs[j] for f, gs in zip(factors, per_example)) / 3 for j in range(len(params))]
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(params, lr=1.0), model, 0.05)
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for b, p, w in zip(before, params, want):
        torch.testing.assert_close(b - p.detach(), w, rtol=1e-4, atol=1e-6)


def test_batch_of_one_and_empty_batches_are_plain():
    model = Model()
    for n in (1, 0):
        x, y = torch.randint(0, VOCAB, (n, SEQ)), torch.randint(0, CLASSES, (n,))
        got = _step(model, x, y, "flat", 0.05)
        if n:
            for g, w in zip(got, reference_clipped_mean(model, x, y, 0.05)):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        else:
            assert all(torch.count_nonzero(g) == 0 for g in got)


def _graph(out: torch.Tensor) -> list:
    nodes, todo = [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            todo.extend(f for f, _ in node.next_functions)
    return nodes


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
@pytest.mark.parametrize("first", ["embedding", "linear"])
def test_the_backward_computes_no_parameter_gradient_and_no_gradient_of_the_input(clipping, first):
    """Every gradient comes from the records: autograd's graph holds no parameter, and the first layer's output is
    tapped, so neither its weight gradient nor the model input's gradient is computed."""
    torch.manual_seed(0)
    if first == "embedding":
        head, x = nn.Embedding(VOCAB, DIM), torch.randint(0, VOCAB, (4, SEQ))
    else:
        head, x = nn.Linear(5, DIM), torch.randn(4, 5)
    model = nn.Sequential(head, nn.Linear(DIM, DIM), nn.ReLU(inplace=True), nn.Linear(DIM, 3))
    DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 1.0, clipping=clipping)
    nodes = _graph(model(x))
    names = [type(n).__name__ for n in nodes]
    params = {id(p) for p in model.parameters()}
    assert not any(id(getattr(n, "variable", None)) in params for n in nodes)
    assert names.count("_TapBackward") == 1  # the first layer's output; the others' inputs need grad
    assert not any("Embedding" in n for n in names)
    assert sum(n in ("AddmmBackward0", "MmBackward0") for n in names) == 2  # the two later Linear's input gradients
