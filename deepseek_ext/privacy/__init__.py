"""Differential privacy for PyTorch training: DP-SGD with Poisson sampling, per-sample clipping (flat, ghost,
per-layer), Gaussian noise and RDP / PRV accounting, behind ``DifferentialPrivacy(...).wrap(optimizer, ...)``."""

from __future__ import annotations

from .accountants import (
    Accountant,
    PRVAccountant,
    RDPAccountant,
    get_noise_multiplier,
    make_accountant,
    register_accountant,
)
from .engine import DifferentialPrivacy, DPOptimizer, PoissonBatchSampler, PrivacyBudgetExceeded
from .ghost import Lookup, OuterProduct, PerSample, register_ghost_rule
from .grad_sample import register_grad_sampler

__all__ = [
    "DifferentialPrivacy",
    "DPOptimizer",
    "PoissonBatchSampler",
    "PrivacyBudgetExceeded",
    "register_grad_sampler",
    "register_ghost_rule",
    "OuterProduct",
    "Lookup",
    "PerSample",
    "Accountant",
    "RDPAccountant",
    "PRVAccountant",
    "make_accountant",
    "register_accountant",
    "get_noise_multiplier",
]
