"""fp8_matmul (deepseek_ext/ops/fp8.py) against dequantise-then-matmul in float64."""

from __future__ import annotations

import pytest
import torch

from deepseek_ext.ops import fp8_matmul, quantize_fp8
from deepseek_ext.reference.fp8 import expand_scale
from tests.helpers import DEVICES, dtype_id

SHAPES = [
    (1, 1, 1),
    (1, 17, 127),
    (17, 127, 1),
    (127, 17, 33),
    (64, 256, 300),
    (3, 1000, 129),
    (0, 5, 7),
    (4, 0, 3),
    (130, 129, 520),
]
PAIRS = [
    (torch.float8_e4m3fn, torch.float8_e4m3fn),
    (torch.float8_e5m2, torch.float8_e4m3fn),
    (torch.float8_e4m3fn, torch.float8_e5m2),
]


def operands(m, k, n, mode, da, db, device, bs=128):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, max(k, 1))[:k]
    w = torch.randn(k, n, generator=g)
    if mode == "tensor":
        (a, sa), (b, sb) = quantize_fp8(x, da), quantize_fp8(w, db)
        a_ref, b_ref = a.double() * sa.double(), b.double() * sb.double()
    elif mode == "row":
        a, sa = quantize_fp8(x, da, "row")
        bt, sbt = quantize_fp8(w.t().contiguous(), db, "row")
        b, sb = bt.t(), sbt.t()
        a_ref, b_ref = a.double() * sa.double(), b.double() * sb.double()
    else:
        a, sa = quantize_fp8(x, da, "group", bs)
        b, sb = quantize_fp8(w, db, "block", bs)
        a_ref = a.double() * expand_scale(sa, a.shape, "group", bs).double()
        b_ref = b.double() * expand_scale(sb, b.shape, "block", bs).double()
    to = dict(device=device)
    return (a.to(**to), b.to(**to), sa.to(**to), sb.to(**to)), a_ref, b_ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["tensor", "row", "block"])
@pytest.mark.parametrize("da,db", PAIRS, ids=lambda d: dtype_id(d))
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
def test_matches_float64_reference(device, mode, da, db, m, k, n):
    (a, b, sa, sb), a_ref, b_ref = operands(m, k, n, mode, da, db, device)
    bias = torch.randn(n, device=device)
    for out_dtype, with_bias in [(torch.float32, True), (torch.bfloat16, False), (torch.float16, True)]:
        y = fp8_matmul(a, b, sa, sb, bias if with_bias else None, out_dtype)
        ref = a_ref @ b_ref + (bias.double().cpu() if with_bias else 0)
        assert y.dtype == out_dtype and y.shape == (m, n)
        # float32 accumulation error, plus the rounding of the output dtype.
        bound = 4 * max(k, 1) * 2.0**-24 * (a_ref.abs() @ b_ref.abs()) + 2 * torch.finfo(out_dtype).eps * ref.abs()
        err = (y.double().cpu() - ref).abs()
        assert (err <= bound + 1e-12).all(), f"max err {err.max():.3g}, worst ratio {(err / (bound + 1e-30)).max():.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_column_major_b_is_read_as_is(device):
    (a, b, sa, sb), _, _ = operands(33, 200, 48, "tensor", torch.float8_e4m3fn, torch.float8_e4m3fn, device)
    col = b.t().contiguous().t()
    assert not col.is_contiguous()
    torch.testing.assert_close(
        fp8_matmul(a, col, sa, sb, out_dtype=torch.float32),
        fp8_matmul(a, b, sa, sb, out_dtype=torch.float32),
        rtol=0,
        atol=0,
    )


def _fp8(*shape, dtype=torch.float8_e4m3fn):
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: fp8_matmul(torch.ones(2, 3), _fp8(3, 4), torch.ones(()), torch.ones(())),
            TypeError,
            r"fp8_matmul: expected a to have dtype torch.float8_e4m3fn or torch.float8_e5m2, but got torch.float32",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(4, 5), torch.ones(()), torch.ones(())),
            ValueError,
            r"inner dimensions \(K\) must match",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(3, 4), torch.ones(2, 1), torch.ones(4, 1)),
            ValueError,
            r"scale_a and scale_b of shapes \[2, 1\] and \[4, 1\] fit no scaling mode.*\[2, 1\] and \[1, 4\]",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(3, 4), torch.tensor(float("inf")), torch.ones(())),
            ValueError,
            "must be finite",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(3, 4), torch.ones(()), torch.ones((), dtype=torch.float64)),
            TypeError,
            "expected scale_b to have dtype torch.float32",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(3, 4), torch.ones(()), torch.ones(()), torch.ones(3)),
            ValueError,
            r"expected bias of shape \[4\], but got \[3\]",
        ),
        (
            lambda: fp8_matmul(_fp8(2, 3), _fp8(3, 4), torch.ones(()), torch.ones(()), out_dtype=torch.int32),
            TypeError,
            "expected out_dtype to be",
        ),
    ],
)
@pytest.mark.any_isa
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.any_isa
def test_opcheck(device):
    # test_schema compares inputs with allclose, which float8 lacks (see test_fp8.py).
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for mode in ("tensor", "row", "block"):
        (a, b, sa, sb), _, _ = operands(9, 130, 17, mode, torch.float8_e4m3fn, torch.float8_e4m3fn, device)
        torch.library.opcheck(
            torch.ops.deepseek_ext.fp8_matmul.default,
            (a, b, sa, sb, torch.randn(17, device=device), torch.float32, 128),
            test_utils=checks,
        )


@pytest.mark.any_isa
def test_torch_compile_fullgraph():
    def fp8_linear(x, w):
        xq, sx = quantize_fp8(x, torch.float8_e4m3fn, "row")
        wq, sw = quantize_fp8(w, torch.float8_e4m3fn, "row")
        return fp8_matmul(xq, wq.t(), sx, sw.t(), None, torch.float32)

    x, w = torch.randn(16, 64), torch.randn(32, 64)
    torch.testing.assert_close(torch.compile(fp8_linear, fullgraph=True)(x, w), fp8_linear(x, w))


@pytest.mark.parametrize("block_size", [2**31, 2**62, 2**63 - 1])
def test_huge_block_sizes_give_the_one_block_result(block_size):
    """Issue 16: the tile count overflowed to 0, empty scales passed the check and the kernel read past them."""
    from tests.helpers import result_of, run_isolated

    a = (torch.randn(3, 5) * 4).to(torch.float8_e4m3fn)
    b = (torch.randn(5, 7) * 4).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(3, 1) + 0.1, torch.rand(1, 1) + 0.1  # one group per row of a, one block for b
    y = result_of(run_isolated(lambda: fp8_matmul(a, b, sa, sb, out_dtype=torch.float32, block_size=block_size)))
    torch.testing.assert_close(y.double(), (a.double() * sa) @ (b.double() * sb), rtol=1e-5, atol=1e-5)
    empty = torch.empty(3, 0)
    outcome = run_isolated(lambda: fp8_matmul(a, b, empty, torch.empty(0, 0), block_size=block_size))
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError)
    assert "scale_a and scale_b of shapes [3, 0] and [0, 0] fit no scaling mode" in str(outcome[1])
