"""Property-based tests (hypothesis) over the arguments of every native op.

Each example draws shapes (0 and odd sizes included), dtypes, extreme block/group sizes, non-finite values and
memory layouts (contiguous, strided, at a storage offset, expanded with stride 0), and runs the op in a forked child
(``tests.helpers.run_isolated``), so a crash or a hang fails the example instead of killing pytest. An example holds
either valid arguments, and then the result must equal the reference (``deepseek_ext.reference``, or PyTorch's own op)
to the precision the op promises, or exactly one deliberately bad argument, and then the op must raise a TypeError or
ValueError whose message names the op and that argument.

The example budget is fixed and small in ``make test`` (the ``ci`` profile in tests/conftest.py); ``pytest --slow``
runs many more examples per property.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deepseek_ext.ops.amp import unscale_check_norm_  # noqa: E402
from deepseek_ext.ops.fp8 import dequantize_fp8, fp8_matmul, quantize_fp8  # noqa: E402
from deepseek_ext.ops.privacy import clip_sum_noise, per_sample_sq_norms  # noqa: E402
from deepseek_ext.ops.quant import code_sums, quantize_weight, quantized_linear  # noqa: E402
from deepseek_ext.reference import attention as ref_attn  # noqa: E402
from deepseek_ext.reference import fp8 as ref_fp8  # noqa: E402
from deepseek_ext.reference import quant as ref_quant  # noqa: E402
from tests.helpers import assert_clear_error, result_of, run_isolated  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SIZES = [0, 1, 2, 3, 5, 7, 16, 17, 33, 64, 129]
SMALL = [0, 1, 2, 3, 5, 17]
BLOCKS = [1, 2, 3, 5, 16, 127, 128, 129, 1000, 2**31 - 1, 2**31, 2**62, 2**63 - 1]
BAD_BLOCKS = [0, -1, -128, -(2**63)]
LAYOUTS = ["contiguous", "strided", "offset", "expanded"]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


# ------------------------------------------------------------------------------------------------------ inputs
def generator(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def values(g, shape, dtype=torch.float32, special: bool = False) -> torch.Tensor:
    """Gaussian values spread over a few orders of magnitude; with ``special``, some NaN, +-inf and signed zeros."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if x.dim() and x.numel():
        x = x * torch.pow(10.0, torch.randint(-3, 4, (x.shape[0],), generator=g).double()).view(
            -1, *[1] * (x.dim() - 1)
        )
    if special and x.numel():
        k = int(torch.randint(1, max(2, x.numel() // 4 + 1), (), generator=g))
        idx = torch.randint(0, x.numel(), (k,), generator=g)
        pool = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=torch.float64)
        x.view(-1)[idx] = pool[torch.randint(0, 5, (k,), generator=g)]
    return x.to(dtype)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in another memory layout (same logical values, except 'expanded', which repeats the first entry along
    dim 0 through a stride-0 view)."""
    if layout == "strided":
        if t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if t.dim() == 1:
            big = torch.zeros(2 * t.numel(), dtype=t.dtype)
            big[::2].copy_(t) if t.numel() else None
            return big[::2]
        return t
    if layout == "offset":
        big = torch.zeros(t.numel() + 3, dtype=t.dtype)
        big[3:].copy_(t.reshape(-1))
        return big[3:].view(t.shape)
    if layout == "expanded" and t.dim() and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def clamp_block(block: int, *dims: int) -> int:
    """A block edge that tiles these dims exactly as ``block`` does, small enough for the reference to allocate."""
    return min(block, max([*dims, 1]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound) -> None:
    """NaN where the reference is NaN, infinities equal, finite values within ``bound`` (a tensor or a float)."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.equal(a.isnan(), e.isnan()), (
        f"NaN positions differ: {a.isnan().nonzero()[:5]} {e.isnan().nonzero()[:5]}"
    )
    inf = e.isinf()
    assert torch.equal(a[inf], e[inf]), "infinite entries differ"
    fin = e.isfinite()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(e.shape)
    err = (a - e).abs()
    bad = fin & ~(err <= bound)
    assert not bad.any(), f"max error {err[fin].max():.4g} above the bound ({bad.sum()} entries)"


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical except for the sign and payload of NaNs (which IEEE arithmetic leaves unspecified)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return bits_equal(a[keep], b[keep])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return torch.equal(a.contiguous().reshape(-1).view(as_int), b.contiguous().reshape(-1).view(as_int))


# ------------------------------------------------------------------------------------------------------- FP8
def fp8_shape(data, granularity):
    if granularity == "tensor":
        return tuple(data.draw(st.lists(st.sampled_from(SIZES), max_size=3), label="shape"))
    return (data.draw(st.sampled_from(SIZES), label="rows"), data.draw(st.sampled_from(SIZES), label="cols"))


@given(data=st.data())
def test_quantize_fp8(data):
    g = generator(data)
    granularity = data.draw(st.sampled_from(["tensor", "row", "group", "block"]), label="granularity")
    shape = fp8_shape(data, granularity)
    dtype = data.draw(st.sampled_from(FP8), label="dtype")
    block = data.draw(st.sampled_from(BLOCKS), label="block_size")
    x = lay_out(
        values(g, shape, data.draw(st.sampled_from(FLOATS)), data.draw(st.booleans())),
        data.draw(st.sampled_from(LAYOUTS)),
    )
    args = dict(x=x, dtype=dtype, granularity=granularity, block_size=block)
    bad = data.draw(st.sampled_from([None, "x", "x_dims", "dtype", "granularity", "block_size"]), label="bad")
    if bad == "x":
        args["x"] = x.to(data.draw(st.sampled_from([torch.float64, torch.int32])))
    elif bad == "x_dims" and granularity != "tensor":
        args["x"], bad = x.reshape(-1), "x"
    elif bad == "dtype":
        args["dtype"] = data.draw(st.sampled_from([torch.float16, torch.int8]))
    elif bad == "granularity":
        args["granularity"] = "column"
    elif bad == "block_size" and granularity in ("group", "block"):
        args["block_size"] = data.draw(st.sampled_from(BAD_BLOCKS))
    else:
        bad = None
    outcome = run_isolated(lambda: quantize_fp8(**args))
    if bad:
        return assert_clear_error(outcome, "quantize_fp8", bad)
    q, s = result_of(outcome)
    rq, rs = ref_fp8.quantize_fp8(x, dtype, granularity, clamp_block(block, *shape))
    assert bits_equal(q, rq), "codes differ from the reference"
    assert bits_equal(s, rs), f"scales differ from the reference: {s} vs {rs}"


@given(data=st.data())
def test_dequantize_fp8(data):
    g = generator(data)
    granularity = data.draw(st.sampled_from(["tensor", "row", "group", "block"]), label="granularity")
    shape = fp8_shape(data, granularity)
    block = data.draw(st.sampled_from(BLOCKS), label="block_size")
    fp8 = data.draw(st.sampled_from(FP8))
    if data.draw(st.booleans(), label="raw_bits"):  # every code, NaN and inf codes included
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(fp8)
        _, s = ref_fp8.quantize_fp8(torch.zeros(shape), fp8, granularity, clamp_block(block, *shape))
        s = torch.rand(s.shape, generator=g) * 4
    else:
        x, s = ref_fp8.quantize_fp8(values(g, shape), fp8, granularity, clamp_block(block, *shape))
    x = lay_out(x, data.draw(st.sampled_from(LAYOUTS), label="x_layout"))
    s = lay_out(s, data.draw(st.sampled_from(LAYOUTS), label="scale_layout"))
    out_dtype = data.draw(st.sampled_from(FLOATS), label="out_dtype")
    args = dict(x=x, scale=s, granularity=granularity, block_size=block, out_dtype=out_dtype)
    bad = data.draw(st.sampled_from([None, "x", "scale", "scale_shape", "out_dtype", "block_size"]), label="bad")
    if bad == "x":
        args["x"] = x.float()
    elif bad == "scale":
        args["scale"] = s.double()
    elif bad == "scale_shape":
        args["scale"], bad = torch.ones(*s.shape, 2) if s.dim() else torch.ones(3), "scale"
    elif bad == "out_dtype":
        args["out_dtype"] = torch.int32
    elif bad == "block_size" and granularity in ("group", "block"):
        args["block_size"] = data.draw(st.sampled_from(BAD_BLOCKS))
    else:
        bad = None
    outcome = run_isolated(lambda: dequantize_fp8(**args))
    if bad:
        return assert_clear_error(outcome, "dequantize_fp8", bad)
    out = result_of(outcome)
    expected = ref_fp8.dequantize_fp8(x, s, granularity, clamp_block(block, *shape), out_dtype)
    assert out.dtype == out_dtype
    assert_close(out, expected, 0.0)


def fp8_operand(g, shape, fp8):
    return (torch.randn(shape, generator=g) * 4).to(fp8)


@given(data=st.data())
def test_fp8_matmul(data):
    g = generator(data)
    m, k, n = (data.draw(st.sampled_from(SIZES), label=d) for d in "mkn")
    fa, fb = data.draw(st.sampled_from(FP8), label="a_dtype"), data.draw(st.sampled_from(FP8), label="b_dtype")
    a, b = fp8_operand(g, (m, k), fa), fp8_operand(g, (k, n), fb)
    mode = data.draw(st.sampled_from(["tensor", "row", "block"]), label="mode")
    block = data.draw(st.sampled_from(BLOCKS), label="block_size")
    bs = clamp_block(block, k, n)
    kb, nb = -(-k // bs), -(-n // bs)
    shapes = {"tensor": ((), ()), "row": ((m, 1), (1, n)), "block": ((m, kb), (kb, nb))}[mode]
    sa = torch.rand(shapes[0], generator=g) + 0.01
    sb = torch.rand(shapes[1], generator=g) + 0.01
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = torch.randn(n, generator=g).to(data.draw(st.sampled_from(FLOATS), label="bias_dtype"))
    out_dtype = data.draw(st.sampled_from(FLOATS), label="out_dtype")
    a, b = lay_out(a, data.draw(st.sampled_from(LAYOUTS))), lay_out(b, data.draw(st.sampled_from(LAYOUTS)))
    sa, sb = lay_out(sa, data.draw(st.sampled_from(LAYOUTS))), lay_out(sb, data.draw(st.sampled_from(LAYOUTS)))
    args = dict(a=a, b=b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype, block_size=block)
    bad = data.draw(
        st.sampled_from(
            [None, "a", "inner", "scale_a", "scale_shape", "scale_finite", "bias", "out_dtype", "block_size"]
        ),
        label="bad",
    )
    if bad == "a":
        args["a"] = a.float()
    elif bad == "inner":
        args["b"], bad = fp8_operand(g, (k + 1, n), fb), "inner dimensions"
    elif bad == "scale_a":
        args["scale_a"] = sa.double()
    elif bad == "scale_shape" and mode != "tensor":
        args["scale_a"], bad = torch.ones(m + 1, 2), "scale_a"
    elif bad == "scale_finite" and sb.numel():
        sb_bad = sb.clone()
        sb_bad.view(-1)[0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        args["scale_b"], bad = sb_bad, "scale_b"
    elif bad == "bias":
        args["bias"] = torch.zeros(n + 1)
    elif bad == "out_dtype":
        args["out_dtype"] = torch.float64
    elif bad == "block_size":
        args["block_size"] = data.draw(st.sampled_from(BAD_BLOCKS))
    else:
        bad = None
    outcome = run_isolated(lambda: fp8_matmul(**args))
    if bad:
        return assert_clear_error(outcome, "fp8_matmul", bad)
    y = result_of(outcome)
    if mode == "block":
        A = a.double() * ref_fp8.expand_scale(sa.double(), (m, k), "group", bs)
        B = b.double() * ref_fp8.expand_scale(sb.double(), (k, n), "block", bs)
    else:
        A, B = a.double() * sa.double(), b.double() * sb.double()
    expected = A @ B + (0 if bias is None else bias.double())
    assert y.shape == (m, n) and y.dtype == out_dtype
    bound = EPS[out_dtype] * expected.abs() + (A.abs() @ B.abs()) * (k + 2) * 2.0**-23 + 1e-30
    assert_close(y, expected.to(out_dtype), bound)


# ---------------------------------------------------------------------------------------------- integer quant
GROUPS = [0, 32, 64, 96, 128, 65536]
BAD_GROUPS = [48, -32, 65536 + 32, 2**62, 2**63 - 32]


def weight_args(data, g, special=False, groups=GROUPS):
    n = data.draw(st.sampled_from(SIZES), label="out_features")
    k = data.draw(st.sampled_from(SIZES), label="in_features")
    bits = data.draw(st.sampled_from([8, 4]), label="bits")
    group = data.draw(st.sampled_from(groups), label="group_size")
    sym = data.draw(st.booleans(), label="symmetric")
    w = values(g, (n, k), data.draw(st.sampled_from(FLOATS), label="w_dtype"), special)
    return w, bits, group, sym


@given(data=st.data())
def test_quantize_weight(data):
    g = generator(data)
    w, bits, group, sym = weight_args(data, g)
    w = lay_out(w, data.draw(st.sampled_from(LAYOUTS), label="layout"))
    args = dict(w=w, bits=bits, group_size=group, symmetric=sym)
    bad = data.draw(st.sampled_from([None, "w", "w_dims", "bits", "group_size"]), label="bad")
    if bad == "w":
        args["w"] = w.double()
    elif bad == "w_dims":
        args["w"], bad = w.reshape(-1), "w"
    elif bad == "bits":
        args["bits"] = data.draw(st.sampled_from([0, 2, 16, -8]))
    elif bad == "group_size":
        args["group_size"] = data.draw(st.sampled_from(BAD_GROUPS))
    outcome = run_isolated(lambda: quantize_weight(**args))
    if bad:
        return assert_clear_error(outcome, "quantize_weight", bad)
    codes, scales, zeros = result_of(outcome)
    rc, rs, rz = ref_quant.quantize_weight(w, bits, group, sym)
    assert torch.equal(ref_quant.unpack_codes(codes, bits), rc), "codes differ from the reference"
    assert bits_equal(scales, rs) and torch.equal(zeros, rz), "scales or zero points differ from the reference"


@given(data=st.data())
def test_quantize_weight_non_finite(data):
    """NaN cannot be an integer code: NaN weights are an error. Infinite weights are an error too, or saturate to the
    extreme code of their sign while the group's finite weights keep a finite, positive scale."""
    g = generator(data)
    w, bits, group, sym = weight_args(data, g, special=True)
    if not (~w.isfinite()).any():
        return
    outcome = run_isolated(lambda: quantize_weight(w, bits, group, sym))
    if w.isnan().any() or outcome[0] == "raised":
        return assert_clear_error(outcome, "quantize_weight", "w")
    codes, scales, zeros = result_of(outcome)
    assert scales.isfinite().all() and (scales > 0).all(), "a group's scale is not finite and positive"
    c = ref_quant.unpack_codes(codes, bits)[:, : w.shape[1]]
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    wf = w.float()
    assert (c[wf == math.inf] == hi).all() and (c[wf == -math.inf] == lo).all(), "infinities do not saturate"
    back = ref_quant.dequantize_weight(codes, scales, zeros, bits, group, w.shape[1])
    step = scales.repeat_interleave(group or c.shape[1], 1)[:, : w.shape[1]] if c.numel() else back
    fin = wf.isfinite()
    assert ((back - wf).abs()[fin] <= step[fin] / 2 + 1e-6 * wf.abs()[fin]).all()


def linear_args(data, g, x_special=False, act_bits=None):
    w, bits, group, sym = weight_args(data, g, groups=GROUPS[:-1])  # 65536-wide groups: slow, and packing covers them
    n, k = w.shape
    codes, scales, zeros = quantize_weight(w, bits, group, sym)
    m = data.draw(st.sampled_from(SIZES), label="batch")
    act_bits = data.draw(st.sampled_from([8, 16, 0]), label="act_bits") if act_bits is None else act_bits
    x = values(g, (m, k), data.draw(st.sampled_from(FLOATS), label="x_dtype"), x_special)
    bias = torch.randn(n, generator=g) if data.draw(st.booleans(), label="bias") else None
    act_scale = None
    if act_bits == 8 and data.draw(st.booleans(), label="static"):
        act_scale = torch.tensor(float(torch.rand((), generator=g)) + 0.01)
    sums = code_sums(codes, bits, scales.shape[1]) if data.draw(st.booleans(), label="code_sums") else None
    return dict(
        x=x, codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group, in_features=k, act_bits=act_bits,
        bias=bias, act_scale=act_scale, code_sums=sums,
    )  # fmt: skip


def linear_bound(args, expected):
    eps = EPS[args["x"].dtype] if args["x"].dtype != torch.float32 else 0.0
    scale = expected[expected.isfinite()].abs().max() if expected.isfinite().any() else torch.tensor(0.0)
    return 2 * eps * expected.abs() + 1e-5 * scale.double() + 1e-30


@given(data=st.data())
def test_quantized_linear(data):
    g = generator(data)
    args = linear_args(data, g)  # finite inputs: non-finite rows are test_quantized_linear_non_finite_rows
    args["x"] = lay_out(args["x"], data.draw(st.sampled_from(LAYOUTS), label="x_layout"))
    args["codes"] = lay_out(args["codes"], data.draw(st.sampled_from(LAYOUTS), label="codes_layout"))
    good = dict(args)
    n, k, bits = args["codes"].shape[0], args["in_features"], args["bits"]
    bads = [None, "x", "x_features", "codes", "codes_shape", "scales", "zeros", "bits", "group_size", "act_bits"]
    bads += ["bias", "act_scale", "act_scale_value", "code_sums"]
    bad = data.draw(st.sampled_from(bads), label="bad")
    if bad == "x":
        args["x"] = args["x"].to(torch.int32)
    elif bad == "x_features":
        args["x"], bad = torch.zeros(2, k + 1), "features"
    elif bad == "codes":
        args["codes"] = args["codes"].to(torch.int32)
    elif bad == "codes_shape":
        args["codes"], bad = args["codes"][:, :-1] if args["codes"].shape[1] else torch.zeros(n, 3), "codes"
    elif bad == "scales":
        args["scales"] = torch.ones(n + 1, 1)
    elif bad == "zeros":
        args["zeros"] = args["zeros"].float()
    elif bad == "bits":
        args["bits"] = 12 - bits  # 4 <-> 8: the codes no longer fit, or bits is refused
        bad = ("bits", "codes")
    elif bad == "group_size":
        args["group_size"] = data.draw(st.sampled_from(BAD_GROUPS))
    elif bad == "act_bits":
        args["act_bits"] = data.draw(st.sampled_from([4, 7, 32, -8]))
    elif bad == "bias":
        args["bias"] = torch.zeros(n + 2)
    elif bad == "act_scale":
        args["act_scale"] = torch.tensor([1.0, 2.0]) if args["act_bits"] == 8 else torch.tensor(0.5)
    elif bad == "act_scale_value" and args["act_bits"] == 8:
        args["act_scale"] = torch.tensor(data.draw(st.sampled_from([math.nan, math.inf, 0.0, -1.0])))
        bad = "act_scale"
    elif bad == "code_sums":
        args["code_sums"] = torch.zeros(n + 1, 1, dtype=torch.int32)
    else:
        bad = None
    outcome = run_isolated(lambda: quantized_linear(**args))
    if bad:
        return assert_clear_error(outcome, "quantized_linear", bad)
    y = result_of(outcome)
    a = good
    expected = ref_quant.quantized_linear(
        a["x"], a["codes"], a["scales"], a["zeros"], bits, a["group_size"], k, a["act_bits"], a["bias"], a["act_scale"]
    )
    assert y.shape == (a["x"].shape[0], n) and y.dtype == a["x"].dtype
    assert_close(y, expected.to(y.dtype), linear_bound(a, expected))  # rounded (and overflowing) as the output


@given(data=st.data())
def test_quantized_linear_non_finite_rows(data):
    """A NaN in an input row makes that output row NaN. A row with infinities (no NaN) gives an all-NaN row, or
    non-finite outputs wherever float arithmetic on the dequantised weights does (the integer kernels compute such
    rows in float, as nn.Linear would)."""
    g = generator(data)
    args = linear_args(data, g, x_special=True)
    args["act_scale"] = None
    x = args["x"]
    if x.isfinite().all():
        return
    y = result_of(run_isolated(lambda: quantized_linear(**args))).double()
    expected = ref_quant.quantized_linear(
        x.float(), args["codes"], args["scales"], args["zeros"], args["bits"], args["group_size"],
        args["in_features"], 16, args["bias"],
    ).to(y.dtype)  # fmt: skip
    for r in range(x.shape[0]):
        if x[r].isnan().any():
            assert y[r].isnan().all(), f"row {r} holds NaN but its output is not NaN"
        elif x[r].isinf().any() and not y[r].isnan().all():
            # Which non-finite value comes out (inf of a sign, or NaN from inf - inf) depends on the order of the
            # sums and on float32 overflow; what must hold is that no infinite input turns finite.
            bad = expected[r].isfinite() == False  # noqa: E712
            assert not y[r][bad].isfinite().any(), f"row {r}: an infinite input gave a finite output"


# ------------------------------------------------------------------------------------------ mixed precision
@given(data=st.data())
def test_unscale_check_norm_(data):
    g = generator(data)
    count = data.draw(st.integers(0, 4), label="count")
    grads = []
    for i in range(count):
        shape = tuple(data.draw(st.lists(st.sampled_from(SMALL), max_size=3), label=f"shape{i}"))
        t = values(g, shape, data.draw(st.sampled_from(FLOATS), label=f"dtype{i}"), data.draw(st.booleans()))
        grads.append(lay_out(t, data.draw(st.sampled_from(["contiguous", "strided", "offset"]), label=f"layout{i}")))
    found_inf = torch.zeros(1)
    inv_scale = torch.tensor([data.draw(st.sampled_from([1.0, 0.5, 2.0**-16, 3.0]), label="inv_scale")])
    args = dict(grads=grads, found_inf=found_inf, inv_scale=inv_scale)
    bads = [None, "found_inf", "inv_scale"] + (["expanded", "dtype"] if count else [])
    bad = data.draw(st.sampled_from(bads), label="bad")
    if bad in ("expanded", "dtype"):
        last = grads[-1]
        if bad == "expanded":
            grads[-1] = torch.zeros(1, 1).expand(3, 2)  # one storage element behind six
        else:
            grads[-1] = last.double()
        bad = f"grads[{count - 1}]"
    elif bad == "found_inf":
        args["found_inf"] = torch.zeros(2)
    elif bad == "inv_scale":
        args["inv_scale"] = torch.tensor([0.5], dtype=torch.float64)
    before = [t.clone() for t in grads]

    def call():
        try:
            norm = unscale_check_norm_(grads, args["found_inf"], args["inv_scale"])
            return ("ok", norm, grads, args["found_inf"])
        except Exception as e:  # the state after a refused call matters too
            return ("raised", e, grads, args["found_inf"])

    kind, value, after, found_after = result_of(run_isolated(call))
    if bad:
        assert_clear_error(("raised", value) if kind == "raised" else ("ok", value), "unscale_check_norm_", bad)
        assert all(bits_equal(a, b) for a, b in zip(after, before)), "a refused call changed some gradients"
        return
    assert kind == "ok", f"valid arguments raised {value!r}"
    expected = [t.clone() for t in before]
    expected_found = torch.zeros(1)
    if expected:
        torch._amp_foreach_non_finite_check_and_unscale_(expected, expected_found, inv_scale)
    for a, e in zip(after, expected):
        assert same_values(a, e), "unscaled gradient differs from PyTorch's"
    assert torch.equal(found_after, expected_found)
    ref_norm = math.sqrt(sum(float(e.double().pow(2).sum()) for e in expected))
    if expected_found.item():
        assert not math.isfinite(float(value))
    else:
        assert math.isclose(float(value), ref_norm, rel_tol=1e-5, abs_tol=1e-30)


# --------------------------------------------------------------------------------------- differential privacy
DP_DTYPES = FLOATS + [torch.float64]


def per_sample(data, g):
    n = data.draw(st.sampled_from(SIZES), label="samples")
    rest = tuple(data.draw(st.lists(st.sampled_from(SMALL), max_size=2), label="shape"))
    dtype = data.draw(st.sampled_from(DP_DTYPES), label="dtype")
    grads = values(g, (n, *rest), dtype, data.draw(st.booleans(), label="non_finite"))
    return lay_out(grads, data.draw(st.sampled_from(LAYOUTS), label="layout"))


@given(data=st.data())
def test_per_sample_sq_norms(data):
    g = generator(data)
    grads = per_sample(data, g)
    bad = data.draw(st.sampled_from([None, "grads", "grads_dims"]), label="bad")
    arg = {"grads": grads.to(torch.int64), "grads_dims": torch.tensor(1.0)}.get(bad, grads)
    outcome = run_isolated(lambda: per_sample_sq_norms(arg))
    if bad:
        return assert_clear_error(outcome, "per_sample_sq_norms", "grads")
    out = result_of(outcome)
    sq = grads.double().pow(2)
    expected = sq.sum(dim=tuple(range(1, sq.dim()))) if sq.dim() > 1 else sq
    assert out.dtype == (torch.float64 if grads.dtype == torch.float64 else torch.float32)
    assert_close(out, expected.to(out.dtype), 1e-5 * expected.abs() + 1e-30)


@given(data=st.data())
def test_clip_sum_noise(data):
    g = generator(data)
    grads = per_sample(data, g)
    n = grads.shape[0]
    factors = lay_out(torch.rand(n, generator=g), data.draw(st.sampled_from(LAYOUTS), label="factors_layout"))
    noise = None
    if data.draw(st.booleans(), label="noise"):
        noise = values(g, grads.shape[1:], data.draw(st.sampled_from([torch.float32, torch.float64])))
    scale = data.draw(st.sampled_from([1.0, 0.5, 1 / 3, 0.0, 1e-6]), label="scale")
    args = dict(grads=grads, factors=factors, noise=noise, scale=scale)
    bad = data.draw(st.sampled_from([None, "grads", "factors", "factors_shape", "noise", "noise_dtype"]), label="bad")
    if bad == "grads":
        args["grads"] = torch.tensor(1.0)
    elif bad == "factors":
        args["factors"] = factors.double()
    elif bad == "factors_shape":
        args["factors"], bad = torch.ones(n + 1), "factors"
    elif bad == "noise":
        args["noise"] = torch.zeros(*grads.shape[1:], 2)
    elif bad == "noise_dtype":
        args["noise"], bad = torch.zeros(grads.shape[1:], dtype=torch.float16), "noise"
    outcome = run_isolated(lambda: clip_sum_noise(**args))
    if bad:
        return assert_clear_error(outcome, "clip_sum_noise", bad)
    out = result_of(outcome)
    terms = factors.double().view(-1, *[1] * (grads.dim() - 1)) * grads.double()
    expected = (terms.sum(0) + (0 if noise is None else noise.double())) * scale
    magnitude = (terms.abs().sum(0) + (0 if noise is None else noise.double().abs())) * scale
    assert out.dtype == grads.dtype and out.shape == grads.shape[1:]
    tol = EPS[grads.dtype] if grads.dtype in (torch.float16, torch.bfloat16) else 0.0
    assert_close(out, expected.to(grads.dtype), 2 * tol * expected.abs() + (n + 2) * 2.0**-23 * magnitude + 1e-30)


# -------------------------------------------------------------------------------------------------- attention
ATT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def attention_tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]


@given(data=st.data())
def test_fused_attention(data):
    g = generator(data)
    b, hkv = data.draw(st.sampled_from([0, 1, 2]), label="batch"), data.draw(st.sampled_from([1, 2]), label="heads_kv")
    hq = hkv * data.draw(st.sampled_from([1, 2]), label="group")
    sq, sk = (
        data.draw(st.sampled_from(SMALL + [33]), label="seq_q"),
        data.draw(st.sampled_from(SMALL + [33]), label="seq_k"),
    )
    d, dv = (
        data.draw(st.sampled_from([1, 3, 16, 17, 64]), label="d"),
        data.draw(st.sampled_from([1, 5, 16]), label="dv"),
    )
    dtype = data.draw(st.sampled_from(ATT_DTYPES), label="dtype")
    q, k, v = (
        lay_out(torch.randn(s, generator=g, dtype=torch.float64).to(dtype), data.draw(st.sampled_from(LAYOUTS)))
        for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv))
    )
    mask_kind = data.draw(st.sampled_from([None, "bool", "float", "causal"]), label="mask")
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "float"):
        shape = data.draw(
            st.sampled_from([(sq, sk), (1, 1, sq, sk), (b, 1, 1, sk), (b, hq, sq, sk)]), label="mask_shape"
        )
        mask = torch.rand(shape, generator=g) > 0.3
        if mask_kind == "float":
            mask = torch.where(mask, torch.randn(shape, generator=g), torch.full(shape, -math.inf)).to(
                data.draw(st.sampled_from([torch.float32, dtype]))
            )
    scale = data.draw(st.sampled_from([None, 0.1, 1.0, 2.5]), label="scale")
    sc = 1 / math.sqrt(d) if scale is None else scale
    args = [q, k, v, mask, 0.0, causal, sc, None]
    bad = data.draw(st.sampled_from([None, "query", "head_dim_0", "head_dim_257", "heads", "attn_mask", "scale",
                                     "dropout_p", "is_causal", "key"]), label="bad")  # fmt: skip
    names = {"head_dim_0": "head dim", "head_dim_257": "head dim", "heads": "heads"}
    if bad == "query":
        args[0] = q.to(torch.int32)
    elif bad == "head_dim_0":
        args[0], args[1] = q[..., :0], k[..., :0]
    elif bad == "head_dim_257":
        args[2] = torch.zeros(b, hkv, sk, 257, dtype=dtype)
    elif bad == "heads":
        args[0], args[1], args[2] = (
            torch.zeros(b, h, s, e, dtype=dtype) for h, s, e in ((3, sq, d), (2, sk, d), (2, sk, dv))
        )
    elif bad == "attn_mask":
        args[3], args[5] = torch.ones(sq + 1, sk + 2, dtype=torch.bool), False
    elif bad == "scale":
        args[6] = data.draw(st.sampled_from([math.nan, math.inf]))
    elif bad == "dropout_p":
        args[4] = data.draw(st.sampled_from([1.0, -0.1, math.nan]))
    elif bad == "is_causal":
        args[3], args[5] = torch.ones(sq, sk, dtype=torch.bool), True
    elif bad == "key":
        args[1] = k.to(torch.float16 if dtype != torch.float16 else torch.float32)
        bad = ("key", "dtype")
    outcome = run_isolated(lambda: torch.ops.deepseek_ext.fused_attention_fwd(*args))
    if bad:
        return assert_clear_error(outcome, "fused_attention_fwd", names.get(bad, bad))
    out, lse = result_of(outcome)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    expected = ref_attn.attention(q64, k64, v64, m64, causal, sc)
    assert out.shape == expected.shape and out.dtype == dtype
    tol = attention_tolerance(dtype) * (1 + v.double().abs().amax().item() if v.numel() else 1)
    assert_close(out, expected.detach(), tol)
    if dtype == torch.bfloat16 or not out.numel():
        return
    # The backward op against autograd through the float64 reference.
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    dq, dk, dv_ = result_of(
        run_isolated(
            lambda: torch.ops.deepseek_ext.fused_attention_bwd(grad_out, q, k, v, out, lse, mask, 0.0, causal, sc, None)
        )
    )
    eq, ek, ev = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double(), allow_unused=True)
    for got, want in ((dq, eq), (dk, ek), (dv_, ev)):
        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
        assert_close(got, want, 50 * tol * (1 + want.abs().amax().item() if want.numel() else 1))


