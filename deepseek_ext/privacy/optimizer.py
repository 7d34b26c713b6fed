"""DPOptimizer: a wrapped optimizer whose ``step()`` replaces the gradients by clipped, summed, noised and averaged
per-sample gradients. Clipping is delegated to a ``ClippingStrategy`` (clipping.py), the noise to ``GaussianNoise``
(rng.py), the privacy budget to the ``StepHooks`` given by ``DifferentialPrivacy``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .capture import Capture
from .clipping import ALL, CapturedBatch, ClippingStrategy
from .rng import GaussianNoise, with_noise
from .sampling import PoissonDataLoader


@dataclass(frozen=True)
class StepHooks:
    """Callbacks around the wrapped optimizer's step.

    Attributes:
        before_step: runs before anything changes (may raise, e.g. ``PrivacyBudgetExceeded``).
        after_step: runs after the wrapped optimizer stepped (e.g. the accountant's record).

    Example:
        >>> hooks = StepHooks(before_step=check_budget, after_step=lambda: accountant.step(sigma, q))
        >>> DPOptimizer(optimizer, capture, clipping=make_clipping("flat", 1.0), noise=GaussianNoise(0.5),
        ...             expected_batch_size=256, hooks=hooks)
    """

    before_step: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None


class DPOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: ``step()`` replaces the gradients by clipped, summed, noised and averaged per-sample
    gradients, then steps the wrapped optimizer. It is a ``torch.optim.Optimizer`` (LR schedulers accept it) whose
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's.

    Args:
        optimizer: the optimizer to wrap.
        capture: the hooks recording the model's per-unit inputs and output gradients.
        clipping: the ``ClippingStrategy`` (``make_clipping(name, max_grad_norm)``).
        noise: the Gaussian noise added to each step's sum (std 0: none).
        expected_batch_size: the divisor of the noisy sum (``q * N``); None: the number of examples in the step.
        hooks: ``StepHooks`` around the wrapped step (budget check, accounting).
        data_loader: the ``PoissonDataLoader`` the batches must come from; each ``step()`` checks that at least one
            batch was drawn from it since the previous one.

    Example:
        >>> optimizer = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=0.5).wrap(
        ...     optimizer, model=model, data_loader=loader)     # a DPOptimizer
        >>> optimizer.step()                                 # clip, sum, noise, then the wrapped step
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        capture: Capture,
        *,
        clipping: ClippingStrategy,
        noise: GaussianNoise,
        expected_batch_size: float | None,
        hooks: StepHooks = StepHooks(),
        data_loader: PoissonDataLoader | None = None,
    ):
        # Optimizer.__init__ is not called: parameters and state stay with the wrapped optimizer.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self.capture = capture
        self.clipping = clipping
        capture.on_gradients = clipping.on_gradients  # per-record work done in the backward, as gradients arrive
        self.noise = noise
        self.expected_batch_size = expected_batch_size
        self.hooks = hooks
        self.data_loader = data_loader
        self._drawn = data_loader.batches_drawn if data_loader is not None else 0
        self._summed: dict[nn.Parameter, torch.Tensor] = {}
        self._accumulated = 0
        self.last_clip_factors: torch.Tensor | None = None

    @property
    def max_grad_norm(self) -> float:
        return self.clipping.max_grad_norm

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"DPOptimizer({self.optimizer!r})"

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def _clip(self, batch: CapturedBatch, noise: GaussianNoise | None, scale: float) -> dict:
        """The physical batch's ``{param: (clipped sum + noise) * scale}``."""
        with self.capture.paused():  # grad samplers may re-run modules: record nothing meanwhile
            clipped = self.clipping.clip(batch, noise, scale)
        if ALL in clipped.factors:
            self.last_clip_factors = clipped.factors[ALL]
        return clipped.sums

    def _accumulate(self) -> None:
        batch = CapturedBatch.from_units(self.capture.units)
        for p, s in self._clip(batch, None, 1.0).items():
            self._summed[p] = s if p not in self._summed else self._summed[p] + s
        self._accumulated += batch.batch_size
        self.capture.clear()

    def _check_data(self) -> None:
        if self.data_loader is None:
            return
        if self.data_loader.batches_drawn == self._drawn:
            raise RuntimeError(
                "DPOptimizer.step(): no batch was drawn from the Poisson-sampled loader since the last step. "
                "DifferentialPrivacy.wrap() leaves your DataLoader unchanged: iterate dp.data_loader instead, "
                "so that the batches are the Poisson samples the privacy accounting assumes"
            )

    def virtual_step(self) -> None:
        """Clips this physical batch and keeps the sum, without noise or an optimizer step (gradient accumulation:
        call it after every micro-batch's backward but the last, then ``step()``)."""
        self._accumulate()

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        self._check_data()
        if self.hooks.before_step is not None:
            self.hooks.before_step()  # raises PrivacyBudgetExceeded before anything changes
        params = self.params
        self.noise.start_step(params)
        if not self._summed and self._accumulated == 0:
            # One physical batch: clipping, sum, noise and averaging in one pass per parameter.
            batch = CapturedBatch.from_units(self.capture.units)
            denominator = self.expected_batch_size or max(batch.batch_size, 1)
            grads = self._clip(batch, self.noise, 1.0 / denominator)
        else:
            self._accumulate()
            denominator = self.expected_batch_size or max(self._accumulated, 1)
            grads = {p: with_noise(s, p, self.noise, 1.0 / denominator) for p, s in self._summed.items()}
        for p in params:
            g = grads.get(p)
            if g is None:  # no example reached this parameter: its gradient is the noise alone
                g = with_noise(None, p, self.noise, 1.0 / denominator) if self.noise.std else torch.zeros_like(p)
            p.grad = g.to(p.dtype)
        self._summed.clear()
        self._accumulated = 0
        self.capture.clear()
        if self.data_loader is not None:
            self._drawn = self.data_loader.batches_drawn
        result = self.optimizer.step()
        if self.hooks.after_step is not None:
            self.hooks.after_step()
        return result

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)
