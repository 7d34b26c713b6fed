"""DifferentialPrivacy, the front door: DP-SGD added to an existing training loop with one call,
``optimizer = dp.wrap(optimizer, model=model, data_loader=loader)``, then batches from ``dp.data_loader``.

The parts live beside it: sampling.py (Poisson sampling and the Poisson loader), optimizer.py (``DPOptimizer``),
clipping.py (one strategy per clipping mode), capture.py and grad_sample.py (per-sample gradients), rng.py (noise),
accountants.py (privacy accounting)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import grad_sample
from .accountants import get_noise_multiplier, make_accountant
from .capture import Capture
from .clipping import CLIP_EPS, make_clipping
from .optimizer import DPOptimizer, StepHooks
from .rng import GaussianNoise
from .sampling import PoissonBatchSampler, PoissonDataLoader, check_real

__all__ = [
    "CLIP_EPS",
    "DifferentialPrivacy",
    "DPOptimizer",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "PrivacyBudgetExceeded",
]


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the target epsilon; the model was not changed.

    Example:
        >>> try:
        ...     optimizer.step()
        ... except PrivacyBudgetExceeded:
        ...     break
    """


class DifferentialPrivacy:
    """DP-SGD with Poisson sampling, per-sample clipping, Gaussian noise and privacy accounting.

    Args:
        epsilon: the privacy budget ε (> 0) to stay within.
        delta: δ in (0, 1); typically below 1 / dataset size.
        noise_multiplier: σ; the noise std is ``σ * max_grad_norm``. With ``None``, ``epochs`` must be given and the
            smallest σ that meets (ε, δ) over that many epochs is computed at ``wrap``.
        max_grad_norm: the clipping bound C on each example's gradient (flat L2 norm over all parameters).
        epochs: the planned training length (only for ``noise_multiplier=None``).
        accountant: ``'rdp'`` (Rényi DP, a provable upper bound; default) or ``'prv'`` (numerically tight).
        clipping: ``'flat'`` (per-sample gradients materialised, one fused clip/sum/noise op per parameter),
            ``'ghost'`` (for Linear and Embedding the per-sample norms and clipped sums come from activations and
            output gradients without materialising per-sample gradients; other layers as 'flat'; same result), or
            ``'per_layer'`` (each parameter clipped to ``C / sqrt(#parameters)``).
        secure_rng: draw sampling and noise from the operating system's CSPRNG instead of torch generators.
        generator: a seeded ``torch.Generator`` for sampling and noise (reproducible tests).
        loss_reduction: ``'mean'`` (the loss is averaged over the batch, PyTorch's default) or ``'sum'``.

    The batch size is the first dimension of the model's first tensor input. A layer whose output is shared by the
    whole batch (batch dimension 1, as the position embeddings of stock BERT and GPT-2, which look up ids of shape
    ``(1, seq)``) has its output expanded to the batch, so its per-example gradients are exact in every clipping
    mode; a layer fed the batch's tokens flattened example by example (``(batch * seq, ...)``, as OPT's MLPs) is
    read as ``(batch, seq, ...)``. A layer whose input does not carry the batch at all (T5's relative attention
    bias) is refused at the first forward with an error naming it: freeze it or give it batch-first inputs.

    Example:
        >>> dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=0.5, max_grad_norm=1.0)
        >>> optimizer = dp.wrap(optimizer, model=model, data_loader=train_loader)
        >>> for x, y in dp.data_loader:  # Poisson-sampled; train_loader itself is unchanged
        ...     optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        >>> dp.epsilon_spent(), dp.steps
    """

    def __init__(
        self,
        epsilon: float,
        delta: float,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        *,
        epochs: float | None = None,
        accountant: str = "rdp",
        clipping: str = "flat",
        secure_rng: bool = False,
        generator: torch.Generator | None = None,
        loss_reduction: str = "mean",
    ):
        check_real("DifferentialPrivacy", "epsilon", epsilon, "positive and finite", lambda v: v > 0)
        check_real("DifferentialPrivacy", "delta", delta, "in (0, 1)", lambda v: 0 < v < 1)
        if noise_multiplier is not None:
            check_real(
                "DifferentialPrivacy", "noise_multiplier", noise_multiplier, "non-negative and finite", lambda v: v >= 0
            )
        if epochs is not None:
            check_real("DifferentialPrivacy", "epochs", epochs, "positive and finite", lambda v: v > 0)
        if noise_multiplier is None and epochs is None:
            raise ValueError(
                "DifferentialPrivacy: give noise_multiplier, or noise_multiplier=None with epochs= so the "
                "noise can be computed from the budget"
            )
        check_real("DifferentialPrivacy", "max_grad_norm", max_grad_norm, "positive and finite", lambda v: v > 0)
        make_clipping(clipping, max_grad_norm)  # the one check of the name
        self.epsilon = epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.epochs = epochs
        self.clipping = clipping
        self.secure_rng = secure_rng
        self.generator = generator
        self.loss_reduction = loss_reduction
        self.accountant = make_accountant(accountant)
        self.sample_rate: float | None = None
        self._max_steps: int | None = None
        self._optimizer: DPOptimizer | None = None
        # The Poisson-sampled loader built by wrap(data_loader=...); None before, or without a data_loader.
        self.data_loader: PoissonDataLoader | None = None

    @property
    def steps(self) -> int:
        return self.accountant.steps

    def epsilon_spent(self, delta: float | None = None) -> float:
        """ε spent so far, for ``delta`` (default: the δ given at construction)."""
        return self.accountant.get_epsilon(self.delta if delta is None else delta)

    def wrap(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        data_loader: DataLoader | None = None,
        *,
        sample_rate: float | None = None,
        dataset_size: int | None = None,
    ) -> DPOptimizer:
        """Makes ``optimizer`` differentially private for ``model``, and builds ``dp.data_loader``: a Poisson-sampled
        ``PoissonDataLoader`` over ``data_loader``'s dataset (same collate function, workers and pinning; the
        sample rate defaults to its ``batch_size / len(dataset)``). ``data_loader`` itself is left unchanged;
        train on ``dp.data_loader`` (each ``step()`` checks that a batch came from it since the previous step).

        Without a ``data_loader``, give ``sample_rate`` and ``dataset_size`` and sample the batches yourself.

        Returns:
            The ``DPOptimizer`` to use in place of ``optimizer`` (so ``optimizer = dp.wrap(optimizer, ...)`` stays
            one line).
        """
        if self._optimizer is not None:
            raise RuntimeError(
                "DifferentialPrivacy.wrap() was already called on this object; create one "
                "DifferentialPrivacy per training run"
            )
        if isinstance(optimizer, DPOptimizer):
            raise RuntimeError("DifferentialPrivacy.wrap(): this optimizer is already wrapped")
        if model is None:
            raise ValueError("DifferentialPrivacy.wrap() needs model= (per-sample gradients come from its layers)")
        if data_loader is not None:
            dataset_size = len(data_loader.dataset)
            if dataset_size == 0:
                raise ValueError(
                    "DifferentialPrivacy.wrap(): expected a non-empty dataset in data_loader, but it has 0 items"
                )
            batch = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
            if batch is None:
                raise ValueError("DifferentialPrivacy.wrap(): cannot tell the loader's batch size; pass sample_rate=")
            sample_rate = sample_rate or batch / dataset_size
        if sample_rate is None or dataset_size is None:
            raise ValueError("DifferentialPrivacy.wrap(): pass data_loader=, or sample_rate= and dataset_size=")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"DifferentialPrivacy.wrap(): expected dataset_size >= 1, but got {dataset_size!r}")
        check_real("DifferentialPrivacy.wrap()", "sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        model_params = {id(p) for p in model.parameters()}
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("DifferentialPrivacy.wrap(): the optimizer holds parameters that are not the model's")
        grad_sample.refuse_batch_norm(model)
        self.sample_rate = sample_rate
        steps_per_epoch = max(1, round(1 / sample_rate))
        if self.noise_multiplier is None:
            self.noise_multiplier = get_noise_multiplier(
                self.epsilon, self.delta, sample_rate, int(self.epochs * steps_per_epoch), self.accountant.name
            )
        self._max_steps = self._steps_within_budget()
        if self._max_steps == 0:
            raise ValueError(
                f"DifferentialPrivacy: epsilon={self.epsilon} cannot be met even for one step with "
                f"noise_multiplier={self.noise_multiplier} and sample rate {sample_rate:.4g}"
            )
        if data_loader is not None:
            self.data_loader = PoissonDataLoader(data_loader, sample_rate, self.generator, self.secure_rng)
        self._optimizer = DPOptimizer(
            optimizer,
            Capture(model, self.loss_reduction),
            clipping=make_clipping(self.clipping, self.max_grad_norm),
            noise=GaussianNoise(self.noise_multiplier * self.max_grad_norm, self.generator, self.secure_rng),
            expected_batch_size=sample_rate * dataset_size,
            hooks=StepHooks(before_step=self._check_budget, after_step=self._record_step),
            data_loader=self.data_loader,
        )
        return self._optimizer

    def _steps_within_budget(self) -> int:
        """How many steps of (noise_multiplier, sample_rate) keep epsilon within the target."""
        sigma, q = self.noise_multiplier, self.sample_rate
        if sigma == 0:
            return 0

        def ok(n):
            return self.accountant.get_epsilon(self.delta, [(sigma, q, n)]) <= self.epsilon

        if not ok(1):
            return 0
        hi = 1
        while ok(hi * 2):
            hi *= 2
            if hi > 1 << 40:
                return hi
        lo = hi  # ok(lo), not ok(2 * hi)
        hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def _check_budget(self) -> None:
        if self.steps + 1 > self._max_steps:
            raise PrivacyBudgetExceeded(
                f"DifferentialPrivacy: step {self.steps + 1} would exceed epsilon={self.epsilon} at delta={self.delta} "
                f"(noise_multiplier={self.noise_multiplier}, sample rate {self.sample_rate:.4g}: at most "
                f"{self._max_steps} steps); the model was left unchanged"
            )

    def _record_step(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    @staticmethod
    def clip_only(
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        max_grad_norm: float = 1.0,
        clipping: str = "flat",
        loss_reduction: str = "mean",
    ) -> DPOptimizer:
        """Per-sample clipping alone: no noise, no accounting, averaged over the actual batch size."""
        grad_sample.refuse_batch_norm(model)
        check_real("clip_only", "max_grad_norm", max_grad_norm, "positive and finite", lambda v: v > 0)
        return DPOptimizer(
            optimizer,
            Capture(model, loss_reduction),
            clipping=make_clipping(clipping, max_grad_norm, owner="clip_only"),
            noise=GaussianNoise(0.0),
            expected_batch_size=None,
        )

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if state["noise_multiplier"] != self.noise_multiplier or state["sample_rate"] != self.sample_rate:
            warnings.warn(
                "DifferentialPrivacy.load_state_dict: the saved noise multiplier or sample rate differs from "
                "this run's",
                stacklevel=2,
            )