@given(data=st.data())
def test_fused_attention_varlen(data):
    g = generator(data)
    lens_q = data.draw(st.lists(st.sampled_from([0, 1, 3, 17]), min_size=0, max_size=3), label="lens_q")
    lens_k = [data.draw(st.sampled_from([0, 1, 4, 17]), label=f"len_k{i}") for i in range(len(lens_q))]
    hkv = data.draw(st.sampled_from([1, 2]), label="heads_kv")
    hq = hkv * data.draw(st.sampled_from([1, 2]), label="group")
    d = data.draw(st.sampled_from([1, 8, 17]), label="d")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    cu_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="cu_dtype")
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(cu_dtype)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(cu_dtype)
    q = lay_out(torch.randn(int(cu_q[-1]), hq, d, generator=g, dtype=dtype), data.draw(st.sampled_from(LAYOUTS)))
    k = torch.randn(int(cu_k[-1]), hkv, d, generator=g, dtype=dtype)
    v = lay_out(torch.randn(int(cu_k[-1]), hkv, d, generator=g, dtype=dtype), data.draw(st.sampled_from(LAYOUTS)))
    causal = data.draw(st.booleans(), label="causal")
    sc = 1 / math.sqrt(d)
    args = [q, k, v, cu_q, cu_k, -1, -1, causal, sc]
    bad = data.draw(st.sampled_from([None, "start", "order", "end", "max_seqlen_q", "batch", "cu_dims"]), label="bad")
    if bad == "start":
        args[3], bad = cu_q + 1, "cu_seqlens_q"
    elif bad == "order" and len(lens_k) >= 2 and lens_k[0] > 0:
        bad_k = cu_k.clone()
        bad_k[1] = cu_k[-1] + 1
        args[4], bad = bad_k, "cu_seqlens_k"
    elif bad == "end":
        bad_q = cu_q.clone()
        bad_q[-1] += 1
        args[3], bad = bad_q, "cu_seqlens_q"
    elif bad == "max_seqlen_q" and max(lens_q, default=0) > 0:
        args[5] = max(lens_q) - 1
    elif bad == "batch":
        args[4], bad = torch.cat([cu_k, cu_k[-1:]]), "cu_seqlens_q and cu_seqlens_k"
    elif bad == "cu_dims":
        args[3], bad = cu_q.view(1, -1), "cu_seqlens_q"
    else:
        bad = None
    outcome = run_isolated(lambda: torch.ops.deepseek_ext.fused_attention_varlen_fwd(*args))
    if bad:
        return assert_clear_error(outcome, "fused_attention_varlen_fwd", bad)
    out, lse = result_of(outcome)
    expected = ref_attn.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal, sc)
    assert_close(out, expected, attention_tolerance(dtype) * 4)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grads = result_of(
        run_isolated(
            lambda: torch.ops.deepseek_ext.fused_attention_varlen_bwd(
                grad_out, q, k, v, out, lse, cu_q, cu_k, -1, -1, causal, sc
            )
        )
    )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = ref_attn.attention_varlen(q64, k64, v64, cu_q, cu_k, causal, sc)
    if ref.requires_grad:
        want = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double(), allow_unused=True)
    else:
        want = (None, None, None)
    for got, w in zip(grads, want):
        w = torch.zeros_like(got, dtype=torch.float64) if w is None else w
        assert_close(got, w, attention_tolerance(dtype) * 50 * (1 + (w.abs().amax().item() if w.numel() else 0)))
