"""per_sample_sq_norms, clip_sum_noise, gaussian_noise and gaussian_noise_ (deepseek_ext/ops/privacy.py) against
plain PyTorch and the reference noise stream (deepseek_ext/reference/privacy.py), plus the stream's statistics."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_ext.ops import clip_sum_noise, draw_seed, gaussian_noise, gaussian_noise_, per_sample_sq_norms
from deepseek_ext.reference import privacy as ref_privacy
from tests.helpers import DEVICES

SHAPES = [(1, 1), (3, 17), (5, 4, 97), (2, 20000), (64, 3, 3, 3), (0, 5), (4, 0)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_per_sample_sq_norms(device, dtype, shape):
    g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    got = per_sample_sq_norms(g)
    ref = g.double().flatten(1).pow(2).sum(1) if shape[0] else torch.zeros(0, dtype=torch.float64)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (shape[0],)
    torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_noise", [False, True])
def test_clip_sum_noise(device, dtype, shape, with_noise):
    g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    f = torch.rand(shape[0], device=device)
    noise = torch.randn(shape[1:], device=device) if with_noise else None
    got = clip_sum_noise(g, f, noise, 0.25)
    ref = (g.double() * f.double().view(-1, *([1] * (g.dim() - 1)))).sum(0)
    if with_noise:
        ref = ref + noise.double()
    ref = ref * 0.25
    assert got.dtype == dtype and got.shape == shape[1:]
    torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=TOL[dtype], atol=TOL[dtype])


# ------------------------------------------------------------------------------------------ generated noise
OPMATH = {torch.float32: torch.float32, torch.float64: torch.float64, torch.float16: torch.float32,
          torch.bfloat16: torch.float32}  # fmt: skip
NOISE_CASES = [  # (shape, offset): partial tiles at either end, a counter crossing 2^32 blocks, the top of int64
    ((0,), 0),
    ((1,), 0),
    ((63,), 1),
    ((5, 17), 37),
    ((3, 64, 7), 64),
    ((200,), 2**34 - 70),
    ((100,), 2**63 - 100),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,offset", NOISE_CASES, ids=str)
def test_gaussian_noise_matches_the_reference_stream(device, dtype, shape, offset):
    got = gaussian_noise(shape, 1.5, 987654321, offset, dtype=dtype, device=device)
    ref = ref_privacy.gaussian_noise(shape, 1.5, 987654321, offset, torch.float64)
    assert got.dtype == dtype and got.shape == shape and got.device.type == device
    # float32 Box-Muller: a few float32 ulps of values below 10 (then the output dtype's rounding)
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 4, 97), (2, 5000), (0, 70)], ids=str)
def test_fused_noise_equals_clip_sum_plus_the_same_generated_noise(device, dtype, shape):
    g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    f = torch.rand(shape[0], device=device)
    seed, offset = draw_seed(), 128
    fused = clip_sum_noise(g, f, None, 0.25, noise_std=0.7, seed=seed, offset=offset)
    noise = gaussian_noise(shape[1:], 0.7, seed, offset, dtype=OPMATH[dtype], device=device)
    # Generated noise starts the accumulator exactly as a noise tensor does: the same bits.
    assert torch.equal(fused, clip_sum_noise(g, f, noise, 0.25))
    ref = ref_privacy.clip_sum_noise(g.cpu(), f.cpu(), None, 0.25, 0.7, int(seed), offset)
    torch.testing.assert_close(fused.double().cpu(), ref, rtol=TOL[dtype], atol=max(TOL[dtype], 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,offset", [((0,), 0), ((1,), 3), ((5, 17), 37), ((3, 2048 * 3 + 5), 64)], ids=str)
def test_in_place_noise_is_the_same_stream(device, dtype, shape, offset):
    seed = draw_seed()
    want = gaussian_noise(shape, 0.7, seed, offset, dtype=dtype, device=device)
    buf = torch.full(shape, float("nan"), dtype=dtype, device=device)  # every element is overwritten
    assert gaussian_noise_(buf, 0.7, seed, offset) is buf
    assert torch.equal(buf, want)
    # a transposed (non-contiguous) tensor gets the values in its own row-major order
    t = torch.full(shape[::-1], float("nan"), dtype=dtype, device=device).t() if len(shape) == 2 else buf.clone()
    gaussian_noise_(t, 0.7, seed, offset)
    assert not t.isnan().any() and torch.equal(t, want)
    # accumulate: (tensor + std z) * scale, the bits of clip_sum_noise over that tensor as the only sample
    base = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    acc = gaussian_noise_(base.clone(), 0.7, seed, offset, scale=0.25, accumulate=True)
    fused = clip_sum_noise(
        base[None], torch.ones(1, device=device), None, 0.25, noise_std=0.7, seed=seed, offset=offset
    )
    assert torch.equal(acc, fused)
    ref = (base.double().cpu() + ref_privacy.gaussian_noise(shape, 0.7, int(seed), offset, torch.float64)) * 0.25
    torch.testing.assert_close(acc.double().cpu(), ref, rtol=TOL[dtype], atol=max(TOL[dtype], 1e-5))
    # scale without accumulate; std 0 zeroes, or only scales what is there
    scaled = gaussian_noise_(torch.empty(shape, dtype=dtype, device=device), 0.7, seed, offset, scale=-2.0)
    torch.testing.assert_close(scaled.double(), want.double() * -2.0, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(gaussian_noise_(base.clone(), 0.0, seed, offset), torch.zeros_like(base))
    assert torch.equal(gaussian_noise_(base.clone(), 0.0, seed, offset, scale=3.0, accumulate=True), base * 3.0)


def test_noise_is_deterministic_and_offsets_and_seeds_give_other_streams():
    z = gaussian_noise((4, 1000), 1.0, 42)
    assert torch.equal(z, gaussian_noise((4, 1000), 1.0, torch.tensor([42])))
    flat = z.flatten()
    # any slice of the stream generated alone: the same values, bit for bit
    for start in (1, 63, 64, 1000, 3999):
        assert torch.equal(gaussian_noise((4000 - start,), 1.0, 42, start), flat[start:])
    assert torch.equal(gaussian_noise((4000,), 3.0, 42), flat * 3.0)
    later = gaussian_noise((4000,), 1.0, 42, 4000)
    other = gaussian_noise((4000,), 1.0, 43)
    negative = gaussian_noise((4000,), 1.0, -42)
    big = gaussian_noise((4000,), 1.0, 2**64 - 42)  # the same 64 bits as -42
    assert torch.equal(negative, big)
    for a in (later, other, negative):
        assert not torch.isin(a, flat).any()  # no shared values, let alone shifted copies
        assert abs(torch.corrcoef(torch.stack([a, flat]))[0, 1]) < 0.1
    assert torch.equal(gaussian_noise((5,), 0.0, 1), torch.zeros(5))


def test_noise_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    g, f = torch.randn(3, 300_001), torch.rand(3)
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fused = clip_sum_noise(g, f, None, 0.5, noise_std=1.0, seed=7, offset=5)
            added = gaussian_noise_(torch.ones(300_001, dtype=torch.float64), 1.0, 7, 5, scale=0.5, accumulate=True)
            results.append((gaussian_noise((300_001,), 1.0, 7, 5), fused, added))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.any_isa
def test_every_instruction_set_level_computes_the_reference_stream():
    import deepseek_ext
    from tests.ops.conftest import LEVELS

    ref = ref_privacy.gaussian_noise((20_011,), 1.0, 31337, 29, torch.float64)
    for level in LEVELS:  # each level's own vector width: 16, 8 or 4 lanes per tile row
        with deepseek_ext.capped_cpu_isa(level):
            got = gaussian_noise((20_011,), 1.0, 31337, 29)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=f"level {level}")


def _normal_statistics(z: torch.Tensor) -> dict:
    """Moments, lag correlations, tail mass and the Kolmogorov-Smirnov distance to N(0, 1) of a flat sample."""
    z = z.double()
    n = z.numel()
    mean = z.mean()
    c = z - mean
    var = c.pow(2).mean()
    s = torch.sort(z).values
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    stats = {
        "mean": mean.item(),
        "var": var.item(),
        "skew": (c.pow(3).mean() / var**1.5).item(),
        "excess_kurtosis": (c.pow(4).mean() / var**2 - 3).item(),
        "tail3": (z.abs() > 3).double().mean().item(),
        "ks": ks.item(),
    }
    for lag in (1, 16, 64):  # neighbours in a tile row, the rows of a tile, neighbouring tiles
        stats[f"lag{lag}"] = (c[:-lag] * c[lag:]).mean().item() / var.item()
    return stats


def _normal_violations(z: torch.Tensor) -> list[str]:
    """The statistics of an N(0, 1) sample that fall outside bounds a true N(0, 1) sample of this size meets with
    probability above 1 - 1e-8 each (about 6 standard errors; KS at the 1e-9 level)."""
    n = z.numel()
    st = _normal_statistics(z)
    p3 = 2 * (1 - 0.9986501019683699)  # P(|Z| > 3)
    bounds = {
        "mean": 6 / math.sqrt(n),
        "var": 6 * math.sqrt(2 / n),
        "skew": 6 * math.sqrt(6 / n),
        "excess_kurtosis": 6 * math.sqrt(24 / n),
        "tail3": 6 * math.sqrt(p3 * (1 - p3) / n),
        "ks": math.sqrt(math.log(2 / 1e-9) / (2 * n)),
        "lag1": 6 / math.sqrt(n),
        "lag16": 6 / math.sqrt(n),
        "lag64": 6 / math.sqrt(n),
    }
    centre = {"var": 1.0, "tail3": p3}
    print({k: round(v, 6) for k, v in st.items()})
    return [k for k, b in bounds.items() if abs(st[k] - centre.get(k, 0.0)) > b]


@pytest.mark.parametrize("device", DEVICES)
def test_noise_statistics_are_those_of_a_standard_normal(device):
    n = 1_000_000
    for seed, offset in ((0, 0), (2**62 + 12345, 3)):
        z = gaussian_noise((n,), 1.0, seed, offset, device=device).cpu()
        assert _normal_violations(z) == []
        assert z.abs().max() < 6.67  # Box-Muller's largest radius from 32-bit uniforms
    # fused into the reduction over no samples: the same statistics times the std
    g = torch.empty(0, n, device=device)
    z = clip_sum_noise(g, torch.empty(0, device=device), None, 1.0, noise_std=2.5, seed=11).cpu()
    assert _normal_violations(z / 2.5) == []


@pytest.mark.any_isa
def test_the_statistical_bounds_reject_a_wrong_std_a_bias_and_a_bad_shape():
    gen = torch.Generator().manual_seed(0)
    good = torch.randn(1_000_000, generator=gen)
    assert _normal_violations(good) == []
    assert "var" in _normal_violations(good * 1.01)
    assert "mean" in _normal_violations(good + 0.01)
    uniform = (torch.rand(1_000_000, generator=gen) - 0.5) * math.sqrt(12)  # mean 0, variance 1, not normal
    assert {"excess_kurtosis", "ks"} <= set(_normal_violations(uniform))
    repeated = good.view(-1, 16)[:, :1].expand(-1, 16).reshape(-1)  # correlated neighbours
    assert "lag1" in _normal_violations(repeated)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: per_sample_sq_norms(torch.tensor(1.0)), ValueError, "leading per-sample dimension"),
        (lambda: per_sample_sq_norms(torch.ones(3, dtype=torch.int64)), TypeError, "expected grads to have dtype"),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(2)),
            ValueError,
            r"clip_sum_noise: expected factors of shape \[3\] \(one per sample\), but got \[2\]",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3, dtype=torch.float64)),
            TypeError,
            "expected factors to have dtype torch.float32",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), torch.ones(3)),
            ValueError,
            r"expected noise of shape \[2\] \(a gradient without the sample dimension\), but got \[3\]",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), torch.ones(2), noise_std=1.0, seed=1),
            ValueError,
            r"clip_sum_noise: expected either noise \(a tensor\) or noise_std > 0 .* but got both",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=-1.0, seed=1),
            ValueError,
            "clip_sum_noise: expected noise_std to be finite and >= 0, but got -1",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=float("nan"), seed=1),
            ValueError,
            "clip_sum_noise: expected noise_std to be finite and >= 0, but got nan",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=1.0),
            ValueError,
            "clip_sum_noise: noise_std > 0 needs seed, a one-element int64 CPU tensor, but got None",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=1.0, seed=torch.ones(2)),
            ValueError,
            r"clip_sum_noise: expected seed to be a one-element int64 CPU tensor, but got a tensor of 2 element\(s\)"
            " of dtype torch.float32 on cpu",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=1.0, seed=1, offset=-1),
            ValueError,
            r"clip_sum_noise: expected offset >= 0 with offset \+ the number of noise values \(2\) at most 2\^63, "
            "but got offset -1",
        ),
        (
            lambda: clip_sum_noise(torch.ones(3, 2), torch.ones(3), noise_std=1.0, seed=1, offset=2**63 - 1),
            ValueError,
            r"clip_sum_noise: expected offset >= 0 .* but got offset 9223372036854775807",
        ),
        (lambda: gaussian_noise((2, -1), 1.0, 1), ValueError, r"gaussian_noise: expected size with non-negative"),
        (lambda: gaussian_noise((2,), -0.5, 1), ValueError, "gaussian_noise: expected std to be finite and >= 0"),
        (
            lambda: gaussian_noise((2,), 1.0, 1, dtype=torch.int32),
            TypeError,
            "gaussian_noise: expected dtype to be torch.float32, torch.float64, torch.float16 or torch.bfloat16, "
            "but got torch.int32",
        ),
        (
            lambda: gaussian_noise((2,), 1.0, torch.tensor([1], dtype=torch.int32)),
            ValueError,
            "gaussian_noise: expected seed to be a one-element int64 CPU tensor",
        ),
        (lambda: gaussian_noise((2,), 1.0, "1"), TypeError, "gaussian_noise: expected seed to be an int or a one"),
        (lambda: gaussian_noise((2,), 1.0, 2**64), ValueError, r"gaussian_noise: expected seed in \[-2\^63, 2\^64\)"),
        (lambda: gaussian_noise((2,), 1.0, 1, -3), ValueError, "gaussian_noise: expected offset >= 0"),
        (
            lambda: gaussian_noise_(torch.ones(2, dtype=torch.int32), 1.0, 1),
            TypeError,
            "gaussian_noise_: expected self to have dtype .* but got torch.int32",
        ),
        (
            lambda: gaussian_noise_(torch.ones(2), float("inf"), 1),
            ValueError,
            "gaussian_noise_: expected std to be finite and >= 0, but got inf",
        ),
        (
            lambda: gaussian_noise_(torch.ones(2), 1.0, 1, scale=float("nan")),
            ValueError,
            "gaussian_noise_: expected scale to be finite, but got nan",
        ),
        (
            lambda: gaussian_noise_(torch.ones(2), 1.0, torch.tensor([1.0])),
            ValueError,
            r"gaussian_noise_: expected seed to be a one-element int64 CPU tensor, but got a tensor of 1 element\(s\) "
            "of dtype torch.float32",
        ),
        (lambda: gaussian_noise_(torch.ones(2), 1.0, 1.5), TypeError, "gaussian_noise_: expected seed to be an int"),
        (
            lambda: gaussian_noise_(torch.ones(3), 1.0, 1, 2**63 - 2),
            ValueError,
            r"gaussian_noise_: expected offset >= 0 with offset \+ the number of noise values \(3\) at most 2\^63",
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
    g = torch.randn(6, 4, 5, device=device)
    torch.library.opcheck(torch.ops.deepseek_ext.per_sample_sq_norms.default, (g,))
    torch.library.opcheck(
        torch.ops.deepseek_ext.clip_sum_noise.default,
        (g, torch.rand(6, device=device), torch.randn(4, 5, device=device), 0.5),
    )
    torch.library.opcheck(torch.ops.deepseek_ext.clip_sum_noise.default, (g, torch.rand(6, device=device), None, 1.0))
    seed = torch.tensor([5])
    torch.library.opcheck(
        torch.ops.deepseek_ext.clip_sum_noise.default, (g, torch.rand(6, device=device), None, 0.5, 2.0, seed, 70)
    )
    torch.library.opcheck(
        torch.ops.deepseek_ext.gaussian_noise.default,
        ([3, 70], 1.5, seed, 9),
        {"dtype": torch.float64, "device": torch.device(device)},
    )
    for kwargs in ({}, {"scale": 0.5, "accumulate": True}):
        torch.library.opcheck(
            torch.ops.deepseek_ext.gaussian_noise_.default, (torch.randn(3, 70, device=device), 1.5, seed, 9), kwargs
        )


@pytest.mark.any_isa
def test_torch_compile_fullgraph():
    def dp_reduce(g, c):
        f = (c / (per_sample_sq_norms(g).sqrt() + 1e-6)).clamp(max=1.0)
        return clip_sum_noise(g, f, None, 1.0 / g.shape[0])

    g = torch.randn(8, 33)
    torch.testing.assert_close(torch.compile(dp_reduce, fullgraph=True)(g, 1.0), dp_reduce(g, 1.0))


@pytest.mark.any_isa
def test_torch_compile_fullgraph_with_generated_noise():
    def noisy_reduce(g, f, total, seed):  # f, total from outside: inductor may round its own differently
        fused = clip_sum_noise(g, f, None, 1.0 / g.shape[0], noise_std=0.5, seed=seed, offset=64)
        total = total * 2  # a new tensor, noised in place
        return (
            fused,
            gaussian_noise((g.shape[1],), 0.5, seed, 64),
            gaussian_noise_(total, 0.5, seed, 128, scale=0.1, accumulate=True),
        )

    compiled = torch.compile(noisy_reduce, fullgraph=True)
    g = torch.randn(8, 33)
    f = (1.0 / (per_sample_sq_norms(g).sqrt() + 1e-6)).clamp(max=1.0)
    for seed in (torch.tensor([1]), torch.tensor([2])):  # a new seed is a new input, not a new graph
        for got, want in zip(compiled(g, f, g.sum(0), seed), noisy_reduce(g, f, g.sum(0), seed)):
            assert torch.equal(got, want)
