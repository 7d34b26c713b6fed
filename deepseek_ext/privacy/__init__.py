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
from .clipping import ClippingStrategy, make_clipping, register_clipping
from .engine import DifferentialPrivacy, PrivacyBudgetExceeded
from .ghost import Lookup, OuterProduct, PerSample, register_ghost_rule
from .grad_sample import register_grad_sampler, register_norm_sampler
from .optimizer import DPOptimizer, StepHooks
from .sampling import PoissonBatchSampler, PoissonDataLoader

__all__ = [
    "DifferentialPrivacy",
    "DPOptimizer",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "PrivacyBudgetExceeded",
    "StepHooks",
    "ClippingStrategy",
    "make_clipping",
    "register_clipping",
    "register_grad_sampler",
    "register_norm_sampler",
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
