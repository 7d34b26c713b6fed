"""DifferentialPrivacy: DP-SGD added to an existing training loop with one call, ``dp.wrap(optimizer, ...)``."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Sampler

from ..ops.privacy import clip_sum_noise, per_sample_sq_norms
from . import ghost, grad_sample
from .accountants import get_noise_multiplier, make_accountant
from .capture import Capture, Unit

CLIP_EPS = 1e-6  # clip factor min(1, C / (||g_i|| + CLIP_EPS))


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the target epsilon; the model was not changed.

    Example:
        >>> try:
        ...     optimizer.step()
        ... except PrivacyBudgetExceeded:
        ...     break
    """


# ---------------------------------------------------------------------------------------------- Poisson sampling
class PoissonBatchSampler(Sampler[list[int]]):
    """Each batch holds every example independently with probability ``sample_rate`` (so batches vary in size and
    may be empty); ``len`` is ``round(1 / sample_rate)`` batches per epoch.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.01)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)   # each example joins a batch with probability 0.01
    """

    def __init__(
        self, num_samples: int, sample_rate: float, generator: torch.Generator | None = None, secure_rng: bool = False
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"PoissonBatchSampler: expected num_samples >= 0, but got {num_samples!r}")
        _check_real("PoissonBatchSampler", "sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.generator = generator
        self.secure_rng = secure_rng

    def __len__(self) -> int:
        return max(1, round(1 / self.sample_rate))

    def __iter__(self):
        for _ in range(len(self)):
            if self.secure_rng:
                u = _secure_uniform(self.num_samples)
            else:
                u = torch.rand(self.num_samples, generator=self.generator)
            yield torch.nonzero(u < self.sample_rate).flatten().tolist()


def _check_real(owner: str, name: str, value, expected: str, ok) -> None:
    """ValueError (TypeError for a non-number) unless ``value`` is a finite real number with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: expected {name} to be a number ({expected}), but got {type(value).__name__}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{owner}: expected {name} to be {expected}, but got {value}")


def _secure_uniform(n: int) -> torch.Tensor:
    """Uniform [0, 1) from the operating system's CSPRNG (53 random bits per value)."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)
    return (raw & ((1 << 53) - 1)).double() / float(1 << 53)


def _secure_normal(shape, std: float, device) -> torch.Tensor:
    """Gaussian noise from the OS CSPRNG (Box-Muller on its uniforms)."""
    n = math.prod(shape)
    u = _secure_uniform(2 * ((n + 1) // 2)).view(2, -1)
    u1 = u[0].clamp_min(1e-300)
    r = torch.sqrt(-2 * torch.log(u1))
    z = torch.cat([r * torch.cos(2 * math.pi * u[1]), r * torch.sin(2 * math.pi * u[1])])[:n]
    return (z * std).float().view(shape).to(device)


def _empty_like_sample(sample: Any) -> Any:
    """A batch of zero examples shaped like one collated example."""

    def empty(x):
        if isinstance(x, torch.Tensor):
            return torch.empty((0, *x.shape), dtype=x.dtype)
        if isinstance(x, bool):
            return torch.empty(0, dtype=torch.bool)
        if isinstance(x, int):
            return torch.empty(0, dtype=torch.int64)
        if isinstance(x, float):
            return torch.empty(0, dtype=torch.float64)
        return x

    return pytree.tree_map(empty, sample)


class _EmptyAwareCollate:
    def __init__(self, collate_fn, dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, batch):
        if len(batch) == 0:
            return _empty_like_sample(self.dataset[0])
        return self.collate_fn(batch)


def make_poisson(loader: DataLoader, sample_rate: float, generator, secure_rng: bool) -> None:
    """Turns ``loader`` (in place) into a Poisson-sampling loader over the same dataset and collate function."""
    sampler = PoissonBatchSampler(len(loader.dataset), sample_rate, generator, secure_rng)
    # DataLoader forbids re-assigning these after construction; object.__setattr__ is the documented way around.
    object.__setattr__(loader, "batch_sampler", sampler)
    object.__setattr__(loader, "sampler", sampler)
    object.__setattr__(loader, "batch_size", None)
    object.__setattr__(loader, "drop_last", False)
    object.__setattr__(loader, "collate_fn", _EmptyAwareCollate(loader.collate_fn, loader.dataset))
    if hasattr(loader, "_iterator"):
        loader._iterator = None


# ---------------------------------------------------------------------------------------------------- optimizer
class DPOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: ``step()`` replaces the gradients by clipped, summed, noised and averaged per-sample
    gradients, then steps the wrapped optimizer. It is a ``torch.optim.Optimizer`` (LR schedulers accept it) whose
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's.

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
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float | None,
        clipping: str,
        generator: torch.Generator | None,
        secure_rng: bool,
        on_step=None,
    ):
        # Optimizer.__init__ is not called: parameters and state stay with the wrapped optimizer.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self.capture = capture
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.clipping = clipping
        self.generator = generator
        self.secure_rng = secure_rng
        self._on_step = on_step  # (before_step_check, after_step) from DifferentialPrivacy
        self._summed: dict[nn.Parameter, torch.Tensor] = {}
        self._accumulated = 0
        self.last_clip_factors: torch.Tensor | None = None

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

    # -- clipping -------------------------------------------------------------------------------------------------
    def _records(self, unit: Unit):
        return [r for r in unit.records if any(g is not None for g in r.grad_outputs)]

    def _materialise(self, unit: Unit) -> dict:
        """Per-sample gradients of the unit, summed over its uses in the step."""
        total: dict = {}
        for r in self._records(unit):
            try:
                grads = grad_sample.per_sample_grads(
                    unit.module, r.activations, tuple(r.grad_outputs), r.kwargs, r.batch_size
                )
            except Exception as e:  # a clear pointer instead of an obscure vmap error
                how = "the torch.func fallback" if not grad_sample.has_sampler(unit.module) else "its grad sampler"
                raise RuntimeError(
                    f"DifferentialPrivacy: cannot compute per-sample gradients of module '{unit.name}' "
                    f"({type(unit.module).__name__}) with {how}: {e}. Register a grad sampler: "
                    f"@deepseek_ext.privacy.register_grad_sampler({type(unit.module).__name__})"
                ) from e
            for p, g in grads.items():
                total[p] = g if p not in total else total[p] + g
        return total

    def _grad_scale(self) -> float:
        """The factor that turns the recorded output gradients into those of the per-sample losses: per-sample
        gradients are linear in them, so it scales norms and clip factors instead of every gradient. Records of
        different scales (forwards of different batch sizes in one step) are rescaled to 1 first."""
        records = [r for u in self.capture.units for r in self._records(u)]
        scales = {r.scale for r in records}
        if len(scales) <= 1:
            return scales.pop() if scales else 1.0
        for r in records:
            r.grad_outputs = [None if g is None else g * r.scale for g in r.grad_outputs]
            r.scale = 1.0
        return 1.0

    def _batch_size(self) -> int:
        return max((r.batch_size for u in self.capture.units for r in self._records(u)), default=0)

    def _clipped_sums(self, noises: dict | None = None, scale: float = 1.0) -> dict:
        """{param: (sum_i c_i g_i + noise) * scale} for this physical batch (noise only where given)."""
        units = self.capture.units
        noises = noises or {}
        gs = self._grad_scale()
        if self.clipping == "per_layer":
            sums, tied = {}, {}
            uses: dict[nn.Parameter, int] = {}
            for u in units:
                for p in u.params:
                    uses[p] = uses.get(p, 0) + 1
            bound = self.max_grad_norm / math.sqrt(max(len(uses), 1))

            def clip(p, g):
                f = (bound / (per_sample_sq_norms(g).sqrt() * gs + CLIP_EPS)).clamp(max=1.0).float()
                sums[p] = clip_sum_noise(g, f * gs, noises.get(p), scale)

            for u in units:
                for p, g in self._materialise(u).items():
                    if uses[p] > 1:  # a tied parameter is clipped once, on the sum over its units
                        tied[p] = g if p not in tied else tied[p] + g
                    else:
                        clip(p, g)
            for p, g in tied.items():
                clip(p, g)
            return sums

        if self.clipping == "ghost":
            return self._ghost_clipped_sums(noises, scale, gs)
        sq = torch.zeros(self._batch_size(), dtype=torch.float32)
        materialised = {}
        for u in units:
            for p, g in self._materialise(u).items():
                materialised[p] = g if p not in materialised else materialised[p] + g
        for g in materialised.values():
            sq = sq + per_sample_sq_norms(g).float().cpu()
        factors = (self.max_grad_norm / (sq.sqrt() * gs + CLIP_EPS)).clamp(max=1.0)
        self.last_clip_factors = factors
        f = factors * gs
        # The fused op reads each per-sample gradient once: clip factors, sum, noise and scale together.
        return {p: clip_sum_noise(g, f.to(g.device), noises.get(p), scale) for p, g in materialised.items()}

    def _ghost_clipped_sums(self, noises: dict, scale: float, gs: float) -> dict:
        """Ghost clipping: each unit with a rule gives one term per parameter (norms and clipped sums from its
        activations and output gradients), the others are materialised; a parameter shared by several units has
        its terms merged, so it is clipped once on its summed per-sample gradient."""
        terms, materialised = {}, {}
        for u in self.capture.units:
            records = self._records(u)
            if not records:
                continue
            unit_terms = ghost.terms_for_unit(u.module, records, u.name)
            if unit_terms is None:
                ghost.warn_materialised(u.module, u.name)
                for p, g in self._materialise(u).items():
                    materialised[p] = g if p not in materialised else materialised[p] + g
                continue
            for p, t in unit_terms.items():
                terms[p] = t if p not in terms else terms[p].merge(t)
        for p in [p for p in terms if p in materialised]:  # tied across a ghost unit and a materialised one
            materialised[p] = materialised[p] + terms.pop(p).per_sample()
        sq = torch.zeros(self._batch_size(), dtype=torch.float32)
        for t in terms.values():
            sq = sq + t.sq_norms().float().cpu()
        for g in materialised.values():
            sq = sq + per_sample_sq_norms(g).float().cpu()
        factors = (self.max_grad_norm / (sq.sqrt() * gs + CLIP_EPS)).clamp(max=1.0)
        self.last_clip_factors = factors
        f = factors * gs
        sums = {p: clip_sum_noise(g, f.to(g.device), noises.get(p), scale) for p, g in materialised.items()}
        for p, t in terms.items():
            held = t.held()
            if held is not None:  # per-sample gradients already exist: the fused reduction
                sums[p] = clip_sum_noise(held, f.to(held.device), noises.get(p), scale)
            else:
                s = t.clipped_sum(f.to(p.device))
                sums[p] = (s + noises[p] if p in noises else s) * scale
        return sums

    def _accumulate(self) -> None:
        batch = self._batch_size()
        for p, s in self._clipped_sums().items():
            self._summed[p] = s if p not in self._summed else self._summed[p] + s
        self._accumulated += batch
        self.capture.clear()

    def virtual_step(self) -> None:
        """Clips this physical batch and keeps the sum, without noise or an optimizer step (gradient accumulation:
        call it after every micro-batch's backward but the last, then ``step()``)."""
        self._accumulate()

    def _noise(self, p: nn.Parameter) -> torch.Tensor | None:
        std = self.noise_multiplier * self.max_grad_norm
        if std == 0:
            return None
        if self.secure_rng:
            return _secure_normal(p.shape, std, p.device)
        return torch.normal(0.0, std, p.shape, generator=self.generator).to(p.device)

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._on_step is not None:
            self._on_step[0]()  # raises PrivacyBudgetExceeded before anything changes
        params = self.params
        noises = {p: n for p in params if (n := self._noise(p)) is not None}
        total = self._accumulated + self._batch_size()
        denominator = self.expected_batch_size or max(total, 1)
        if not self._summed and self._accumulated == 0:
            # One physical batch: clipping, sum, noise and averaging in one pass per parameter.
            grads = self._clipped_sums(noises, 1.0 / denominator)
        else:
            self._accumulate()
            grads = {p: (s + noises[p] if p in noises else s) / denominator for p, s in self._summed.items()}
        for p in params:
            g = grads.get(p)
            if g is None:  # no example reached this parameter: its gradient is the noise alone
                g = noises[p] / denominator if p in noises else torch.zeros_like(p)
            p.grad = g.to(p.dtype)
        self._summed.clear()
        self._accumulated = 0
        self.capture.clear()
        result = self.optimizer.step()
        if self._on_step is not None:
            self._on_step[1]()
        return result

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ the front door
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
        >>> for x, y in train_loader:  # now Poisson-sampled
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
        _check_real("DifferentialPrivacy", "epsilon", epsilon, "positive and finite", lambda v: v > 0)
        _check_real("DifferentialPrivacy", "delta", delta, "in (0, 1)", lambda v: 0 < v < 1)
        if noise_multiplier is not None:
            _check_real(
                "DifferentialPrivacy", "noise_multiplier", noise_multiplier, "non-negative and finite", lambda v: v >= 0
            )
        if epochs is not None:
            _check_real("DifferentialPrivacy", "epochs", epochs, "positive and finite", lambda v: v > 0)
        if noise_multiplier is None and epochs is None:
            raise ValueError(
                "DifferentialPrivacy: give noise_multiplier, or noise_multiplier=None with epochs= so the "
                "noise can be computed from the budget"
            )
        _check_real("DifferentialPrivacy", "max_grad_norm", max_grad_norm, "positive and finite", lambda v: v > 0)
        if clipping not in ("flat", "ghost", "per_layer"):
            raise ValueError(f"DifferentialPrivacy: clipping must be 'flat', 'ghost' or 'per_layer', got {clipping!r}")
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
        """Makes ``optimizer`` differentially private for ``model``, and ``data_loader`` Poisson-sampled (in place).

        Without a ``data_loader``, give ``sample_rate`` and ``dataset_size`` and sample the batches yourself.
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
        _check_real("DifferentialPrivacy.wrap()", "sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
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
            make_poisson(data_loader, sample_rate, self.generator, self.secure_rng)
        self._optimizer = DPOptimizer(
            optimizer,
            Capture(model, self.loss_reduction),
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=sample_rate * dataset_size,
            clipping=self.clipping,
            generator=self.generator,
            secure_rng=self.secure_rng,
            on_step=(self._check_budget, self._record_step),
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
        if clipping not in ("flat", "ghost", "per_layer"):
            raise ValueError(f"clip_only: clipping must be 'flat', 'ghost' or 'per_layer', got {clipping!r}")
        _check_real("clip_only", "max_grad_norm", max_grad_norm, "positive and finite", lambda v: v > 0)
        return DPOptimizer(
            optimizer,
            Capture(model, loss_reduction),
            max_grad_norm=max_grad_norm,
            noise_multiplier=0.0,
            expected_batch_size=None,
            clipping=clipping,
            generator=None,
            secure_rng=False,
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
