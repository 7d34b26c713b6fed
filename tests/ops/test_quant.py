"""quantize_weight and quantized_linear (deepseek_ext/ops/quant.py) against the reference."""

from __future__ import annotations

import pytest
import torch

from deepseek_ext.ops.quant import code_sums, quantize_weight, quantized_linear
from deepseek_ext.reference import quant as ref
from tests.helpers import DEVICES

CONFIGS = [
    (8, 0, True),
    (8, 0, False),
    (8, 32, True),
    (8, 128, False),
    (4, 0, True),
    (4, 64, True),
    (4, 128, False),
    (4, 32, False),
]
SHAPES = [(1, 1, 1), (7, 17, 5), (1, 128, 17), (64, 300, 129), (16, 1000, 33), (3, 11008, 17), (7, 4096, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,group,sym", CONFIGS, ids=str)
def test_packing_matches_the_reference_and_round_trips(device, bits, group, sym):
    w = torch.randn(19, 333) * torch.logspace(-1, 1, 333)
    codes, scales, zeros = quantize_weight(w.to(device), bits, group, sym)
    rc, rs, rz = ref.quantize_weight(w, bits, group, sym)
    assert torch.equal(ref.unpack_codes(codes.cpu(), bits), rc)
    torch.testing.assert_close(scales.cpu(), rs, rtol=0, atol=0)
    assert torch.equal(zeros.cpu(), rz)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    assert rc.min() >= lo and rc.max() <= hi
    back = ref.dequantize_weight(codes.cpu(), scales.cpu(), zeros.cpu(), bits, group, 333)
    step = rs.repeat_interleave(group or rc.shape[1], 1)[:, :333]
    assert ((back - w).abs() <= step / 2 + 1e-6 * w.abs()).all()  # within half a quantisation step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,group,sym", CONFIGS, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
@pytest.mark.parametrize("act_bits", [8, 16, 0])
def test_quantized_linear_matches_the_reference(device, bits, group, sym, m, k, n, act_bits):
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    codes, scales, zeros = quantize_weight(w, bits, group, sym)
    sums = code_sums(codes, bits, scales.shape[1])
    dev = dict(device=device)
    y = quantized_linear(
        x.to(**dev),
        codes.to(**dev),
        scales.to(**dev),
        zeros.to(**dev),
        bits,
        group,
        k,
        act_bits,
        b.to(**dev),
        None,
        sums.to(**dev),
    )
    expected = ref.quantized_linear(x, codes, scales, zeros, bits, group, k, act_bits, b)
    err = (y.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert err < 1e-5, f"relative error {err:.3g}"


def test_static_scale_and_low_precision_inputs():
    x, w = torch.randn(5, 64), torch.randn(8, 64)
    codes, scales, zeros = quantize_weight(w, 8, 0, True)
    s = torch.tensor(0.05)
    y = quantized_linear(x, codes, scales, zeros, 8, 0, 64, 8, None, s)
    torch.testing.assert_close(
        y.double(), ref.quantized_linear(x, codes, scales, zeros, 8, 0, 64, 8, None, s), rtol=1e-5, atol=1e-5
    )
    yb = quantized_linear(x.bfloat16(), codes, scales, zeros, 8, 0, 64, 16)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: quantize_weight(torch.randn(4, 64), 3, 0, True), ValueError, "bits to be 8 or 4, but got 3"),
        (lambda: quantize_weight(torch.randn(4, 64), 8, 48, True), ValueError, "multiple of 32"),
        (lambda: quantize_weight(torch.randn(64), 8, 0, True), ValueError, "expected w to be 2-D"),
        (
            lambda: quantized_linear(torch.randn(2, 63), *quantize_weight(torch.randn(4, 64), 8, 0, True), 8, 0, 64, 8),
            ValueError,
            "x has 63 features but the layer takes 64",
        ),
        (
            lambda: quantized_linear(torch.randn(2, 64), *quantize_weight(torch.randn(4, 64), 8, 0, True), 4, 0, 64, 8),
            TypeError,
            "expected codes to have dtype torch.uint8",
        ),
        (
            lambda: quantized_linear(
                torch.randn(2, 64), *quantize_weight(torch.randn(4, 64), 8, 32, True), 8, 0, 64, 8
            ),
            ValueError,
            r"expected scales and zeros of shape \[4, 1\]",
        ),
        (
            lambda: quantized_linear(
                torch.randn(2, 64),
                *quantize_weight(torch.randn(4, 64), 8, 0, True),
                8,
                0,
                64,
                16,
                None,
                torch.tensor(0.1),
            ),
            ValueError,
            "only applies with act_bits=8",
        ),
        (
            lambda: quantized_linear(torch.randn(2, 64), *quantize_weight(torch.randn(4, 64), 8, 0, True), 8, 0, 64, 4),
            ValueError,
            "act_bits to be 8, or 16 / 0",
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
    w = torch.randn(24, 96, device=device)
    torch.library.opcheck(torch.ops.deepseek_ext.quantize_weight.default, (w, 4, 32, True))
    codes, scales, zeros = quantize_weight(w, 4, 32, True)
    for act_bits in (8, 16):
        torch.library.opcheck(
            torch.ops.deepseek_ext.quantized_linear.default,
            (
                torch.randn(20, 96, device=device),
                codes,
                scales,
                zeros,
                4,
                32,
                96,
                act_bits,
                torch.randn(24, device=device),
                None,
                None,
            ),
        )


@pytest.mark.parametrize("bits,group,sym", CONFIGS, ids=str)
def test_packed_layout_round_trips_and_gives_identical_results(bits, group, sym):
    from deepseek_ext.ops.quant import pack_quantized_weight, unpack_quantized_weight

    g = torch.Generator().manual_seed(bits + group)
    k, n = 300, 130
    w, x = torch.randn(n, k, generator=g), torch.randn(9, k, generator=g)
    codes, scales, zeros = quantize_weight(w, bits, group, sym)
    packed = pack_quantized_weight(codes, bits, group, k)
    assert packed.shape == (3, (codes.shape[1] * (8 // bits)) // (4 if bits == 8 else 8), 64, 4)
    assert torch.equal(unpack_quantized_weight(packed, bits, group, k, n), codes)
    for act_bits in (8, 16):
        a = quantized_linear(x, codes, scales, zeros, bits, group, k, act_bits)
        b = quantized_linear(x, packed, scales, zeros, bits, group, k, act_bits)
        assert torch.equal(a, b)


@pytest.mark.any_isa
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (8, 128), (4, 32)], ids=str)
def test_int8_results_are_bit_identical_across_instruction_sets_and_batch_sizes(bits, group):
    """The integer kernels differ per CPU level and batch size (GEMV, GEMM, widened 4-bit blocks); the promise is one
    result for a row whatever the level and whatever else is in its batch."""
    import deepseek_ext
    from tests.ops.conftest import LEVELS

    g = torch.Generator().manual_seed(7)
    k, n = 1000, 70
    x, w = torch.randn(33, k, generator=g), torch.randn(n, k, generator=g)
    codes, scales, zeros = quantize_weight(w, bits, group, True)
    want = quantized_linear(x, codes, scales, zeros, bits, group, k, 8)
    for level in LEVELS:
        with deepseek_ext.capped_cpu_isa(level):
            for rows in (1, 2, 5, 17, 33):
                y = quantized_linear(x[:rows], codes, scales, zeros, bits, group, k, 8)
                assert torch.equal(y, want[:rows]), (level, rows)


def test_non_finite_inputs_propagate_as_in_float():
    w = torch.randn(8, 64)
    codes, scales, zeros = quantize_weight(w, 8, 0, True)
    x = torch.randn(3, 64)
    x[1, 5], x[2, 3] = float("nan"), float("inf")
    y = quantized_linear(x, codes, scales, zeros, 8, 0, 64, 8)
    deq = ref.dequantize_weight(codes, scales, zeros, 8, 0, 64)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    torch.testing.assert_close(y[2], x[2] @ deq.t(), equal_nan=True)
    with pytest.raises(ValueError, match="expected a finite, positive act_scale, but got 0"):
        quantized_linear(x, codes, scales, zeros, 8, 0, 64, 8, None, torch.tensor(0.0))


@pytest.mark.parametrize("group_size", [65536 + 32, 2**40, 2**62, 2**63 - 32])
def test_huge_group_sizes_are_refused_by_name(group_size):
    """Issue 16: padded sizes from a group_size near 2^63 overflowed."""
    from tests.helpers import run_isolated

    outcome = run_isolated(lambda: quantize_weight(torch.randn(3, 40), 8, group_size, True))
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError), outcome
    assert "quantize_weight: expected group_size to be 0 (per channel) or a positive multiple of 32" in str(outcome[1])
    codes, scales, zeros = quantize_weight(torch.randn(3, 40), 8, 0, True)
    outcome = run_isolated(lambda: quantized_linear(torch.randn(2, 40), codes, scales, zeros, 8, group_size, 40, 8))
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError) and "group_size" in str(outcome[1])


def test_largest_group_size_round_trips():
    w = torch.randn(3, 40)
    codes, scales, zeros = quantize_weight(w, 8, 65536, True)
    rc, rs, rz = ref.quantize_weight(w, 8, 65536, True)
    assert torch.equal(ref.unpack_codes(codes, 8), rc) and torch.equal(scales, rs) and scales.shape == (3, 1)


@pytest.mark.parametrize(
    "act_scale,match",
    [
        (torch.tensor(float("nan")), "expected a finite, positive act_scale, but got nan"),
        (torch.tensor(-0.5), "expected a finite, positive act_scale"),
        (torch.tensor(0.5, dtype=torch.float64), "expected act_scale to have dtype torch.float32"),
    ],
)
def test_bad_static_activation_scales_are_refused(act_scale, match):
    codes, scales, zeros = quantize_weight(torch.randn(3, 40), 8, 0, True)
    with pytest.raises((ValueError, TypeError), match="quantized_linear: " + match):
        quantized_linear(torch.randn(2, 40), codes, scales, zeros, 8, 0, 40, 8, None, act_scale)


@pytest.mark.any_isa
def test_none_is_the_sentinel_for_per_channel_and_weight_only():
    qw, ql = quantize_weight, quantized_linear
    torch.manual_seed(0)
    w, x = torch.randn(24, 40), torch.randn(3, 40)
    codes, scales, zeros = qw(w, 8, None)
    for got, want in zip((codes, scales, zeros), qw(w, 8, 0)):
        assert torch.equal(got, want)
    assert scales.shape == (24, 1)  # one scale per output channel
    weight_only = ql(x, codes, scales, zeros, 8, None, 40, act_bits=None)
    assert torch.equal(weight_only, ql(x, codes, scales, zeros, 8, 0, 40, act_bits=0))
    torch.testing.assert_close(weight_only, x @ ref.dequantize_weight(codes, scales, zeros, 8, None, 40).t())
