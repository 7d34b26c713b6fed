"""quantize_fp8 / dequantize_fp8 against the plain-PyTorch reference (deepseek_ext.reference.fp8).

FP8 results are compared bit for bit: both sides compute the same float32 scale and the same scaled value,
and the cast must round exactly as PyTorch's own `.to(float8)` does.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_ext import ops
from deepseek_ext.ops import dequantize_fp8, quantize_fp8
from deepseek_ext.reference import fp8 as ref
from tests.helpers import DEVICES, FLOAT_DTYPES, FP8_DTYPES, all_bit_patterns, dtype_id, spread_randn

# (granularity, shape, block_size): odd sizes, partial edge blocks, empty tensors, 0-d and N-d inputs.
CASES = [
    ("tensor", (), 128),
    ("tensor", (0,), 128),
    ("tensor", (1,), 128),
    ("tensor", (17,), 128),
    ("tensor", (3, 97), 128),
    ("tensor", (2, 3, 1025), 128),
    ("tensor", (4, 0, 5), 128),
    ("row", (1, 1), 128),
    ("row", (0, 5), 128),
    ("row", (5, 0), 128),
    ("row", (17, 97), 128),
    ("row", (129, 1025), 128),
    ("block", (1, 1), 128),
    ("block", (17, 97), 128),
    ("block", (128, 256), 128),
    ("block", (129, 257), 128),
    ("block", (300, 130), 32),
    ("block", (7, 11), 3),
    ("block", (3, 5000), 1),
    ("block", (0, 5), 4),
    ("block", (5, 0), 4),
    ("group", (1, 1), 128),
    ("group", (17, 300), 128),
    ("group", (33, 256), 64),
    ("group", (0, 5), 4),
]
CASE_IDS = [f"{g}-{'x'.join(map(str, s)) or 'scalar'}-b{b}" for g, s, b in CASES]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = bits(actual.cpu()), bits(expected.cpu())
    mismatch = (a != e) & ~(actual.cpu().float().isnan() & expected.cpu().float().isnan())
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {a.numel()} values differ; first at {mismatch.nonzero()[0].tolist()}: "
        f"got {actual.cpu()[mismatch][:4].float().tolist()}, expected {expected.cpu()[mismatch][:4].float().tolist()}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity,shape,block_size", CASES, ids=CASE_IDS)
def test_quantize_matches_reference(device, in_dtype, fp8_dtype, granularity, shape, block_size):
    x = spread_randn(shape, in_dtype)
    q_ref, s_ref = ref.quantize_fp8(x, fp8_dtype, granularity, block_size)
    q, s = quantize_fp8(x.to(device), fp8_dtype, granularity, block_size)
    assert s.dtype == torch.float32 and s.shape == s_ref.shape and q.is_contiguous()
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    assert_bits_equal(q, q_ref)
    # NaN-aware bit equality is strict, but the NaN positions must agree as well.
    assert torch.equal(q.cpu().float().isnan(), q_ref.float().isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity,shape,block_size", CASES, ids=CASE_IDS)
def test_dequantize_matches_reference(device, out_dtype, fp8_dtype, granularity, shape, block_size):
    q, s = ref.quantize_fp8(spread_randn(shape), fp8_dtype, granularity, block_size)
    out = dequantize_fp8(q.to(device), s.to(device), granularity, block_size, out_dtype)
    assert_bits_equal(out, ref.dequantize_fp8(q, s, granularity, block_size, out_dtype))


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", ["tensor", "row", "group", "block"])
def test_round_trip_error_is_within_half_an_fp8_step(fp8_dtype, granularity):
    x = spread_randn((257, 300))
    q, s = quantize_fp8(x, fp8_dtype, granularity, 64)
    y = dequantize_fp8(q, s, granularity, 64)
    mant = 3 if fp8_dtype == torch.float8_e4m3fn else 2
    min_normal = 2.0 ** (-6 if fp8_dtype == torch.float8_e4m3fn else -14)
    scale = ref.expand_scale(s, x.shape, granularity, 64)
    # Half a step of the format at |x| (relative 2^-(mant+1)), or half the subnormal step below min_normal.
    bound = scale * torch.maximum(x.abs() / scale, torch.full_like(x, min_normal)) * 2.0 ** -(mant + 1)
    err = (y - x).abs()
    print(f"max rel err {(err / x.abs().clamp_min(1e-30)).max():.3e}, max err/bound {(err / bound).max():.3f}")
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_every_16_bit_pattern_rounds_like_pytorch(device, in_dtype, fp8_dtype, granularity):
    """All 65536 fp16 / bf16 values, inf and NaN included: the cast of each scaled value equals PyTorch's."""
    x = all_bit_patterns(in_dtype)
    q, s = quantize_fp8(x.to(device), fp8_dtype, granularity, 16)
    q, s = q.cpu(), s.cpu()
    fmax = ref.FP8_MAX[fp8_dtype]
    expected = (x.float() / ref.expand_scale(s, x.shape, granularity, 16)).clamp(-fmax, fmax).to(fp8_dtype)
    assert_bits_equal(q, expected)
    # Documented special values: NaN stays NaN with its sign, +-inf saturates to +-max.
    xf = x.float()
    assert torch.equal(q.float().isnan(), xf.isnan())
    assert torch.equal(
        q.view(torch.uint8)[xf.isnan()] & 0x80, (x.view(torch.int16)[xf.isnan()] < 0).to(torch.uint8) * 0x80
    )
    assert (q.float()[xf == float("inf")] == fmax).all() and (q.float()[xf == float("-inf")] == -fmax).all()
    torch.testing.assert_close(s, ref.quantize_fp8(x, fp8_dtype, granularity, 16)[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_do_not_enter_the_scale(device):
    x = spread_randn((4, 64))
    clean_q, clean_s = quantize_fp8(x.to(device), granularity="row")
    x[0, 3], x[1, 5], x[2, 7] = float("inf"), float("-inf"), float("nan")
    q, s = quantize_fp8(x.to(device), granularity="row")
    torch.testing.assert_close(s, clean_s, rtol=0, atol=0)
    assert q[0, 3].float() == 448 and q[1, 5].float() == -448 and q[2, 7].float().isnan()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_all_zero_input_gives_floor_scale_and_zeros(device, granularity):
    q, s = quantize_fp8(torch.zeros(3, 200, device=device), granularity=granularity)
    assert (q.float() == 0).all()
    assert torch.allclose(s.cpu(), torch.full(s.shape, ref.AMAX_FLOOR / 448.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_non_contiguous_input(device, granularity):
    x = spread_randn((96, 200), device=device).t()[:, ::2]
    assert not x.is_contiguous()
    q, s = quantize_fp8(x, granularity=granularity, block_size=32)
    q2, s2 = quantize_fp8(x.contiguous(), granularity=granularity, block_size=32)
    assert torch.equal(s, s2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: quantize_fp8(torch.ones(3), granularity="row"),
            ValueError,
            r"quantize_fp8: .*'row' expects x to be a 2-D tensor, but got a 1-D",
        ),
        (
            lambda: quantize_fp8(torch.ones(2, 3, 4), granularity="block"),
            ValueError,
            r"quantize_fp8: .*2-D tensor, but got a 3-D",
        ),
        (
            lambda: quantize_fp8(torch.ones(3, dtype=torch.int32)),
            TypeError,
            r"quantize_fp8: expected x to have dtype torch.float32, torch.float16 or torch.bfloat16, "
            r"but got torch.int32",
        ),
        (lambda: quantize_fp8(torch.ones(3, dtype=torch.float64)), TypeError, r"but got torch.float64"),
        (
            lambda: quantize_fp8(torch.ones(3), dtype=torch.float16),
            TypeError,
            r"quantize_fp8: expected dtype to be torch.float8_e4m3fn or torch.float8_e5m2, but got torch.float16",
        ),
        (
            lambda: quantize_fp8(torch.ones(2, 2), granularity="block", block_size=0),
            ValueError,
            r"quantize_fp8: expected block_size to be a positive integer, but got 0",
        ),
        (
            lambda: quantize_fp8(torch.ones(2, 2), granularity="column"),
            ValueError,
            r"quantize_fp8: expected granularity to be 'tensor', 'row', 'group' or 'block', but got 'column'",
        ),
        (
            lambda: dequantize_fp8(torch.ones(2, 2), torch.ones(())),
            TypeError,
            r"dequantize_fp8: expected x to have dtype torch.float8_e4m3fn or torch.float8_e5m2, but got torch.float32",
        ),
        (
            lambda: dequantize_fp8(torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(4)),
            ValueError,
            r"dequantize_fp8: expected scale of shape \[\] .* but got \[4\]",
        ),
        (
            lambda: dequantize_fp8(torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(4), "row"),
            ValueError,
            r"expected scale of shape \[4, 1\]",
        ),
        (
            lambda: dequantize_fp8(torch.zeros(4, 300).to(torch.float8_e4m3fn), torch.ones(1, 2), "block"),
            ValueError,
            r"expected scale of shape \[1, 3\] .*block_size=128, but got \[1, 2\]",
        ),
        (
            lambda: dequantize_fp8(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones((), dtype=torch.float16)),
            TypeError,
            r"dequantize_fp8: expected scale to have dtype torch.float32",
        ),
        (
            lambda: dequantize_fp8(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(()), out_dtype=torch.int8),
            TypeError,
            r"dequantize_fp8: expected out_dtype to be torch.float32, torch.float16 or torch.bfloat16, "
            r"but got torch.int8",
        ),
    ],
)
@pytest.mark.any_isa
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
def test_dequantize_rejects_scale_on_another_device():
    q, s = quantize_fp8(torch.ones(4, 4, device="cuda"))
    with pytest.raises(RuntimeError, match=r"dequantize_fp8: expected x and scale to be on the same device"):
        dequantize_fp8(q, s.cpu())


def opcheck_samples(device):
    for granularity, shape, block in [("tensor", (5, 7), 128), ("row", (9, 33), 128), ("block", (70, 33), 32)]:
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            yield (
                torch.ops.deepseek_ext.quantize_fp8.default,
                (spread_randn(shape, torch.bfloat16, device), dtype, granularity, block),
            )
            q, s = ref.quantize_fp8(spread_randn(shape), dtype, granularity, block)
            yield (
                torch.ops.deepseek_ext.dequantize_fp8.default,
                (q.to(device), s.to(device), granularity, block, torch.float16),
            )


# opcheck's test_schema compares inputs before and after the call with torch.allclose, which PyTorch does not
# implement for float8 tensors; ops that take FP8 inputs get every other check.
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.any_isa
def test_opcheck(device):
    for op, args in opcheck_samples(device):
        fp8_input = any(isinstance(a, torch.Tensor) and a.dtype in FP8_DTYPES for a in args)
        checks = ALL_CHECKS[1:] if fp8_input else ALL_CHECKS
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.any_isa
def test_torch_compile_fullgraph():
    def fake_quant(x):
        q, s = quantize_fp8(x, torch.float8_e4m3fn, "block", 32)
        return dequantize_fp8(q, s, "block", 32, torch.bfloat16) * 2

    x = spread_randn((70, 45), torch.bfloat16)
    compiled = torch.compile(fake_quant, fullgraph=True)
    assert torch.equal(compiled(x), fake_quant(x))


@pytest.mark.parametrize("granularity", ["group", "block"])
@pytest.mark.parametrize("block_size", [2**31, 2**62, 2**63 - 1])
def test_huge_block_sizes_are_one_tile_and_never_divide_by_zero(granularity, block_size):
    """Issue 16: (n + b - 1) / b overflowed to 0 tiles; quantize divided by zero (SIGFPE), dequantize accepted empty
    scales."""
    from tests.helpers import result_of, run_isolated

    x = spread_randn((5, 9))
    q, s = result_of(run_isolated(lambda: quantize_fp8(x, granularity=granularity, block_size=block_size)))
    rq, rs = ref.quantize_fp8(x, torch.float8_e4m3fn, granularity, 9)  # one tile per row / for everything
    assert s.shape == ((5, 1) if granularity == "group" else (1, 1))
    assert_bits_equal(q, rq)
    assert torch.equal(s, rs)
    back = result_of(run_isolated(lambda: dequantize_fp8(q, s, granularity, block_size)))
    assert_bits_equal(back, ref.dequantize_fp8(rq, rs, granularity, 9))
    outcome = run_isolated(lambda: dequantize_fp8(q, torch.empty(5, 0), granularity, block_size))
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError)
    assert "expected scale of shape" in str(outcome[1])


# ------------------------------------------------------------------------------- fake kernels = the C++ checks
def _bad_fp8_calls():
    x = torch.randn(8, 12)
    q, s = ops.quantize_fp8(x, torch.float8_e4m3fn, "block", 4)
    e4 = torch.float8_e4m3fn
    a, sa = ops.quantize_fp8(torch.randn(4, 8), e4, "row")
    b, sb = ops.quantize_fp8(torch.randn(6, 8), e4, "row")
    return {
        "quantize dtype of x": (ops.quantize_fp8, (x.int(),)),
        "quantize dtype": (ops.quantize_fp8, (x, torch.float16)),
        "quantize granularity": (ops.quantize_fp8, (x, e4, "column")),
        "quantize 3-D": (ops.quantize_fp8, (x.view(2, 4, 12), e4, "row")),
        "quantize block_size": (ops.quantize_fp8, (x, e4, "group", 0)),
        "dequantize dtype of x": (ops.dequantize_fp8, (x, s, "block", 4)),
        "dequantize scale dtype": (ops.dequantize_fp8, (q, s.double(), "block", 4)),
        "dequantize out_dtype": (ops.dequantize_fp8, (q, s, "block", 4, torch.int8)),
        "dequantize scale shape": (ops.dequantize_fp8, (q, s, "block", 8)),
        "dequantize scale shape (tensor)": (ops.dequantize_fp8, (q, s, "tensor")),
        "matmul dtype": (ops.fp8_matmul, (a.float(), b.t(), sa, sb.t())),
        "matmul 2-D": (ops.fp8_matmul, (a.view(2, 2, 8), b.t(), sa, sb.t())),
        "matmul K": (ops.fp8_matmul, (a, b, sa, sb.t())),
        "matmul scale dtype": (ops.fp8_matmul, (a, b.t(), sa.double(), sb.t())),
        "matmul scales": (ops.fp8_matmul, (a, b.t(), sa, sb)),
        "matmul bias": (ops.fp8_matmul, (a, b.t(), sa, sb.t(), torch.zeros(5))),
        "matmul out_dtype": (ops.fp8_matmul, (a, b.t(), sa, sb.t(), None, torch.int32)),
        "matmul block_size": (ops.fp8_matmul, (a, b.t(), sa, sb.t(), None, torch.bfloat16, 0)),
    }


BAD_FP8_CALLS = [
    "quantize dtype of x", "quantize dtype", "quantize granularity", "quantize 3-D", "quantize block_size",
    "dequantize dtype of x", "dequantize scale dtype", "dequantize out_dtype", "dequantize scale shape",
    "dequantize scale shape (tensor)", "matmul dtype", "matmul 2-D", "matmul K", "matmul scale dtype",
    "matmul scales", "matmul bias", "matmul out_dtype", "matmul block_size",
]  # fmt: skip


@pytest.mark.any_isa
@pytest.mark.parametrize("case", BAD_FP8_CALLS)
def test_fake_kernels_raise_exactly_the_eager_errors(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, args = _bad_fp8_calls()[case]
    with pytest.raises((TypeError, ValueError, RuntimeError)) as eager:
        fn(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        with pytest.raises((TypeError, ValueError, RuntimeError)) as fake:
            fn(*fake_args)
    print(f"{case}: {eager.value}")
    assert type(fake.value) is type(eager.value)
    assert str(fake.value) == str(eager.value)


@pytest.mark.any_isa
def test_a_compiled_call_fails_with_the_eager_message():
    x = torch.randn(2, 4, 12)
    with pytest.raises(ValueError) as eager:
        ops.quantize_fp8(x, torch.float8_e4m3fn, "row")
    compiled = torch.compile(lambda t: ops.quantize_fp8(t, torch.float8_e4m3fn, "row"), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as traced:
        compiled(x)
    assert str(eager.value) in str(traced.value)
