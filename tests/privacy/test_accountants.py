"""Accountants (deepseek_ext/privacy/accountants.py) pinned to published values."""

from __future__ import annotations

import math

import pytest

from deepseek_ext.privacy import PRVAccountant, RDPAccountant, get_noise_multiplier, make_accountant

# TensorFlow Privacy's orders (compute_dp_sgd_privacy).
TF_ORDERS = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5] + list(range(5, 64)) + [128, 256, 512]


def eps(q, sigma, steps, delta, **kw):
    acc = RDPAccountant(**kw)
    acc.step(sigma, q, steps)
    return acc.get_epsilon(delta)


def test_opacus_rdp_accountant_value():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, 90 epochs, delta 1e-5 -> 7.32911117143
    assert eps(0.04, 1.5, int(90 / 0.04), 1e-5) == pytest.approx(7.32911117143, rel=1e-6)


@pytest.mark.parametrize(
    "n,batch,sigma,epochs,delta,expected",
    [(60000, 150, 1.3, 15, 1e-5, 0.7242234026109595), (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842)],
)
def test_tensorflow_privacy_compute_dp_sgd_privacy_values(n, batch, sigma, epochs, delta, expected):
    # tensorflow_privacy compute_dp_sgd_privacy_test.py (improved conversion, their orders, ceil(epochs*n/batch)).
    steps = math.ceil(epochs * n / batch)
    assert eps(batch / n, sigma, steps, delta, alphas=TF_ORDERS) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "q,sigma,steps,expected",
    [
        (256 / 60000, 1.1, 60 * 60000 // 256, 3.01),  # TF Privacy tutorials README: "eps = 3.01"
        (256 / 60000, 1.3, 15 * 60000 // 256, 1.19),
        (256 / 60000, 0.7, 45 * 60000 // 256, 7.10),
        (0.004, 0.7, 45 * 250, 6.86),  # Opacus MNIST README (before Opacus switched conversions)
        (0.004, 1.1, 60 * 250, 2.91),
        (0.004, 1.3, 15 * 250, 1.16),
    ],
)
def test_classic_conversion_matches_older_published_values(q, sigma, steps, expected):
    assert round(eps(q, sigma, steps, 1e-5, conversion="classic"), 2) == pytest.approx(expected, abs=0.006)


def test_prv_is_tight_and_matches_opacus_prv():
    prv = PRVAccountant()
    prv.step(1.5, 0.04, int(90 / 0.04))
    value = prv.get_epsilon(1e-5)
    # opacus accountants_test.py pins its PRV accountant at 6.777395712150674 for these parameters.
    assert f"{value:.2g}" == f"{6.777395712150674:.2g}"
    assert value < eps(0.04, 1.5, int(90 / 0.04), 1e-5)  # tighter than RDP


def test_noise_multiplier_for_a_budget():
    # opacus accountants_test.py: target eps 8, delta 1e-5, q 0.04, 90 epochs -> about 1.416
    sigma = get_noise_multiplier(8.0, 1e-5, 0.04, int(90 / 0.04))
    assert sigma == pytest.approx(1.416, abs=3e-3)
    assert eps(0.04, sigma, int(90 / 0.04), 1e-5) <= 8.0


def test_history_composes_and_state_round_trips():
    a = RDPAccountant()
    for _ in range(10):
        a.step(1.0, 0.01)
    a.step(2.0, 0.01, 5)
    assert a.steps == 15 and a.history == [(1.0, 0.01, 10), (2.0, 0.01, 5)]
    b = make_accountant("rdp")
    b.load_state_dict(a.state_dict())
    assert b.get_epsilon(1e-5) == a.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        make_accountant("gdp")
