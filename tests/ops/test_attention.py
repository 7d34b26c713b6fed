"""fused_attention / fused_attention_varlen (deepseek_ext/ops/attention.py) against the float64 reference in
deepseek_ext/reference/attention.py: outputs and gradients over a grid of shapes, masks and dtypes; dropout;
errors; opcheck; torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from deepseek_ext.ops import fused_attention, fused_attention_varlen
from deepseek_ext.reference import attention as ref
from tests.helpers import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Tolerances against the float64 reference, for outputs of unit-variance inputs.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
SEQS = [1, 17, 128, 257, 1000]


def _inputs(batch, hq, hkv, sq, sk, d, dtype, device, dv=None, requires_grad=False):
    def make(*shape):
        t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return make(batch, hq, sq, d), make(batch, hkv, sk, d), make(batch, hkv, sk, dv or d)


def _mask(kind, batch, hq, sq, sk, dtype, device):
    if kind == "bool":  # broadcast over heads; some rows fully masked
        m = torch.rand(batch, 1, sq, sk, device=device) > 0.3
        m[..., : min(sq, 2), :] = False
        return m
    if kind == "additive":
        return torch.randn(sq, sk, dtype=torch.float64).to(device=device, dtype=dtype)
    return None


def _check(got, want, tol):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk", list(itertools.product(SEQS, SEQS)), ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_sequence_grid(device, dtype, sq, sk, causal):
    d = [32, 64, 80, 128, 256][(sq + sk) % 5]
    q, k, v = _inputs(3 if sq * sk < 10**5 else 1, 8, 2, sq, sk, d, dtype, device)
    got = fused_attention(q, k, v, is_causal=causal, enable_gqa=True)
    want = ref.attention(q.double(), k.double(), v.double(), is_causal=causal)
    assert got.dtype == dtype and got.shape == want.shape
    _check(got, want, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 64, 80, 128, 256, 7])
@pytest.mark.parametrize("heads", [(1, 1), (8, 8), (8, 2), (4, 1)], ids=str)
@pytest.mark.parametrize("mask", [None, "bool", "additive", "causal"])
def test_forward_dims_heads_masks(device, dtype, d, heads, mask):
    batch, sq, sk = 3, 67, 131
    q, k, v = _inputs(batch, heads[0], heads[1], sq, sk, d, dtype, device, dv=d + 3 if d == 7 else None)
    m = _mask(mask, batch, heads[0], sq, sk, dtype, device)
    got = fused_attention(q, k, v, attn_mask=m, is_causal=mask == "causal", enable_gqa=True)
    want = ref.attention(q.double(), k.double(), v.double(), attn_mask=m, is_causal=mask == "causal")
    _check(got, want, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1, 1, 32),
        (3, 8, 2, 17, 257, 64),
        (1, 4, 1, 257, 128, 80),
        (2, 2, 2, 128, 17, 256),
        (1, 1, 1, 300, 300, 33),
    ],
    ids=str,
)
@pytest.mark.parametrize("mask", [None, "bool", "additive", "causal"])
def test_backward_matches_reference(device, dtype, shape, mask):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, dtype, device, requires_grad=True)
    m = _mask(mask, b, hq, sq, sk, dtype, device)
    out = fused_attention(q, k, v, attn_mask=m, is_causal=mask == "causal", enable_gqa=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = ref.attention(q64, k64, v64, attn_mask=m, is_causal=mask == "causal")
    want = torch.autograd.grad(want_out, (q64, k64, v64), g.double())
    for a, w in zip(got, want):
        assert a.dtype == dtype
        scale = max(1.0, w.abs().max().item())
        _check(a / scale, w / scale, GRAD_TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q, k, v = _inputs(1, 4, 2, 9, 13, 6, torch.float64, "cpu", dv=5, requires_grad=True)
    m = torch.randn(9, 13, dtype=torch.float64) if not causal else None
    f = lambda q, k, v: fused_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.any_isa
def test_double_backward_is_a_clear_error():
    q, k, v = _inputs(1, 1, 1, 4, 4, 8, torch.float64, "cpu", requires_grad=True)
    (dq,) = torch.autograd.grad(fused_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        dq.sum().backward()


def test_fully_masked_rows_give_zeros_and_finite_grads():
    q, k, v = _inputs(1, 2, 2, 5, 7, 16, torch.float32, "cpu", requires_grad=True)
    m = torch.ones(5, 7, dtype=torch.bool)
    m[1] = False
    out = fused_attention(q, k, v, attn_mask=m)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # causal with more queries than keys leaves no row empty (top-left); zero keys gives zeros
    q0, k0, v0 = _inputs(1, 1, 1, 3, 0, 8, torch.float32, "cpu")
    assert torch.equal(fused_attention(q0, k0, v0), torch.zeros(1, 1, 3, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_sdpa_and_non_contiguous_inputs(dtype):
    base = torch.randn(2, 64, 8, 3 * 32, dtype=dtype)  # (batch, seq, heads, 3 * dim): a fused qkv projection
    q, k, v = (t.transpose(1, 2) for t in base.split(32, dim=-1))
    assert not q.is_contiguous()
    got = fused_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    _check(got, want, TOL[dtype] * 2)
    # unbatched (heads, seq, dim) as SDPA accepts, and a default scale override
    _check(
        fused_attention(q[0], k[0], v[0], scale=0.3),
        F.scaled_dot_product_attention(q[0].float(), k[0].float(), v[0].float(), scale=0.3),
        TOL[dtype] * 2,
    )


def _dropout_mask(q, k, p, seed):
    """The keep-mask the kernels draw, read back by attending to one-hot values (v = identity)."""
    sk = k.size(-2)
    eye = torch.eye(sk, dtype=torch.float64).expand(q.size(0), k.size(1), sk, sk)
    torch.manual_seed(seed)
    probs = fused_attention(q.double(), k.double(), eye, dropout_p=p, enable_gqa=True)
    return probs != 0


def test_dropout_statistics_reproducibility_and_gradients():
    p = 0.3
    q, k, v = _inputs(2, 4, 2, 33, 40, 16, torch.float64, "cpu", requires_grad=True)
    torch.manual_seed(123)
    a = fused_attention(q, k, v, dropout_p=p, enable_gqa=True)
    torch.manual_seed(123)
    b = fused_attention(q, k, v, dropout_p=p, enable_gqa=True)
    assert torch.equal(a, b)
    c = fused_attention(q, k, v, dropout_p=p, enable_gqa=True)
    assert not torch.equal(a, c)
    keep = _dropout_mask(q.detach(), k.detach(), p, 123)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02
    want = ref.attention(q, k, v, dropout_mask=keep, dropout_p=p)
    _check(a, want, 1e-10)
    g = torch.randn_like(a)
    got = torch.autograd.grad(a, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for x, y in zip(got, exp):
        _check(x, y, 1e-9)


def _varlen_case(lens_q, lens_k, hq, hkv, d, dtype, cu_dtype=torch.int32, requires_grad=False):
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=cu_dtype)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=cu_dtype)

    def make(n, h):
        return torch.randn(n, h, d, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    return make(sum(lens_q), hq), make(sum(lens_k), hkv), make(sum(lens_k), hkv), cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "lens",
    [([5, 0, 17, 1], [5, 0, 17, 1]), ([3, 100, 7], [10, 100, 300]), ([1], [1]), ([0, 0], [4, 0]), ([257], [129])],
    ids=str,
)
def test_varlen_matches_reference(dtype, causal, lens):
    q, k, v, cu_q, cu_k = _varlen_case(*lens, 4, 2, 48, dtype, requires_grad=True)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, is_causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.attention_varlen(q64, k64, v64, cu_q, cu_k, is_causal=causal)
    _check(out, want, TOL[dtype])
    if out.numel():
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        exp = torch.autograd.grad(want, (q64, k64, v64), g.double(), allow_unused=True)
        for a, w in zip(got, exp):
            w = torch.zeros_like(a, dtype=torch.float64) if w is None else w
            scale = max(1.0, w.abs().max().item())
            _check(a / scale, w / scale, GRAD_TOL[dtype])


def test_varlen_int64_offsets_and_explicit_max_seqlen():
    q, k, v, cu_q, cu_k = _varlen_case([4, 9], [6, 9], 2, 2, 32, torch.float32, cu_dtype=torch.int64)
    a = fused_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, is_causal=True)
    b = fused_attention_varlen(q, k, v, cu_q.int(), cu_k.int(), is_causal=True)
    assert torch.equal(a, b)


def test_varlen_gradcheck_float64():
    q, k, v, cu_q, cu_k = _varlen_case([3, 0, 5], [4, 2, 5], 2, 1, 4, torch.float64, requires_grad=True)
    f = lambda q, k, v: fused_attention_varlen(q, k, v, cu_q, cu_k, is_causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))


# SDPA broadcasts the leading (batch, head) dimensions of q, k and v: (q, k, v, mask, enable_gqa, is_causal).
BROADCAST_CASES = [
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), None, False, True),  # multi-query attention without enable_gqa
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), None, True, False),
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 4, 6, 8), None, False, False),  # key broadcast, value not
    ((2, 1, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), None, False, True),  # query with one head
    ((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8), (2, 1, 5, 6), False, False),  # batch-shared key/value
    ((1, 4, 5, 8), (3, 4, 6, 8), (3, 4, 6, 8), (1, 1, 5, 6), False, False),  # batch-shared query
    ((3, 4, 5, 8), (1, 1, 6, 8), (1, 1, 6, 8), (3, 1, 5, 6), False, False),
    ((2, 4, 5, 8), (1, 4, 6, 8), (2, 4, 6, 8), None, False, False),
    ((1, 5, 8), (4, 6, 8), (4, 6, 8), None, False, False),  # unbatched
    ((2, 4, 5, 8), (4, 6, 8), (4, 6, 8), None, False, True),  # ranks differ
    ((5, 8), (6, 8), (6, 8), None, False, True),  # 2-D
    ((5, 8), (2, 4, 6, 8), (2, 4, 6, 8), None, False, False),
    ((2, 3, 4, 5, 8), (2, 3, 4, 6, 8), (1, 3, 4, 6, 8), (3, 1, 5, 6), False, False),  # 5-D
    ((2, 3, 4, 5, 8), (2, 3, 2, 6, 8), (1, 3, 2, 6, 8), None, True, True),
    ((1, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), None, True, False),
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 2, 6, 8), None, True, False),
    ((2, 6, 5, 8), (2, 2, 6, 8), (2, 3, 6, 8), None, True, False),  # two different divisors
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 16), None, False, True),  # value head dim differs
]


@pytest.mark.parametrize("qs,ks,vs,ms,gqa,causal", BROADCAST_CASES, ids=str)
def test_broadcast_shapes_match_sdpa_on_the_kernels(qs, ks, vs, ms, gqa, causal):
    import warnings

    q, k, v = (torch.randn(*s, dtype=torch.float64) for s in (qs, ks, vs))
    m = None if ms is None else torch.rand(ms) > 0.3
    results = []
    for attend in (F.scaled_dot_product_attention, fused_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback: the kernels run
            out = attend(*leaves, attn_mask=m, is_causal=causal, enable_gqa=gqa)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
        results.append((out, *(x.grad for x in leaves)))
    for want, got in zip(*results):
        assert got.shape == want.shape
        _check(got, want, 1e-10)


@pytest.mark.any_isa
def test_multi_query_key_value_reach_the_kernel_without_copies(monkeypatch):
    seen = []
    op = torch.ops.deepseek_ext.fused_attention_fwd.default

    def spy(q, k, v, *rest):
        seen.append((q.shape, k.shape, k.data_ptr()))
        return op(q, k, v, *rest)

    import deepseek_ext.ops.attention as attn

    monkeypatch.setattr(attn.torch.ops.deepseek_ext.fused_attention_fwd, "default", spy, raising=False)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
    fused_attention(q, k, v)
    assert seen == [(q.shape, k.shape, k.data_ptr())]


@pytest.mark.parametrize(
    "qs,ks,vs,gqa",
    [
        ((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), False),
        ((2, 4, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), True),
        ((2, 1, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), True),
        ((2, 4, 5, 8), (3, 4, 6, 8), (3, 4, 6, 8), False),
        ((2, 4, 5, 8), (2, 4, 6, 8), (2, 2, 6, 8), False),
        ((8,), (6, 8), (6, 8), False),
    ],
    ids=str,
)
@pytest.mark.any_isa
def test_shapes_sdpa_rejects_are_rejected(qs, ks, vs, gqa):
    q, k, v = (torch.randn(*s) for s in (qs, ks, vs))
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    with pytest.raises(ValueError, match="fused_attention: "):
        fused_attention(q, k, v, enable_gqa=gqa)


@pytest.mark.any_isa
def test_head_dim_over_256_falls_back_to_sdpa_with_one_warning():
    import deepseek_ext.ops.attention as attn

    attn._warned.clear()
    q, k, v = _inputs(1, 2, 2, 9, 9, 300, torch.float32, "cpu")
    with pytest.warns(UserWarning, match="head dim 300 is above 256"):
        got = fused_attention(q, k, v)
    _check(got, ref.attention(q.double(), k.double(), v.double()), 2e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attention(q, k, v)  # once only


def _op(*args, **kw):
    return torch.ops.deepseek_ext.fused_attention_fwd(*args, **kw)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: fused_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8, 1), torch.randn(2, 4, 8, 1)),
            ValueError,
            r"expected head counts that broadcast .* were \(2, 4, 8\), \(2, 4, 8, 1\) and \(2, 4, 8, 1\)",
        ),
        (
            lambda: fused_attention(torch.randn(8), torch.randn(4, 8), torch.randn(4, 8)),
            ValueError,
            r"expected query, key and value with at least 2 dimensions",
        ),
        (
            lambda: fused_attention(torch.randn(2, 4, 8, 16), torch.randn(3, 4, 8, 16), torch.randn(3, 4, 8, 16)),
            ValueError,
            r"expected batch dimensions that broadcast",
        ),
        (
            lambda: fused_attention(
                torch.randn(2, 4, 8, 16), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16), enable_gqa=True
            ),
            ValueError,
            r"enable_gqa=True needs key/value heads \(3, 3\) that divide the query heads \(4\)",
        ),
        (
            lambda: fused_attention(torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)),
            ValueError,
            "pass enable_gqa=True",
        ),
        (
            lambda: _op(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)),
            ValueError,
            r"query heads \(3\) to be a multiple of key/value heads \(2\)",
        ),
        (
            lambda: _op(torch.randn(2, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)),
            ValueError,
            "one batch size, but got 2, 1 and 1",
        ),
        (
            lambda: _op(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 16)),
            ValueError,
            r"expected key with the head dim of query \(16\), but got 8",
        ),
        (
            lambda: _op(torch.randn(1, 2, 8, 300), torch.randn(1, 2, 8, 300), torch.randn(1, 2, 8, 300)),
            ValueError,
            "head dims from 1 to 256 are supported, but got 300",
        ),
        (
            lambda: _op(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16)),
            TypeError,
            "one dtype, but got torch.float32, torch.float16 and torch.float32",
        ),
        (
            lambda: _op(*(torch.ones(1, 2, 8, 16, dtype=torch.int32),) * 3),
            TypeError,
            "expected query to have dtype torch.float32",
        ),
        (
            lambda: _op(*(torch.randn(1, 2, 8, 16),) * 3, torch.ones(8, 9, dtype=torch.bool)),
            ValueError,
            r"attn_mask broadcastable to \(batch, heads, seq_q, seq_k\) = \(1, 2, 8, 8\)",
        ),
        (
            lambda: _op(*(torch.randn(1, 2, 8, 16),) * 3, torch.ones(8, 8, dtype=torch.int64)),
            TypeError,
            "expected attn_mask of dtype torch.bool",
        ),
        (
            lambda: _op(*(torch.randn(1, 2, 8, 16),) * 3, torch.ones(8, 8, dtype=torch.bool), 0.0, True),
            ValueError,
            "attn_mask and is_causal=True are exclusive",
        ),
        (lambda: _op(*(torch.randn(1, 2, 8, 16),) * 3, None, 1.0), ValueError, r"dropout_p in \[0, 1\)"),
        (lambda: _op(*(torch.randn(1, 2, 8, 16),) * 3, None, 0.5), ValueError, "needs seed"),
        (
            lambda: fused_attention_varlen(*(torch.randn(5, 2, 8),) * 3, torch.tensor([0, 3]), torch.tensor([0, 5])),
            ValueError,
            r"cu_seqlens_q to end at the number of tokens \(5\), but it ends at 3",
        ),
        (
            lambda: fused_attention_varlen(
                *(torch.randn(5, 2, 8),) * 3, torch.tensor([0, 4, 3, 5]), torch.tensor([0, 1, 2, 5])
            ),
            ValueError,
            r"cu_seqlens_q to be non-decreasing, but entry 2 \(3\) is below entry 1 \(4\)",
        ),
        (
            lambda: fused_attention_varlen(*(torch.randn(5, 2, 8),) * 3, torch.tensor([1, 5]), torch.tensor([0, 5])),
            ValueError,
            "cu_seqlens_q to start at 0",
        ),
        (
            lambda: fused_attention_varlen(*(torch.randn(5, 2, 8),) * 3, torch.tensor([0, 5]), torch.tensor([0, 2, 5])),
            ValueError,
            "one batch size, but got 1 and 2",
        ),
        (
            lambda: fused_attention_varlen(
                *(torch.randn(5, 2, 8),) * 3, torch.tensor([0.0, 5.0]), torch.tensor([0, 5])
            ),
            TypeError,
            "expected cu_seqlens_q to have dtype torch.int32 or torch.int64",
        ),
        (
            lambda: fused_attention_varlen(
                *(torch.randn(5, 2, 8),) * 3, torch.tensor([0, 5]), torch.tensor([0, 5]), max_seqlen_q=3
            ),
            ValueError,
            r"max_seqlen_q \(3\) is below the longest query sequence",
        ),
    ],
)
@pytest.mark.any_isa
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.any_isa
def test_opcheck(dtype):
    q, k, v = _inputs(2, 4, 2, 9, 11, 16, dtype, "cpu", requires_grad=True)
    m = torch.rand(2, 1, 9, 11) > 0.2
    for args in [(q, k, v, None, 0.0, True, 0.25, None), (q, k, v, m, 0.0, False, 0.25, None)]:
        torch.library.opcheck(torch.ops.deepseek_ext.fused_attention_fwd.default, args)
    qv, kv, vv, cu_q, cu_k = _varlen_case([3, 6], [5, 6], 4, 2, 16, dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.deepseek_ext.fused_attention_varlen_fwd.default, (qv, kv, vv, cu_q, cu_k, 6, 6, True, 0.25)
    )
    out, lse = torch.ops.deepseek_ext.fused_attention_fwd(q, k, v, None, 0.0, True, 0.25, None)
    torch.library.opcheck(
        torch.ops.deepseek_ext.fused_attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, 0.0, True, 0.25, None),
    )


@pytest.mark.any_isa
def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v = _inputs(2, 4, 2, 33, 33, 32, torch.float32, "cpu", requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return fused_attention(q, k, v, is_causal=True, enable_gqa=True).square().sum()

    loss = f(q, k, v)
    loss.backward()
    want = ref.attention(q.double(), k.double(), v.double(), is_causal=True).square().sum()
    assert abs(loss.item() - want.item()) < 1e-3 * abs(want.item())
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.any_isa
def test_cuda_matches_cpu(dtype, causal):
    q, k, v = _inputs(2, 8, 2, 257, 300, 128, dtype, "cpu", requires_grad=True)
    out = fused_attention(q, k, v, is_causal=causal, enable_gqa=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    outc = fused_attention(qc, kc, vc, is_causal=causal, enable_gqa=True)
    gradsc = torch.autograd.grad(outc, (qc, kc, vc), g.cuda())
    _check(outc, out, TOL[dtype] * 2)
    for a, b in zip(gradsc, grads):
        scale = max(1.0, b.abs().max().item())
        _check(a.float() / scale, b.float() / scale, GRAD_TOL[dtype] * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_finfo_min_additive_mask_masks_like_a_boolean_mask(dtype, device):
    """The documented rule: an additive mask of finfo(float32).min masks its key; a row masked entirely gives zeros."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 32, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    keep = torch.rand(2, 1, 9, 9, generator=g) > 0.4
    keep[:, :, 3] = False  # a fully masked row
    keep = keep.to(device)
    additive = torch.zeros(keep.shape, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)
    a = fused_attention(q, k, v, attn_mask=additive.to(dtype) if dtype == torch.float32 else additive)
    b = fused_attention(q, k, v, attn_mask=keep)
    assert torch.equal(a[:, :, 3], torch.zeros_like(a[:, :, 3]))
    _check(a, b, TOL[dtype])


def test_head_dim_0_is_a_clear_error_not_a_zero_division():
    """Issue 16: the default scale 1 / sqrt(0) raised ZeroDivisionError in the wrapper."""
    q = torch.randn(1, 2, 3, 0)
    with pytest.raises(ValueError, match=r"fused_attention_fwd: expected head dims of at least 1, but got 0"):
        fused_attention(q, q, q)
    with pytest.raises(ValueError, match=r"fused_attention_varlen_fwd: expected head dims of at least 1, but got 0"):
        fused_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                               torch.tensor([0, 3]), torch.tensor([0, 3]))  # fmt: skip
