"""Shared pytest configuration: tests marked ``cuda`` run only where a GPU and the CUDA kernels exist."""

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
