"""Shared pytest configuration: tests marked ``cuda`` run only where a GPU and the CUDA kernels exist; ``--slow`` gives
the hypothesis suites a larger example budget."""

from __future__ import annotations

import pytest
import torch

import deepseek_ext


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not deepseek_ext.capabilities()["cuda"]:
        return "deepseek_ext was built without CUDA kernels"
    return None


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="longer runs of the randomized suites (hypothesis: many more examples per property)",
    )


def pytest_configure(config):
    # Hypothesis budgets: a small fixed number of examples in `make test` / CI, many more with --slow.
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is a dev requirement; tests that need it import it and fail clearly
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=50, derandomize=True, database=None, **common)
    settings.register_profile("slow", max_examples=500, **common)
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
