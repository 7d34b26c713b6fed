"""per_sample_sq_norms and clip_sum_noise (deepseek_ext/ops/privacy.py) against plain PyTorch."""

from __future__ import annotations

import pytest
import torch

from deepseek_ext.ops import clip_sum_noise, per_sample_sq_norms
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


@pytest.mark.any_isa
def test_torch_compile_fullgraph():
    def dp_reduce(g, c):
        f = (c / (per_sample_sq_norms(g).sqrt() + 1e-6)).clamp(max=1.0)
        return clip_sum_noise(g, f, None, 1.0 / g.shape[0])

    g = torch.randn(8, 33)
    torch.testing.assert_close(torch.compile(dp_reduce, fullgraph=True)(g, 1.0), dp_reduce(g, 1.0))
