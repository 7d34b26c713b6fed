"""rng.py: the step's noise added where each parameter's sum is formed (``noisy_clip_sum``, ``with_noise``)."""

from __future__ import annotations

import pytest
import torch

from deepseek_ext.ops import clip_sum_noise, gaussian_noise
from deepseek_ext.privacy.rng import GaussianNoise, noisy_clip_sum, with_noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_with_noise_adds_the_parameters_noise_into_the_sum_it_is_given(dtype):
    p = torch.nn.Parameter(torch.zeros(7, 30, dtype=dtype))
    q = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    noise = GaussianNoise(0.6, torch.Generator().manual_seed(2))
    noise.start_step([q, p])  # p's range starts after q's whole tile
    total = torch.randn(7, 30, dtype=torch.float64).to(dtype)
    want = clip_sum_noise(total[None], torch.ones(1), None, 0.25, **noise.op_args(p))
    assert noise.op_args(p)["offset"] == 64
    ptr = total.data_ptr()
    got = with_noise(total, p, noise, 0.25)
    assert got.data_ptr() == ptr and torch.equal(got, want)  # in place, the bits of the fused reduction
    # a transposed sum (Conv1D's weight), no example at all, no noise
    t = torch.randn(30, 7, dtype=torch.float64).to(dtype)
    want_t = clip_sum_noise(t.t().contiguous()[None], torch.ones(1), None, 0.5, **noise.op_args(p))
    assert torch.equal(with_noise(t.t(), p, noise, 0.5), want_t)
    alone = with_noise(None, p, noise, 0.5)
    assert alone.shape == p.shape and alone.dtype == dtype and not alone.requires_grad
    z = gaussian_noise(p.shape, 0.6, noise.op_args(p)["seed"], 64, dtype=torch.float64)
    torch.testing.assert_close(alone.double(), z * 0.5, rtol=1e-2, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(with_noise(None, p, None, 0.5), torch.zeros_like(p))
    plain = torch.randn(7, 30, dtype=torch.float64).to(dtype)
    assert torch.equal(with_noise(plain.clone(), p, GaussianNoise(0.0), 0.5), plain * 0.5)


def test_secure_noise_is_added_in_place_with_the_right_scale():
    p = torch.nn.Parameter(torch.zeros(400, 50))
    noise = GaussianNoise(2.0, secure_rng=True)
    noise.start_step([p])
    total = torch.full((400, 50), 3.0)
    got = with_noise(total, p, noise, 0.5)
    assert got is total
    z = got / 0.5 - 3.0
    assert abs(z.std().item() - 2.0) < 0.1 and abs(z.mean().item()) < 0.1
    g = torch.ones(2, 400, 50)
    fused = noisy_clip_sum(g, torch.ones(2), noise, p, 1.0) - 2.0
    assert abs(fused.std().item() - 2.0) < 0.1
