"""use_fused_attention() on real models and FusedMultiheadAttention against nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepseek_ext.nn as dnn
from deepseek_ext.nn import FusedMultiheadAttention, use_fused_attention


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_use_fused_attention_patches_and_restores():
    original = F.scaled_dot_product_attention
    q = k = v = torch.randn(1, 2, 5, 8)
    with use_fused_attention():
        assert F.scaled_dot_product_attention is not original
        with use_fused_attention():  # nesting keeps the patch until the outer block ends
            pass
        assert F.scaled_dot_product_attention is not original
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is original
    _close(out, original(q, k, v, is_causal=True))
    # ranks the kernels do not take go to SDPA itself
    with use_fused_attention():
        q5 = torch.randn(2, 1, 2, 5, 8)
        _close(F.scaled_dot_product_attention(q5, q5, q5), original(q5, q5, q5))


def _bert(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_swap_on_transformers_model_matches_outputs_and_gradients(model_name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if model_name == "bert":
        model = _bert()
        batch = {
            "input_ids": torch.randint(0, 200, (3, 21)),
            "attention_mask": torch.tensor([[1] * 21, [1] * 15 + [0] * 6, [1] * 9 + [0] * 12]),
            "labels": torch.tensor([0, 1, 0]),
        }
    else:  # causal LM with grouped-query attention
        cfg = transformers.LlamaConfig(
            vocab_size=200,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            attn_implementation="sdpa",
        )
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 200, (2, 19))
        batch = {"input_ids": ids, "labels": ids}
    ref = model(**batch)
    ref.loss.backward()
    want = _grads(model)
    model.zero_grad()
    with use_fused_attention():
        out = model(**batch)
        out.loss.backward()
    _close(out.logits, ref.logits, 1e-4)
    got = _grads(model)
    assert got.keys() == want.keys()
    for name in want:
        _close(got[name], want[name], 1e-4)


def test_swap_routes_through_our_kernel(monkeypatch):
    import deepseek_ext.ops.attention as attn_ops

    seen = []
    original = attn_ops.fused_attention

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attn_ops, "fused_attention", spy)
    model = _bert()
    with use_fused_attention():
        model(input_ids=torch.randint(0, 200, (2, 7)))
    assert len(seen) == 2 and seen[0] == (2, 4, 7, 16)


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8)),  # multi-query (Falcon) without enable_gqa
        ((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8)),  # batch-shared key/value
        ((2, 4, 5, 8), (4, 6, 8), (4, 6, 8)),  # ranks differ
        ((2, 3, 4, 5, 8), (2, 3, 1, 6, 8), (2, 3, 1, 6, 8)),  # 5-D
    ],
    ids=str,
)
def test_swap_takes_every_shape_sdpa_takes_on_our_kernel(shapes, monkeypatch):
    import deepseek_ext.ops.attention as attn_ops

    calls = []
    original = attn_ops._call_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attn_ops, "_call_forward", spy)
    q, k, v = (torch.randn(*s, requires_grad=True) for s in shapes)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    with use_fused_attention():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got_grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert calls and got.shape == want.shape
    _close(got, want)
    for g, w in zip(got_grads, want_grads):
        _close(g, w, 1e-4)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 24])
@pytest.mark.parametrize("mask", [None, "key_padding", "attn_bool", "attn_float", "causal"])
def test_fused_multihead_attention_matches_parent(batch_first, kdim, mask):
    torch.manual_seed(0)
    e, h, lq, lk, n = 32, 4, 11, 13 if mask != "causal" else 11, 3
    ref = nn.MultiheadAttention(e, h, batch_first=batch_first, kdim=kdim, vdim=kdim)
    ours = FusedMultiheadAttention(e, h, batch_first=batch_first, kdim=kdim, vdim=kdim)
    ours.load_state_dict(ref.state_dict())  # same keys both ways
    assert ours.state_dict().keys() == ref.state_dict().keys()

    def shape(length, dim):
        return (n, length, dim) if batch_first else (length, n, dim)

    q = torch.randn(shape(lq, e), requires_grad=True)
    k = torch.randn(shape(lk, kdim or e), requires_grad=True)
    v = torch.randn(shape(lk, kdim or e), requires_grad=True)
    kw = {}
    if mask == "key_padding":
        kpm = torch.zeros(n, lk, dtype=torch.bool)
        kpm[1, -4:] = True
        kw["key_padding_mask"] = kpm
    elif mask == "attn_bool":
        kw["attn_mask"] = torch.rand(lq, lk) > 0.8  # True = not allowed (nn.MultiheadAttention convention)
        kw["attn_mask"][:, 0] = False
    elif mask == "attn_float":
        kw["attn_mask"] = torch.randn(lq, lk)
    elif mask == "causal":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq)
        kw["is_causal"] = True
    want, _ = ref(q, k, v, need_weights=False, **kw)
    got, weights = ours(q, k, v, need_weights=False, **kw)
    assert weights is None
    _close(got, want)
    g = torch.randn_like(want)
    gw = torch.autograd.grad(want, (q, k, v, ref.in_proj_bias), g)
    gg = torch.autograd.grad(got, (q, k, v, ours.in_proj_bias), g)
    for a, b in zip(gg, gw):
        _close(a, b, 1e-4)
    # need_weights=True returns the parent's weights
    got_w, w = ours(q, k, v, **kw)
    want_w, ww = ref(q, k, v, **kw)
    _close(got_w, want_w)
    _close(w, ww)


def test_fused_multihead_attention_from_module_and_eval_unbatched():
    ref = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = FusedMultiheadAttention.from_module(ref)
    assert not ours.training
    x = torch.randn(5, 16)  # unbatched
    with torch.no_grad():
        _close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    assert isinstance(ours, nn.MultiheadAttention)
    assert "FusedMultiheadAttention" in dnn.__all__
