"""unscale_check_norm_ (deepseek_ext/ops/amp.py) against PyTorch's own unscale and norm."""

from __future__ import annotations

import pytest
import torch

from deepseek_ext.ops import unscale_check_norm_
from tests.helpers import DEVICES

SHAPES = [(0,), (1,), (17,), (3, 5), (1025,), (70001,), (300, 257)]


def make_grads(device, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    g = torch.Generator().manual_seed(0)
    grads = []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        grads.append((torch.randn(shape, generator=g) * 1000).to(dtype=dtype, device=device))
    grads.append(torch.randn(40, 30, generator=g).to(device).t())  # non-contiguous
    return grads


def reference(grads, inv):
    """PyTorch's op, then the norm of what it wrote (computed in float64)."""
    out = [g.clone() for g in grads]
    found = torch.zeros(1, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(out, found, torch.tensor([inv], device=grads[0].device))
    norm = torch.sqrt(sum((o.double() ** 2).sum() for o in out))
    return out, found, norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inv", [1.0, 2.0**-16, 0.37])
def test_matches_pytorch_unscale_and_norm(device, inv):
    grads = make_grads(device)
    expected, found_ref, norm_ref = reference(grads, inv)
    found = torch.zeros(1, device=device)
    norm = unscale_check_norm_(grads, found, torch.tensor([inv], device=device))
    for g, e in zip(grads, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)
    assert found.item() == found_ref.item() == 0.0
    print(f"norm {norm.item():.6g} vs float64 {norm_ref.item():.6g}")
    torch.testing.assert_close(norm.double().cpu(), norm_ref.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_sets_found_inf(device, bad):
    grads = make_grads(device)
    grads[5].view(-1)[12345] = bad
    found = torch.zeros(1, device=device)
    norm = unscale_check_norm_(grads, found, torch.tensor([0.5], device=device))
    assert found.item() == 1.0 and not torch.isfinite(norm)
    # found_inf is only ever set, never cleared: a later clean call keeps it.
    clean = make_grads(device)
    unscale_check_norm_(clean, found, torch.tensor([0.5], device=device))
    assert found.item() == 1.0


def test_empty_list_gives_zero_norm():
    found = torch.zeros(1)
    assert unscale_check_norm_([], found, torch.tensor([0.5])).item() == 0.0


@pytest.mark.parametrize(
    "args,error,match",
    [
        (
            lambda: ([torch.ones(3)], torch.zeros(1, dtype=torch.float64), torch.ones(1)),
            TypeError,
            r"unscale_check_norm_: expected found_inf to have dtype torch.float32, but got torch.float64",
        ),
        (
            lambda: ([torch.ones(3)], torch.zeros(2), torch.ones(1)),
            ValueError,
            r"expected found_inf and inv_scale to have one element each, but got 2 and 1",
        ),
        (
            lambda: ([torch.ones(3, dtype=torch.int32)], torch.zeros(1), torch.ones(1)),
            TypeError,
            r"expected grads\[0\] to have dtype torch.float32, torch.float16 or torch.bfloat16, but got torch.int32",
        ),
    ],
)
@pytest.mark.any_isa
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        unscale_check_norm_(*args())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.any_isa
def test_opcheck(device):
    grads = [torch.randn(5, 3, device=device), torch.randn(7, device=device).half()]
    torch.library.opcheck(
        torch.ops.deepseek_ext.unscale_check_norm_.default,
        (grads, torch.zeros(1, device=device), torch.tensor([0.5], device=device)),
    )


@pytest.mark.any_isa
def test_torch_compile_fullgraph():
    def fn(a, b, found, inv):
        grads = [a * 2, b * 2]
        norm = unscale_check_norm_(grads, found, inv)
        return grads[0] + 1, norm

    a, b = torch.randn(4, 3), torch.randn(5)
    found, inv = torch.zeros(1), torch.tensor([0.25])
    eager = fn(a, b, found.clone(), inv)
    compiled = torch.compile(fn, fullgraph=True)(a, b, found.clone(), inv)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_looks_at_the_stored_value(device):
    """A finite float16 gradient that overflows once unscaled (inv_scale > 1) is flagged on both devices."""
    g = [torch.tensor([60000.0, 1.0], dtype=torch.float16, device=device)]
    found = torch.zeros(1, device=device)
    norm = unscale_check_norm_(g, found, torch.tensor([2.0], device=device))
    assert found.item() == 1.0 and torch.isinf(g[0][0]) and not torch.isfinite(norm)


def test_an_expanded_gradient_is_refused_before_any_gradient_is_unscaled():
    """Issue 16: it used to fail only after the other gradients had been halved."""
    from tests.helpers import result_of, run_isolated

    grads = [torch.full((4,), 2.0), torch.full((3,), 4.0, dtype=torch.bfloat16), torch.ones(1, 5).expand(3, 5)]
    found = torch.zeros(1)

    def call():
        try:
            unscale_check_norm_(grads, found, torch.tensor([0.5]))
            return None, grads, found
        except ValueError as e:
            return str(e), grads, found

    message, after, found_after = result_of(run_isolated(call))
    assert message is not None and "unscale_check_norm_: expected grads[2] to be writable in place" in message
    assert "expanded or self-overlapping" in message
    assert torch.equal(after[0], torch.full((4,), 2.0)) and torch.equal(after[1], torch.full((3,), 4.0).bfloat16())
    assert found_after.item() == 0.0
